"""VaultStore below the stack: one class, run on SQLite and PostgreSQL (conftest.BACKENDS)."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.vault.store import ACTIVE, AVAILABLE, DESTROYED, RETIRED, SHREDDED, ArtifactRecord, VaultStore


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> VaultStore:
    return VaultStore(service_engine(request, "vault", tmp_path))


def record(tenant: str, artifact_id: str, *, created_at: float = 1.0, kind: int = 1, session_id: str = "",
           kek_version: int = 1, stored_size: int = 100, lineage_json: str | None = None) -> ArtifactRecord:
    return ArtifactRecord(
        artifact_id=artifact_id, tenant_id=tenant, kind=kind, name=f"name of {artifact_id}",
        content_type="application/x-test", session_id=session_id, metadata={"step": 3, "tags": ["a", "b"]},
        size_bytes=stored_size - 40, plaintext_sha256=os.urandom(32), stored_size=stored_size, format_version=1,
        segment_size=65536, kek_version=kek_version, wrapped_dek=os.urandom(60), blob_key=artifact_id,
        state=AVAILABLE, created_at=created_at, lineage_json=lineage_json)


class TestVaultStore:
    # -- tenants and KEKs --------------------------------------------------------------------------
    def test_a_new_tenant_has_one_active_kek(self, store: VaultStore) -> None:
        assert store.tenant("t1") is None
        wrapped = os.urandom(60)
        created = store.add_tenant("t1", "kek_abc", wrapped)
        assert (created.tenant_id, created.key_id, created.current_version, created.shredded_at) == \
            ("t1", "kek_abc", 1, None)
        assert store.tenant("t1") == created
        [kek] = store.keks("t1")
        assert (kek.version, kek.state, kek.wrapped_kek, kek.wrapped_count) == (1, ACTIVE, wrapped, 0)
        assert store.wrapped_kek("t1", 1) == wrapped
        assert store.wrapped_kek("t1", 2) is None
        assert store.tenant("t2") is None and store.keks("t2") == []

    def test_a_tenant_is_added_once(self, store: VaultStore) -> None:
        store.add_tenant("t1", "kek_a", b"w1")
        with pytest.raises(sa.exc.IntegrityError):
            store.add_tenant("t1", "kek_b", b"w2")
        assert store.tenant("t1").key_id == "kek_a" and store.wrapped_kek("t1", 1) == b"w1"

    def test_keks_count_the_data_keys_they_wrap(self, store: VaultStore) -> None:
        store.add_tenant("t1", "k", b"w")
        store.add_tenant("t2", "k2", b"w")
        for i in range(3):
            store.insert_artifact(record("t1", f"art_{i}"))
        store.insert_artifact(record("t2", "art_other"))
        assert [k.wrapped_count for k in store.keks("t1")] == [3]
        assert [k.wrapped_count for k in store.keks("t2")] == [1]

    def test_rotate_rewraps_and_destroys_the_versions_left_empty(self, store: VaultStore) -> None:
        store.add_tenant("t1", "k", b"kek1")
        store.insert_artifact(record("t1", "art_a"))
        store.insert_artifact(record("t1", "art_b"))
        store.rotate("t1", 2, b"kek2", {"art_a": (1, b"dek_a2"), "art_b": (1, b"dek_b2")})
        assert store.tenant("t1").current_version == 2
        states = {k.version: (k.state, k.wrapped_kek, k.wrapped_count) for k in store.keks("t1")}
        assert states == {1: (DESTROYED, None, 0), 2: (ACTIVE, b"kek2", 2)}
        a = store.get_artifact("t1", "art_a")
        assert (a.kek_version, a.wrapped_dek) == (2, b"dek_a2")

    def test_rotate_keeps_a_version_that_still_wraps_a_key(self, store: VaultStore) -> None:
        store.add_tenant("t1", "k", b"kek1")
        store.insert_artifact(record("t1", "art_a"))
        store.insert_artifact(record("t1", "art_b"))
        # art_b is not in the rewrap (e.g. put while the rotation read): version 1 must survive for it.
        store.rotate("t1", 2, b"kek2", {"art_a": (1, b"dek_a2")})
        states = {k.version: (k.state, k.wrapped_count) for k in store.keks("t1")}
        assert states == {1: (RETIRED, 1), 2: (ACTIVE, 1)}
        assert store.wrapped_kek("t1", 1) == b"kek1"
        # A rewrap computed from a version the artifact no longer has is not applied.
        store.rotate("t1", 3, b"kek3", {"art_b": (1, b"dek_b3"), "art_a": (1, b"stale")})
        assert store.get_artifact("t1", "art_a").kek_version == 2
        assert store.get_artifact("t1", "art_a").wrapped_dek == b"dek_a2"
        assert store.get_artifact("t1", "art_b").wrapped_dek == b"dek_b3"
        states = {k.version: k.state for k in store.keks("t1")}
        assert states == {1: DESTROYED, 2: RETIRED, 3: ACTIVE}

    def test_shred_destroys_every_key_of_that_tenant_only(self, store: VaultStore) -> None:
        store.add_tenant("t1", "k", b"kek1")
        store.rotate("t1", 2, b"kek2", {})
        store.add_tenant("t2", "k2", b"other")
        for i in range(3):
            store.insert_artifact(record("t1", f"art_{i}", kek_version=2))
        store.insert_artifact(record("t2", "art_t2"))
        assert store.shred("t1", "unused") == 3
        assert store.tenant("t1").shredded_at is not None
        assert all(k.state == DESTROYED and k.wrapped_kek is None for k in store.keks("t1"))
        for i in range(3):
            a = store.get_artifact("t1", f"art_{i}")
            assert (a.state, a.wrapped_dek) == (SHREDDED, None)
        other = store.get_artifact("t2", "art_t2")
        assert other.state == AVAILABLE and other.wrapped_dek is not None
        assert store.tenant("t2").shredded_at is None and store.wrapped_kek("t2", 1) == b"other"

    def test_shred_of_an_unknown_tenant_records_it_shredded(self, store: VaultStore) -> None:
        assert store.shred("t9", "kek_new") == 0
        t = store.tenant("t9")
        assert t.key_id == "kek_new" and t.shredded_at is not None
        assert [(k.state, k.wrapped_kek) for k in store.keks("t9")] == [(DESTROYED, None)]

    # -- artifacts ---------------------------------------------------------------------------------
    def test_artifact_round_trip(self, store: VaultStore) -> None:
        r = record("t1", "art_1", lineage_json='{"session_id": "s"}', session_id="sess_1")
        store.insert_artifact(r)
        assert store.get_artifact("t1", "art_1") == r

    def test_artifact_ids_are_unique(self, store: VaultStore) -> None:
        store.insert_artifact(record("t1", "art_1"))
        with pytest.raises(sa.exc.IntegrityError):
            store.insert_artifact(record("t2", "art_1"))
        assert store.get_artifact("t2", "art_1") is None

    def test_another_tenant_neither_reads_nor_deletes(self, store: VaultStore) -> None:
        store.insert_artifact(record("t1", "art_1"))
        assert store.get_artifact("t2", "art_1") is None
        assert store.list_artifacts("t2", 0, "", None, 100) == []
        assert store.delete_artifact("t2", "art_1") is False
        assert store.get_artifact("t1", "art_1") is not None
        assert store.delete_artifact("t1", "art_1") is True
        assert store.get_artifact("t1", "art_1") is None
        assert store.delete_artifact("t1", "art_1") is False

    def test_list_pages_in_created_order_with_filters(self, store: VaultStore) -> None:
        # Same created_at for some: the artifact id breaks the tie.
        times = {"art_c": 1.0, "art_a": 2.0, "art_b": 2.0, "art_d": 3.0, "art_e": 4.0}
        for art, t in times.items():
            store.insert_artifact(record("t1", art, created_at=t, kind=2 if art in ("art_b", "art_e") else 1,
                                         session_id="s1" if art != "art_d" else "s2"))
        store.insert_artifact(record("t2", "art_x", created_at=2.5))
        order = ["art_c", "art_a", "art_b", "art_d", "art_e"]
        assert [r.artifact_id for r in store.list_artifacts("t1", 0, "", None, 100)] == order
        pages, after = [], None
        while True:
            page = store.list_artifacts("t1", 0, "", after, 2)
            if not page:
                break
            pages.append([r.artifact_id for r in page])
            after = (page[-1].created_at, page[-1].artifact_id)
        assert pages == [["art_c", "art_a"], ["art_b", "art_d"], ["art_e"]]
        assert [r.artifact_id for r in store.list_artifacts("t1", 2, "", None, 100)] == ["art_b", "art_e"]
        assert [r.artifact_id for r in store.list_artifacts("t1", 0, "s2", None, 100)] == ["art_d"]
        assert [r.artifact_id for r in store.list_artifacts("t1", 1, "s1", (1.0, "art_c"), 100)] == ["art_a"]

    def test_usage_counts_the_tenants_stored_bytes(self, store: VaultStore) -> None:
        assert store.usage("t1") == (0, 0)
        store.insert_artifact(record("t1", "art_1", stored_size=100))
        store.insert_artifact(record("t1", "art_2", stored_size=250))
        store.insert_artifact(record("t2", "art_3", stored_size=7))
        store.shred("t1", "k")  # shredded artifacts still take room until deleted
        assert store.usage("t1") == (350, 2)
        assert store.usage("t2") == (7, 1)
        store.delete_artifact("t1", "art_1")
        assert store.usage("t1") == (250, 1)
