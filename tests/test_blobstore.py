"""The vault's blob stores, one class of tests run against each: the local directory and S3 through a real S3
API server on loopback (moto in server mode). Streaming round trips, replacement, no partial blob after a put
that fails or is killed, delete, tamper detection through the vault's read path, and two vault replicas sharing
one database and one bucket.

The S3 variant skips only when boto3 or moto is missing and TENSAFE_REQUIRE_S3 is unset (CI sets it)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from stores.backends import service_engine

from conftest import BACKENDS, REPO, Process, base_env, free_port, spawn, tensafe_cmd, wait_serving
from tensafe.runtime.config import ConfigError, ServerConfig
from tensafe.runtime.db import create_engine
from tensafe.runtime.errors import IntegrityFailure, NotFound
from tensafe.vault.blobs import BlobStore, LocalBlobStore
from tensafe.vault.keys import LocalMasterKey
from tensafe.vault.service import ArtifactHeader, Vault
from tensafe.vault.servicer import blob_store
from tensafe.vault.store import VaultStore

MIB = 1 << 20
PART = 5 * MIB  # S3's smallest part: blobs above it are multipart uploads
SEGMENT = 64 * 1024
MASTER = os.urandom(32)
HAVE_S3 = all(importlib.util.find_spec(m) is not None for m in ("boto3", "moto"))
REQUIRE_S3 = os.environ.get("TENSAFE_REQUIRE_S3", "") not in ("", "0")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# -- the S3 API server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    if not HAVE_S3:
        if REQUIRE_S3:
            pytest.fail("TENSAFE_REQUIRE_S3 is set but boto3/moto are missing: pip install boto3 'moto[server]'")
        pytest.skip("boto3 or moto is not installed (set TENSAFE_REQUIRE_S3=1 to make this a failure)")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


# -- one backend: how to make a store over the same storage, and how to see its raw objects -----------------
@dataclass
class Backend:
    kind: str
    make: Callable[..., BlobStore]          # a new store instance over the same storage (a restart, a replica)
    raw_get: Callable[[str], bytes]
    raw_put: Callable[[str, bytes], None]
    strays: Callable[[], list[str]]         # what puts in flight left outside the final keys
    child: dict[str, str] = field(default_factory=dict[str, str])  # how a subprocess opens the same store


def local_backend(root: Path) -> Backend:
    def make(**_: Any) -> BlobStore:
        return LocalBlobStore(root)

    def path(key: str) -> Path:
        return LocalBlobStore(root).path_of(key)

    return Backend("local", make, lambda k: path(k).read_bytes(), lambda k, b: path(k).write_bytes(b) and None,
                   lambda: sorted(p.name for p in (root / "tmp").iterdir()), {"kind": "local", "root": str(root)})


def s3_backend(endpoint: str) -> Backend:
    from tensafe.vault.blobstore_s3 import S3BlobStore

    client = s3_client(endpoint)
    bucket = f"tensafe-test-{secrets.token_hex(4)}"
    prefix = "vault/blobs/"
    client.create_bucket(Bucket=bucket)

    def make(**kw: Any) -> BlobStore:
        kw.setdefault("part_size", PART)
        return S3BlobStore(bucket, prefix, endpoint_url=endpoint, **kw)

    def key_of(key: str) -> str:
        return f"{prefix}{key[-2:]}/{key}"

    def strays() -> list[str]:
        return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []))

    return Backend("s3", make, lambda k: client.get_object(Bucket=bucket, Key=key_of(k))["Body"].read(),
                   lambda k, b: client.put_object(Bucket=bucket, Key=key_of(k), Body=b) and None, strays,
                   {"kind": "s3", "endpoint": endpoint, "bucket": bucket, "prefix": prefix})


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path / "blobs")
    return s3_backend(request.getfixturevalue("s3_endpoint"))


def blob_key() -> str:
    return "art_" + secrets.token_hex(12)


def pattern(size: int, seed: int = 0) -> bytes:
    block = os.urandom(MIB) if seed == 0 else bytes([seed]) * MIB
    return (block * (size // MIB + 1))[:size]


def put_blob(store: BlobStore, key: str, data: bytes, chunk: int = 256 * 1024) -> None:
    writer = store.open_writer(key)
    for i in range(0, len(data), chunk):
        writer.write(data[i:i + chunk])
    writer.commit()


def make_vault(store: VaultStore, blobs: BlobStore) -> Vault:
    return Vault(store, blobs, LocalMasterKey(MASTER, "test"), segment_size=SEGMENT)


def chunks_of(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def header() -> ArtifactHeader:
    return ArtifactHeader(kind=1, name="weights", metadata={})


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> sa.Engine:
    return service_engine(request, "vault", tmp_path)


def same_database(engine: sa.Engine) -> sa.Engine:
    """A second engine on ``engine``'s database (and PostgreSQL schema): another replica's connection pool."""
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "sqlite":
        other = create_engine(url)
    else:
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        other = create_engine(url, schema=schema)
    return other


CHILD = r"""
import json, sys
args = json.loads(sys.argv[1])
if args["kind"] == "local":
    from pathlib import Path
    from tensafe.vault.blobs import LocalBlobStore
    store = LocalBlobStore(Path(args["root"]))
else:
    from tensafe.vault.blobstore_s3 import S3BlobStore
    store = S3BlobStore(args["bucket"], args["prefix"], endpoint_url=args["endpoint"], part_size=5 << 20)
writer = store.open_writer(args["key"])
block = bytes(range(256)) * 1024
written = 0
while True:  # never commits: killed mid-write
    writer.write(block)
    written += len(block)
    print(written, flush=True)
"""


class TestBlobStore:
    def test_streaming_round_trip(self, backend: Backend) -> None:
        store = backend.make()
        key, data = blob_key(), pattern(2 * PART + 12345)
        writer = store.open_writer(key)
        buffered = 0
        for i in range(0, len(data), 256 * 1024):
            writer.write(data[i:i + 256 * 1024])
            buffered = max(buffered, len(getattr(writer, "_buf", b"")))
            assert not store.exists(key), "visible before commit"
        writer.commit()
        assert buffered <= PART + 256 * 1024  # S3: one part in memory at most, whatever the blob's size
        assert store.exists(key) and store.size(key) == len(data)
        got = list(store.read(key, chunk_size=MIB, first=100))
        assert [len(c) for c in got] == [100] + [MIB] * ((len(data) - 100) // MIB) + [(len(data) - 100) % MIB]
        assert b"".join(got) == data
        assert b"".join(store.read(key)) == data
        assert b"".join(backend.make().read(key)) == data  # another instance (a restart, a replica)
        assert backend.strays() == []
        empty = blob_key()
        put_blob(store, empty, b"")
        assert store.size(empty) == 0 and b"".join(store.read(empty)) == b""

    def test_a_put_replaces_whole_and_an_aborted_one_changes_nothing(self, backend: Backend) -> None:
        store = backend.make()
        key, first, second = blob_key(), pattern(PART + 10, seed=1), pattern(3 * MIB, seed=2)
        put_blob(store, key, first)
        writer = store.open_writer(key)
        writer.write(second)
        writer.write(second)  # past one part: S3 has started a multipart upload
        assert b"".join(store.read(key)) == first
        writer.abort()
        writer.abort()  # idempotent
        assert b"".join(store.read(key)) == first and backend.strays() == []
        put_blob(store, key, second)
        assert b"".join(store.read(key)) == second and store.size(key) == len(second)

    def test_a_put_that_fails_midway_leaves_nothing(self, backend: Backend, db: sa.Engine) -> None:
        vault = make_vault(VaultStore(db), backend.make())

        def failing() -> Iterator[bytes]:
            yield from chunks_of(pattern(PART + MIB))  # a multipart upload is under way on S3
            raise ConnectionError("client went away")

        with pytest.raises(ConnectionError):
            vault.put("t1", header(), failing())
        assert vault.list("t1", 0, "", None, 10) == []
        assert backend.strays() == []  # the temporary file / the multipart upload were removed
        if backend.kind == "local":
            assert [p for p in vault.blobs.root.rglob("*") if p.is_file()] == []  # type: ignore[attr-defined]

    def test_a_killed_put_leaves_nothing_under_its_key(self, backend: Backend) -> None:
        key = blob_key()
        env = dict(os.environ, **S3_ENV, PYTHONPATH=os.pathsep.join(
            [str(REPO / "services"), str(REPO / "sdk"), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dict(backend.child, key=key))],
                                stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # at least two parts sent (S3), 12 MiB in the temporary file (local)
                if int(line) >= 12 * MIB:
                    break
            else:
                pytest.fail(f"the writer ended by itself: {proc.wait()}")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        strays = backend.strays()
        assert len(strays) == 1 and key in strays[0]  # what it left is elsewhere, never read as the blob
        if backend.kind == "s3":
            # A young upload may be another replica's live put: kept. (moto reports every upload as started
            # in 2010, so its start is shown as now, as S3 would.)
            store: Any = backend.make(stale_upload_seconds=None)
            paginator = store.client.get_paginator

            def recent(name: str) -> Any:
                pages = paginator(name)
                now = datetime.now(UTC)

                class Recent:
                    def paginate(self, **kw: Any) -> Iterator[dict[str, Any]]:
                        for page in pages.paginate(**kw):
                            yield dict(page, Uploads=[dict(u, Initiated=now) for u in page.get("Uploads", [])])
                return Recent()

            store.client.get_paginator = recent
            assert store.abort_stale_uploads(3600) == 0 and backend.strays() == strays
            assert not store.exists(key)
            with pytest.raises(FileNotFoundError):
                b"".join(store.read(key))
        store = backend.make(stale_upload_seconds=0)  # a (re)start removes stale leftovers
        assert backend.strays() == []
        assert not store.exists(key)
        with pytest.raises(FileNotFoundError):
            b"".join(store.read(key))

    def test_delete(self, backend: Backend) -> None:
        store = backend.make()
        key, other = blob_key(), blob_key()
        put_blob(store, key, b"x" * 1000)
        put_blob(store, other, b"y")
        store.delete(key)
        assert not store.exists(key) and store.exists(other)
        with pytest.raises(FileNotFoundError):
            store.size(key)
        with pytest.raises(FileNotFoundError):
            b"".join(store.read(key))
        store.delete(key)  # nothing there: no error
        with pytest.raises(ValueError):
            store.delete("../" + other)

    def test_a_tampered_blob_is_refused_by_the_vault(self, backend: Backend, db: sa.Engine) -> None:
        vault = make_vault(VaultStore(db), backend.make())
        data = pattern(3 * SEGMENT + 5)
        art = vault.put("t1", header(), chunks_of(data)).artifact_id
        key = vault.describe("t1", art).blob_key
        original = backend.raw_get(key)
        for bad in (original[:-1] + bytes([original[-1] ^ 1]), original[:-SEGMENT - 16],
                    original[:200] + bytes([original[200] ^ 1]) + original[201:]):
            backend.raw_put(key, bad)
            with pytest.raises(IntegrityFailure, match=art):
                b"".join(vault.read("t1", art)[1])
        vault.blobs.delete(key)
        with pytest.raises(IntegrityFailure, match="missing"):
            b"".join(vault.read("t1", art)[1])
        backend.raw_put(key, original)
        assert b"".join(vault.read("t1", art)[1]) == data

    def test_two_vault_replicas_share_artifacts(self, backend: Backend, db: sa.Engine) -> None:
        one = make_vault(VaultStore(db), backend.make())
        two = make_vault(VaultStore(same_database(db)), backend.make())
        data = pattern(PART + 3 * SEGMENT + 1)
        art = one.put("t1", header(), chunks_of(data)).artifact_id
        assert b"".join(two.read("t1", art)[1]) == data
        assert b"".join(two.pull("t1", art)[1]) == backend.raw_get(two.describe("t1", art).blob_key)
        other = two.put("t1", header(), chunks_of(b"from two")).artifact_id
        assert b"".join(one.read("t1", other)[1]) == b"from two"
        key = one.describe("t1", art).blob_key
        two.delete("t1", art)
        assert not one.blobs.exists(key)
        with pytest.raises(NotFound):
            one.read("t1", art)
        two.store.engine.dispose()


# -- S3 only ------------------------------------------------------------------------------------------------
def test_s3_read_resumes_after_a_dropped_connection(s3_endpoint: str) -> None:
    backend = s3_backend(s3_endpoint)
    store: Any = backend.make()
    key, data = blob_key(), pattern(3 * MIB + 7)
    put_blob(store, key, data)
    real_get = store.get_object
    calls: list[tuple[int, str | None]] = []

    class Dropping:
        def __init__(self, body: Any) -> None:
            self.body, self.sent = body, 0

        def read(self, n: int) -> bytes:
            if self.sent > MIB:
                raise ConnectionResetError("connection reset by peer")
            out = self.body.read(min(n, 100_000))
            self.sent += len(out)
            return out

        def close(self) -> None:
            self.body.close()

    def get_object(k: str, offset: int, etag: str | None) -> Any:
        calls.append((offset, etag))
        response = real_get(k, offset, etag)
        return dict(response, Body=Dropping(response["Body"])) if len(calls) == 1 else response

    store.get_object = get_object
    assert b"".join(store.read(key, chunk_size=MIB, first=10)) == data
    assert len(calls) == 2 and calls[0] == (0, None) and calls[1][0] > MIB and calls[1][1]


def test_s3_store_from_the_server_settings(s3_endpoint: str, tmp_path: Path) -> None:
    from tensafe.vault.blobstore_s3 import S3BlobStore

    client = s3_client(s3_endpoint)
    bucket = f"tensafe-cfg-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    none = tmp_path / "none.env"
    # TENSAFE_BLOB_DIR (the chart and compose set it for the local store) is unused with s3.
    env = {"TENSAFE_BLOB_DIR": str(tmp_path / "blobs"), "TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": bucket,
           "TENSAFE_BLOB_PREFIX": "tensafe/blobs",
           "TENSAFE_BLOB_ENDPOINT_URL": s3_endpoint, "TENSAFE_BLOB_REGION": "us-east-1"}
    store = blob_store(ServerConfig.load(environ=env, env_file=none, data_dir=tmp_path))
    assert isinstance(store, S3BlobStore) and store.prefix == "tensafe/blobs/"
    key = blob_key()
    put_blob(store, key, b"abc")
    assert client.head_object(Bucket=bucket, Key=f"tensafe/blobs/{key[-2:]}/{key}")["ContentLength"] == 3
    assert not (tmp_path / "blobs").exists()  # nothing local on the side
    # A bucket that is not there: a clear startup error, not a failure at the first put.
    with pytest.raises(ConfigError, match=r"TENSAFE_BLOB_BUCKET='tensafe-missing'.*no such bucket"):
        blob_store(ServerConfig.load(environ=dict(env, TENSAFE_BLOB_BUCKET="tensafe-missing"), env_file=none))


def test_two_vault_servers_share_one_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    """Two `tensafe serve vault` processes, one database and one bucket: an artifact put through one is read
    and deleted through the other, over gRPC with the SDK; nothing is written to a local blob dir."""
    from tg_tinker import NotFoundError, ServiceClient

    backend = s3_backend(s3_endpoint)
    data_dir = tmp_path / "data"
    env = base_env(**S3_ENV, TENSAFE_BLOB_STORE="s3", TENSAFE_BLOB_BUCKET=backend.child["bucket"],
                   TENSAFE_BLOB_PREFIX=backend.child["prefix"], TENSAFE_BLOB_ENDPOINT_URL=s3_endpoint)
    init = subprocess.run(tensafe_cmd("init", "--data-dir", str(data_dir)), env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert init.returncode == 0, init.stderr
    api_key = (data_dir / "api_key").read_text().strip()
    servers: list[tuple[Process, str]] = []
    try:
        for i in range(2):  # one after the other: the first runs the vault's migrations
            port = free_port()
            proc = spawn(tensafe_cmd("serve", "vault", "--data-dir", str(data_dir), "--port", str(port)), env,
                         tmp_path / f"vault{i}.log")
            servers.append((proc, f"127.0.0.1:{port}"))
            wait_serving(servers[-1][1], ("vault",), proc)
        (_, one), (_, two) = servers
        data = pattern(PART + 2 * MIB + 3)
        with ServiceClient(api_key=api_key, base_url=one, retry_count=0) as a, \
                ServiceClient(api_key=api_key, base_url=two, retry_count=0) as b:
            info = a.artifacts.put(data, name="shared")
            assert b.get_artifact(info.artifact_id) == data
            assert b.describe_artifact(info.artifact_id).sha256 == info.sha256
            key = info.artifact_id
            assert len(backend.raw_get(key)) == info.stored_size_bytes
            b.delete_artifact(info.artifact_id)
            with pytest.raises(NotFoundError):
                a.describe_artifact(info.artifact_id)
        with pytest.raises(Exception, match="NoSuchKey"):
            backend.raw_get(key)
        assert backend.strays() == []
        assert not (data_dir / "blobs").exists()
    finally:
        for proc, _ in servers:
            assert proc.stop() == 0, proc.output()
