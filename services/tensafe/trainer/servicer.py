"""gRPC adapter of the trainer: tenant and request in, read into plain values (``values``), `Trainer` called,
protos out; and `create`, which builds the trainer from the service environment (limits, vault and
accountant clients, op audit). The only module of the trainer that reads a request message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from tensafe.common import devices
from tensafe.runtime import context
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment
from tensafe.runtime.vault_client import VaultClient
from tg_tinker.configs import from_struct
from tg_tinker.sampling_rules import SamplingParamError, check_sampling

from .audit_trail import OpAudit
from .messages import BIAS_NAMES, config_proto
from .service import Trainer, TrainerLimits
from .session import TrainingSession
from .settings import STEP_PARAM_FIELDS, StepParams
from .values import (
    BatchInput,
    DPSpec,
    LoraSpec,
    LossSpec,
    OptimizerSpec,
    SamplingSpec,
    SessionConfig,
    TensorData,
)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Each RPC: the request read into plain values (``values``), the ``Trainer`` called, its answer
    (a session, a future) written into the response. Sampling parameters are checked here, by the
    rules the SDK and inference share (``tg_tinker.sampling_rules``)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    # -- sessions ---------------------------------------------------------------------------
    def CreateSession(self, request: trainer_pb2.CreateSessionRequest,
                      ctx: grpc.ServicerContext) -> trainer_pb2.CreateSessionResponse:
        session = self.trainer.create_session(context.current_tenant(), config_value(request.config))
        return trainer_pb2.CreateSessionResponse(session=session_proto(session))

    def GetSession(self, request: trainer_pb2.GetSessionRequest,
                   ctx: grpc.ServicerContext) -> trainer_pb2.GetSessionResponse:
        return trainer_pb2.GetSessionResponse(
            session=session_proto(self.trainer.get(context.current_tenant(), request.session_id)))

    def ListSessions(self, request: trainer_pb2.ListSessionsRequest,
                     ctx: grpc.ServicerContext) -> trainer_pb2.ListSessionsResponse:
        req = page_request("trainer.ListSessions", request.page_size, request.page_token, (float, str),
                           include_closed=request.include_closed)
        page, token = req.page(self.trainer.list(context.current_tenant(), request.include_closed, req.after,
                                                 req.limit), key=lambda s: (s.create_time, s.session_id))
        return trainer_pb2.ListSessionsResponse(sessions=[session_proto(s) for s in page], next_page_token=token)

    def CloseSession(self, request: trainer_pb2.CloseSessionRequest,
                     ctx: grpc.ServicerContext) -> trainer_pb2.CloseSessionResponse:
        return trainer_pb2.CloseSessionResponse(
            session=session_proto(self.trainer.close(context.current_tenant(), request.session_id)))

    # -- ops: each returns its future at once ----------------------------------------------------
    def ForwardBackward(self, request: trainer_pb2.ForwardBackwardRequest,
                        ctx: grpc.ServicerContext) -> trainer_pb2.ForwardBackwardResponse:
        op = self.trainer.forward_backward(context.current_tenant(), request.session_id, batch_value(request.batch),
                                           loss_value(request), request.return_logprobs)
        return trainer_pb2.ForwardBackwardResponse(future=op.ref())

    def Forward(self, request: trainer_pb2.ForwardRequest, ctx: grpc.ServicerContext) -> trainer_pb2.ForwardResponse:
        op = self.trainer.forward(context.current_tenant(), request.session_id, batch_value(request.batch),
                                  loss_value(request), request.return_logprobs)
        return trainer_pb2.ForwardResponse(future=op.ref())

    def OptimStep(self, request: trainer_pb2.OptimStepRequest,
                  ctx: grpc.ServicerContext) -> trainer_pb2.OptimStepResponse:
        noise = request.apply_dp_noise if request.HasField("apply_dp_noise") else None
        step = None
        if request.HasField("params"):
            p = request.params
            step = StepParams(**{f: getattr(p, f) if p.HasField(f) else None for f in STEP_PARAM_FIELDS})
        return trainer_pb2.OptimStepResponse(
            future=self.trainer.optim_step(context.current_tenant(), request.session_id, noise, step).ref())

    def Sample(self, request: trainer_pb2.SampleRequest, ctx: grpc.ServicerContext) -> trainer_pb2.SampleResponse:
        sampling = sampling_value(request.sampling)
        op = self.trainer.sample(context.current_tenant(), request.session_id, sampling, list(request.prompts),
                                 [list(p.token_ids) for p in request.prompt_token_ids])
        return trainer_pb2.SampleResponse(future=op.ref())

    def GetInfo(self, request: trainer_pb2.GetInfoRequest, ctx: grpc.ServicerContext) -> trainer_pb2.GetInfoResponse:
        return trainer_pb2.GetInfoResponse(
            future=self.trainer.get_info(context.current_tenant(), request.session_id).ref())

    def ForwardCustom(self, request: trainer_pb2.ForwardCustomRequest,
                      ctx: grpc.ServicerContext) -> trainer_pb2.ForwardCustomResponse:
        op = self.trainer.forward_custom(context.current_tenant(), request.session_id, batch_value(request.batch))
        return trainer_pb2.ForwardCustomResponse(future=op.ref())

    def BackwardCustom(self, request: trainer_pb2.BackwardCustomRequest,
                       ctx: grpc.ServicerContext) -> trainer_pb2.BackwardCustomResponse:
        grad = tensor_value(request.grad_logprobs) if request.HasField("grad_logprobs") else None
        op = self.trainer.backward_custom(context.current_tenant(), request.session_id, request.forward_future_id,
                                          grad, request.loss if request.HasField("loss") else None)
        return trainer_pb2.BackwardCustomResponse(future=op.ref())

    def SaveState(self, request: trainer_pb2.SaveStateRequest,
                  ctx: grpc.ServicerContext) -> trainer_pb2.SaveStateResponse:
        metadata = from_struct(request.metadata) if request.HasField("metadata") else None
        op = self.trainer.save_state(context.current_tenant(), request.session_id, request.name,
                                     request.include_optimizer, metadata)
        return trainer_pb2.SaveStateResponse(future=op.ref())

    def LoadState(self, request: trainer_pb2.LoadStateRequest,
                  ctx: grpc.ServicerContext) -> trainer_pb2.LoadStateResponse:
        return trainer_pb2.LoadStateResponse(
            future=self.trainer.load_state(context.current_tenant(), request.session_id, request.artifact_id).ref())

    # -- futures ---------------------------------------------------------------------------------
    def WatchFutures(self, request: trainer_pb2.WatchFuturesRequest,
                     ctx: grpc.ServicerContext) -> Iterator[trainer_pb2.WatchFuturesResponse]:
        events = self.trainer.watch(context.current_tenant(), request.session_id, request.after_sequence,
                                    request.future_ids, ctx.is_active)
        for event in events:
            yield trainer_pb2.WatchFuturesResponse(event=event)

    def GetFuture(self, request: trainer_pb2.GetFutureRequest,
                  ctx: grpc.ServicerContext) -> trainer_pb2.GetFutureResponse:
        op = self.trainer.future(context.current_tenant(), request.session_id, request.future_id)
        return trainer_pb2.GetFutureResponse(event=op.event())

    def CancelFuture(self, request: trainer_pb2.CancelFutureRequest,
                     ctx: grpc.ServicerContext) -> trainer_pb2.CancelFutureResponse:
        cancelled, op = self.trainer.cancel(context.current_tenant(), request.session_id, request.future_id)
        return trainer_pb2.CancelFutureResponse(cancelled=cancelled, event=op.event())


# -- requests -> plain values ------------------------------------------------------------------------
def tensor_value(msg: common_pb2.Tensor) -> TensorData:
    return TensorData(dtype=msg.dtype, shape=tuple(msg.shape), data=msg.data)


def batch_value(msg: trainer_pb2.Batch) -> BatchInput:
    def get(name: str) -> TensorData | None:
        return tensor_value(getattr(msg, name)) if msg.HasField(name) else None

    return BatchInput(input_ids=get("input_ids"), attention_mask=get("attention_mask"), labels=get("labels"),
                      advantages=get("advantages"), old_logprobs=get("old_logprobs"),
                      extra={name: tensor_value(t) for name, t in msg.extra.items()})


def loss_spec(msg: trainer_pb2.LossConfig) -> LossSpec:
    return LossSpec(name=msg.name, kwargs=from_struct(msg.kwargs) if msg.HasField("kwargs") else None)


def loss_value(request) -> LossSpec | None:
    """The call's ``loss``; None when it names none (the session's default applies)."""
    return loss_spec(request.loss) if request.HasField("loss") else None


def _optional(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def config_value(msg: trainer_pb2.TrainingConfig) -> SessionConfig:
    """A TrainingConfig as plain values (``messages.config_proto`` is the inverse)."""
    lora = opt = dp = None
    if msg.HasField("lora_config"):
        lc = msg.lora_config
        if lc.bias not in BIAS_NAMES:
            raise InvalidArgument("config.lora_config.bias", f"unknown LoRA bias {lc.bias}")
        lora = LoraSpec(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target_modules=tuple(lc.target_modules),
                        bias=BIAS_NAMES[lc.bias])
    if msg.HasField("optimizer"):
        o = msg.optimizer
        opt = OptimizerSpec(name=o.name, learning_rate=o.learning_rate, weight_decay=o.weight_decay,
                            betas=tuple(o.betas), eps=_optional(o, "eps"), momentum=_optional(o, "momentum"))
    if msg.HasField("dp_config"):
        d = msg.dp_config
        dp = DPSpec(enabled=d.enabled, noise_multiplier=_optional(d, "noise_multiplier"),
                    max_grad_norm=d.max_grad_norm, target_epsilon=d.target_epsilon, target_delta=d.target_delta,
                    accountant_type=d.accountant_type, dataset_size=_optional(d, "dataset_size"),
                    sample_rate=_optional(d, "sample_rate"), max_steps=_optional(d, "max_steps"),
                    budget_id=d.budget_id, sampling=d.sampling, dataset_artifact_id=d.dataset_artifact_id)
    return SessionConfig(model_ref=msg.model_ref, lora=lora, optimizer=opt, batch_size=msg.batch_size,
                         gradient_accumulation_steps=msg.gradient_accumulation_steps, seed=_optional(msg, "seed"),
                         max_sequence_length=msg.max_sequence_length, dp=dp,
                         loss=loss_spec(msg.loss) if msg.HasField("loss") else None,
                         metadata=from_struct(msg.metadata) if msg.HasField("metadata") else None)


def sampling_value(msg: common_pb2.SamplingParams, field: str = "sampling") -> SamplingSpec:
    """SamplingParams checked by the shared rules, as plain values."""
    try:
        check_sampling(msg, field)
    except SamplingParamError as exc:
        raise InvalidArgument(exc.field, exc.reason) from None
    return SamplingSpec(max_tokens=msg.max_tokens, temperature=_optional(msg, "temperature"),
                        top_p=_optional(msg, "top_p"), top_k=_optional(msg, "top_k"), stop=tuple(msg.stop),
                        seed=_optional(msg, "seed"), num_samples=msg.num_samples,
                        return_logprobs=msg.return_logprobs)


# -- plain values -> responses -----------------------------------------------------------------------
def session_proto(session: TrainingSession) -> trainer_pb2.Session:
    msg = trainer_pb2.Session(session_id=session.session_id, tenant_id=session.tenant_id,
                              config=config_proto(session.settings.config),
                              state=trainer_pb2.SESSION_STATE_CLOSED if session.closed
                              else trainer_pb2.SESSION_STATE_ACTIVE,
                              step=session.step, last_sequence=session.book.last_sequence,
                              budget_id=session.dp.budget_id if session.dp else "")
    msg.create_time.FromNanoseconds(int(session.create_time * 1e9))
    if session.close_time:
        msg.close_time.FromNanoseconds(int(session.close_time * 1e9))
    return msg


def create(env: ServiceEnvironment) -> TrainerServicer:
    devices.configure(env.config.device, env.config.dtype)  # a device this process cannot use stops the start
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
