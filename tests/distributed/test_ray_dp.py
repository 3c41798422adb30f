"""tensafe.distributed on a real Ray cluster (2 CPU workers, gloo) against a real `tensafe up`: distributed DP-SGD
whose parameters agree across ranks, whose clipped sum is the single-process one, whose epsilon is an independent
dp-accounting PLD at the global rate, and whose killed worker resumes from the vault with every step counted once.

One Ray cluster and one stack for the module (Ray's start is the slow part)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

import dp_accounting  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from ray import cloudpickle  # noqa: E402
from tiny_model import CORPUS  # noqa: E402

from conftest import eventually, start_stack  # noqa: E402
from tensafe.distributed import DistributedDPConfig, TenSafeTrainer, TenSafeTrainingConfig  # noqa: E402
from tensafe.runtime.errors import InvalidArgument  # noqa: E402
from tg_tinker import LoRAConfig, TrainingConfig  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's own train loops, sent to the workers

TEXTS = CORPUS[3:11]  # clinic, model and everyday sentences the tiny tokenizer knows
N_ROWS = 48
PLD_RTOL = 0.005


def independent_pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    acct = pld_privacy_accountant.PLDAccountant()
    acct.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return acct.get_epsilon(delta)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                         # Ray Train's controller polls its workers this often (default 2 s):
                                         # reported checkpoints are registered soon after they are made.
                                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dist_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = start_stack(tmp_path_factory.mktemp("dist"), {"TENSAFE_MODEL_DIR": str(tiny_model.parent)})
    yield s
    assert s.process.stop() == 0, s.process.output()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": TEXTS[i % len(TEXTS)] + f" ({i})"}) + "\n" for i in range(N_ROWS)))
    return path


def operator_env(stack, tiny_model: Path) -> dict[str, str]:
    return {"TENSAFE_DATA_DIR": str(stack.data_dir), "TENSAFE_MODEL_DIR": str(tiny_model.parent)}


def config(**kw) -> TenSafeTrainingConfig:
    base = dict(model_name="tiny", lora_rank=4, lora_alpha=8, num_epochs=1, per_device_batch_size=4,
                learning_rate=5e-3, num_workers=2, use_gpu=False, checkpoint_every=2, seed=3,
                dp_config=DistributedDPConfig(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=0.5))
    base.update(kw)
    return TenSafeTrainingConfig(**base)


def progress(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / f"progress-{rank}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


# -- the run end to end, a worker killed on the way ---------------------------------------------------------------
def test_fit_trains_privately_as_the_tenant_and_survives_a_killed_worker(ray_cluster, dist_stack, tiny_model,
                                                                        dataset) -> None:
    """12 planned steps, checkpoints at 3, 6, 9, 12; rank 1 is SIGKILLed once it is past step 4. Ray Train restarts
    the group from the step-3 checkpoint (read back from the vault), the steps after it are made again under the
    same step ids, and the run ends with every global step counted once, by the accountant and in the ledger."""
    trainer = TenSafeTrainer(config(num_epochs=2, checkpoint_every=3), dataset=str(dataset),
                             api_key=dist_stack.api_key, base_url=dist_stack.target,
                             environ=operator_env(dist_stack, tiny_model))
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    runs = dist_stack.data_dir / "distributed"

    def past_first_checkpoint() -> tuple[Path, int] | None:
        """Rank 1 still training after Ray Train registered the first checkpoint (its snapshot file)."""
        for run_dir in runs.glob("dist-*") if runs.is_dir() else []:
            p = progress(run_dir, 1)
            if p and 3 <= p["step"] < 12 and (run_dir / "checkpoint_manager_snapshot.json").is_file():
                return run_dir, p["pid"]
        return None

    run_dir, pid = eventually(past_first_checkpoint, timeout=240, interval=0.05,
                              message="rank 1 past the first checkpoint")
    os.kill(pid, signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive(), "fit did not finish after the worker was killed"
    if "error" in box:
        raise box["error"]
    result = box["result"]
    assert result.run_id == run_dir.name
    assert progress(run_dir, 1)["pid"] != pid  # rank 1 is a new process: the group was restarted
    q = 8 / N_ROWS  # per_device_batch_size x num_workers / N
    assert result.sample_rate == pytest.approx(q) and result.metrics["sample_rate"] == pytest.approx(q)
    assert result.steps == result.planned_steps == 12 == result.metrics["steps"]
    # Calibrated from the planned steps: the whole run spends the target, as plain dp-accounting computes it.
    expected = independent_pld_epsilon(result.noise_multiplier, q, result.steps, 1e-5)
    assert result.epsilon == pytest.approx(expected, rel=PLD_RTOL)
    assert result.epsilon == pytest.approx(4.0, rel=0.02)
    run_dir = dist_stack.data_dir / "distributed" / result.run_id
    # The same parameters on every rank at the end (digests of the LoRA tensors, written by each rank).
    p0, p1 = progress(run_dir, 0), progress(run_dir, 1)
    assert p0 and p1 and p0["step"] == p1["step"] == 12
    assert p0["params_sha256"] == p1["params_sha256"] and len(p0["params_sha256"]) == 64
    # No weight in the clear outside the vault: Ray's checkpoints are pointers.
    kept = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in kept if p.suffix in (".safetensors", ".bin", ".pt", ".tar")], kept
    with dist_stack.client() as client:
        # The final adapter is served by inference ...
        sampler = client.create_sampling_client(result.artifact_id)
        out = sampler.sample("The clinic opens", max_tokens=4, temperature=0.0)
        assert out.samples and out.samples[0].token_ids
        # ... and loads into a training session, its attested lineage saying how it was made: the run's budget at
        # the epsilon spent, twelve private steps, no non-private one (a DP session could continue that budget; this
        # one is exhausted: the noise was calibrated to spend it all).
        with client.create_training_client(TrainingConfig(
                model_ref="tiny", batch_size=8,
                lora_config=LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))) as tc:
            loaded = tc.load_state(result.artifact_id)
        assert loaded.step == 12 and loaded.optimizer_restored
        lineage = loaded.lineage
        assert lineage is not None and lineage.attested and not lineage.external_ancestry
        assert lineage.private_steps == 12 and lineage.non_private_steps == 0
        assert [(b.budget_id, round(b.epsilon, 6)) for b in lineage.budgets] == [(result.budget_id,
                                                                                 round(result.epsilon, 6))]
        # The run in the tenant's verified ledger: its start, each global step once, checkpoints, the end.
        key = dist_stack.cli("ledger", "vkey").stdout.strip()
        mine = [r for r in client.get_audit_logs(service="distributed", vkey=key)
                if r.details.get("run_id") == result.run_id]
    steps = sorted(int(r.details["global_step"]) for r in mine if r.action == "distributed.Step")
    assert steps == list(range(1, 13))  # steps 4.. were made twice, and are in the ledger once
    assert [r.resource_id for r in mine if r.action == "distributed.Fit"] == [result.artifact_id]
    saved = [r for r in mine if r.action == "distributed.SaveState"]
    assert {int(r.details["global_step"]) for r in saved} == {3, 6, 9, 12}
    # The restarted group continued from a checkpoint it read back from the vault (not from scratch).
    resumed_from = {r.details["parent_artifact_id"] for r in saved} - {""}
    assert resumed_from and resumed_from <= {r.resource_id for r in saved}
    assert all(r.tenant_id == mine[0].tenant_id != "tensafe-system" for r in mine)


def test_bad_config_is_refused_before_anything_runs(dist_stack, tiny_model, dataset) -> None:
    with pytest.raises(InvalidArgument) as err:
        TenSafeTrainer(config(per_device_batch_size=0), dataset=str(dataset), api_key=dist_stack.api_key)
    assert err.value.field == "config.per_device_batch_size"
    with pytest.raises(InvalidArgument) as err:
        TenSafeTrainer(config(dp_config=DistributedDPConfig(target_delta=2.0)), dataset=str(dataset),
                       api_key=dist_stack.api_key)
    assert err.value.field == "config.dp_config.target_delta"
    small = dataset.parent / "small.jsonl"
    small.write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(InvalidArgument) as err:
        TenSafeTrainer(config(), dataset=str(small), api_key=dist_stack.api_key, base_url=dist_stack.target,
                       environ=operator_env(dist_stack, tiny_model)).fit()
    assert err.value.field == "dataset" and "fewer than the global expected batch 8" in err.value.message


# -- the step's arithmetic across ranks ----------------------------------------------------------------------------
ROWS_BY_RANK = {0: [0, 3, 4, 9, 10], 1: [1, 5, 6]}  # a "sampled" step, fixed so the reference sees the same rows


def _clipped_sum(model_dir: str, texts: list[str], rows: list[int]) -> tuple[torch.Tensor, int]:
    """The run's own model set-up and step function (tensafe.distributed.dpstep) on the given rows."""
    from peft import LoraConfig, get_peft_model

    from tensafe.common import devices
    from tensafe.common.models import load_base_model, resolve_model_ref
    from tensafe.distributed import dpstep
    from tensafe.trainer.dp import PerSampleClipper, lora_layers
    from tensafe.trainer.losses import resolve_loss

    model, tok = load_base_model(resolve_model_ref("tiny", model_dir), devices.CPU_FLOAT32)
    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="r")
    params = [p for n, p in peft.named_parameters() if ".r." in n + "."]
    for p in params:
        p.requires_grad_(True)
    clipper = PerSampleClipper(lora_layers(peft, "r"), 0.05, expected=params)
    batch = [dpstep.encode(tok, [texts[i] for i in rows], 32, torch.device("cpu"))]
    flat, n, _ = dpstep.local_clipped_sum(peft, clipper, params, batch, resolve_loss("token_ce"))
    return flat, n


def _clipped_sum_loop(loop_config: dict) -> None:
    """On each worker: its rows' clipped sum all-reduced, and noise alone; rank 0 writes the results."""
    import ray.train

    from tensafe.distributed import dpstep
    from tensafe.trainer.dp import SecureGaussian

    rank = ray.train.get_context().get_world_rank()
    flat, rows = _clipped_sum(loop_config["model_dir"], loop_config["texts"], ROWS_BY_RANK[rank])
    summed = dpstep.noised_global_mean(flat, noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=1.0,
                                       noise=None)
    # Noise alone (zero sums), sigma*C = 2: added once in all, its per-coordinate variance is 4 (twice would be 8).
    noised = dpstep.noised_global_mean(torch.zeros(20000), noise_multiplier=4.0, max_grad_norm=0.5,
                                       expected_batch_size=1.0, noise=SecureGaussian())
    if rank == 0:
        torch.save({"summed": summed, "noised": noised, "rows": rows}, Path(loop_config["out"]) / "out.pt")


def test_global_clipped_sum_is_the_single_process_sum_and_noise_is_added_once(ray_cluster, tiny_model,
                                                                              tmp_path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(12)]
    TorchTrainer(_clipped_sum_loop, train_loop_config={"model_dir": str(tiny_model.parent), "texts": texts,
                                                       "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="clip-check", storage_path=str(tmp_path / "ray"))).fit()
    got = torch.load(tmp_path / "out.pt")
    # The reference: one process, the union of both ranks' rows in one batch.
    union = ROWS_BY_RANK[0] + ROWS_BY_RANK[1]
    reference, rows = _clipped_sum(str(tiny_model.parent), texts, union)
    assert rows == len(union) and got["rows"] == len(ROWS_BY_RANK[0])
    assert float(reference.norm()) > 0.05  # several rows were clipped to the bound and summed
    torch.testing.assert_close(got["summed"], reference, rtol=1e-4, atol=1e-6)
    var = float(got["noised"].double().var())
    assert abs(var - 4.0) < 0.3, var  # once: 4 (twice would be 8); the estimate's sd over 20000 draws is ~0.04
