"""The services' calls to the vault (trainer, inference, he), always made as the tenant who asked (their own
API key).

Deadlines (``runtime.peers.call_timeout``): in a thread serving a call (the he and inference services
loading an adapter), what is left of that call's deadline; otherwise (the trainer's workers saving
and loading checkpoints) a budget proportional to the transfer: :data:`TRANSFER_BASE_S` plus the
bytes at :data:`TRANSFER_MIN_BYTES_PER_S`, of the checkpoint for a put, of the largest artifact the
client reads (``max_artifact_bytes``) for a get.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2

from tensafe.api.common.v1 import common_pb2
from tensafe.api.vault.v1 import vault_pb2, vault_pb2_grpc

from .context import CallContext
from .errors import InvalidArgument, TensafeError
from .peers import PeerChannels, call_timeout, metadata_for, peer_error, stream_budget
from .safetar import DEFAULT_MAX_ARTIFACT_BYTES

CHUNK = 1 << 20
TRANSFER_BASE_S = 30.0
TRANSFER_MIN_BYTES_PER_S = 8 << 20


def _reraise(err: grpc.RpcError, what: str) -> TensafeError:
    """The vault's own error, passed on to the caller with the same code and reason."""
    return peer_error(err, "vault", what)


class VaultClient:
    def __init__(self, peers: PeerChannels, max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> None:
        self.peers = peers
        self.max_artifact_bytes = max_artifact_bytes  # TENSAFE_MAX_ARTIFACT_MB: larger artifacts are not read

    def _stub(self) -> vault_pb2_grpc.VaultServiceStub:
        return vault_pb2_grpc.VaultServiceStub(self.peers.channel("vault"))

    def put(self, caller: CallContext, data: bytes, *, kind: int, name: str, metadata: dict[str, Any],
            session_id: str, content_type: str, lineage: common_pb2.Lineage | None = None,
            lineage_mac: bytes = b"") -> vault_pb2.Artifact:
        """Stores the bytes; ``lineage`` with its MAC (tensafe.runtime.lineage) is what the vault records."""
        meta = struct_pb2.Struct()
        # types-protobuf 7.35.1.20261122 types Struct.update with an Unknown in its value union.
        meta.update(metadata)  # pyright: ignore[reportUnknownMemberType]
        header = vault_pb2.PutArtifactHeader(kind=cast("vault_pb2.ArtifactKind", kind), name=name, metadata=meta,
                                             session_id=session_id, content_type=content_type, lineage=lineage,
                                             lineage_mac=lineage_mac)

        def requests() -> Iterator[vault_pb2.PutArtifactRequest]:
            yield vault_pb2.PutArtifactRequest(header=header)
            for i in range(0, len(data), CHUNK):
                yield vault_pb2.PutArtifactRequest(chunk=data[i:i + CHUNK])

        try:
            timeout = call_timeout(stream_budget(len(data), TRANSFER_BASE_S, TRANSFER_MIN_BYTES_PER_S), "vault",
                                   "storing the checkpoint")
            return self._stub().PutArtifact(requests(), timeout=timeout,
                                            metadata=tuple(metadata_for(caller, uuid.uuid4().hex))).artifact
        except grpc.RpcError as err:
            raise _reraise(err, "storing the checkpoint") from None

    def get(self, caller: CallContext, artifact_id: str) -> tuple[vault_pb2.Artifact, bytes]:
        """The artifact's description and plaintext; InvalidArgument(artifact_id) when it is larger than
        ``max_artifact_bytes`` (checked on the declared size first, then on the bytes as they arrive)."""
        artifact, out, limit = None, bytearray(), self.max_artifact_bytes
        call = None
        try:
            timeout = call_timeout(stream_budget(limit, TRANSFER_BASE_S, TRANSFER_MIN_BYTES_PER_S), "vault",
                                   "reading the checkpoint")
            call = self._stub().GetArtifact(vault_pb2.GetArtifactRequest(artifact_id=artifact_id), timeout=timeout,
                                            metadata=tuple(metadata_for(caller)))
            for msg in call:
                if msg.WhichOneof("part") == "artifact":
                    artifact = msg.artifact
                    if artifact.size_bytes > limit:
                        raise InvalidArgument("artifact_id", f"the artifact is {artifact.size_bytes} bytes, more "
                                                             f"than the limit of {limit} (TENSAFE_MAX_ARTIFACT_MB)")
                else:
                    out += msg.chunk
                    if len(out) > limit:
                        raise InvalidArgument("artifact_id", f"the artifact is more than the limit of {limit} "
                                                             "bytes (TENSAFE_MAX_ARTIFACT_MB)")
        except grpc.RpcError as err:
            raise _reraise(err, "reading the checkpoint") from None
        except InvalidArgument:
            if call is not None:
                call.cancel()
            raise
        if artifact is None:
            raise TensafeError(f"the vault sent artifact {artifact_id} without its description")
        return artifact, bytes(out)
