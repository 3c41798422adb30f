"""gRPC adapter of the trainer: tenant and request in, `Trainer` called, protos out; and `create`, which builds
the trainer from the service environment (limits, vault and accountant clients, op audit)."""

from __future__ import annotations

from pathlib import Path

import grpc

from tensafe.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from tensafe.runtime import context
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment

from .accountant_client import AccountantClient
from .audit_trail import OpAudit
from .service import Trainer, TrainerLimits
from .vault_client import VaultClient


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    # -- sessions ---------------------------------------------------------------------------
    def CreateSession(self, request, ctx):
        session = self.trainer.create_session(context.current_tenant(), request.config)
        return trainer_pb2.CreateSessionResponse(session=session.proto())

    def GetSession(self, request, ctx):
        return trainer_pb2.GetSessionResponse(
            session=self.trainer.get(context.current_tenant(), request.session_id).proto())

    def ListSessions(self, request, ctx):
        req = page_request("trainer.ListSessions", request.page_size, request.page_token, (float, str),
                           include_closed=request.include_closed)
        page, token = req.page(self.trainer.list(context.current_tenant(), request.include_closed, req.after,
                                                 req.limit), key=lambda s: (s.create_time, s.session_id))
        return trainer_pb2.ListSessionsResponse(sessions=[s.proto() for s in page], next_page_token=token)

    def CloseSession(self, request, ctx):
        return trainer_pb2.CloseSessionResponse(
            session=self.trainer.close(context.current_tenant(), request.session_id).proto())

    # -- ops: each returns its future at once ----------------------------------------------------
    def ForwardBackward(self, request, ctx):
        op = self.trainer.forward_backward(context.current_tenant(), request)
        return trainer_pb2.ForwardBackwardResponse(future=op.ref())

    def Forward(self, request, ctx):
        return trainer_pb2.ForwardResponse(future=self.trainer.forward(context.current_tenant(), request).ref())

    def OptimStep(self, request, ctx):
        return trainer_pb2.OptimStepResponse(future=self.trainer.optim_step(context.current_tenant(), request).ref())

    def Sample(self, request, ctx):
        return trainer_pb2.SampleResponse(future=self.trainer.sample(context.current_tenant(), request).ref())

    def GetInfo(self, request, ctx):
        return trainer_pb2.GetInfoResponse(future=self.trainer.get_info(context.current_tenant(), request).ref())

    def ForwardCustom(self, request, ctx):
        op = self.trainer.forward_custom(context.current_tenant(), request)
        return trainer_pb2.ForwardCustomResponse(future=op.ref())

    def BackwardCustom(self, request, ctx):
        op = self.trainer.backward_custom(context.current_tenant(), request)
        return trainer_pb2.BackwardCustomResponse(future=op.ref())

    def SaveState(self, request, ctx):
        return trainer_pb2.SaveStateResponse(future=self.trainer.save_state(context.current_tenant(), request).ref())

    def LoadState(self, request, ctx):
        return trainer_pb2.LoadStateResponse(future=self.trainer.load_state(context.current_tenant(), request).ref())

    # -- futures ---------------------------------------------------------------------------------
    def WatchFutures(self, request, ctx: grpc.ServicerContext):
        for event in self.trainer.watch(context.current_tenant(), request, ctx.is_active):
            yield trainer_pb2.WatchFuturesResponse(event=event)

    def GetFuture(self, request, ctx):
        op = self.trainer.future(context.current_tenant(), request.session_id, request.future_id)
        return trainer_pb2.GetFutureResponse(event=op.event())

    def CancelFuture(self, request, ctx):
        cancelled, op = self.trainer.cancel(context.current_tenant(), request.session_id, request.future_id)
        return trainer_pb2.CancelFutureResponse(cancelled=cancelled, event=op.event())


def create(env: ServiceEnvironment) -> TrainerServicer:
    model_dir = Path(env.config.model_dir) if env.config.model_dir else env.config.data_dir / "models"
    cfg = env.config
    limits = TrainerLimits(sessions=cfg.quota_sessions, private_copies=cfg.quota_private_copies,
                           sample_tokens=cfg.max_sample_tokens, batch_tokens=cfg.max_batch_tokens,
                           pending_ops=cfg.quota_pending_ops)
    trainer = Trainer(model_dir, VaultClient(env.peers, cfg.max_artifact_mb << 20), AccountantClient(env.peers),
                      models=cfg.registered_models(), limits=limits)
    trainer.audit = OpAudit(env.db)  # entries that ops write when they run, delivered with the service's own
    trainer.service_key = env.config.service_key  # authenticates saved checkpoints' lineage to the vault
    env.closers.append(trainer.shutdown)
    return TrainerServicer(trainer)
