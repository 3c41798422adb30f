"""``TrainingClient``: one training session on the server, driven through futures."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from tensafe.api.trainer.v1 import trainer_pb2

from ._transport import make_error, translate_error
from .configs import LossConfig, to_struct
from .errors import FutureCancelledError, ServerError, ServiceUnavailableError, TGTinkerError, ValidationError
from .futures import FutureHandle, Outcome
from .results import (
    CustomLossResult,
    ForwardBackwardResult,
    LoadStateResult,
    OpResult,
    OptimStepResult,
    SampleResult,
    SaveStateResult,
    SessionInfo,
    event_result,
)
from .sampling import Prompts, sampling_params, split_prompts
from .sampling_rules import SamplingParamError, check_sampling
from .tensors import from_proto, to_proto

if TYPE_CHECKING:
    import torch

    from ._transport import Transport

log = logging.getLogger("tg_tinker.training")
R = TypeVar("R")

_BATCH_FIELDS = ("input_ids", "attention_mask", "labels", "advantages", "old_logprobs")


def batch_to_proto(batch: Mapping[str, Any]) -> trainer_pb2.Batch:
    """``input_ids`` / ``attention_mask`` / ``labels`` (int, [batch, seq]), optional RL tensors and extras."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValidationError("batch: a mapping with at least 'input_ids' is required", field="batch.input_ids",
                              code="INVALID_ARGUMENT")
    msg = trainer_pb2.Batch()
    for name, value in batch.items():
        if value is None:
            continue
        where = f"batch.{name}"
        if name in ("input_ids", "attention_mask", "labels"):
            getattr(msg, name).CopyFrom(to_proto(value, where, dtype="int64"))
        elif name in ("advantages", "old_logprobs"):
            getattr(msg, name).CopyFrom(to_proto(value, where, dtype="float32"))
        else:
            msg.extra[name].CopyFrom(to_proto(value, f"batch.extra.{name}"))
    return msg


def _loss_proto(loss: str | LossConfig | None, kwargs: dict[str, Any]) -> trainer_pb2.LossConfig | None:
    if loss is None and not kwargs:
        return None
    if isinstance(loss, LossConfig):
        return LossConfig(loss.name, {**loss.kwargs, **kwargs}).to_proto()
    return trainer_pb2.LossConfig(name=loss or "token_ce", kwargs=to_struct(kwargs, "loss.kwargs"))


def _scalar_loss(value: object) -> torch.Tensor:
    """``loss_fn``'s result, which must be a scalar tensor (the caller's function may return anything)."""
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise ValidationError("loss_fn must return a scalar torch tensor", field="loss_fn", code="INVALID_ARGUMENT")
    return value


class _Waiter(Protocol):
    """What the router completes: one submitted operation, whatever its result type."""

    def settle(self, event: trainer_pb2.FutureEvent) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class _Pending(Generic[R]):
    """A submitted operation waiting for its event: the outcome to set and the result type it must have."""

    def __init__(self, outcome: Outcome[R], expected: type[R], on_result: Callable[[OpResult], None]) -> None:
        self.outcome = outcome
        self.expected = expected
        self.on_result = on_result

    def settle(self, event: trainer_pb2.FutureEvent) -> None:
        if event.state == trainer_pb2.FUTURE_STATE_SUCCEEDED:
            result = event_result(event)
            if not isinstance(result, self.expected):
                self.fail(ServerError(f"future {event.future_id} returned a {type(result).__name__}, not a "
                                      f"{self.expected.__name__}", code="INTERNAL"))
                return
            self.on_result(result)
            self.outcome.set_result(result)
        elif event.state == trainer_pb2.FUTURE_STATE_CANCELLED:
            self.fail(FutureCancelledError(event.error.message or "cancelled", code="FUTURE_CANCELLED"))
        else:
            e = event.error
            name = grpc.StatusCode.INTERNAL.name
            for code in grpc.StatusCode:
                if code.value[0] == e.code:
                    name = code.name
            self.fail(make_error(name, e.reason or None, e.message, dict(e.metadata)))

    def fail(self, error: BaseException) -> None:
        self.outcome.set_exception(error)


class _FutureRouter:
    """Reads the session's WatchFutures stream on a thread and completes the matching operations.

    The stream holds one of the tenant's stream places on the server (``TENSAFE_QUOTA_STREAMS_PER_TENANT``)
    until the client is closed. When the server refuses it, or it ends for good, :attr:`error` holds
    why, every waiting operation fails with it, and so does every one registered later."""

    def __init__(self, transport: Transport, session_id: str, after_sequence: int) -> None:
        self._transport = transport
        self._session_id = session_id
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[int, _Waiter]] = {}
        self._early: dict[str, trainer_pb2.FutureEvent] = {}
        self._after = after_sequence
        self._call: Any = None
        self._stopped = False
        self.error: TGTinkerError | None = None
        self._established = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tg-futures-{session_id}", daemon=True)
        self._thread.start()

    def wait_established(self, timeout: float) -> None:
        """Wait until the server has admitted the stream; raise its refusal (e.g. QuotaExceededError)."""
        if not self._established.wait(timeout):
            raise ServiceUnavailableError(f"the result stream of session {self._session_id} was not "
                                          f"admitted within {timeout:g} s", code="DEADLINE_EXCEEDED")
        if self.error is not None:
            raise self.error

    def register(self, ref: trainer_pb2.FutureRef, waiter: _Waiter) -> None:
        with self._lock:
            early = self._early.pop(ref.future_id, None)
            if early is None and self.error is None:
                self._waiting[ref.future_id] = (ref.sequence, waiter)
        if early is not None:
            waiter.settle(early)
        elif self.error is not None:
            waiter.fail(self.error)

    def _run(self) -> None:
        transport = self._transport
        backoff = 0.2
        while not self._stopped:
            with self._lock:
                pending = [seq for seq, _ in self._waiting.values()]
            after = min(pending) - 1 if pending else self._after
            try:
                self._call = transport.stub("trainer").WatchFutures(
                    trainer_pb2.WatchFuturesRequest(session_id=self._session_id, after_sequence=after),
                    metadata=transport.metadata())
                # The server sends its headers (with x-request-id) as soon as it admits the stream; a refused
                # stream gets none (its status comes alone), and iterating it raises the refusal.
                if any(k == "x-request-id" for k, _ in self._call.initial_metadata() or ()):
                    self._established.set()
                for resp in self._call:
                    backoff = 0.2
                    self._dispatch(resp.event)
                if self._stopped:
                    return
                return  # the server ended the stream: the session was closed
            except grpc.RpcError as err:
                if self._stopped or err.code() == grpc.StatusCode.CANCELLED:
                    return
                error = translate_error(err)
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._fail_all(error)
                    return
                log.warning("future stream interrupted (%s); reconnecting", error)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - never leave callers waiting forever
                self._fail_all(TGTinkerError(f"future stream failed: {exc}", code="CLIENT_ERROR"))
                return
            finally:
                self._established.set()
        self._fail_all(ServiceUnavailableError("the training client was closed", code="CLIENT_CLOSED"))

    def _dispatch(self, event: trainer_pb2.FutureEvent) -> None:
        with self._lock:
            self._after = max(self._after, event.sequence)
            entry = self._waiting.pop(event.future_id, None)
            if entry is None:
                self._early[event.future_id] = event
                return
        entry[1].settle(event)

    def _fail_all(self, error: TGTinkerError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            waiters = [w for _, w in self._waiting.values()]
            self._waiting.clear()
        for waiter in waiters:
            waiter.fail(error)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
        self._thread.join(5)
        self._fail_all(ServiceUnavailableError("the training client was closed", code="CLIENT_CLOSED"))


class TrainingClient:
    """A training session. Operations return a :class:`FutureHandle` at once and the server
    applies them in the order they were submitted, so several can be queued before waiting."""

    def __init__(self, transport: Transport, session: trainer_pb2.Session) -> None:
        self._transport = transport
        self.session_id = session.session_id
        self.config = session.config
        self._step = session.step
        self._router = _FutureRouter(transport, self.session_id, session.last_sequence)
        try:
            self._router.wait_established(transport.config.timeout)
        except TGTinkerError:
            self._router.stop()
            raise

    def __repr__(self) -> str:
        return f"TrainingClient({self.session_id!r}, model_ref={self.config.model_ref!r}, step={self._step})"

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def step(self) -> int:
        """Optimizer steps applied, as of the last ``optim_step`` result received."""
        return self._step

    # -- plumbing -----------------------------------------------------------------------------
    def _submit(self, method: str, request: Message, expected: type[R]) -> FutureHandle[R]:
        ref: trainer_pb2.FutureRef = self._transport.unary("trainer", method, request).future
        outcome: Outcome[R] = Outcome()
        self._router.register(ref, _Pending(outcome, expected, self._observe))
        return FutureHandle(ref.future_id, session_id=self.session_id, canceller=self._cancel, outcome=outcome)

    def _cancel(self, future_id: str) -> bool:
        resp = self._transport.unary("trainer", "CancelFuture",
                                     trainer_pb2.CancelFutureRequest(session_id=self.session_id, future_id=future_id))
        return resp.cancelled

    def _observe(self, result: OpResult) -> None:
        if isinstance(result, OptimStepResult):
            self._step = max(self._step, result.step)

    # -- training -------------------------------------------------------------------------------
    def forward_backward(self, batch: Mapping[str, Any] | None, loss: str | LossConfig | None = None, *,
                         return_logprobs: bool = False, **loss_kwargs: Any) -> FutureHandle[ForwardBackwardResult]:
        """Queue a forward and backward pass; gradients accumulate until :meth:`optim_step`.

        ``batch`` None: in a session with ``DPConfig(sampling="server")`` the trainer draws the batch from the
        session's dataset itself (and refuses one sent)."""
        req = trainer_pb2.ForwardBackwardRequest(session_id=self.session_id, return_logprobs=return_logprobs)
        if batch is not None:
            req.batch.CopyFrom(batch_to_proto(batch))
        lp = _loss_proto(loss, loss_kwargs)
        if lp is not None:
            req.loss.CopyFrom(lp)
        return self._submit("ForwardBackward", req, ForwardBackwardResult)

    def forward(self, batch: Mapping[str, Any], loss: str | LossConfig | None = None, *,
                return_logprobs: bool = False, **loss_kwargs: Any) -> FutureHandle[ForwardBackwardResult]:
        """Queue a forward pass that computes the loss without gradients."""
        req = trainer_pb2.ForwardRequest(session_id=self.session_id, batch=batch_to_proto(batch),
                                         return_logprobs=return_logprobs)
        lp = _loss_proto(loss, loss_kwargs)
        if lp is not None:
            req.loss.CopyFrom(lp)
        return self._submit("Forward", req, ForwardBackwardResult)

    def optim_step(self, apply_dp_noise: bool | None = None, *, learning_rate: float | None = None,
                   beta1: float | None = None, beta2: float | None = None, eps: float | None = None,
                   weight_decay: float | None = None, grad_clip_norm: float | None = None,
                   ) -> FutureHandle[OptimStepResult]:
        """Queue an optimizer update with the accumulated gradients.

        The keyword arguments set the optimizer's hyperparameters from this step on (Tinker's
        ``AdamParams``); one not given keeps its current value. ``grad_clip_norm`` clips the global
        gradient norm of this step only (0: no clipping)."""
        req = trainer_pb2.OptimStepRequest(session_id=self.session_id)
        if apply_dp_noise is not None:
            req.apply_dp_noise = apply_dp_noise
        given = {"learning_rate": learning_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
                 "weight_decay": weight_decay, "grad_clip_norm": grad_clip_norm}
        if any(v is not None for v in given.values()):
            req.params.SetInParent()
            for name, value in given.items():
                if value is not None:
                    setattr(req.params, name, float(value))
        return self._submit("OptimStep", req, OptimStepResult)

    def forward_backward_custom(self, batch: Mapping[str, Any],
                                loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor],
                                ) -> FutureHandle[CustomLossResult]:
        """Train with a loss computed HERE, on this machine: the server returns the per-token
        log-probabilities of the labels, ``loss_fn(logprobs, batch)`` (torch) computes a scalar loss,
        and only d(loss)/d(logprobs) goes back. No client code runs on the server."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the client's install
            raise TGTinkerError("forward_backward_custom needs torch on the client", code="CLIENT_ERROR") from exc
        fwd = self._submit("ForwardCustom", trainer_pb2.ForwardCustomRequest(
            session_id=self.session_id, batch=batch_to_proto(batch)), trainer_pb2.ForwardCustomResult)
        fwd_result = fwd.result()
        logprobs = torch.tensor(from_proto(fwd_result.logprobs, "logprobs"), requires_grad=True)
        loss = _scalar_loss(loss_fn(logprobs, batch))
        (grad,) = torch.autograd.grad(loss, logprobs)
        loss_value = float(loss.detach())
        back = self._submit("BackwardCustom", trainer_pb2.BackwardCustomRequest(
            session_id=self.session_id, forward_future_id=fwd.future_id,
            grad_logprobs=to_proto(grad.detach().numpy(), "grad_logprobs", dtype="float32"), loss=loss_value),
            trainer_pb2.BackwardCustomResult)
        outcome: Outcome[CustomLossResult] = Outcome()

        def finish(done: FutureHandle[trainer_pb2.BackwardCustomResult]) -> None:
            error = done.exception()
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(CustomLossResult(loss_value, done.result().num_tokens))

        back.add_done_callback(finish)
        return FutureHandle(back.future_id, session_id=self.session_id, outcome=outcome)

    # -- sampling and info ------------------------------------------------------------------------
    def sample_async(self, prompts: Prompts, max_tokens: int = 128, *,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     stop: Sequence[str] | str | None = None, seed: int | None = None, num_samples: int = 1,
                     return_logprobs: bool = False) -> FutureHandle[SampleResult]:
        """Queue generation from the session's current weights (temperature 0: greedy)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValidationError("prompts: at least one prompt is required", field="prompts",
                                  code="INVALID_ARGUMENT")
        params = sampling_params(max_tokens, temperature, top_p, top_k, stop, seed, num_samples, return_logprobs)
        try:
            check_sampling(params)  # the rules the trainer applies, so a mistake fails here, naming the field
        except SamplingParamError as err:
            raise ValidationError(str(err), field=err.field, code="INVALID_ARGUMENT") from None
        texts, token_ids = split_prompts(prompts)
        req = trainer_pb2.SampleRequest(session_id=self.session_id, sampling=params, prompts=texts,
                                        prompt_token_ids=token_ids)
        return self._submit("Sample", req, SampleResult)

    def sample(self, prompts: Prompts, max_tokens: int = 128,
               **kwargs: Any) -> SampleResult:
        """Generate and wait for the result (after every op queued before it)."""
        return self.sample_async(prompts, max_tokens, **kwargs).result()

    def get_info_async(self) -> FutureHandle[SessionInfo]:
        return self._submit("GetInfo", trainer_pb2.GetInfoRequest(session_id=self.session_id), SessionInfo)

    def get_info(self) -> SessionInfo:
        """The session's state once every op queued before this call has run."""
        return self.get_info_async().result()

    # -- checkpoints (the vault) ----------------------------------------------------------------------
    def save_state_async(self, include_optimizer: bool = True, metadata: dict[str, Any] | None = None,
                         name: str = "") -> FutureHandle[SaveStateResult]:
        return self._submit("SaveState", trainer_pb2.SaveStateRequest(
            session_id=self.session_id, include_optimizer=include_optimizer,
            metadata=to_struct(metadata, "metadata"), name=name), SaveStateResult)

    def save_state(self, include_optimizer: bool = True, metadata: dict[str, Any] | None = None,
                   name: str = "") -> SaveStateResult:
        """Save an encrypted checkpoint in the vault and return its description."""
        return self.save_state_async(include_optimizer, metadata, name).result()

    def load_state_async(self, artifact_id: str) -> FutureHandle[LoadStateResult]:
        return self._submit("LoadState", trainer_pb2.LoadStateRequest(session_id=self.session_id,
                                                                      artifact_id=artifact_id), LoadStateResult)

    def load_state(self, artifact_id: str) -> LoadStateResult:
        """Restore a checkpoint saved by :meth:`save_state`."""
        return self.load_state_async(artifact_id).result()

    # -- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the session on the server (its memory is released) and stop listening for results."""
        try:
            self._transport.unary("trainer", "CloseSession",
                                  trainer_pb2.CloseSessionRequest(session_id=self.session_id))
        finally:
            self._router.stop()
