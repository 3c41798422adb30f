"""A training session's configuration, checked at the edge: every field range-checked or allow-listed and
named in its INVALID_ARGUMENT (``config.<field>``, ``params.<field>``), before any model is touched.

``validate_config`` turns a ``SessionConfig`` into the session's settings and PEFT LoRA config;
``validate_dp`` checks its DP parameters (the sampling rate above all: the guarantee depends on it).
``server_dataset_id`` the settings of server-side sampling (the dataset is read by the service).
"""

from __future__ import annotations

import math
import secrets

from peft import LoraConfig

from tensafe.runtime.adapter_config import MAX_RANK, check_module_names
from tensafe.runtime.errors import InvalidArgument

from .dataset import FIELD as DATASET_FIELD
from .dp import poisson_batch_limit
from .losses import Loss, resolve_loss
from .messages import DEFAULT_ACCOUNTANT_TYPE
from .settings import DPState, SessionSettings, StepParams
from .values import DP_SAMPLING_CLIENT, DP_SAMPLING_SERVER, LORA_BIASES, LossSpec, SessionConfig

OPTIMIZERS = ("adamw", "adam", "sgd")


def resolve_spec_loss(spec: LossSpec) -> Loss:
    return resolve_loss(spec.name or "token_ce", **(spec.kwargs or {}))


def resolve_request_loss(default: Loss, loss: LossSpec | None) -> Loss:
    """The call's loss, or the session's default when the call names none."""
    return default if loss is None else resolve_spec_loss(loss)


def check_step_params(step: StepParams | None, optimizer: str) -> None:
    """INVALID_ARGUMENT naming ``params.<field>`` for a per-step hyperparameter out of range."""
    if step is None:
        return
    rules = (("learning_rate", lambda v: v > 0, "must be > 0"), ("beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
             ("beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"), ("eps", lambda v: v > 0, "must be > 0"),
             ("weight_decay", lambda v: v >= 0, "must be >= 0"), ("grad_clip_norm", lambda v: v >= 0, "must be >= 0"))
    for name, ok, what in rules:
        value = getattr(step, name)
        if value is None:
            continue
        if not math.isfinite(value) or not ok(value):
            raise InvalidArgument(f"params.{name}", f"{what} and finite, got {value!r}")
        if optimizer == "sgd" and name in ("beta1", "beta2", "eps"):
            raise InvalidArgument(f"params.{name}", "applies to Adam(W) only; this session's optimizer is sgd")


def validate_config(config: SessionConfig) -> tuple[SessionSettings, LoraConfig]:
    lora = config.lora_or_default
    if lora.rank <= 0:
        raise InvalidArgument("config.lora_config.rank", "must be > 0")
    if lora.alpha <= 0:
        raise InvalidArgument("config.lora_config.alpha", "must be > 0")
    if not 0 <= lora.dropout < 1:
        raise InvalidArgument("config.lora_config.dropout", "must be in [0, 1)")
    if not lora.target_modules:
        raise InvalidArgument("config.lora_config.target_modules", "must list at least one module name")
    # Names matched exactly or as a suffix (PEFT's rule for a list): bounded, no regex characters.
    target_modules = check_module_names(list(lora.target_modules), "config.lora_config.target_modules", min_count=1)
    if lora.rank > MAX_RANK:
        raise InvalidArgument("config.lora_config.rank", f"must be at most {MAX_RANK}")
    if lora.bias not in LORA_BIASES:
        raise InvalidArgument("config.lora_config.bias", f"unknown LoRA bias {lora.bias!r}; use one of "
                                                         f"{LORA_BIASES[1:]}")
    opt = config.optimizer_or_default
    name = (opt.name or "adamw").lower()
    if name not in OPTIMIZERS:
        raise InvalidArgument("config.optimizer.name", f"unknown optimizer {opt.name!r}; use one of {OPTIMIZERS}")
    if not opt.learning_rate > 0:
        raise InvalidArgument("config.optimizer.learning_rate", "must be > 0")
    if opt.weight_decay < 0:
        raise InvalidArgument("config.optimizer.weight_decay", "must be >= 0")
    betas = tuple(opt.betas) or (0.9, 0.999)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise InvalidArgument("config.optimizer.betas", "must be two numbers in [0, 1)")
    eps = opt.eps if opt.eps is not None else 1e-8
    if eps <= 0:
        raise InvalidArgument("config.optimizer.eps", "must be > 0")
    momentum = opt.momentum if opt.momentum is not None else 0.0
    if momentum < 0:
        raise InvalidArgument("config.optimizer.momentum", "must be >= 0")
    if config.batch_size <= 0:
        raise InvalidArgument("config.batch_size", "must be > 0")
    if config.gradient_accumulation_steps < 0:
        raise InvalidArgument("config.gradient_accumulation_steps", "must be >= 1")
    if config.max_sequence_length < 0:
        raise InvalidArgument("config.max_sequence_length", "must be >= 0 (0: the model's limit)")
    default_loss = resolve_spec_loss(config.loss) if config.loss is not None else resolve_loss("token_ce")
    seed = config.seed if config.seed is not None else secrets.randbits(62)
    settings = SessionSettings(config=config, optimizer=name, learning_rate=opt.learning_rate,
                               weight_decay=opt.weight_decay, betas=(float(betas[0]), float(betas[1])), eps=eps,
                               momentum=momentum, accumulation=max(1, config.gradient_accumulation_steps),
                               seed=seed, max_length=config.max_sequence_length, default_loss=default_loss)
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha,  # pyright: ignore[reportArgumentType] - PEFT says int, takes any number
                             lora_dropout=lora.dropout,
                             target_modules=target_modules, bias=lora.bias or "none")
    if config.dp_or_default.enabled:
        settings.dp = validate_dp(config, default_loss, peft_config)
    return settings, peft_config


# Sample rates from dataset_size and from sample_rate must agree this closely when both are given.
_RATE_RTOL = 1e-6


def validate_dp(config: SessionConfig, default_loss: Loss, lora: LoraConfig) -> DPState:
    """The DP parameters of a session, checked; the noise multiplier may still need calibrating."""
    dp = config.dp_or_default
    if not dp.max_grad_norm > 0 or not math.isfinite(dp.max_grad_norm):
        raise InvalidArgument("config.dp_config.max_grad_norm", "must be a finite number > 0 (the per-sample "
                                                                 "clipping bound)")
    if dp.noise_multiplier is not None and not (dp.noise_multiplier > 0 and math.isfinite(dp.noise_multiplier)):
        raise InvalidArgument("config.dp_config.noise_multiplier", "must be > 0 (no noise, no privacy); omit it "
                                                                    "and give max_steps to calibrate it")
    if dp.noise_multiplier is None and dp.budget_id:
        raise InvalidArgument("config.dp_config.noise_multiplier", "is required when continuing a budget "
                                                                    "(budget_id): give the previous run's")
    if dp.noise_multiplier is None and not (dp.max_steps is not None and dp.max_steps > 0):
        raise InvalidArgument("config.dp_config.noise_multiplier", "give noise_multiplier, or max_steps (> 0) to "
                                                                    "calibrate it to the target epsilon")
    if dp.max_steps is not None and dp.max_steps <= 0:
        raise InvalidArgument("config.dp_config.max_steps", "must be > 0")
    if not dp.budget_id:
        if not (dp.target_epsilon > 0 and math.isfinite(dp.target_epsilon)):
            raise InvalidArgument("config.dp_config.target_epsilon", "must be a finite number > 0")
        if not 0 < dp.target_delta < 1:
            raise InvalidArgument("config.dp_config.target_delta", "must be in (0, 1)")
    expected = config.batch_size * max(1, config.gradient_accumulation_steps)
    rate = None
    if dp.dataset_size is not None:
        if dp.dataset_size <= 0:
            raise InvalidArgument("config.dp_config.dataset_size", "must be > 0")
        if expected > dp.dataset_size:
            raise InvalidArgument("config.dp_config.dataset_size", f"is smaller than the expected batch size "
                                                                   f"{expected} (batch_size x accumulation steps)")
        rate = expected / dp.dataset_size
    if dp.sample_rate is not None:
        if not 0 < dp.sample_rate <= 1:
            raise InvalidArgument("config.dp_config.sample_rate", "must be in (0, 1]")
        if rate is not None and abs(rate - dp.sample_rate) > _RATE_RTOL * rate:
            raise InvalidArgument("config.dp_config.sample_rate",
                                  "disagrees with dataset_size: batch_size x accumulation / dataset_size = "
                                  f"{rate:.6g}; give one of the two")
        rate = dp.sample_rate
    if rate is None:
        raise InvalidArgument("config.dp_config.dataset_size",
                              "a DP session needs dataset_size (or sample_rate): the privacy guarantee depends on "
                              "the sampling rate, expected batch size / dataset size")
    if lora.bias != "none":
        raise InvalidArgument("config.lora_config.bias", "DP sessions train the LoRA factors only (bias 'none'): "
                                                         "base-layer biases are not clipped per sample")
    if not default_loss.per_example:
        raise InvalidArgument("config.loss.name", f"loss '{default_loss.name}' compares rows with each other, so a "
                                                  "row's gradient is not its own; DP sessions need a per-example "
                                                  "loss")
    dataset_size = dp.dataset_size
    return DPState(noise_multiplier=dp.noise_multiplier if dp.noise_multiplier is not None else 0.0,
                   max_grad_norm=dp.max_grad_norm, sample_rate=rate, expected_batch_size=expected,
                   accountant_type=dp.accountant_type or DEFAULT_ACCOUNTANT_TYPE,
                   target_epsilon=dp.target_epsilon, target_delta=dp.target_delta, dataset_size=dataset_size,
                   batch_limit=poisson_batch_limit(rate, dataset_size, expected))


def server_dataset_id(config: SessionConfig) -> str | None:
    """The vault dataset a DPConfig.sampling = SERVER session draws from (None: the client samples), with the
    settings server sampling rules out refused by name."""
    dp = config.dp
    if dp is None or dp.sampling not in (0, DP_SAMPLING_CLIENT, DP_SAMPLING_SERVER):
        if dp is not None:
            raise InvalidArgument("config.dp_config.sampling", f"unknown sampling {dp.sampling}")
        return None
    if dp.sampling != DP_SAMPLING_SERVER:
        if dp.dataset_artifact_id:
            raise InvalidArgument(DATASET_FIELD, "is only read with sampling = SERVER")
        return None
    if not dp.enabled:
        raise InvalidArgument("config.dp_config.sampling", "server sampling is for DP sessions (enabled = true)")
    if not dp.dataset_artifact_id:
        raise InvalidArgument(DATASET_FIELD, "is required with sampling = SERVER: the trainer samples it")
    if dp.sample_rate is not None:
        raise InvalidArgument("config.dp_config.sample_rate", "is the trainer's with server sampling (expected "
                                                              "batch / the dataset's rows): omit it")
    if config.gradient_accumulation_steps > 1:
        raise InvalidArgument("config.gradient_accumulation_steps", "server sampling draws a whole logical "
                                                                    "batch per ForwardBackward: use 1")
    return dp.dataset_artifact_id
