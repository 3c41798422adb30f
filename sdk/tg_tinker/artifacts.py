"""Encrypted artifacts in the vault: describe, list, pull, decrypt locally, delete; tenant keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.api.common.v1 import common_pb2
from tensafe.api.vault.v1 import vault_pb2

from .configs import from_struct, to_struct
from .errors import IntegrityError, ValidationError
from .lineage import Lineage

if TYPE_CHECKING:
    from ._transport import Transport

CHUNK = 1 << 20
_KINDS = {"checkpoint": vault_pb2.ARTIFACT_KIND_CHECKPOINT, "adapter": vault_pb2.ARTIFACT_KIND_ADAPTER,
          "other": vault_pb2.ARTIFACT_KIND_OTHER}


@dataclass(frozen=True)
class EncryptionInfo:
    algorithm: str          # "AES-256-GCM"
    format_version: int
    kek_version: int
    key_id: str
    segment_size: int

    @classmethod
    def from_proto(cls, m: common_pb2.EncryptionInfo) -> EncryptionInfo:
        return cls(m.algorithm, m.format_version, m.kek_version, m.key_id, m.segment_size)


@dataclass(frozen=True)
class ArtifactInfo:
    artifact_id: str
    kind: str
    name: str
    size_bytes: int
    stored_size_bytes: int
    sha256: str             # hex digest of the plaintext
    encryption: EncryptionInfo
    metadata: dict[str, Any]
    session_id: str
    content_type: str
    state: str              # "available" or "shredded"
    create_time: float
    # How it was made, as the services recorded it; attested=False for an artifact a tenant uploaded.
    lineage: Lineage = Lineage(attested=False)

    @classmethod
    def from_proto(cls, m: vault_pb2.Artifact) -> ArtifactInfo:
        return cls(m.artifact_id, vault_pb2.ArtifactKind.Name(m.kind).removeprefix("ARTIFACT_KIND_").lower(),
                   m.name, m.size_bytes, m.stored_size_bytes, m.plaintext_sha256.hex(),
                   EncryptionInfo.from_proto(m.encryption), from_struct(m.metadata), m.session_id,
                   m.content_type, vault_pb2.ArtifactState.Name(m.state).removeprefix("ARTIFACT_STATE_").lower(),
                   m.create_time.ToNanoseconds() / 1e9, Lineage.from_proto(m.lineage))


@dataclass(frozen=True)
class TenantKeyInfo:
    tenant_id: str
    key_id: str
    current_version: int
    versions: list[dict[str, Any]]
    shredded: bool

    @classmethod
    def from_proto(cls, m: vault_pb2.TenantKeyInfo) -> TenantKeyInfo:
        return cls(m.tenant_id, m.key_id, m.current_version,
                   [{"version": v.version, "state": vault_pb2.KekState.Name(v.state).removeprefix("KEK_STATE_").lower(),
                     "wrapped_keys": v.wrapped_key_count} for v in m.versions], m.shredded)


def _chunks(data: bytes | bytearray | Path | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
    elif isinstance(data, Path):
        with open(data, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
    else:
        yield from data


class Artifacts:
    """The vault calls of a :class:`ServiceClient` (available as its methods)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def put(self, data: bytes | Path | Iterable[bytes], *, kind: str = "other", name: str = "",
            metadata: dict[str, Any] | None = None, content_type: str = "application/octet-stream") -> ArtifactInfo:
        if kind not in _KINDS:
            raise ValidationError(f"kind must be one of {sorted(_KINDS)}", field="kind", code="INVALID_ARGUMENT")
        replayable = isinstance(data, (bytes, bytearray, memoryview, Path))
        header = vault_pb2.PutArtifactHeader(kind=_KINDS[kind], name=name, content_type=content_type,
                                             metadata=to_struct(metadata, "metadata"))

        def requests() -> Iterator[vault_pb2.PutArtifactRequest]:
            yield vault_pb2.PutArtifactRequest(header=header)
            for chunk in _chunks(data):
                yield vault_pb2.PutArtifactRequest(chunk=chunk)

        # A one-shot iterator cannot be sent twice, so only bytes and files are retried.
        resp = self._t.client_stream("vault", "PutArtifact", requests, retry=replayable)
        return ArtifactInfo.from_proto(resp.artifact)

    def iter_plaintext(self, artifact_id: str) -> Iterator[bytes]:
        """Stream the decrypted bytes (decrypted and verified by the vault, sent to the owner only)."""
        for msg in self._t.server_stream("vault", "GetArtifact", vault_pb2.GetArtifactRequest(artifact_id=artifact_id)):
            if msg.WhichOneof("part") == "chunk":
                yield msg.chunk

    def pull(self, artifact_id: str) -> bytes:
        """The encrypted container exactly as stored."""
        out = bytearray()
        for msg in self._t.server_stream("vault", "PullArtifact",
                                         vault_pb2.PullArtifactRequest(artifact_id=artifact_id)):
            if msg.WhichOneof("part") == "chunk":
                out += msg.chunk
        return bytes(out)

    def decrypt(self, container: bytes, expected_sha256: str | None = None) -> bytes:
        """Decrypt a pulled container on this machine: the vault unwraps the artifact's data key for
        its owner, and the bytes are authenticated and decrypted here."""
        from .container import decrypt_bytes, read_header

        header, _ = read_header(container)
        resp = self._t.unary("vault", "UnwrapDataKey", vault_pb2.UnwrapDataKeyRequest(artifact_id=header.artifact_id))
        plaintext = decrypt_bytes(container, resp.data_key, header.tenant_id, header.artifact_id)
        if expected_sha256 and hashlib.sha256(plaintext).hexdigest() != expected_sha256:
            raise IntegrityError(f"artifact {header.artifact_id}: plaintext digest differs from the expected one",
                                 code="INTEGRITY_ERROR", details={"artifact_id": header.artifact_id})
        return plaintext

    def describe(self, artifact_id: str) -> ArtifactInfo:
        resp = self._t.unary("vault", "DescribeArtifact", vault_pb2.DescribeArtifactRequest(artifact_id=artifact_id))
        return ArtifactInfo.from_proto(resp.artifact)

    def list(self, kind: str | None = None, session_id: str | None = None) -> list[ArtifactInfo]:
        out: list[ArtifactInfo] = []
        token = ""
        while True:
            resp = self._t.unary("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest(
                kind=_KINDS[kind] if kind else None, session_id=session_id or "", page_token=token))
            out.extend(ArtifactInfo.from_proto(a) for a in resp.artifacts)
            token = resp.next_page_token
            if not token:
                return out

    def delete(self, artifact_id: str) -> None:
        self._t.unary("vault", "DeleteArtifact", vault_pb2.DeleteArtifactRequest(artifact_id=artifact_id))

    def rotate_key(self) -> tuple[TenantKeyInfo, int]:
        resp = self._t.unary("vault", "RotateTenantKey", vault_pb2.RotateTenantKeyRequest())
        return TenantKeyInfo.from_proto(resp.key_info), resp.rewrapped_count

    def shred(self, confirm_tenant_id: str) -> tuple[TenantKeyInfo, int]:
        resp = self._t.unary("vault", "ShredTenant", vault_pb2.ShredTenantRequest(confirm_tenant_id=confirm_tenant_id))
        return TenantKeyInfo.from_proto(resp.key_info), resp.artifact_count

    def key_info(self) -> TenantKeyInfo:
        return TenantKeyInfo.from_proto(self._t.unary("vault", "GetTenantKeyInfo",
                                                      vault_pb2.GetTenantKeyInfoRequest()).key_info)
