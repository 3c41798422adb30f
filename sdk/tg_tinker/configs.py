"""Training configuration, checked on the client before any call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

from google.protobuf import struct_pb2

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2

from .errors import ValidationError

_BIAS = {"none": trainer_pb2.LORA_BIAS_NONE, "all": trainer_pb2.LORA_BIAS_ALL,
         "lora_only": trainer_pb2.LORA_BIAS_LORA_ONLY}
_ACCOUNTANTS = {"pld": common_pb2.ACCOUNTANT_TYPE_PLD, "prv": common_pb2.ACCOUNTANT_TYPE_PRV,
                "rdp": common_pb2.ACCOUNTANT_TYPE_RDP}
_SAMPLING = {"client": trainer_pb2.DP_SAMPLING_CLIENT, "server": trainer_pb2.DP_SAMPLING_SERVER}


def _fail(fld: str, message: str) -> NoReturn:
    raise ValidationError(f"{fld}: {message}", field=fld, code="INVALID_ARGUMENT")


def _mapping(value: object) -> dict[str, Any] | None:
    """``value`` as the mapping YAML made of it, or None when it is not one."""
    return cast("dict[str, Any]", value) if isinstance(value, dict) else None


def to_struct(values: dict[str, Any] | None, fld: str) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    try:
        # types-protobuf 7.35.1.20261122 types Struct.update with an Unknown in its value union.
        s.update(values or {})  # pyright: ignore[reportUnknownMemberType]
    except (ValueError, TypeError) as exc:
        _fail(fld, f"values must be JSON-like (str, number, bool, None, list, dict): {exc}")
    return s


def from_struct(msg: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict; whole numbers come back as ints (Struct stores every number as a double)."""
    from google.protobuf import json_format

    def fix(v: object) -> object:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):  # JSON: the items are JSON values too
            return [fix(x) for x in cast("list[object]", v)]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in cast("dict[str, object]", v).items()}
        return v

    return {k: fix(x) for k, x in json_format.MessageToDict(msg).items()}


@dataclass
class LoRAConfig:
    """The LoRA adapter: ``rank`` (r), ``alpha`` (scaling alpha / r), ``dropout``, ``target_modules``, ``bias``."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("lora_config.rank", "must be a positive integer")
        if not self.alpha > 0:
            _fail("lora_config.alpha", "must be > 0")
        if not 0 <= self.dropout < 1:
            _fail("lora_config.dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str) or not self.target_modules or not all(
                isinstance(m, str) and m for m in self.target_modules):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("lora_config.target_modules", "must be a non-empty list of module names")
        if self.bias not in _BIAS:
            _fail("lora_config.bias", f"must be one of {sorted(_BIAS)}")

    def to_proto(self) -> trainer_pb2.LoRAConfig:
        return trainer_pb2.LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                                      target_modules=list(self.target_modules), bias=_BIAS[self.bias])


@dataclass
class OptimizerConfig:
    """``name`` is adamw, adam or sgd; the rest are that optimizer's hyper-parameters."""

    name: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name.lower() not in ("adamw", "adam", "sgd"):
            _fail("optimizer.name", "must be adamw, adam or sgd")
        if not self.learning_rate > 0:
            _fail("optimizer.learning_rate", "must be > 0")
        if self.weight_decay < 0:
            _fail("optimizer.weight_decay", "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("optimizer.betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            _fail("optimizer.eps", "must be > 0")
        if self.momentum < 0:
            _fail("optimizer.momentum", "must be >= 0")

    def to_proto(self) -> trainer_pb2.OptimizerConfig:
        return trainer_pb2.OptimizerConfig(name=self.name.lower(), learning_rate=self.learning_rate,
                                           weight_decay=self.weight_decay, betas=list(self.betas), eps=self.eps,
                                           momentum=self.momentum)


@dataclass
class LossConfig:
    """A loss chosen by name from the server's registry, with its keyword arguments.

    Built in: ``token_ce`` (``ignore_index``, ``label_smoothing``), ``importance_sampling``,
    ``ppo`` (``clip_epsilon``), ``margin_ranking`` (``margin``), ``contrastive``
    (``temperature``) and ``mse``. See docs/losses.md.
    """

    name: str = "token_ce"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("loss.name", "must be a loss name")

    @classmethod
    def from_yaml(cls, source: str | Path) -> LossConfig:
        """Read the ``loss:`` section (``type`` and ``kwargs``) of a YAML file or string."""
        import yaml

        text = Path(source).read_text() if isinstance(source, Path) or (
            "\n" not in source and Path(source).is_file()) else source
        data = _mapping(yaml.safe_load(text) or {})
        section = _mapping(data.get("loss", data)) if data is not None else None
        if section is None or "type" not in section:
            _fail("loss", "expected a mapping with 'type' (and optional 'kwargs') under 'loss:'")
        kwargs = _mapping(section.get("kwargs") or {})
        if kwargs is None:
            _fail("loss.kwargs", "must be a mapping")
        return cls(name=str(section["type"]), kwargs=dict(kwargs))

    def to_proto(self) -> trainer_pb2.LossConfig:
        return trainer_pb2.LossConfig(name=self.name, kwargs=to_struct(self.kwargs, "loss.kwargs"))


@dataclass
class DPConfig:
    """Differential privacy for a whole session (DP-SGD); enforced and accounted by the server."""

    enabled: bool = False
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    accountant_type: str = "pld"
    dataset_size: int | None = None
    sample_rate: float | None = None
    max_steps: int | None = None
    budget_id: str = ""
    # "client": you Poisson-sample the batches (tg_tinker.data) and the epsilon assumes you did (declared).
    # "server": the trainer samples ``dataset_artifact_id`` (a JSONL dataset you put in the vault) itself, at
    # q = batch_size / its rows, so the epsilon does not rest on you (attested); forward_backward then takes no
    # batch. See docs/privacy.md.
    sampling: str = "client"
    dataset_artifact_id: str = ""

    def __post_init__(self) -> None:
        if self.sampling not in _SAMPLING:
            _fail("dp_config.sampling", f"must be one of {sorted(_SAMPLING)}")
        if self.sampling == "server" and not self.dataset_artifact_id:
            _fail("dp_config.dataset_artifact_id", "is required with sampling='server'")
        if self.accountant_type not in _ACCOUNTANTS:
            _fail("dp_config.accountant_type", f"must be one of {sorted(_ACCOUNTANTS)}")
        if not self.max_grad_norm > 0:
            _fail("dp_config.max_grad_norm", "must be > 0")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            _fail("dp_config.noise_multiplier", "must be >= 0")
        if not self.target_epsilon > 0:
            _fail("dp_config.target_epsilon", "must be > 0")
        if not 0 < self.target_delta < 1:
            _fail("dp_config.target_delta", "must be in (0, 1)")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            _fail("dp_config.sample_rate", "must be in (0, 1]")
        if self.dataset_size is not None and self.dataset_size <= 0:
            _fail("dp_config.dataset_size", "must be > 0")

    def to_proto(self) -> trainer_pb2.DPConfig:
        msg = trainer_pb2.DPConfig(enabled=self.enabled, max_grad_norm=self.max_grad_norm,
                                   target_epsilon=self.target_epsilon, target_delta=self.target_delta,
                                   accountant_type=_ACCOUNTANTS[self.accountant_type], budget_id=self.budget_id,
                                   sampling=_SAMPLING[self.sampling], dataset_artifact_id=self.dataset_artifact_id)
        for name in ("noise_multiplier", "dataset_size", "sample_rate", "max_steps"):
            if getattr(self, name) is not None:
                setattr(msg, name, getattr(self, name))
        return msg


@dataclass
class TrainingConfig:
    """A training session: the base model (``model_ref``: a name the server knows, a directory of its
    ``TENSAFE_MODEL_DIR`` or one the operator registered in ``TENSAFE_MODELS``; never a path), the
    adapter, the optimizer and the batch shape."""

    model_ref: str
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    seed: int | None = None
    max_sequence_length: int = 0
    dp_config: DPConfig | None = None
    loss: LossConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_ref, str) or not self.model_ref.strip():  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("model_ref", "must name a model of the server (a name in its model directory, not a path)")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("batch_size", "must be a positive integer")
        if not isinstance(self.gradient_accumulation_steps, int) or self.gradient_accumulation_steps < 1:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            _fail("gradient_accumulation_steps", "must be an integer >= 1")
        if self.max_sequence_length < 0:
            _fail("max_sequence_length", "must be >= 0 (0: the model's limit)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            _fail("seed", "must be in [0, 2**63)")

    def to_proto(self) -> trainer_pb2.TrainingConfig:
        msg = trainer_pb2.TrainingConfig(
            model_ref=self.model_ref, lora_config=self.lora_config.to_proto(), optimizer=self.optimizer.to_proto(),
            batch_size=self.batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_sequence_length=self.max_sequence_length, metadata=to_struct(self.metadata, "metadata"))
        if self.seed is not None:
            msg.seed = self.seed
        if self.dp_config is not None:
            msg.dp_config.CopyFrom(self.dp_config.to_proto())
        if self.loss is not None:
            msg.loss.CopyFrom(self.loss.to_proto())
        return msg
