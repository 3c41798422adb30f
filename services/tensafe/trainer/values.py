"""The plain values the trainer's logic takes: what ``servicer`` reads out of each request.

Each mirrors its message field for field, with ``None`` where the message tracks presence (an
``optional`` scalar, a sub-message that may be absent), so that ``messages.config_proto`` gives back
the configuration exactly as the tenant sent it (Session.config, the checkpoint record). Defaults
and range checks are the logic's (``config_checks.validate_config``), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# LoRA bias values the logic knows; "" is "not given" (same as "none").
LORA_BIASES = ("", "none", "all", "lora_only")


@dataclass(frozen=True)
class TensorData:
    """An encoded tensor as sent (``common.v1.Tensor``): decoded, and its size checked, by the logic."""

    dtype: int
    shape: tuple[int, ...]
    data: bytes


# trainer.v1.DPSampling
DP_SAMPLING_CLIENT, DP_SAMPLING_SERVER = 1, 2


@dataclass(frozen=True)
class BatchInput:
    """A ``Batch``: token ids [B, T] and the optional per-row / per-token inputs of the losses."""

    input_ids: TensorData | None = None
    attention_mask: TensorData | None = None
    labels: TensorData | None = None
    advantages: TensorData | None = None
    old_logprobs: TensorData | None = None
    extra: dict[str, TensorData] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A loss by name ("" is ``token_ce``) and its keyword arguments (None: none given)."""

    name: str = ""
    kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    bias: str = ""  # one of LORA_BIASES


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = ""  # "" is "adamw"
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, ...] = ()
    eps: float | None = None
    momentum: float | None = None


@dataclass(frozen=True)
class DPSpec:
    enabled: bool = False
    noise_multiplier: float | None = None
    max_grad_norm: float = 0.0
    target_epsilon: float = 0.0
    target_delta: float = 0.0
    accountant_type: int = 0  # common.v1.AccountantType; 0: the default (PLD)
    dataset_size: int | None = None
    sample_rate: float | None = None
    max_steps: int | None = None
    budget_id: str = ""
    sampling: int = 0              # trainer.v1.DPSampling; 0 / CLIENT: the client draws the batches
    dataset_artifact_id: str = ""  # SERVER sampling: the vault dataset the trainer draws from


@dataclass(frozen=True)
class SessionConfig:
    """A ``TrainingConfig``."""

    model_ref: str = ""
    lora: LoraSpec | None = None
    optimizer: OptimizerSpec | None = None
    batch_size: int = 0
    gradient_accumulation_steps: int = 0
    seed: int | None = None
    max_sequence_length: int = 0
    dp: DPSpec | None = None
    loss: LossSpec | None = None
    metadata: dict[str, Any] | None = None

    @property
    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()

    @property
    def optimizer_or_default(self) -> OptimizerSpec:
        return self.optimizer or OptimizerSpec()

    @property
    def dp_or_default(self) -> DPSpec:
        return self.dp or DPSpec()


@dataclass(frozen=True)
class SamplingSpec:
    """``SamplingParams``: None where absent (temperature 1.0, top_p 1.0, top_k off, random seed)."""

    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_samples: int = 0  # 0 is 1
    return_logprobs: bool = False
