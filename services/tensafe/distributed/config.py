"""What a distributed run is asked to do (the user guide's ``TenSafeTrainingConfig``), checked before it starts.

Every field is bounded and checked here, on the driver, before any worker, budget or artifact exists:
a bad value is ``InvalidArgument`` naming ``config.<field>`` (``config.dp_config.<field>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tensafe.runtime.adapter_config import MAX_RANK, check_module_names
from tensafe.runtime.errors import InvalidArgument

MAX_WORKERS = 256
MAX_EPOCHS = 1000
MAX_PER_DEVICE_BATCH = 4096
MAX_SEQUENCE_LENGTH = 8192
MAX_PLANNED_STEPS = 1_000_000
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class DistributedDPConfig:
    """DP-SGD of the whole run: ``(target_epsilon, target_delta)`` over all its global steps.

    ``noise_multiplier`` None: calibrated by the accountant so that the planned steps at the global
    sample rate spend exactly ``target_epsilon``.
    """

    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class TenSafeTrainingConfig:
    """One distributed LoRA fine-tuning run.

    ``per_device_batch_size`` is each worker's EXPECTED batch: under Poisson sampling the global sample rate
    is ``q = per_device_batch_size * num_workers / dataset_size`` and the global expected batch ``q * N``.
    ``model_name`` is a model name of the server's model directory (``TENSAFE_MODEL_DIR`` / ``TENSAFE_MODELS``),
    never a path or a hub id. ``dp_config`` None trains without DP (the lineage then counts non-private steps).
    """

    model_name: str
    lora_rank: int = 16
    lora_alpha: float = 32.0
    num_epochs: int = 1
    per_device_batch_size: int = 4
    learning_rate: float = 1e-4
    num_workers: int = 2
    use_gpu: bool = False
    dp_config: DistributedDPConfig | None = field(default_factory=DistributedDPConfig)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    max_sequence_length: int = 128
    checkpoint_every: int = 0  # global steps between encrypted checkpoints; 0: about 10 per run
    max_failures: int = 2      # worker-group restarts Ray Train may make (each resumes from the last checkpoint)
    seed: int = 0              # the LoRA initialisation (the same on every rank); never the sampling or the noise
    name: str = ""             # the final artifact's name in the vault (default: the run id)


def _positive_int(name: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise InvalidArgument(f"config.{name}", f"must be an integer in [1, {limit}]")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"config.{name}", "must be a finite number > 0")
    return float(value)


def validate(config: TenSafeTrainingConfig) -> None:
    """Refuse a config that cannot run, naming the field (nothing else is checked on the workers)."""
    if not isinstance(config, TenSafeTrainingConfig):
        raise InvalidArgument("config", "must be a TenSafeTrainingConfig")
    if not isinstance(config.model_name, str) or not config.model_name:
        raise InvalidArgument("config.model_name", "must name a model of the server's model directory")
    rank = _positive_int("lora_rank", config.lora_rank, MAX_RANK)
    del rank
    _positive_float("lora_alpha", config.lora_alpha)
    _positive_int("num_epochs", config.num_epochs, MAX_EPOCHS)
    _positive_int("per_device_batch_size", config.per_device_batch_size, MAX_PER_DEVICE_BATCH)
    _positive_float("learning_rate", config.learning_rate)
    _positive_int("num_workers", config.num_workers, MAX_WORKERS)
    _positive_int("max_sequence_length", config.max_sequence_length, MAX_SEQUENCE_LENGTH)
    if isinstance(config.checkpoint_every, bool) or not isinstance(config.checkpoint_every, int) \
            or not 0 <= config.checkpoint_every <= MAX_PLANNED_STEPS:
        raise InvalidArgument("config.checkpoint_every", f"must be an integer in [0, {MAX_PLANNED_STEPS}]")
    if isinstance(config.max_failures, bool) or not isinstance(config.max_failures, int) \
            or not 0 <= config.max_failures <= 100:
        raise InvalidArgument("config.max_failures", "must be an integer in [0, 100]")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 1 << 62:
        raise InvalidArgument("config.seed", "must be an integer in [0, 2^62)")
    if not isinstance(config.use_gpu, bool):
        raise InvalidArgument("config.use_gpu", "must be true or false")
    if not isinstance(config.name, str) or len(config.name) > 256:
        raise InvalidArgument("config.name", "must be a string of at most 256 characters")
    check_module_names(list(config.target_modules), "config.target_modules", min_count=1)
    dp = config.dp_config
    if dp is None:
        return
    if not isinstance(dp, DistributedDPConfig):
        raise InvalidArgument("config.dp_config", "must be a DistributedDPConfig or None")
    _positive_float("dp_config.target_epsilon", dp.target_epsilon)
    if isinstance(dp.target_delta, bool) or not isinstance(dp.target_delta, (int, float)) \
            or not 0 < dp.target_delta < 1:
        raise InvalidArgument("config.dp_config.target_delta", "must be in (0, 1)")
    _positive_float("dp_config.max_grad_norm", dp.max_grad_norm)
    if dp.noise_multiplier is not None:
        _positive_float("dp_config.noise_multiplier", dp.noise_multiplier)


@dataclass(frozen=True)
class Plan:
    """What the run does, derived from the config and the dataset size: fixed before any step."""

    dataset_size: int
    sample_rate: float          # q: every worker keeps each of its rows with this probability, every step
    expected_batch_size: float  # q * N: the divisor of the noised global sum
    planned_steps: int          # num_epochs / q, rounded up: what the noise is calibrated for
    checkpoint_every: int


def plan(config: TenSafeTrainingConfig, dataset_size: int) -> Plan:
    global_batch = config.per_device_batch_size * config.num_workers
    if dataset_size < global_batch:
        raise InvalidArgument("dataset", f"has {dataset_size} rows, fewer than the global expected batch "
                                         f"{global_batch} (per_device_batch_size x num_workers)")
    if dataset_size < config.num_workers:
        raise InvalidArgument("config.num_workers", f"is more than the dataset's {dataset_size} rows")
    q = global_batch / dataset_size
    steps = math.ceil(config.num_epochs * dataset_size / global_batch)
    if steps > MAX_PLANNED_STEPS:
        raise InvalidArgument("config.num_epochs", f"plans {steps} global steps, more than {MAX_PLANNED_STEPS}")
    every = config.checkpoint_every or max(1, math.ceil(steps / 10))
    return Plan(dataset_size=dataset_size, sample_rate=q, expected_batch_size=q * dataset_size,
                planned_steps=steps, checkpoint_every=min(every, steps))
