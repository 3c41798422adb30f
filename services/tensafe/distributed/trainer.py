"""``TenSafeTrainer``: one tenant's distributed LoRA fine-tuning run on Ray Train, with DP-SGD across workers.

The driver (the process that calls :meth:`TenSafeTrainer.fit`) checks the config, reads the dataset, plans
the run (global sample rate q, planned steps), has the accountant calibrate the noise for those steps and
open the run's budget, writes the start to the ledger, then runs :func:`tensafe.distributed.worker.train_loop`
on ``num_workers`` Ray Train workers (``TorchTrainer``; gloo on CPU, nccl on GPU). What one global step
does is in :mod:`tensafe.distributed.dpstep`; checkpoints and restarts in :mod:`tensafe.distributed.worker`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensafe.api.common.v1 import common_pb2
from tensafe.common.models import resolve_model_ref
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument
from tensafe.trainer.values import DPSpec, LoraSpec, OptimizerSpec, SessionConfig

from . import dataset as datasets
from .config import TenSafeTrainingConfig, plan, validate
from .services import Access, TenantServices
from .worker import RunSpec, train_loop

PLD = common_pb2.ACCOUNTANT_TYPE_PLD
RAY_INSTALL = "pip install 'tensafe[ray]'"


@dataclass(frozen=True)
class FitResult:
    """What a run did. ``metrics`` holds the same as a dict (``epsilon``, ``steps``, ``sample_rate``,
    ``artifact_id``, ...). ``artifact_id`` is the final adapter: a checkpoint in the vault, for
    ``create_sampling_client`` or ``load_state`` (a DP session continues the run's budget: ``budget_id``
    and ``noise_multiplier``)."""

    run_id: str
    artifact_id: str
    epsilon: float
    delta: float
    steps: int
    planned_steps: int
    sample_rate: float
    noise_multiplier: float
    budget_id: str
    stopped: str = ""  # why the run ended before its planned steps ("" when it did not)
    metrics: dict[str, Any] = field(default_factory=dict)


class TenSafeTrainer:
    """``TenSafeTrainer(config, dataset=...)``; ``.fit()`` runs it and returns a :class:`FitResult`.

    ``dataset``: a JSONL path (one ``{"text": ...}`` per line) or ``"vault:<artifact_id>"``. ``api_key``: the
    tenant's (default ``TS_API_KEY``); ``base_url``: the combined server (default ``TS_BASE_URL``; the split
    services' ``TENSAFE_<SERVICE>_ENDPOINT`` win). ``environ``: the operator's settings (default: this
    process's environment: TENSAFE_DATA_DIR, TENSAFE_MODEL_DIR, the services' key, ...).
    """

    def __init__(self, config: TenSafeTrainingConfig, dataset: str | Path | None = None, *,
                 api_key: str | None = None, base_url: str | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        validate(config)
        self.config = config
        self.dataset = dataset
        self.access = Access.resolve(api_key, base_url, environ)

    def fit(self) -> FitResult:
        try:
            import ray
            from ray.train import FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchConfig, TorchTrainer
        except ModuleNotFoundError as exc:
            raise FailedPrecondition(f"tensafe.distributed needs Ray Train ({exc.name} is missing): "
                                     f"{RAY_INSTALL}") from None
        cfg = self.config
        if self.dataset is None:
            raise InvalidArgument("dataset", 'is required: a JSONL path or "vault:<artifact_id>"')
        run_id = f"dist-{uuid.uuid4().hex[:20]}"
        services = TenantServices(self.access, run_id)
        try:
            sc = services.config
            model_dir = Path(sc.model_dir) if sc.model_dir else sc.data_dir / "models"
            resolve_model_ref(cfg.model_name, model_dir, sc.registered_models(), "config.model_name")
            texts = datasets.load(self.dataset, services)
            the_plan = plan(cfg, len(texts))
            noise_multiplier, budget_id = 0.0, ""
            dp = cfg.dp_config
            if dp is not None:
                noise_multiplier = dp.noise_multiplier or services.accountant.calibrate(
                    services.caller, dp.target_epsilon, dp.target_delta, the_plan.sample_rate,
                    the_plan.planned_steps, PLD).noise_multiplier
                budget_id = services.accountant.create_budget(services.caller, run_id, dp.target_epsilon,
                                                              dp.target_delta, PLD, the_plan.sample_rate).budget_id
            storage = (sc.data_dir / "distributed").resolve()
            run_dir = storage / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = RunSpec(run_id=run_id, config=cfg, plan=the_plan, access=self.access, run_dir=str(run_dir),
                           session_config=_session_config(cfg, the_plan.dataset_size, noise_multiplier, budget_id),
                           budget_id=budget_id, noise_multiplier=noise_multiplier, accountant_type=PLD)
            services.audit("distributed.Start", run_id, {
                "model_name": cfg.model_name, "num_workers": cfg.num_workers, "dataset_size": the_plan.dataset_size,
                "sample_rate": the_plan.sample_rate, "planned_steps": the_plan.planned_steps,
                "noise_multiplier": noise_multiplier, "max_grad_norm": dp.max_grad_norm if dp else "",
                "budget_id": budget_id, "target_epsilon": dp.target_epsilon if dp else ""}, "start")
            if not ray.is_initialized():
                ray.init()  # a local cluster, or the one RAY_ADDRESS names
            trainer = TorchTrainer(
                train_loop, train_loop_config={"spec": spec, "texts": ray.put(texts)},
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
                torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
                run_config=RunConfig(name=run_id, storage_path=str(storage),
                                     failure_config=FailureConfig(max_failures=cfg.max_failures)))
            result = trainer.fit()
            metrics = dict(result.metrics or {})
            artifact_id = str(metrics.get("artifact_id") or "")
            if not artifact_id:
                raise FailedPrecondition(f"run {run_id} ended without a final checkpoint (last metrics: {metrics})")
            epsilon, steps = 0.0, int(metrics.get("steps", 0))
            if dp is not None:
                budget = services.accountant.get_budget(services.caller, budget_id)
                epsilon, steps = budget.spent_epsilon, budget.num_steps
            stopped = str(metrics.get("stopped") or "")
            services.audit("distributed.Fit", artifact_id, {"steps": steps, "epsilon": epsilon,
                                                            "budget_id": budget_id, "stopped": stopped}, "fit")
            out = {"epsilon": epsilon, "steps": steps, "sample_rate": the_plan.sample_rate,
                   "artifact_id": artifact_id, "budget_id": budget_id, "noise_multiplier": noise_multiplier,
                   "planned_steps": the_plan.planned_steps, "run_id": run_id, "loss": metrics.get("loss")}
            return FitResult(run_id=run_id, artifact_id=artifact_id, epsilon=epsilon,
                             delta=dp.target_delta if dp else 0.0, steps=steps,
                             planned_steps=the_plan.planned_steps, sample_rate=the_plan.sample_rate,
                             noise_multiplier=noise_multiplier, budget_id=budget_id, stopped=stopped, metrics=out)
        finally:
            services.close()


def _session_config(cfg: TenSafeTrainingConfig, dataset_size: int, noise_multiplier: float,
                    budget_id: str) -> SessionConfig:
    """The run as a trainer TrainingConfig: what its checkpoints record (``session.json``)."""
    dp = cfg.dp_config
    return SessionConfig(
        model_ref=cfg.model_name,
        lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=tuple(cfg.target_modules),
                      bias="none"),
        optimizer=OptimizerSpec(name="adamw", learning_rate=cfg.learning_rate),
        batch_size=cfg.per_device_batch_size * cfg.num_workers, gradient_accumulation_steps=1, seed=cfg.seed,
        max_sequence_length=cfg.max_sequence_length,
        dp=None if dp is None else DPSpec(enabled=True, noise_multiplier=noise_multiplier,
                                          max_grad_norm=dp.max_grad_norm, target_epsilon=dp.target_epsilon,
                                          target_delta=dp.target_delta, accountant_type=PLD,
                                          dataset_size=dataset_size, budget_id=budget_id))
