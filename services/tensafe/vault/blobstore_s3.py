"""The vault's blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...), shared by vault replicas.

Needs boto3 (``pip install 'tensafe[s3]'``). The bucket, the key prefix, the endpoint and the region come from
the server's settings (``TENSAFE_BLOB_*``), the credentials from the standard AWS chain; nothing a tenant
sends selects any of them (blob keys are the vault's own artifact ids).

Objects are ``<prefix><last two characters>/<artifact id>``, the local store's layout, so a blob directory
can be copied into a bucket as it is (``tmp/`` excepted).

No partial object is ever visible under a blob's key, by S3's own atomicity, with no temporary key and no
copy: a blob up to one part (``part_size``, 8 MiB) is one ``PutObject``, which S3 stores whole or not at all
(the body is sent with its length and checksum: a truncated request is refused); a larger one is a multipart
upload, and its object appears, whole, only at ``CompleteMultipartUpload``, sent after the last part by
:meth:`commit`. Until then the parts are invisible to reads and listings of objects. A put that fails or is
aborted aborts its upload; one whose process is killed leaves an incomplete upload, which nothing reads and
which :meth:`S3BlobStore.abort_stale_uploads` (run at start, for uploads older than a day) or the bucket's
``AbortIncompleteMultipartUpload`` lifecycle rule removes. (A temporary key copied into place would not be
more atomic, would write every byte twice, and CopyObject stops at 5 GiB.) Memory per put is at most one
part plus one chunk.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from tensafe.runtime.config import ConfigError

from .blobs import blob_name, check_key

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'tensafe[s3]'"
MIN_PART = 5 << 20          # S3's smallest part but the last
DEFAULT_PART = 8 << 20
STALE_UPLOAD_SECONDS = 24 * 3600
_READ_RETRIES = 3


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise ConfigError(f"TENSAFE_BLOB_STORE=s3 needs boto3, which is not installed: {EXTRA_HINT}") from None


def _error_code(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_MISSING = {"NoSuchKey", "404", "NotFound"}


class _S3Writer:
    def __init__(self, store: S3BlobStore, key: str) -> None:
        self.store, self.key, self.object_key = store, key, store.object_key(key)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError("write after commit or abort")
        self._buf += data
        if len(self._buf) >= self.store.part_size:
            self._upload_part()

    def _upload_part(self) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self._upload_id is None:
            self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.object_key)["UploadId"]
        number = len(self._parts) + 1
        etag = client.upload_part(Bucket=bucket, Key=self.object_key, UploadId=self._upload_id, PartNumber=number,
                                  Body=bytes(self._buf))["ETag"]
        self._parts.append({"PartNumber": number, "ETag": etag})
        self._buf.clear()

    def commit(self) -> None:
        if self._done:
            raise ValueError("commit after commit or abort")
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._upload_id is None:
                client.put_object(Bucket=bucket, Key=self.object_key, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._upload_part()
                client.complete_multipart_upload(Bucket=bucket, Key=self.object_key, UploadId=self._upload_id,
                                                 MultipartUpload={"Parts": self._parts})
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buf = bytearray()

    def abort(self) -> None:
        self._done = True
        self._buf = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.object_key,
                                                         UploadId=upload_id)
            except (self.store.exceptions.BotoCoreError, self.store.exceptions.ClientError) as exc:
                # Invisible either way; abort_stale_uploads removes it later.
                log.warning("could not abort the upload of blob %s (%s); it is never read, and is removed "
                            "after %d s", self.key, exc, STALE_UPLOAD_SECONDS)


class _ObjectReader:
    def __init__(self, store: S3BlobStore, key: str) -> None:
        self.store, self.key = store, key
        response = store.get_object(key, 0, None)
        self.etag: str = response["ETag"]
        self.body: Any = response["Body"]
        self.offset = 0
        self.retries = 0

    def take(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the object."""
        out = bytearray()
        while len(out) < n:
            try:
                part: bytes = self.body.read(n - len(out))
            except (self.store.exceptions.BotoCoreError, OSError) as exc:
                if self.retries >= _READ_RETRIES:
                    raise
                self.retries += 1
                log.warning("reading blob %s: %s; resuming at byte %d", self.key, exc, self.offset)
                self.body.close()
                self.body = self.store.get_object(self.key, self.offset, self.etag)["Body"]
                continue
            if not part:
                break
            out += part
            self.offset += len(part)
        return bytes(out)

    def close(self) -> None:
        self.body.close()


class S3BlobStore:
    """Blobs as objects ``<prefix><last two characters>/<key>`` of one bucket."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "",
                 part_size: int = DEFAULT_PART, stale_upload_seconds: float | None = STALE_UPLOAD_SECONDS,
                 connections: int = 64, client: Any = None) -> None:
        """Checks at once that the bucket is there and usable (:class:`ConfigError` if not), then aborts the
        multipart uploads under ``prefix`` older than ``stale_upload_seconds`` (None: none). ``connections``:
        HTTP connections kept to the endpoint (one per stream in flight: the server's TENSAFE_MAX_STREAMS)."""
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's smallest part)")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix, self.part_size = bucket, prefix, part_size
        boto3 = _import("boto3")
        self.exceptions: Any = _import("botocore.exceptions")
        if client is None:
            config = _import("botocore.config").Config(
                retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=connections,
                # S3-compatible servers on a host name of their own address buckets by path.
                s3={"addressing_style": "path"} if endpoint_url else {})
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                                     region_name=region or None, config=config)
        self.client: Any = client
        self._check_bucket(endpoint_url)
        if stale_upload_seconds is not None:
            self.abort_stale_uploads(stale_upload_seconds)

    def _check_bucket(self, endpoint_url: str) -> None:
        where = f"at {endpoint_url}" if endpoint_url else "on AWS S3"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.exceptions.ClientError as exc:
            code = _error_code(exc)
            reason = {"404": "there is no such bucket", "NoSuchBucket": "there is no such bucket",
                      "403": "access denied: check the AWS credentials (standard AWS chain) and the bucket policy"
                      }.get(code, str(exc))
            raise ConfigError(f"TENSAFE_BLOB_BUCKET={self.bucket!r} {where}: {reason}") from None
        except self.exceptions.BotoCoreError as exc:  # no credentials, endpoint unreachable, ...
            raise ConfigError(f"TENSAFE_BLOB_BUCKET={self.bucket!r} {where} cannot be reached: {exc} "
                              "(check TENSAFE_BLOB_ENDPOINT_URL, TENSAFE_BLOB_REGION and the AWS "
                              "credential chain)") from None

    def object_key(self, key: str) -> str:
        return self.prefix + blob_name(key)

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the incomplete multipart uploads under the prefix started more than ``older_than`` seconds
        ago (puts killed half way; a live put of another replica is younger); their number."""
        cutoff = datetime.fromtimestamp(time.time() - older_than, tz=UTC)
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self.prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] <= cutoff:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
        if aborted:
            log.info("aborted %d stale multipart upload(s) under s3://%s/%s", aborted, self.bucket, self.prefix)
        return aborted

    def open_writer(self, key: str) -> _S3Writer:
        return _S3Writer(self, check_key(key))

    def get_object(self, key: str, offset: int, etag: str | None) -> Any:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if etag:
            args["IfMatch"] = etag  # a resumed read continues the same object, or fails
        try:
            return self.client.get_object(**args)
        except self.exceptions.ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"blob {key} is not in s3://{self.bucket}/{self.prefix}") from None
            raise

    def read(self, key: str, chunk_size: int = 1 << 20, first: int | None = None) -> Iterator[bytes]:
        """Streams the object; a connection lost mid-way resumes where it stopped (a ranged GET of the same
        ETag: the same bytes or an error), up to three times per read."""
        reader = _ObjectReader(self, key)
        try:
            if first:
                yield reader.take(first)
            while chunk := reader.take(chunk_size):
                yield chunk
        finally:
            reader.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def _head(self, key: str) -> dict[str, Any]:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except self.exceptions.ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"blob {key} is not in s3://{self.bucket}/{self.prefix}") from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])
