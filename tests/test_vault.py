"""The vault against a real `tensafe up` (SQLite and PostgreSQL): envelope encryption, tampering,
tenant isolation, key rotation and shredding, atomic puts, constant memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import REPO, start_stack
from tg_tinker import ConflictError, IntegrityError, NotFoundError, ValidationError

MARKER = b"PLAINTEXT-MARKER-5f1c"


def new_tenant(stack, name: str):
    out = stack.cli("keys", "create", "--tenant", name)
    assert out.returncode == 0, out.stderr
    return stack.client(api_key=out.stdout.strip().splitlines()[-1], retry_count=0)


def blob_path(stack, artifact_id: str) -> Path:
    return stack.data_dir / "blobs" / artifact_id[-2:] / artifact_id


def test_put_get_pull_and_local_decrypt(stack) -> None:
    data = (MARKER + os.urandom(1000)) * 3000  # ~3 MiB: several 1 MiB segments
    with new_tenant(stack, "roundtrip") as client:
        info = client.artifacts.put(data, kind="other", name="notes", metadata={"epoch": 3, "ok": True})
        assert info.size_bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.encryption.algorithm == "AES-256-GCM" and info.metadata == {"epoch": 3, "ok": True}
        assert info.encryption.key_id.startswith("kek_") and info.encryption.kek_version == 1
        assert client.get_artifact(info.artifact_id) == data
        container = client.pull_artifact(info.artifact_id)
        assert len(container) == info.stored_size_bytes and MARKER not in container
        assert client.decrypt_artifact(container) == data
        assert [a.artifact_id for a in client.list_artifacts()] == [info.artifact_id]
        # Nothing on disk holds the plaintext: not the blob, not the database.
        assert MARKER not in blob_path(stack, info.artifact_id).read_bytes()
        for db in stack.data_dir.glob("*.db*"):
            assert MARKER not in db.read_bytes()
        client.delete_artifact(info.artifact_id)
        assert not blob_path(stack, info.artifact_id).exists()
        with pytest.raises(NotFoundError):
            client.describe_artifact(info.artifact_id)


def test_other_tenants_see_nothing(stack) -> None:
    with new_tenant(stack, "owner") as owner, new_tenant(stack, "stranger") as stranger:
        info = owner.artifacts.put(b"secret", name="mine")
        container = owner.pull_artifact(info.artifact_id)
        for call in (lambda: stranger.get_artifact(info.artifact_id),
                     lambda: stranger.pull_artifact(info.artifact_id),
                     lambda: stranger.describe_artifact(info.artifact_id),
                     lambda: stranger.delete_artifact(info.artifact_id),
                     lambda: stranger.decrypt_artifact(container)):
            with pytest.raises(NotFoundError):
                call()
        assert stranger.list_artifacts() == []
        assert owner.get_artifact(info.artifact_id) == b"secret"


def _tamper_cases(container: bytes, header_len: int, other: bytes) -> dict[str, bytes]:
    seg = 1024 * 1024 + 16
    body = container[header_len:]
    segments = [body[i:i + seg] for i in range(0, len(body), seg)]
    assert len(segments) >= 3
    flipped = bytearray(container)
    flipped[header_len + seg + 100] ^= 1
    header_flip = bytearray(container)
    header_flip[10] ^= 1
    return {
        "flipped byte": bytes(flipped),
        "flipped header byte": bytes(header_flip),
        "reordered": container[:header_len] + segments[1] + segments[0] + b"".join(segments[2:]),
        "dropped": container[:header_len] + segments[0] + b"".join(segments[2:]),
        "truncated": container[:header_len] + b"".join(segments[:-1]),
        "truncated mid-segment": container[:-100],
        "spliced": container[:header_len] + other[header_len:header_len + seg] + b"".join(segments[1:]),
        "swapped header": other[:header_len] + body,
        "trailing": container + b"x",
    }


def test_every_tampering_is_detected_naming_the_artifact(stack) -> None:
    from tg_tinker.container import read_header

    data = os.urandom(3 * 1024 * 1024 + 5)
    with new_tenant(stack, "tamper") as client:
        info = client.artifacts.put(data, name="target")
        other = client.artifacts.put(os.urandom(len(data)), name="other")
        path = blob_path(stack, info.artifact_id)
        original = path.read_bytes()
        _, header_len = read_header(original)
        for case, bad in _tamper_cases(original, header_len, blob_path(stack, other.artifact_id).read_bytes()).items():
            path.write_bytes(bad)
            with pytest.raises(IntegrityError) as err:
                client.get_artifact(info.artifact_id)
            assert info.artifact_id in str(err.value), case
            with pytest.raises(IntegrityError):  # the tenant's own local decryption refuses it too
                client.decrypt_artifact(bad)
        path.write_bytes(original)
        assert client.get_artifact(info.artifact_id) == data


def test_altered_wrapped_key_is_detected(stack) -> None:
    with new_tenant(stack, "dbtamper") as client:
        info = client.artifacts.put(b"abc" * 100, name="k")
        url = stack.env.get("TENSAFE_DB_URL") or f"sqlite:///{stack.data_dir / 'vault.db'}"
        schema = stack.env.get("TENSAFE_DB_SCHEMA_PREFIX", "tensafe_") + "vault"
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        table = f'"{schema}".vault_artifacts' if "postgresql" in url else "vault_artifacts"
        with engine.begin() as conn:
            wrapped = conn.execute(sa.text(f"SELECT wrapped_dek FROM {table} WHERE artifact_id = :a"),
                                   {"a": info.artifact_id}).scalar_one()
            bad = bytes(wrapped[:-1]) + bytes([wrapped[-1] ^ 1])
            conn.execute(sa.text(f"UPDATE {table} SET wrapped_dek = :w WHERE artifact_id = :a"),
                         {"w": bad, "a": info.artifact_id})
        engine.dispose()
        with pytest.raises(IntegrityError) as err:
            client.get_artifact(info.artifact_id)
        assert info.artifact_id in str(err.value)


def test_rotate_then_read_and_shred(stack) -> None:
    with new_tenant(stack, "lifecycle") as client:
        first = client.artifacts.put(b"one" * 1000, name="a")
        second = client.artifacts.put(b"two" * 1000, name="b")
        info, rewrapped = client.artifacts.rotate_key()
        assert rewrapped == 2 and info.current_version == 2
        assert {v["version"]: v["state"] for v in info.versions} == {1: "destroyed", 2: "active"}
        assert client.get_artifact(first.artifact_id) == b"one" * 1000
        assert client.describe_artifact(second.artifact_id).encryption.kek_version == 2
        third = client.artifacts.put(b"three", name="c")
        assert client.describe_artifact(third.artifact_id).encryption.kek_version == 2
        with pytest.raises(ValidationError):
            client.artifacts.shred("someone-else")
        info, count = client.artifacts.shred("lifecycle")
        assert info.shredded and count == 3
        for art in (first, second, third):
            with pytest.raises(ConflictError) as err:
                client.get_artifact(art.artifact_id)
            assert err.value.code == "TENANT_SHREDDED" and "shredded" in str(err.value)
            assert client.describe_artifact(art.artifact_id).state == "shredded"
        with pytest.raises(ConflictError):
            client.artifacts.put(b"more")


def test_put_stopped_half_way_leaves_nothing(stack) -> None:
    with new_tenant(stack, "halfway") as client:
        def dying():
            yield MARKER * 1000
            yield os.urandom(2 << 20)
            raise RuntimeError("client died")

        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, the vault keeps nothing
            client.artifacts.put(dying(), name="half")
        time.sleep(0.5)
        assert client.list_artifacts() == []
        assert list((stack.data_dir / "blobs" / "tmp").iterdir()) == []


@pytest.mark.slow
def test_256_mib_in_constant_memory_and_a_killed_put(tmp_path) -> None:
    """Peak server memory does not grow with artifact size; a server killed mid-put shows no artifact."""
    s = start_stack(tmp_path)
    try:
        client = s.client(retry_count=0)

        def stream(total: int, block: bytes = os.urandom(1 << 20)):
            for _ in range(total // len(block)):
                yield block

        def peak() -> int:
            status = Path(f"/proc/{s.process.proc.pid}/status").read_text()
            return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) // 1024

        sizes = {}
        for mib in (16, 256):
            info = client.artifacts.put(stream(mib << 20), name=f"{mib}")
            digest = hashlib.sha256()
            for chunk in client.artifacts.iter_plaintext(info.artifact_id):
                digest.update(chunk)
            assert digest.hexdigest() == info.sha256 and info.size_bytes == mib << 20
            sizes[mib] = peak()
        assert sizes[256] - sizes[16] < 64, sizes  # MiB: a 16x larger artifact, about the same peak
        client.close()
    finally:
        s.process.stop()
    # Kill -9 in the middle of a put: after a restart, no artifact and no temporary file.
    s = start_stack(tmp_path, data_dir=s.data_dir)
    script = (f"import os\nfrom tg_tinker import ServiceClient\n"
              f"c = ServiceClient(api_key={s.api_key!r}, base_url={s.target!r}, retry_count=0)\n"
              "def gen():\n    import time\n    for _ in range(10_000):\n        yield os.urandom(1 << 20)\n"
              "        time.sleep(0.01)\nc.artifacts.put(gen(), name='doomed')\n")
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        time.sleep(3)
        parts = list((s.data_dir / "blobs" / "tmp").glob("*.part"))
        assert parts, "the put should be in progress"
        s.process.proc.kill()
        s.process.proc.wait(10)
    finally:
        writer.kill()
    s = start_stack(tmp_path, data_dir=s.data_dir)
    try:
        with s.client() as client:
            assert [a.name for a in client.list_artifacts()] == ["16", "256"]
        assert list((s.data_dir / "blobs" / "tmp").glob("*.part")) == []
    finally:
        s.process.stop()
