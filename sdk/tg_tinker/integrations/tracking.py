"""Trackers: a session's settings, per-step metrics (loss, epsilon, learning rate) and artifact ids.

What is logged is chosen here, field by field: the session's TrainingConfig without its ``metadata`` (free
text a user may have filled with anything), results' numbers, and the ids of saved artifacts. Never weights,
tokens, prompts or data.
"""

from __future__ import annotations

import importlib
import math
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf import json_format

from ..errors import ValidationError

if TYPE_CHECKING:
    from ..results import ForwardBackwardResult, OptimStepResult
    from ..training import TrainingClient

StepMetrics: TypeAlias = dict[str, float]
_NAME = re.compile(r"[A-Za-z0-9_.:/ -]{1,128}")
_MAX_NAME = 128


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in sorted(value.items()):  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType, reportUnknownMemberType]
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)  # pyright: ignore[reportUnknownArgumentType]
    elif isinstance(value, list):
        items: list[Any] = value  # pyright: ignore[reportUnknownVariableType]
        out[prefix] = ",".join(str(v) for v in items)
    else:
        out[prefix] = str(value)


def session_params(tc: TrainingClient) -> dict[str, str]:
    """The session's settings as flat string parameters (``lora_config.rank``, ``dp_config.target_epsilon``, ...),
    without ``metadata``."""
    config: dict[str, Any] = json_format.MessageToDict(tc.config, preserving_proto_field_name=True)
    config.pop("metadata", None)
    out: dict[str, str] = {"session_id": tc.session_id}
    _flatten("", config, out)
    return out


def step_metrics(fb: ForwardBackwardResult | None = None, opt: OptimStepResult | None = None) -> StepMetrics:
    """The numbers of one step: ``loss``, ``num_tokens`` and the loss's own metrics from ``forward_backward``;
    ``learning_rate``, ``grad_norm`` and, in a DP session, ``epsilon`` (spent so far, at ``delta``),
    ``remaining_epsilon``, ``accounted_steps`` and ``noise_multiplier`` from ``optim_step``."""
    out: StepMetrics = {}
    if fb is not None:
        out["loss"] = float(fb.loss)
        out["num_tokens"] = float(fb.num_tokens)
        out.update({f"loss/{k}": float(v) for k, v in fb.metrics.items()})
    if opt is not None:
        out["learning_rate"] = float(opt.learning_rate)
        out["grad_norm"] = float(opt.grad_norm)
        if opt.dp_metrics is not None:
            dp = opt.dp_metrics
            out.update(epsilon=float(dp.total_epsilon), delta=float(dp.delta),
                       remaining_epsilon=float(dp.remaining_epsilon), accounted_steps=float(dp.accounted_steps),
                       noise_multiplier=float(dp.noise_multiplier))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _check_name(field: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValidationError(f"{field} must be 1-{_MAX_NAME} characters of letters, digits and _.:/ -",
                              field=field, code="INVALID_ARGUMENT")
    return value


class Tracker(ABC):
    """Use as a context manager; ``log_session`` once, ``log_step`` per step, ``log_artifact`` per save."""

    def log_session(self, tc: TrainingClient) -> dict[str, str]:
        params = session_params(tc)
        self._params(params)
        return params

    def log_step(self, step: int, fb: ForwardBackwardResult | None = None, opt: OptimStepResult | None = None,
                 **extra: float) -> StepMetrics:
        if not isinstance(step, int) or step < 0:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise ValidationError("step must be an integer >= 0", field="step", code="INVALID_ARGUMENT")
        metrics = {**step_metrics(fb, opt), **{_check_name("extra", k): float(v) for k, v in extra.items()}}
        self._metrics(metrics, step)
        return metrics

    def log_artifact(self, artifact_id: str, step: int, kind: str = "checkpoint") -> None:
        """Record the vault artifact id of a saved checkpoint or adapter (the id only: the bytes stay in the
        vault, encrypted)."""
        _check_name("artifact_id", artifact_id)
        _check_name("kind", kind)
        self._tag(f"artifact.{kind}.step_{step}", artifact_id)
        self._tag(f"artifact.{kind}.last", artifact_id)

    @abstractmethod
    def _params(self, params: dict[str, str]) -> None: ...

    @abstractmethod
    def _metrics(self, metrics: StepMetrics, step: int) -> None: ...

    @abstractmethod
    def _tag(self, key: str, value: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"{module} is not installed: pip install 'tg-tinker[{extra}]'",
                                  name=exc.name) from exc


class MLflowTracker(Tracker):
    """An MLflow run. ``tracking_uri``: ``sqlite:///runs.db``, a tracking server's ``http(s)://`` URL, or a local
    path: a ``.db`` file, else a directory that gets ``mlflow.db`` (MLflow 3's file store is in maintenance
    mode, so local runs go to SQLite)."""

    def __init__(self, tracking_uri: str, experiment: str = "tensafe", run_name: str | None = None) -> None:
        if not tracking_uri or ("://" in tracking_uri and not tracking_uri.startswith(
                ("sqlite:///", "http://", "https://"))):
            raise ValidationError("tracking_uri must be sqlite:///..., http(s)://... or a local path",
                                  field="tracking_uri", code="INVALID_ARGUMENT")
        if "://" not in tracking_uri:
            path = Path(tracking_uri).expanduser().resolve()
            if path.suffix != ".db":
                path.mkdir(parents=True, exist_ok=True)
                path = path / "mlflow.db"
            tracking_uri = f"sqlite:///{path}"
        _check_name("experiment", experiment)
        if run_name is not None:
            _check_name("run_name", run_name)
        tracking = _require("mlflow.tracking", "mlops")
        self.tracking_uri = tracking_uri
        self.client: Any = tracking.MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id: str = found.experiment_id if found else self.client.create_experiment(experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id: str = run.info.run_id
        self._closed = False

    def _params(self, params: dict[str, str]) -> None:
        entities = _require("mlflow.entities", "mlops")
        items = [entities.Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _metrics(self, metrics: StepMetrics, step: int) -> None:
        entities = _require("mlflow.entities", "mlops")
        stamp = int(__import__("time").time() * 1000)
        self.client.log_batch(self.run_id, metrics=[entities.Metric(k, v, stamp, step) for k, v in metrics.items()])

    def _tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A Weights & Biases run, ``mode="offline"`` by default (written under ``dir``; ``wandb sync`` uploads it
    later, if ever)."""

    def __init__(self, project: str = "tensafe", name: str | None = None, mode: str = "offline",
                 dir: str | Path | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValidationError("mode must be offline, online or disabled", field="mode", code="INVALID_ARGUMENT")
        wandb = _require("wandb", "mlops")
        self.run: Any = wandb.init(project=_check_name("project", project),
                                   name=name and _check_name("name", name), mode=mode,
                                   dir=str(dir) if dir is not None else None, reinit="create_new")
        self._closed = False

    def _params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _metrics(self, metrics: StepMetrics, step: int) -> None:
        self.run.log(metrics, step=step)

    def _tag(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()
