"""The trainer's calls to the vault, always made as the tenant who asked (their own API key)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from tensafe.api.vault.v1 import vault_pb2, vault_pb2_grpc
from tensafe.runtime.context import CallContext
from tensafe.runtime.errors import TensafeError
from tensafe.runtime.peers import PeerChannels, metadata_for, peer_error

CHUNK = 1 << 20


def _reraise(err: grpc.RpcError, what: str) -> TensafeError:
    """The vault's own error, passed on to the trainer's caller with the same code and reason."""
    return peer_error(err, "vault", what)


class VaultClient:
    def __init__(self, peers: PeerChannels) -> None:
        self.peers = peers

    def _stub(self) -> vault_pb2_grpc.VaultServiceStub:
        return vault_pb2_grpc.VaultServiceStub(self.peers.channel("vault"))

    def put(self, caller: CallContext, data: bytes, *, kind: int, name: str, metadata: dict[str, Any],
            session_id: str, content_type: str) -> vault_pb2.Artifact:
        meta = struct_pb2.Struct()
        meta.update(metadata)
        header = vault_pb2.PutArtifactHeader(kind=kind, name=name, metadata=meta, session_id=session_id,
                                             content_type=content_type)

        def requests() -> Iterator[vault_pb2.PutArtifactRequest]:
            yield vault_pb2.PutArtifactRequest(header=header)
            for i in range(0, len(data), CHUNK):
                yield vault_pb2.PutArtifactRequest(chunk=data[i:i + CHUNK])

        try:
            return self._stub().PutArtifact(requests(), timeout=300,
                                            metadata=metadata_for(caller, uuid.uuid4().hex)).artifact
        except grpc.RpcError as err:
            raise _reraise(err, "storing the checkpoint") from None

    def get(self, caller: CallContext, artifact_id: str) -> tuple[vault_pb2.Artifact, bytes]:
        artifact, out = None, bytearray()
        try:
            for msg in self._stub().GetArtifact(vault_pb2.GetArtifactRequest(artifact_id=artifact_id), timeout=300,
                                                metadata=metadata_for(caller)):
                if msg.WhichOneof("part") == "artifact":
                    artifact = msg.artifact
                else:
                    out += msg.chunk
        except grpc.RpcError as err:
            raise _reraise(err, "reading the checkpoint") from None
        return artifact, bytes(out)
