"""gRPC adapter of the ledger: messages in and out, the logic in service.py, the SQL in store.py."""

from __future__ import annotations

import grpc

from tensafe.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tensafe.runtime import context
from tensafe.runtime.bootstrap import SYSTEM_TENANT
from tensafe.runtime.errors import PermissionDenied
from tensafe.runtime.messages import timestamp
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment

from .service import MerkleLog, load_signers
from .store import CheckpointRecord, LedgerStore


def checkpoint_proto(record: CheckpointRecord, origin: str) -> ledger_pb2.Checkpoint:
    return ledger_pb2.Checkpoint(origin=origin, tree_size=record.tree_size, root_hash=record.root_hash,
                                 signed_note=record.note, create_time=timestamp(record.created_at))


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, log: MerkleLog) -> None:
        self.log = log

    def AppendEntries(self, request: ledger_pb2.AppendEntriesRequest,
                      ctx: grpc.ServicerContext) -> ledger_pb2.AppendEntriesResponse:
        if context.current_tenant() != SYSTEM_TENANT:
            raise PermissionDenied("only TenSafe's services append to the ledger", reason="PERMISSION_DENIED")
        appended, size = self.log.append(list(request.entries))
        return ledger_pb2.AppendEntriesResponse(
            entries=[ledger_pb2.AppendedEntry(entry_id=a.entry_id, index=a.index, duplicate=a.duplicate)
                     for a in appended], tree_size=size)

    def ListEntries(self, request: ledger_pb2.ListEntriesRequest,
                    ctx: grpc.ServicerContext) -> ledger_pb2.ListEntriesResponse:
        start = request.start_time.ToNanoseconds() if request.HasField("start_time") else None
        end = request.end_time.ToNanoseconds() if request.HasField("end_time") else None
        req = page_request("ledger.ListEntries", request.page_size, request.page_token, (int,), start_time=start,
                           end_time=end, action=request.action, resource_id=request.resource_id,
                           service=request.service)
        rows = self.log.entries(
            context.current_tenant(), start=start / 1e9 if start is not None else None,
            end=end / 1e9 if end is not None else None,
            action=request.action, resource_id=request.resource_id, service=request.service,
            after_index=req.after[0] if req.after else -1, limit=req.limit)
        page, token = req.page(rows, key=lambda r: (r[0],))
        return ledger_pb2.ListEntriesResponse(
            entries=[ledger_pb2.LedgerEntry(index=i, entry=ledger_pb2.AuditEntry.FromString(data), leaf_hash=h)
                     for i, data, h in page], next_page_token=token)

    def GetLatestCheckpoint(self, request: ledger_pb2.GetLatestCheckpointRequest,
                            ctx: grpc.ServicerContext) -> ledger_pb2.GetLatestCheckpointResponse:
        return ledger_pb2.GetLatestCheckpointResponse(
            checkpoint=checkpoint_proto(self.log.latest_checkpoint(), self.log.origin))

    def GetCheckpoint(self, request: ledger_pb2.GetCheckpointRequest,
                      ctx: grpc.ServicerContext) -> ledger_pb2.GetCheckpointResponse:
        return ledger_pb2.GetCheckpointResponse(
            checkpoint=checkpoint_proto(self.log.checkpoint(request.tree_size), self.log.origin))

    def ListCheckpoints(self, request: ledger_pb2.ListCheckpointsRequest,
                        ctx: grpc.ServicerContext) -> ledger_pb2.ListCheckpointsResponse:
        req = page_request("ledger.ListCheckpoints", request.page_size, request.page_token, (int,))
        page, token = req.page(self.log.list_checkpoints(req.after[0] if req.after else 0, req.limit),
                               key=lambda r: (r.tree_size,))
        return ledger_pb2.ListCheckpointsResponse(
            checkpoints=[checkpoint_proto(r, self.log.origin) for r in page], next_page_token=token)

    def GetInclusionProof(self, request: ledger_pb2.GetInclusionProofRequest,
                          ctx: grpc.ServicerContext) -> ledger_pb2.GetInclusionProofResponse:
        leaf, proof = self.log.inclusion(context.current_tenant(), request.leaf_index, request.tree_size)
        return ledger_pb2.GetInclusionProofResponse(leaf_index=request.leaf_index, tree_size=request.tree_size,
                                                    leaf_hash=leaf, hashes=proof)

    def GetConsistencyProof(self, request: ledger_pb2.GetConsistencyProofRequest,
                            ctx: grpc.ServicerContext) -> ledger_pb2.GetConsistencyProofResponse:
        proof = self.log.consistency(request.first_tree_size, request.second_tree_size)
        return ledger_pb2.GetConsistencyProofResponse(first_tree_size=request.first_tree_size,
                                                      second_tree_size=request.second_tree_size, hashes=proof)


def create(env: ServiceEnvironment) -> LedgerServicer:
    log = MerkleLog(LedgerStore(env.db), load_signers(env.config), env.config.ledger_origin)
    env.closers.append(log.close)
    return LedgerServicer(log)
