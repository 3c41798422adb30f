"""What training operations return, as plain Python objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2

from .configs import from_struct
from .lineage import Lineage
from .tensors import from_proto


def _array(msg: Any, name: str) -> np.ndarray | None:
    return from_proto(getattr(msg, name), name) if msg.HasField(name) else None


@dataclass(frozen=True)
class ForwardBackwardResult:
    """``loss`` of the batch (gradients were accumulated); ``logprobs`` [batch, seq] when asked for."""

    loss: float
    num_tokens: int
    num_sequences: int
    metrics: dict[str, float]
    logprobs: np.ndarray | None = None

    @classmethod
    def from_proto(cls, msg: trainer_pb2.ForwardBackwardResult | trainer_pb2.ForwardResult) -> ForwardBackwardResult:
        return cls(msg.loss, msg.num_tokens, msg.num_sequences, dict(msg.metrics), _array(msg, "logprobs"))


ForwardResult = ForwardBackwardResult


@dataclass(frozen=True)
class DPMetrics:
    noise_applied: bool
    noise_multiplier: float
    max_grad_norm: float
    total_epsilon: float
    delta: float
    target_epsilon: float
    remaining_epsilon: float
    sample_rate: float
    accounted_steps: int
    budget_id: str
    spent_without_update: int = 0  # steps recorded (budget spent) whose update could not be applied


@dataclass(frozen=True)
class OptimStepResult:
    """``step`` after this call; ``applied`` is False while gradients are still being accumulated."""

    step: int
    learning_rate: float
    grad_norm: float
    num_tokens: int
    metrics: dict[str, float]
    dp_metrics: DPMetrics | None = None

    @property
    def applied(self) -> bool:
        return self.metrics.get("applied", 1.0) == 1.0

    @classmethod
    def from_proto(cls, msg: trainer_pb2.OptimStepResult) -> OptimStepResult:
        dp = None
        if msg.HasField("dp_metrics"):
            d = msg.dp_metrics
            dp = DPMetrics(d.noise_applied, d.noise_multiplier, d.max_grad_norm, d.total_epsilon, d.delta,
                           d.target_epsilon, d.remaining_epsilon, d.sample_rate, d.accounted_steps, d.budget_id,
                           d.spent_without_update)
        return cls(msg.step, msg.learning_rate, msg.grad_norm, msg.num_tokens, dict(msg.metrics), dp)


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str          # "stop" (EOS or a stop string) or "length"
    prompt_index: int = 0
    sample_index: int = 0


@dataclass(frozen=True)
class SampleResult:
    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: trainer_pb2.SampleResult) -> SampleResult:
        return cls([Sample(s.prompt, s.completion, list(s.token_ids), list(s.logprobs),
                           common_pb2.FinishReason.Name(s.finish_reason).removeprefix("FINISH_REASON_").lower(),
                           s.prompt_index, s.sample_index) for s in msg.samples])


@dataclass(frozen=True)
class CustomLossResult:
    """Result of ``forward_backward_custom``: the client's loss value and the tokens it covered."""

    loss: float
    num_tokens: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model_ref: str
    step: int
    num_trainable_parameters: int
    num_parameters: int
    vocab_size: int
    max_sequence_length: int
    eos_token_id: int | None
    pad_token_id: int | None
    pending_ops: int
    tokens_processed: int
    metadata: dict[str, Any]
    dp_enabled: bool = False
    budget_id: str = ""      # the accountant budget of a DP session
    total_epsilon: float = 0.0  # spent so far (DP sessions), at the budget's target delta
    # Where the weights came from (loaded artifacts' ancestry and this session's own steps). A DP session's
    # epsilon covers its weights only when lineage.dp_covered (no non-private steps, no unattested upload).
    lineage: Lineage | None = None
    spent_without_update: int = 0  # DP steps recorded (budget spent) whose update could not be applied

    @classmethod
    def from_proto(cls, m: trainer_pb2.SessionInfo) -> SessionInfo:
        return cls(m.session_id, m.model_ref, m.step, m.num_trainable_parameters, m.num_parameters, m.vocab_size,
                   m.max_sequence_length, m.eos_token_id if m.HasField("eos_token_id") else None,
                   m.pad_token_id if m.HasField("pad_token_id") else None, m.pending_ops, m.tokens_processed,
                   from_struct(m.metadata), m.dp_enabled, m.budget_id, m.total_epsilon,
                   Lineage.from_proto(m.lineage) if m.HasField("lineage") else None, m.spent_without_update)


@dataclass(frozen=True)
class SaveStateResult:
    """A checkpoint stored, encrypted, in the vault: ``encryption.algorithm`` is "AES-256-GCM"."""

    artifact_id: str
    step: int
    name: str
    size_bytes: int
    sha256: str
    encryption: Any
    metadata: dict[str, Any]
    lineage: Lineage | None = None  # as the vault recorded it

    @classmethod
    def from_proto(cls, m: trainer_pb2.SaveStateResult) -> SaveStateResult:
        from .artifacts import EncryptionInfo

        return cls(m.artifact_id, m.step, m.name, m.size_bytes, m.sha256.hex(),
                   EncryptionInfo.from_proto(m.encryption), from_struct(m.metadata),
                   Lineage.from_proto(m.lineage) if m.HasField("lineage") else None)


@dataclass(frozen=True)
class LoadStateResult:
    step: int
    artifact_id: str
    optimizer_restored: bool
    metadata: dict[str, Any]
    lineage: Lineage | None = None  # the session's, after the load

    @classmethod
    def from_proto(cls, m: trainer_pb2.LoadStateResult) -> LoadStateResult:
        return cls(m.step, m.artifact_id, m.optimizer_restored, from_struct(m.metadata),
                   Lineage.from_proto(m.lineage) if m.HasField("lineage") else None)


OpResult = (ForwardBackwardResult | OptimStepResult | SampleResult | SessionInfo | SaveStateResult | LoadStateResult
            | trainer_pb2.ForwardCustomResult | trainer_pb2.BackwardCustomResult)
"""What a succeeded operation returns: the SDK's result objects; the custom-loss steps' messages as they are."""


def event_result(event: trainer_pb2.FutureEvent) -> OpResult:
    """The result carried by a succeeded :class:`FutureEvent` (its ``result`` oneof), as the SDK returns it."""
    match event.WhichOneof("result"):
        case "forward_backward":
            return ForwardBackwardResult.from_proto(event.forward_backward)
        case "forward":
            return ForwardBackwardResult.from_proto(event.forward)
        case "optim_step":
            return OptimStepResult.from_proto(event.optim_step)
        case "sample":
            return SampleResult.from_proto(event.sample)
        case "info":
            return SessionInfo.from_proto(event.info)
        case "forward_custom":
            return event.forward_custom
        case "backward_custom":
            return event.backward_custom
        case "save_state":
            return SaveStateResult.from_proto(event.save_state)
        case "load_state":
            return LoadStateResult.from_proto(event.load_state)
        case other:
            raise KeyError(f"future {event.future_id} succeeded with an unknown result {other!r}")
