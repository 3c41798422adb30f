"""``TrainingClient``: one training session on the server, driven through futures."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2

from ._transport import make_error, translate_error
from .configs import LossConfig, to_struct
from .errors import FutureCancelledError, ServiceUnavailableError, TGTinkerError, ValidationError
from .futures import FutureHandle
from .results import (
    RESULT_TYPES,
    CustomLossResult,
    ForwardBackwardResult,
    LoadStateResult,
    OptimStepResult,
    SampleResult,
    SaveStateResult,
    SessionInfo,
)
from .sampling import sampling_params
from .sampling_rules import SamplingParamError, check_sampling
from .tensors import to_proto

if TYPE_CHECKING:
    from ._transport import Transport

log = logging.getLogger("tg_tinker.training")

_BATCH_FIELDS = ("input_ids", "attention_mask", "labels", "advantages", "old_logprobs")


def batch_to_proto(batch: Mapping[str, Any]) -> trainer_pb2.Batch:
    """``input_ids`` / ``attention_mask`` / ``labels`` (int, [batch, seq]), optional RL tensors and extras."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
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


class _FutureRouter:
    """Reads the session's WatchFutures stream on a thread and completes the matching handles.

    The stream holds one of the tenant's stream places on the server (``TENSAFE_QUOTA_STREAMS_PER_TENANT``)
    until the client is closed. When the server refuses it, or it ends for good, :attr:`error` holds
    why, every waiting handle fails with it, and so does every handle registered later."""

    def __init__(self, client: TrainingClient, after_sequence: int) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._handles: dict[str, tuple[int, FutureHandle]] = {}
        self._early: dict[str, trainer_pb2.FutureEvent] = {}
        self._after = after_sequence
        self._call: Any = None
        self._stopped = False
        self.error: TGTinkerError | None = None
        self._established = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tg-futures-{client.session_id}", daemon=True)
        self._thread.start()

    def wait_established(self, timeout: float) -> None:
        """Wait until the server has admitted the stream; raise its refusal (e.g. QuotaExceededError)."""
        if not self._established.wait(timeout):
            raise ServiceUnavailableError(f"the result stream of session {self._client.session_id} was not "
                                          f"admitted within {timeout:g} s", code="DEADLINE_EXCEEDED")
        if self.error is not None:
            raise self.error

    def register(self, ref: trainer_pb2.FutureRef, handle: FutureHandle) -> None:
        with self._lock:
            early = self._early.pop(ref.future_id, None)
            if early is None and self.error is None:
                self._handles[ref.future_id] = (ref.sequence, handle)
        if early is not None:
            self._client._complete(handle, early)
        elif self.error is not None:
            handle._set_exception(self.error)

    def _run(self) -> None:
        transport = self._client._transport
        backoff = 0.2
        while not self._stopped:
            with self._lock:
                pending = [seq for seq, _ in self._handles.values()]
            after = min(pending) - 1 if pending else self._after
            try:
                self._call = transport.stub("trainer").WatchFutures(
                    trainer_pb2.WatchFuturesRequest(session_id=self._client.session_id, after_sequence=after),
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
            entry = self._handles.pop(event.future_id, None)
            if entry is None:
                self._early[event.future_id] = event
                return
        self._client._complete(entry[1], event)

    def _fail_all(self, error: TGTinkerError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            handles = [h for _, h in self._handles.values()]
            self._handles.clear()
        for handle in handles:
            handle._set_exception(error)

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
        self._router = _FutureRouter(self, session.last_sequence)
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
    def _submit(self, method: str, request: Any) -> FutureHandle:
        ref = self._transport.unary("trainer", method, request).future
        handle: FutureHandle = FutureHandle(ref.future_id, session_id=self.session_id, canceller=self._cancel)
        self._router.register(ref, handle)
        return handle

    def _cancel(self, future_id: str) -> bool:
        resp = self._transport.unary("trainer", "CancelFuture",
                                     trainer_pb2.CancelFutureRequest(session_id=self.session_id, future_id=future_id))
        return resp.cancelled

    def _complete(self, handle: FutureHandle, event: trainer_pb2.FutureEvent) -> None:
        if event.state == trainer_pb2.FUTURE_STATE_SUCCEEDED:
            which = event.WhichOneof("result")
            result = RESULT_TYPES[which](getattr(event, which))
            if isinstance(result, OptimStepResult):
                self._step = max(self._step, result.step)
            handle._set_result(result)
        elif event.state == trainer_pb2.FUTURE_STATE_CANCELLED:
            handle._set_exception(FutureCancelledError(event.error.message or "cancelled", code="FUTURE_CANCELLED"))
        else:
            e = event.error
            name = grpc.StatusCode.INTERNAL.name
            for code in grpc.StatusCode:
                if code.value[0] == e.code:
                    name = code.name
            handle._set_exception(make_error(name, e.reason or None, e.message, dict(e.metadata)))

    # -- training -------------------------------------------------------------------------------
    def forward_backward(self, batch: Mapping[str, Any], loss: str | LossConfig | None = None, *,
                         return_logprobs: bool = False, **loss_kwargs: Any) -> FutureHandle[ForwardBackwardResult]:
        """Queue a forward and backward pass; gradients accumulate until :meth:`optim_step`."""
        req = trainer_pb2.ForwardBackwardRequest(session_id=self.session_id, batch=batch_to_proto(batch),
                                                 return_logprobs=return_logprobs)
        lp = _loss_proto(loss, loss_kwargs)
        if lp is not None:
            req.loss.CopyFrom(lp)
        return self._submit("ForwardBackward", req)

    def forward(self, batch: Mapping[str, Any], loss: str | LossConfig | None = None, *,
                return_logprobs: bool = False, **loss_kwargs: Any) -> FutureHandle[ForwardBackwardResult]:
        """Queue a forward pass that computes the loss without gradients."""
        req = trainer_pb2.ForwardRequest(session_id=self.session_id, batch=batch_to_proto(batch),
                                         return_logprobs=return_logprobs)
        lp = _loss_proto(loss, loss_kwargs)
        if lp is not None:
            req.loss.CopyFrom(lp)
        return self._submit("Forward", req)

    def optim_step(self, apply_dp_noise: bool | None = None) -> FutureHandle[OptimStepResult]:
        """Queue an optimizer update with the accumulated gradients."""
        req = trainer_pb2.OptimStepRequest(session_id=self.session_id)
        if apply_dp_noise is not None:
            req.apply_dp_noise = apply_dp_noise
        return self._submit("OptimStep", req)

    def forward_backward_custom(self, batch: Mapping[str, Any],
                                loss_fn: Callable[[Any, Mapping[str, Any]], Any]) -> FutureHandle[CustomLossResult]:
        """Train with a loss computed HERE, on this machine: the server returns the per-token
        log-probabilities of the labels, ``loss_fn(logprobs, batch)`` (torch) computes a scalar loss,
        and only d(loss)/d(logprobs) goes back. No client code runs on the server."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the client's install
            raise TGTinkerError("forward_backward_custom needs torch on the client", code="CLIENT_ERROR") from exc
        fwd = self._submit("ForwardCustom", trainer_pb2.ForwardCustomRequest(
            session_id=self.session_id, batch=batch_to_proto(batch)))
        fwd_result = fwd.result()
        from .tensors import from_proto

        logprobs = torch.tensor(from_proto(fwd_result.logprobs, "logprobs"), requires_grad=True)
        loss = loss_fn(logprobs, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValidationError("loss_fn must return a scalar torch tensor", field="loss_fn",
                                  code="INVALID_ARGUMENT")
        (grad,) = torch.autograd.grad(loss, logprobs)
        back = self._submit("BackwardCustom", trainer_pb2.BackwardCustomRequest(
            session_id=self.session_id, forward_future_id=fwd.future_id,
            grad_logprobs=to_proto(grad.detach().numpy(), "grad_logprobs", dtype="float32"), loss=float(loss.detach())))
        out: FutureHandle[CustomLossResult] = FutureHandle(back.future_id, session_id=self.session_id)
        back.add_done_callback(lambda f: out._set_exception(f.exception()) if f.exception() else
                               out._set_result(CustomLossResult(float(loss.detach()), f.result().num_tokens)))
        return out

    # -- sampling and info ------------------------------------------------------------------------
    def sample_async(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 128, *,
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
        req = trainer_pb2.SampleRequest(session_id=self.session_id, sampling=params)
        if all(isinstance(p, str) for p in prompts):
            req.prompts.extend(prompts)
        else:
            req.prompt_token_ids.extend(common_pb2.TokenSequence(token_ids=list(p)) for p in prompts)
        return self._submit("Sample", req)

    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 128,
               **kwargs: Any) -> SampleResult:
        """Generate and wait for the result (after every op queued before it)."""
        return self.sample_async(prompts, max_tokens, **kwargs).result()

    def get_info_async(self) -> FutureHandle[SessionInfo]:
        return self._submit("GetInfo", trainer_pb2.GetInfoRequest(session_id=self.session_id))

    def get_info(self) -> SessionInfo:
        """The session's state once every op queued before this call has run."""
        return self.get_info_async().result()

    # -- checkpoints (the vault) ----------------------------------------------------------------------
    def save_state_async(self, include_optimizer: bool = True, metadata: dict[str, Any] | None = None,
                         name: str = "") -> FutureHandle:
        return self._submit("SaveState", trainer_pb2.SaveStateRequest(
            session_id=self.session_id, include_optimizer=include_optimizer,
            metadata=to_struct(metadata, "metadata"), name=name))

    def save_state(self, include_optimizer: bool = True, metadata: dict[str, Any] | None = None,
                   name: str = "") -> SaveStateResult:
        """Save an encrypted checkpoint in the vault and return its description."""
        return self.save_state_async(include_optimizer, metadata, name).result()

    def load_state_async(self, artifact_id: str) -> FutureHandle:
        return self._submit("LoadState", trainer_pb2.LoadStateRequest(session_id=self.session_id,
                                                                      artifact_id=artifact_id))

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
