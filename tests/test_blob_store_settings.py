"""Which blob store the vault's server settings choose: the local directory by default (the layout existing data
dirs have), S3 when asked, and settings that could not work refused when they are loaded, each naming the setting.
The stores themselves, and S3 from the settings against a real S3 API server: test_blobstore.py."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

from tensafe.runtime.config import ConfigError, ServerConfig
from tensafe.vault.blobs import LocalBlobStore
from tensafe.vault.servicer import blob_store


def test_default_is_the_local_directory(tmp_path: Path) -> None:
    cfg = ServerConfig.load(environ={}, env_file=tmp_path / "none.env", data_dir=tmp_path)
    store = blob_store(cfg)
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "blobs"
    key = "art_" + secrets.token_hex(12)
    writer = store.open_writer(key)
    writer.write(b"abc")
    writer.commit()
    assert (tmp_path / "blobs" / key[-2:] / key).read_bytes() == b"abc"  # the layout existing data dirs have


@pytest.mark.parametrize(("env", "message"), [
    ({"TENSAFE_BLOB_STORE": "gcs"}, "TENSAFE_BLOB_STORE='gcs': use local or s3"),
    ({"TENSAFE_BLOB_STORE": "s3"}, "needs TENSAFE_BLOB_BUCKET"),
    ({"TENSAFE_BLOB_BUCKET": "b-1"}, "TENSAFE_BLOB_BUCKET set but TENSAFE_BLOB_STORE=local"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "Bad_Bucket"}, "not a bucket name"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "192.168.1.1"}, "not a bucket name"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1", "TENSAFE_BLOB_PREFIX": "a/../b"},
     "TENSAFE_BLOB_PREFIX"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1", "TENSAFE_BLOB_PREFIX": "/abs"},
     "TENSAFE_BLOB_PREFIX"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1",
      "TENSAFE_BLOB_ENDPOINT_URL": "http://key:secret@minio:9000"}, "never from the URL"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1", "TENSAFE_BLOB_ENDPOINT_URL": "minio:9000"},
     "TENSAFE_BLOB_ENDPOINT_URL"),
    ({"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1", "TENSAFE_BLOB_REGION": "US East"},
     "TENSAFE_BLOB_REGION"),
])
def test_bad_blob_store_settings_are_refused_at_load(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.load(environ=env, env_file=tmp_path / "none.env")


def test_s3_without_boto3_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ServerConfig.load(environ={"TENSAFE_BLOB_STORE": "s3", "TENSAFE_BLOB_BUCKET": "b-1"},
                            env_file=tmp_path / "none.env", data_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"needs boto3.*pip install 'tensafe\[s3\]'"):
        blob_store(cfg)
    assert not (tmp_path / "blobs").exists()  # no local store in its place
