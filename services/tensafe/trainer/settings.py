"""A session's validated settings (``config_checks`` makes them): its optimizer and per-step hyperparameters,
and a DP session's privacy state (the clipper, the noise source, its accountant budget and DPMetrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.messages import enum_value

from .dp import PerSampleClipper, SecureGaussian
from .losses import Loss
from .values import SessionConfig


@dataclass(frozen=True)
class StepParams:
    """Per-step optimizer hyperparameters (OptimStep ``params``, validated by the service); None keeps the
    session's current value. ``grad_clip_norm`` clips the gradient applied (0: off); it is not kept."""

    learning_rate: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    grad_clip_norm: float | None = None


STEP_PARAM_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


@dataclass
class SessionSettings:
    """A validated TrainingConfig (``config``: as given, echoed back; the rest: its resolved values)."""

    config: SessionConfig
    optimizer: str
    learning_rate: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    momentum: float
    accumulation: int
    seed: int
    max_length: int
    default_loss: Loss
    dp: DPState | None = None


@dataclass
class DPState:
    """A DP session's privacy parameters, its per-sample clipper and its accountant budget."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int       # batch_size x gradient_accumulation_steps: the divisor of the noised sum
    accountant_type: int
    target_epsilon: float
    target_delta: float
    budget_id: str = ""
    dataset_size: int | None = None
    batch_limit: int = 0           # the largest logical batch Poisson sampling at sample_rate makes plausible
    clipper: PerSampleClipper | None = None
    noise: SecureGaussian = field(default_factory=SecureGaussian)
    updates: int = 0               # DP updates attempted; names the accountant step ids, never restored
    total_epsilon: float = 0.0
    accounted_steps: int = 0
    spent_without_update: int = 0  # steps recorded by the accountant whose update could not be applied
    # DPConfig.sampling = SERVER: the vault dataset this session draws its batches from, and its sampler
    # (trainer.dataset); None: the client samples.
    dataset: Any = None
    sampler: Any = None

    @property
    def sampling(self) -> str:
        """"server" (attested: the trainer samples) or "client" (declared)."""
        return "server" if self.dataset is not None else "client"

    def metrics(self, budget: Any = None, applied: bool = False) -> trainer_pb2.DPMetrics:
        if budget is not None:
            self.total_epsilon, self.accounted_steps = budget.spent_epsilon, budget.num_steps
        return trainer_pb2.DPMetrics(
            noise_applied=applied, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            total_epsilon=self.total_epsilon, delta=self.target_delta, target_epsilon=self.target_epsilon,
            remaining_epsilon=max(0.0, self.target_epsilon - self.total_epsilon), sample_rate=self.sample_rate,
            accounted_steps=self.accounted_steps, budget_id=self.budget_id,
            accountant_type=enum_value(common_pb2.AccountantType, self.accountant_type),
            spent_without_update=self.spent_without_update)
