"""What each Ray Train worker runs: the base model and the run's adapter, global DP-SGD steps, checkpoints.

Rank 0 speaks for the run: it records each global step with the accountant (one step id per global step,
``<run id>:g<step>``, recorded BEFORE the step's noised update exists anywhere), writes the step to the
ledger, and saves the encrypted checkpoints in the vault. Ray Train's own checkpoint is only a pointer
(the vault artifact id and the global step): no weight is ever written in the clear. After a worker
failure Ray Train restarts the group; each rank reads the last checkpoint from the vault (as the tenant),
and the steps after it are made again under the SAME step ids, which the accountant counts once: the
update computed before the failure was never released (it lived only in the lost processes' memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tensafe.common import devices
from tensafe.common.models import load_base_model, resolve_model_ref
from tensafe.runtime import lineage as lineage_mac
from tensafe.runtime.errors import DependencyUnavailable, TensafeError
from tensafe.trainer import checkpoint
from tensafe.trainer.dp import PerSampleClipper, SecureGaussian, lora_layers
from tensafe.trainer.lineage import SessionLineage
from tensafe.trainer.losses import resolve_loss
from tensafe.trainer.settings import DPState
from tensafe.trainer.values import SessionConfig

from . import dpstep
from .config import Plan, TenSafeTrainingConfig
from .services import Access, TenantServices

POINTER = "pointer.json"
MICRO_BATCH = 16  # rows per forward pass on a worker (a step's sampled rows are split into these)


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker is given (the same on every rank)."""

    run_id: str
    config: TenSafeTrainingConfig
    plan: Plan
    session_config: SessionConfig
    access: Access
    run_dir: str
    budget_id: str = ""
    noise_multiplier: float = 0.0
    accountant_type: int = 0


@dataclass
class _Base:
    peft: Any


@dataclass
class _Settings:
    config: SessionConfig
    seed: int


@dataclass
class RunSession:
    """The run's adapter in the shape the trainer's checkpoint code reads and restores
    (:func:`tensafe.trainer.checkpoint.build` / :func:`~tensafe.trainer.checkpoint.restore`): a checkpoint
    of a run is a trainer checkpoint, loadable by ``load_state`` and ``create_sampling_client``."""

    session_id: str
    base: _Base
    settings: _Settings
    optimizer: torch.optim.Optimizer
    dp: DPState | None
    lineage: SessionLineage = field(default_factory=SessionLineage)
    step: int = 0
    micro_steps: int = 0
    optim_calls: int = 0
    tokens_since_update: int = 0
    tokens_processed: int = 0


def params_digest(params: list[torch.nn.Parameter]) -> str:
    """SHA-256 of the adapter's tensors (float32, in order): equal on every rank when they agree bit for bit."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _progress(run_dir: str, rank: int, step: int, digest: str = "") -> None:
    """Where this rank is (its pid, last global step and, at checkpoints, its parameters' digest): for the
    operator, and the tests."""
    path = Path(run_dir) / f"progress-{rank}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "step": step, "params_sha256": digest}))
    tmp.replace(path)


def _save(spec: RunSpec, services: TenantServices, session: RunSession, final: bool) -> str:
    """Rank 0: the checkpoint, encrypted by the vault as the tenant's, its lineage attested; the ledger told."""
    meta = {"run_id": spec.run_id, "global_step": session.step, "final": final}
    lineage = session.lineage.proto(session.session_id, session.dp)
    data = checkpoint.build(session, True, meta, lineage)
    tag = lineage_mac.mac(services.lineage_key(), services.tenant_id, hashlib.sha256(data).digest(), lineage)
    name = (spec.config.name or spec.run_id) if final else f"{spec.run_id}-step{session.step}"
    artifact = services.vault.put(services.caller, data, kind=checkpoint.ARTIFACT_KIND, name=name, metadata=meta,
                                  session_id=spec.run_id, content_type=checkpoint.CONTENT_TYPE, lineage=lineage,
                                  lineage_mac=tag)
    services.audit("distributed.SaveState", artifact.artifact_id,
                   {"global_step": session.step, "final": final, **lineage_mac.summary(artifact.lineage)},
                   "checkpoint", session.step, artifact.artifact_id)
    return artifact.artifact_id


def _report(spec: RunSpec, rank: int, metrics: dict[str, Any], artifact_id: str | None) -> None:
    import ray.train

    if rank != 0 or artifact_id is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(dir=spec.run_dir) as tmp:
        (Path(tmp) / POINTER).write_text(json.dumps({"artifact_id": artifact_id, "global_step": metrics["steps"],
                                                     "run_id": spec.run_id}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(services: TenantServices, session: RunSession) -> str | None:
    """Load the last checkpoint Ray Train kept (a pointer to the vault), if any; its artifact id."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        pointer = json.loads((Path(d) / POINTER).read_text())
    artifact_id = str(pointer["artifact_id"])
    artifact, data = services.vault.get(services.caller, artifact_id)
    checkpoint.restore(session, checkpoint.read(data), artifact.lineage, artifact_id)
    # The checkpoint's own steps came in with its lineage: from here the run counts the steps it adds.
    session.lineage.own_private_steps = session.lineage.own_non_private_steps = 0
    return artifact_id


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray
    import ray.train

    spec: RunSpec = loop_config["spec"]
    texts: list[str] = ray.get(loop_config["texts"])
    cfg, plan = spec.config, spec.plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    services = TenantServices(spec.access, spec.run_id)
    try:
        _run(spec, cfg, plan, texts, rank, world, services)
    finally:
        services.close()


def _run(spec: RunSpec, cfg: TenSafeTrainingConfig, plan: Plan, texts: list[str], rank: int, world: int,
         services: TenantServices) -> None:
    from peft import LoraConfig, get_peft_model

    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    placement = devices.Placement(device, devices.resolve_dtype(os.environ.get(devices.DTYPE_SETTING, "auto"),
                                                                device))
    sc = services.config
    model_dir = Path(sc.model_dir) if sc.model_dir else sc.data_dir / "models"
    model, tokenizer = load_base_model(resolve_model_ref(cfg.model_name, model_dir, sc.registered_models(),
                                                         "config.model_name"), placement)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,  # pyright: ignore[reportArgumentType]
                      target_modules=list(cfg.target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same initial adapter on every rank (and broadcast below, to be sure)
        peft = get_peft_model(model, lora, adapter_name=spec.run_id)
    marker = f".{spec.run_id}."
    params = [p for n, p in peft.named_parameters() if marker in n + "."]
    for p in params:
        p.requires_grad_(True)
        dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    dp = None
    if cfg.dp_config is not None:
        dp = DPState(noise_multiplier=spec.noise_multiplier, max_grad_norm=cfg.dp_config.max_grad_norm,
                     sample_rate=plan.sample_rate, expected_batch_size=round(plan.expected_batch_size),
                     accountant_type=spec.accountant_type, target_epsilon=cfg.dp_config.target_epsilon,
                     target_delta=cfg.dp_config.target_delta, budget_id=spec.budget_id,
                     dataset_size=plan.dataset_size)
    session = RunSession(spec.run_id, _Base(peft), _Settings(spec.session_config, cfg.seed), optimizer, dp)
    clipper = PerSampleClipper(lora_layers(peft, spec.run_id), cfg.dp_config.max_grad_norm, expected=params) \
        if cfg.dp_config is not None else None
    loss = resolve_loss("token_ce")
    artifact_id = _restore(services, session)
    if dp is not None and rank == 0:
        budget = services.accountant.get_budget(services.caller, spec.budget_id)
        dp.total_epsilon, dp.accounted_steps = budget.spent_epsilon, budget.num_steps
    shard = list(range(rank, plan.dataset_size, world))
    noise = SecureGaussian()
    stopped = ""
    final_saved = False
    while session.step < plan.planned_steps:
        g = session.step + 1
        _progress(spec.run_dir, rank, session.step)
        rows = dpstep.poisson_sample(shard, plan.sample_rate)
        batches = [dpstep.encode(tokenizer, [texts[i] for i in rows[k:k + MICRO_BATCH]], cfg.max_sequence_length,
                                 device) for k in range(0, len(rows), MICRO_BATCH)]
        if clipper is not None and dp is not None:
            flat, nrows, loss_sum = dpstep.local_clipped_sum(peft, clipper, params, batches, loss)
            status = torch.zeros(2, dtype=torch.float64, device=device)
            if rank == 0:
                try:
                    recorded = services.accountant.record_step(services.caller, dp.budget_id, f"{spec.run_id}:g{g}",
                                                               dp.noise_multiplier, dp.sample_rate)
                    dp.total_epsilon, dp.accounted_steps = (recorded.budget.spent_epsilon,
                                                            recorded.budget.num_steps)
                    status[0], status[1] = 1.0, dp.total_epsilon
                except DependencyUnavailable:
                    # Maybe recorded, maybe not: this rank fails, Ray Train restarts the group from the last
                    # checkpoint, and the step is made again under the same step id (counted once).
                    raise
                except TensafeError as exc:  # refused (budget spent or closed): the run stops where it is
                    stopped = f"{exc.reason}: {exc}"
            dist.broadcast(status, src=0)
            if status[0] != 1.0:
                stopped = stopped or "the accountant refused the step"
                break
            mean = dpstep.noised_global_mean(flat, noise_multiplier=dp.noise_multiplier,
                                             max_grad_norm=dp.max_grad_norm,
                                             expected_batch_size=plan.expected_batch_size, noise=noise)
            epsilon = float(status[1])
            session.lineage.own_private_steps += 1
        else:
            flat, nrows, loss_sum = _plain_sum(peft, params, batches, loss)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            mean = flat / plan.expected_batch_size
            epsilon = 0.0
            session.lineage.own_non_private_steps += 1
        dpstep.set_grads(params, mean)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        session.step = g
        stats = torch.tensor([float(nrows), loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        session.tokens_processed += int(sum(int(b["attention_mask"].sum()) for b in batches))
        if rank == 0:
            services.audit("distributed.Step", spec.run_id, {"global_step": g, "step_id": f"{spec.run_id}:g{g}",
                                                             "budget_id": spec.budget_id, "epsilon": epsilon},
                           "step", g)
        metrics = {"steps": g, "epsilon": epsilon, "sample_rate": plan.sample_rate,
                   "loss": float(stats[1]) / max(1.0, float(stats[0])), "rows": int(stats[0])}
        save = g % plan.checkpoint_every == 0 or g == plan.planned_steps
        if save:
            artifact_id = _save(spec, services, session, final=g == plan.planned_steps) if rank == 0 else None
            _report(spec, rank, {**metrics, "artifact_id": artifact_id or "", "stopped": ""}, artifact_id)
            final_saved = g == plan.planned_steps
        _progress(spec.run_dir, rank, session.step, params_digest(params) if save else "")
    if not final_saved:  # stopped early (the same step on every rank), or resumed from the final checkpoint
        artifact_id = _save(spec, services, session, final=True) if rank == 0 else None
        _report(spec, rank, {"steps": session.step, "epsilon": dp.total_epsilon if dp else 0.0,
                             "sample_rate": plan.sample_rate, "artifact_id": artifact_id or "",
                             "stopped": stopped}, artifact_id)
        _progress(spec.run_dir, rank, session.step, params_digest(params))


def _plain_sum(model: torch.nn.Module, params: list[torch.nn.Parameter], batches: list[dict[str, torch.Tensor]],
               loss) -> tuple[torch.Tensor, int, float]:
    """Without DP: the gradient of the sum of the rows' losses (no clipping, no noise)."""
    from tensafe.trainer.losses import LossInputs

    rows, loss_sum = 0, 0.0
    for b in batches:
        model.train(True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        for i in range(b["input_ids"].shape[0]):
            out = loss(LossInputs(logits=logits[i:i + 1], input_ids=b["input_ids"][i:i + 1],
                                  attention_mask=b["attention_mask"][i:i + 1], labels=b["labels"][i:i + 1],
                                  advantages=None, old_logprobs=None, extra={}))
            out.loss.backward(retain_graph=True)
            loss_sum += float(out.loss)
            rows += 1
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in params])
    for p in params:
        p.grad = None
    return flat, rows, loss_sum
