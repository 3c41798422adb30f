"""The vault's logic (service.Vault) in-process over its real store, on SQLite and PostgreSQL: envelope
encryption round trips, tamper detection, key rotation and shredding."""

from __future__ import annotations

import hashlib
import os

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.runtime.errors import IntegrityFailure, InvalidArgument, NotFound, QuotaExceeded, TenantShredded
from tensafe.vault.blobs import LocalBlobStore
from tensafe.vault.keys import LocalMasterKey
from tensafe.vault.quotas import StorageLimits
from tensafe.vault.service import ArtifactHeader, Vault
from tensafe.vault.store import ACTIVE, DESTROYED, SHREDDED, VaultStore, artifacts
from tg_tinker.container import decrypt_bytes

SEGMENT = 4096
MASTER = os.urandom(32)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> VaultStore:
    return VaultStore(service_engine(request, "vault", tmp_path))


def make_vault(store: VaultStore, root, master: bytes = MASTER, limits: StorageLimits | None = None) -> Vault:
    return Vault(store, LocalBlobStore(root / "blobs"), LocalMasterKey(master, "test"), segment_size=SEGMENT,
                 limits=limits)


def put(vault: Vault, tenant: str, data: bytes, **header) -> str:
    header.setdefault("kind", 1)
    header.setdefault("name", "n")
    header.setdefault("metadata", {})
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    return vault.put(tenant, ArtifactHeader(**header), iter(chunks)).artifact_id


def read(vault: Vault, tenant: str, artifact_id: str) -> bytes:
    _, plaintext = vault.read(tenant, artifact_id)
    return b"".join(plaintext)


class TestVaultService:
    def test_envelope_round_trip(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        data = os.urandom(5 * SEGMENT + 17)
        art = put(vault, "t1", data, name="weights", metadata={"step": 2},
                  expected_sha256=hashlib.sha256(data).digest())
        assert read(vault, "t1", art) == data
        record = vault.describe("t1", art)
        assert (record.size_bytes, record.plaintext_sha256, record.metadata) == \
            (len(data), hashlib.sha256(data).digest(), {"step": 2})
        # Stored encrypted: the blob holds no plaintext segment, and only a wrapped data key is in the record.
        stored = vault.blobs.path_of(record.blob_key).read_bytes()
        assert len(stored) == record.stored_size and data[:SEGMENT] not in stored
        _, dek = vault.unwrap_data_key("t1", art)
        assert record.wrapped_dek != dek and dek not in record.wrapped_dek
        # The owner decrypts the pulled container with the data key, as the SDK does.
        _, pulled = vault.pull("t1", art)
        assert decrypt_bytes(b"".join(pulled), dek, "t1", art) == data
        # A restarted vault (same master key) reads it.
        assert read(make_vault(store, tmp_path), "t1", art) == data

    def test_another_tenant_sees_nothing(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        art = put(vault, "t1", b"secret")
        for call in (vault.describe, vault.read, vault.pull, vault.unwrap_data_key, vault.delete):
            with pytest.raises(NotFound):
                call("t2", art)
        assert vault.list("t2", 0, "", None, 10) == []
        assert read(vault, "t1", art) == b"secret"

    def test_tampered_blob_is_detected_naming_the_artifact(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        data = os.urandom(3 * SEGMENT)
        art = put(vault, "t1", data)
        path = vault.blobs.path_of(vault.describe("t1", art).blob_key)
        original = path.read_bytes()
        for bad in (original[:-1] + bytes([original[-1] ^ 1]), original[:-SEGMENT - 16],
                    original[:200] + bytes([original[200] ^ 1]) + original[201:]):
            path.write_bytes(bad)
            with pytest.raises(IntegrityFailure, match=art):
                read(vault, "t1", art)
        path.unlink()
        with pytest.raises(IntegrityFailure, match="missing"):
            read(vault, "t1", art)
        path.write_bytes(original)
        assert read(vault, "t1", art) == data

    def test_altered_wrapped_key_or_wrong_master_is_detected(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        art = put(vault, "t1", b"abc" * 100)
        with pytest.raises(IntegrityFailure, match="master key"):
            read(make_vault(store, tmp_path, master=os.urandom(32)), "t1", art)
        wrapped = vault.describe("t1", art).wrapped_dek
        with store.engine.begin() as conn:
            conn.execute(artifacts.update().where(artifacts.c.artifact_id == art)
                         .values(wrapped_dek=wrapped[:-1] + bytes([wrapped[-1] ^ 1])))
        with pytest.raises(IntegrityFailure, match=art):
            read(vault, "t1", art)

    def test_expected_sha256_mismatch_keeps_nothing(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        with pytest.raises(IntegrityFailure):
            put(vault, "t1", b"payload", expected_sha256=hashlib.sha256(b"other").digest())
        assert vault.list("t1", 0, "", None, 10) == []
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
        with pytest.raises(InvalidArgument):
            put(vault, "t1", b"payload", name="x" * 300)

    def test_rotate_rewraps_every_key_and_data_stays_readable(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        data = {put(vault, "t1", os.urandom(100 + i)): None for i in range(3)}
        for art in data:
            data[art] = read(vault, "t1", art)
        info, count = vault.rotate("t1")
        assert count == 3 and info.current_version == 2
        assert [(v, s, n) for v, s, n, _ in info.versions] == [(1, DESTROYED, 0), (2, ACTIVE, 3)]
        for art, plain in data.items():
            assert vault.describe("t1", art).kek_version == 2
            assert read(vault, "t1", art) == plain
        new = put(vault, "t1", b"after")
        assert vault.describe("t1", new).kek_version == 2 and read(vault, "t1", new) == b"after"
        assert vault.key_info("t1").key_id == info.key_id  # stable across versions

    def test_shred_makes_everything_unreadable_for_good(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path)
        arts = [put(vault, "t1", b"one"), put(vault, "t1", b"two")]
        kept = put(vault, "t2", b"other tenant")
        with pytest.raises(InvalidArgument):
            vault.shred("t1", "t2")
        info, count = vault.shred("t1", "t1")
        assert count == 2 and info.shredded_at is not None
        assert all(state == DESTROYED for _, state, _, _ in info.versions)
        for art in arts:
            assert vault.describe("t1", art).state == SHREDDED
            for call in (vault.read, vault.pull, vault.unwrap_data_key):
                with pytest.raises(TenantShredded):
                    call("t1", art)
        with pytest.raises(TenantShredded):
            put(vault, "t1", b"more")
        with pytest.raises(TenantShredded):
            vault.rotate("t1")
        assert read(vault, "t2", kept) == b"other tenant"
        vault.delete("t1", arts[0])
        with pytest.raises(NotFound):
            vault.describe("t1", arts[0])

    def test_quota_refuses_and_keeps_nothing(self, store: VaultStore, tmp_path) -> None:
        vault = make_vault(store, tmp_path, limits=StorageLimits(stored_bytes=0, artifacts=2))
        put(vault, "t1", b"a")
        put(vault, "t1", b"b")
        with pytest.raises(QuotaExceeded):
            put(vault, "t1", b"c")
        assert len(vault.list("t1", 0, "", None, 10)) == 2
        put(vault, "t2", b"other tenant's own quota")
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(artifacts)).scalar_one() == 3
