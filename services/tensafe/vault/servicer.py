"""gRPC adapter of the vault: messages in and out, the logic in service.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
from google.protobuf import json_format, struct_pb2

from tensafe.api.common.v1 import common_pb2
from tensafe.api.vault.v1 import vault_pb2, vault_pb2_grpc
from tensafe.runtime import context
from tensafe.runtime import lineage as lineage_codec
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.messages import timestamp
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment

from .blobs import BlobStore, LocalBlobStore
from .keys import load_master_key
from .quotas import StorageLimits
from .service import ALGORITHM, ArtifactHeader, KekInfo, Vault
from .store import SHREDDED, ArtifactRecord, VaultStore

_KEK_STATES = {"active": vault_pb2.KEK_STATE_ACTIVE, "retired": vault_pb2.KEK_STATE_RETIRED,
               "destroyed": vault_pb2.KEK_STATE_DESTROYED}
CHUNK = 1 << 20


def encryption_info(record: ArtifactRecord, key_id: str = "") -> common_pb2.EncryptionInfo:
    return common_pb2.EncryptionInfo(algorithm=ALGORITHM, format_version=record.format_version,
                                     kek_version=record.kek_version, key_id=key_id,
                                     segment_size=record.segment_size)


def artifact_proto(record: ArtifactRecord, key_id: str = "") -> vault_pb2.Artifact:
    meta = struct_pb2.Struct()
    meta.update(record.metadata)
    return vault_pb2.Artifact(
        artifact_id=record.artifact_id, tenant_id=record.tenant_id, kind=cast("vault_pb2.ArtifactKind", record.kind),
        name=record.name,
        size_bytes=record.size_bytes, plaintext_sha256=record.plaintext_sha256,
        create_time=timestamp(record.created_at),
        encryption=encryption_info(record, key_id), metadata=meta, content_type=record.content_type,
        session_id=record.session_id, stored_size_bytes=record.stored_size,
        state=vault_pb2.ARTIFACT_STATE_SHREDDED if record.state == SHREDDED else vault_pb2.ARTIFACT_STATE_AVAILABLE,
        lineage=lineage_codec.from_json(record.lineage_json))


def key_info_proto(info: KekInfo) -> vault_pb2.TenantKeyInfo:
    msg = vault_pb2.TenantKeyInfo(tenant_id=info.tenant_id, key_id=info.key_id,
                                  current_version=info.current_version, shredded=info.shredded_at is not None)
    for version, state, count, created in info.versions:
        msg.versions.add(version=version, state=_KEK_STATES[state], wrapped_key_count=count,
                         create_time=timestamp(created))
    if info.shredded_at is not None:
        msg.shred_time.CopyFrom(timestamp(info.shredded_at))
    return msg


class VaultServicer(vault_pb2_grpc.VaultServiceServicer):
    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    def PutArtifact(self, request_iterator: Iterator[vault_pb2.PutArtifactRequest],
                    ctx: grpc.ServicerContext) -> vault_pb2.PutArtifactResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message of PutArtifact must be the header")
        h = first.header
        header = ArtifactHeader(kind=h.kind or vault_pb2.ARTIFACT_KIND_OTHER, name=h.name,
                                metadata=json_format.MessageToDict(h.metadata), content_type=h.content_type,
                                session_id=h.session_id, expected_sha256=h.expected_sha256,
                                lineage=h.lineage if h.HasField("lineage") else None, lineage_mac=h.lineage_mac)

        def chunks():
            for msg in request_iterator:
                if msg.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header", "only the first message may be a header")
                yield msg.chunk

        tenant = context.current_tenant()
        record = self.vault.put(tenant, header, chunks())
        return vault_pb2.PutArtifactResponse(artifact=artifact_proto(record, self.vault.key_id(tenant)))

    def GetArtifact(self, request: vault_pb2.GetArtifactRequest,
                    ctx: grpc.ServicerContext) -> Iterator[vault_pb2.GetArtifactResponse]:
        record, plaintext = self.vault.read(context.current_tenant(), request.artifact_id)
        yield vault_pb2.GetArtifactResponse(artifact=artifact_proto(record, self.vault.key_id(record.tenant_id)))
        for chunk in plaintext:
            yield vault_pb2.GetArtifactResponse(chunk=chunk)

    def PullArtifact(self, request: vault_pb2.PullArtifactRequest,
                     ctx: grpc.ServicerContext) -> Iterator[vault_pb2.PullArtifactResponse]:
        record, stored = self.vault.pull(context.current_tenant(), request.artifact_id)
        yield vault_pb2.PullArtifactResponse(artifact=artifact_proto(record, self.vault.key_id(record.tenant_id)))
        for chunk in stored:
            yield vault_pb2.PullArtifactResponse(chunk=chunk)

    def DescribeArtifact(self, request: vault_pb2.DescribeArtifactRequest,
                         ctx: grpc.ServicerContext) -> vault_pb2.DescribeArtifactResponse:
        record = self.vault.describe(context.current_tenant(), request.artifact_id)
        return vault_pb2.DescribeArtifactResponse(artifact=artifact_proto(record, self.vault.key_id(record.tenant_id)))

    def ListArtifacts(self, request: vault_pb2.ListArtifactsRequest,
                      ctx: grpc.ServicerContext) -> vault_pb2.ListArtifactsResponse:
        req = page_request("vault.ListArtifacts", request.page_size, request.page_token, (float, str),
                           kind=request.kind, session_id=request.session_id)
        records, token = req.page(self.vault.list(context.current_tenant(), request.kind, request.session_id,
                                                  req.after, req.limit),
                                  key=lambda r: (r.created_at, r.artifact_id))
        key_id = self.vault.key_id(context.current_tenant())
        return vault_pb2.ListArtifactsResponse(artifacts=[artifact_proto(r, key_id) for r in records],
                                               next_page_token=token)

    def DeleteArtifact(self, request: vault_pb2.DeleteArtifactRequest,
                       ctx: grpc.ServicerContext) -> vault_pb2.DeleteArtifactResponse:
        self.vault.delete(context.current_tenant(), request.artifact_id)
        return vault_pb2.DeleteArtifactResponse()

    def UnwrapDataKey(self, request: vault_pb2.UnwrapDataKeyRequest,
                      ctx: grpc.ServicerContext) -> vault_pb2.UnwrapDataKeyResponse:
        record, dek = self.vault.unwrap_data_key(context.current_tenant(), request.artifact_id)
        return vault_pb2.UnwrapDataKeyResponse(artifact_id=record.artifact_id, data_key=dek,
                                               encryption=encryption_info(record, self.vault.key_id(record.tenant_id)))

    def RotateTenantKey(self, request: vault_pb2.RotateTenantKeyRequest,
                        ctx: grpc.ServicerContext) -> vault_pb2.RotateTenantKeyResponse:
        info, count = self.vault.rotate(context.current_tenant())
        return vault_pb2.RotateTenantKeyResponse(key_info=key_info_proto(info), rewrapped_count=count)

    def ShredTenant(self, request: vault_pb2.ShredTenantRequest,
                    ctx: grpc.ServicerContext) -> vault_pb2.ShredTenantResponse:
        info, count = self.vault.shred(context.current_tenant(), request.confirm_tenant_id)
        return vault_pb2.ShredTenantResponse(key_info=key_info_proto(info), artifact_count=count)

    def GetTenantKeyInfo(self, request: vault_pb2.GetTenantKeyInfoRequest,
                         ctx: grpc.ServicerContext) -> vault_pb2.GetTenantKeyInfoResponse:
        return vault_pb2.GetTenantKeyInfoResponse(key_info=key_info_proto(self.vault.key_info(
            context.current_tenant())))


def blob_store(cfg: ServerConfig) -> BlobStore:
    """TENSAFE_BLOB_STORE: the blob dir (LocalBlobStore, the default), or an S3 bucket, checked now
    (ConfigError: boto3 missing, bucket unusable). Never one in place of the other."""
    if cfg.blob_store == "s3":
        from .blobstore_s3 import S3BlobStore

        return S3BlobStore(cfg.blob_bucket, cfg.blob_key_prefix(), endpoint_url=cfg.blob_endpoint_url,
                           region=cfg.blob_region, connections=cfg.max_streams + cfg.internal_workers)
    return LocalBlobStore(Path(cfg.blob_dir) if cfg.blob_dir else cfg.data_dir / "blobs")


def create(env: ServiceEnvironment) -> VaultServicer:
    cfg = env.config
    return VaultServicer(Vault(VaultStore(env.db), blob_store(cfg), load_master_key(cfg),
                               service_key=cfg.service_key,
                               limits=StorageLimits.from_config(cfg.quota_stored_mb, cfg.quota_artifacts)))
