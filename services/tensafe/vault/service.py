"""The vault's logic: put, get, pull, key lifecycle. No gRPC here; every call is for one tenant."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tensafe.api.common.v1 import common_pb2
from tensafe.runtime import lineage as lineage_mac
from tensafe.runtime.context import note_audit
from tensafe.runtime.errors import IntegrityFailure, InvalidArgument, NotFound, PermissionDenied, TenantShredded
from tg_tinker import errors as sdk_errors
from tg_tinker.container import DEFAULT_SEGMENT_SIZE, FORMAT_VERSION, TAG_SIZE, ContainerReader, ContainerWriter

from .blobs import BlobStore
from .keys import KEY_BYTES, KeyUnwrapError, MasterKey, aead_unwrap, aead_wrap, dek_aad, kek_aad
from .quotas import StorageLimits, StorageQuotas
from .store import AVAILABLE, SHREDDED, ArtifactRecord, VaultStore

ALGORITHM = "AES-256-GCM"
MAX_NAME = 256
MAX_METADATA_BYTES = 64 * 1024


@dataclass(frozen=True)
class ArtifactHeader:
    kind: int
    name: str
    metadata: dict[str, Any]
    content_type: str = "application/octet-stream"
    session_id: str = ""
    expected_sha256: bytes = b""
    # Set by the trainer only, with its MAC (see tensafe.runtime.lineage); None for a tenant's upload.
    lineage: common_pb2.Lineage | None = None
    lineage_mac: bytes = b""


@dataclass(frozen=True)
class KekInfo:
    tenant_id: str
    key_id: str
    current_version: int
    versions: list[tuple[int, str, int, float]]  # (version, state, wrapped DEKs, created)
    shredded_at: float | None


class Vault:
    def __init__(self, store: VaultStore, blobs: BlobStore, master: MasterKey,
                 segment_size: int = DEFAULT_SEGMENT_SIZE, service_key: Callable[[], str] | None = None,
                 limits: StorageLimits | None = None) -> None:
        self.store = store
        self._service_key = service_key or (lambda: "")
        self.blobs = blobs
        self.master = master
        self.segment_size = segment_size
        self._tenant_lock = threading.Lock()  # serialises KEK creation and rotation
        self.quotas = StorageQuotas(limits or StorageLimits(0, 0), store.usage)

    # -- keys ----------------------------------------------------------------------------------
    def _active_kek(self, tenant_id: str) -> tuple[int, bytes]:
        """The tenant's current KEK (created on first use), unwrapped for one put."""
        with self._tenant_lock:
            row = self.store.tenant(tenant_id)
            if row is None:
                row = self.store.add_tenant(tenant_id, "kek_" + secrets.token_hex(8),
                                            self.master.wrap(os.urandom(KEY_BYTES), kek_aad(tenant_id, 1)))
            if row.shredded_at is not None:
                raise TenantShredded(f"tenant {tenant_id!r} was shredded: the vault stores nothing more for it",
                                     tenant_id=tenant_id)
            version = row.current_version
            wrapped = self.store.wrapped_kek(tenant_id, version)
        return version, self._unwrap_kek(tenant_id, version, wrapped)

    def _unwrap_kek(self, tenant_id: str, version: int, wrapped: bytes | None) -> bytes:
        if wrapped is None:
            raise TenantShredded(f"KEK version {version} of tenant {tenant_id!r} was destroyed", tenant_id=tenant_id)
        try:
            return self.master.unwrap(wrapped, kek_aad(tenant_id, version))
        except KeyUnwrapError:
            raise IntegrityFailure(f"KEK version {version} of tenant {tenant_id!r} failed authentication under "
                                   "the master key (wrong master key, or the key record was altered)") from None

    def _data_key(self, record: ArtifactRecord) -> bytes:
        if record.state == SHREDDED or record.wrapped_dek is None:
            raise TenantShredded(f"artifact {record.artifact_id} can no longer be decrypted: its tenant's keys "
                                 "were destroyed (shredded)", artifact_id=record.artifact_id)
        kek = self._unwrap_kek(record.tenant_id, record.kek_version,
                               self.store.wrapped_kek(record.tenant_id, record.kek_version))
        try:
            return aead_unwrap(kek, record.wrapped_dek, dek_aad(record.tenant_id, record.artifact_id,
                                                                 record.kek_version))
        except KeyUnwrapError:
            raise IntegrityFailure(f"the data key of artifact {record.artifact_id} failed authentication (the "
                                   "key record was altered)", artifact_id=record.artifact_id) from None

    def key_id(self, tenant_id: str) -> str:
        """The tenant's stable KEK identifier (the same across versions)."""
        row = self.store.tenant(tenant_id)
        return row.key_id if row is not None else ""

    # -- artifacts -------------------------------------------------------------------------------
    def put(self, tenant_id: str, header: ArtifactHeader, chunks: Iterable[bytes]) -> ArtifactRecord:
        """Encrypt and store; visible only once every byte is in the blob store and the record is committed."""
        if len(header.name) > MAX_NAME:
            raise InvalidArgument("header.name", f"must be at most {MAX_NAME} characters")
        if len(repr(header.metadata)) > MAX_METADATA_BYTES:
            raise InvalidArgument("header.metadata", f"must be under {MAX_METADATA_BYTES} bytes")
        if header.expected_sha256 and len(header.expected_sha256) != 32:
            raise InvalidArgument("header.expected_sha256", "must be 32 bytes")
        if header.lineage is not None:
            lineage_mac.check_bounds(header.lineage, "header.lineage")
        elif header.lineage_mac:
            raise InvalidArgument("header.lineage_mac", "is only meaningful with a lineage")
        upload = self.quotas.begin(tenant_id)  # TENSAFE_QUOTA_ARTIFACTS: refused before any byte is read
        artifact_id = "art_" + secrets.token_hex(12)
        kek_version, kek = self._active_kek(tenant_id)
        dek = os.urandom(KEY_BYTES)
        writer = ContainerWriter(dek, tenant_id, artifact_id, self.segment_size)
        blob_key = artifact_id
        out = self.blobs.open_writer(blob_key)
        try:
            out.write(writer.header)
            for chunk in chunks:
                upload.add(len(chunk))  # TENSAFE_QUOTA_STORED_MB: stops the upload as soon as it passes
                for segment in writer.update(chunk):
                    out.write(segment)
            out.write(writer.finalize())
            written = writer.result()
            if header.expected_sha256 and header.expected_sha256 != written.plaintext_sha256:
                raise IntegrityFailure(f"artifact {artifact_id}: the received bytes do not match expected_sha256",
                                       artifact_id=artifact_id)
            lineage_json = self._attested_lineage(tenant_id, header, written.plaintext_sha256)
            out.commit()
        except BaseException:
            out.abort()
            upload.end()
            raise
        record = ArtifactRecord(
            artifact_id=artifact_id, tenant_id=tenant_id, kind=header.kind, name=header.name,
            content_type=header.content_type or "application/octet-stream", session_id=header.session_id,
            metadata=header.metadata, size_bytes=written.plaintext_size, plaintext_sha256=written.plaintext_sha256,
            stored_size=written.stored_size, format_version=FORMAT_VERSION, segment_size=self.segment_size,
            kek_version=kek_version, wrapped_dek=aead_wrap(kek, dek, dek_aad(tenant_id, artifact_id, kek_version)),
            blob_key=blob_key, state=AVAILABLE, created_at=time.time(), lineage_json=lineage_json)
        try:
            # Committed last, if the quotas still allow it: the artifact exists from here on.
            upload.commit(record.stored_size, lambda: self.store.insert_artifact(record))
        except BaseException:
            self.blobs.delete(blob_key)
            raise
        note_audit(kind=record.kind, session_id=record.session_id, cipher=ALGORITHM, kek_version=kek_version,
                   format_version=FORMAT_VERSION, size_bytes=record.size_bytes,
                   plaintext_sha256=record.plaintext_sha256.hex(), lineage_attested=str(lineage_json is not None))
        return record

    def _attested_lineage(self, tenant_id: str, header: ArtifactHeader, plaintext_sha256: bytes) -> str | None:
        """The lineage to store: only one whose MAC (under the services' key) verifies over these bytes."""
        if header.lineage is None:
            return None
        try:
            key = lineage_mac.derive_key(self._service_key())
        except lineage_mac.LineageKeyMissing:
            key = None
        if key is None or not lineage_mac.verify(key, tenant_id, plaintext_sha256, header.lineage,
                                                 header.lineage_mac):
            raise PermissionDenied("an artifact's lineage is written by the TenSafe trainer only (its MAC under the "
                                   "services' key did not verify); put the artifact without a lineage",
                                   reason="PERMISSION_DENIED", field="header.lineage")
        stored = common_pb2.Lineage()
        stored.CopyFrom(header.lineage)
        stored.attested = True
        return lineage_mac.to_json(stored)

    def describe(self, tenant_id: str, artifact_id: str) -> ArtifactRecord:
        record = self.store.get_artifact(tenant_id, artifact_id) if artifact_id else None
        if record is None:
            raise NotFound("artifact", artifact_id)
        return record

    def read(self, tenant_id: str, artifact_id: str) -> tuple[ArtifactRecord, Iterator[bytes]]:
        """The plaintext, verified segment by segment; an integrity failure ends the stream with an error."""
        record = self.describe(tenant_id, artifact_id)
        dek = self._data_key(record)

        def plaintext() -> Iterator[bytes]:
            # No plaintext re-hash: AES-GCM tags and STREAM nonces authenticate every byte, the order and the
            # end; the SHA-256 was computed at put time, and the size is checked below.
            reader = ContainerReader(dek, record.tenant_id, record.artifact_id, digest=False)
            try:
                header_len = 36 + len(record.tenant_id.encode()) + len(record.artifact_id.encode())
                for chunk in self.blobs.read(record.blob_key, record.segment_size + TAG_SIZE, first=header_len):
                    yield from reader.update(chunk)
                last = reader.finalize()
            except sdk_errors.IntegrityError as exc:  # its message already names the artifact
                raise IntegrityFailure(exc.message, artifact_id=record.artifact_id) from None
            except FileNotFoundError:
                raise IntegrityFailure(f"artifact {record.artifact_id}: its stored bytes are missing",
                                       artifact_id=record.artifact_id) from None
            if reader.plaintext_size != record.size_bytes:
                raise IntegrityFailure(f"artifact {record.artifact_id}: {reader.plaintext_size} bytes decrypted, "
                                       f"the record says {record.size_bytes}", artifact_id=record.artifact_id)
            if last:
                yield last

        return record, plaintext()

    def pull(self, tenant_id: str, artifact_id: str) -> tuple[ArtifactRecord, Iterator[bytes]]:
        """The encrypted container exactly as stored (the owner decrypts it with UnwrapDataKey)."""
        record = self.describe(tenant_id, artifact_id)
        if record.state == SHREDDED:
            self._data_key(record)  # raises the clear TENANT_SHREDDED error
        return record, self.blobs.read(record.blob_key)

    def unwrap_data_key(self, tenant_id: str, artifact_id: str) -> tuple[ArtifactRecord, bytes]:
        record = self.describe(tenant_id, artifact_id)
        return record, self._data_key(record)

    def list(self, tenant_id: str, kind: int, session_id: str, after: tuple[float, str] | None, limit: int
             ) -> list[ArtifactRecord]:
        """The tenant's artifacts ordered by (created_at, artifact_id), the first ``limit`` after ``after``."""
        return self.store.list_artifacts(tenant_id, kind, session_id, after, limit)

    def delete(self, tenant_id: str, artifact_id: str) -> None:
        record = self.describe(tenant_id, artifact_id)
        if self.store.delete_artifact(tenant_id, artifact_id):
            self.blobs.delete(record.blob_key)

    # -- key lifecycle -----------------------------------------------------------------------------
    def key_info(self, tenant_id: str) -> KekInfo:
        row = self.store.tenant(tenant_id)
        if row is None:
            raise NotFound("tenant key", tenant_id)
        versions = [(k.version, k.state, k.wrapped_count, k.created_at) for k in self.store.keks(tenant_id)]
        return KekInfo(tenant_id, row.key_id, row.current_version, versions, row.shredded_at)

    def rotate(self, tenant_id: str) -> tuple[KekInfo, int]:
        """New KEK version; every data key is rewrapped under it (the data is not re-encrypted).
        Versions that no longer wrap any data key are destroyed."""
        self._active_kek(tenant_id)  # creates the tenant's first KEK if needed; refuses a shredded tenant
        with self._tenant_lock:
            row = self.store.tenant(tenant_id)
            assert row is not None
            old_keks = {k.version: k.wrapped_kek for k in self.store.keks(tenant_id)}
            new_version = row.current_version + 1
            new_kek = os.urandom(KEY_BYTES)
            unwrapped: dict[int, bytes] = {}
            rewrapped: dict[str, tuple[int, bytes]] = {}
            for art_id, version, wrapped_dek in self.store.wrapped_deks(tenant_id):
                if version not in unwrapped:
                    unwrapped[version] = self._unwrap_kek(tenant_id, version, old_keks.get(version))
                dek = aead_unwrap(unwrapped[version], wrapped_dek, dek_aad(tenant_id, art_id, version))
                rewrapped[art_id] = (version, aead_wrap(new_kek, dek, dek_aad(tenant_id, art_id, new_version)))
            self.store.rotate(tenant_id, new_version, self.master.wrap(new_kek, kek_aad(tenant_id, new_version)),
                              rewrapped)
        note_audit(kek_version_before=row.current_version, kek_version=new_version, rewrapped=len(rewrapped))
        return self.key_info(tenant_id), len(rewrapped)

    def shred(self, tenant_id: str, confirm_tenant_id: str) -> tuple[KekInfo, int]:
        """Destroy every KEK version of the tenant: all its artifacts become unreadable for good."""
        if confirm_tenant_id != tenant_id:
            raise InvalidArgument("confirm_tenant_id", "must equal your tenant id: shredding cannot be undone")
        with self._tenant_lock:
            count = self.store.shred(tenant_id, "kek_" + secrets.token_hex(8))
        note_audit(artifacts_made_unreadable=count)
        return self.key_info(tenant_id), count
