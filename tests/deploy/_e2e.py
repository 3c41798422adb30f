"""The SDK round trip the container tests run against a deployed stack (compose, kube play): a DP training
session on the tiny model, save_state, sampling the saved adapter from the inference service, and the audit
log read back and verified until the services' outboxes have delivered their entries."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tests.deploy._podman import ROOT

ROWS = [[0, 45, 120, 77, 200, 31, 9, 150, 66, 88, 12, 5],
        [0, 99, 14, 230, 61, 7, 180, 42, 3, 111, 19, 250],
        [0, 17, 64, 201, 33, 90, 140, 8, 71, 29, 160, 2],
        [0, 5, 81, 222, 47, 13, 190, 55, 98, 36, 120, 11]]
PROMPTS = ["Once upon a time", "The clinic opens at"]


def tiny_model_dir(tmp_path_factory: Any) -> Path:
    """A models directory holding the tiny Llama as ``tiny``, readable by the images' uid 10001."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import build_tiny_model

    models = tmp_path_factory.mktemp("container-models")
    build_tiny_model(models / "tiny")
    for p in [models, *models.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return models


def dp_config() -> Any:
    from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig

    return TrainingConfig(model_ref="tiny", batch_size=4, seed=5,
                          lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.5),
                          dp_config=DPConfig(enabled=True, noise_multiplier=1.1, max_grad_norm=1.0,
                                             target_epsilon=8.0, target_delta=1e-5, dataset_size=400))


def train_save_sample(client: Any, steps: int = 2) -> tuple[Any, Any]:
    """Train ``steps`` DP steps, save the adapter, sample it from the inference service; return (checkpoint,
    the trainer's own samples), having checked that both sample alike."""
    batch = {"input_ids": ROWS, "attention_mask": [[1] * 12] * 4, "labels": ROWS}
    with client.create_training_client(dp_config()) as tc:
        for _ in range(steps):
            tc.forward_backward(batch)
            result = tc.optim_step(apply_dp_noise=True).result(timeout=120)
        assert result.dp_metrics.noise_applied and result.dp_metrics.accounted_steps == steps
        assert result.dp_metrics.total_epsilon > 0
        expected = tc.sample(PROMPTS, max_tokens=8, temperature=0)
        ckpt = tc.save_state(include_optimizer=False)
    got = client.create_sampling_client(artifact_id=ckpt.artifact_id).sample(PROMPTS, max_tokens=8, temperature=0)
    assert [s.token_ids for s in got.samples] == [s.token_ids for s in expected.samples], (
        f"inference {[s.token_ids for s in got.samples]} != trainer {[s.token_ids for s in expected.samples]}")
    return ckpt, expected


def audit_entries(client: Any, vkey: str, wait_for: str = "inference.Generate", deadline_s: float = 60,
                  services: frozenset[str] = frozenset({"trainer", "inference", "vault"})) -> list[Any]:
    """The verified audit log, once it holds ``wait_for`` and an entry of each of ``services`` (entries
    reach the ledger through each service's own outbox, so one service's may arrive after another's)."""
    deadline = time.monotonic() + deadline_s
    while True:
        entries = client.get_audit_logs(vkey=vkey)
        actions = {e.action for e in entries}
        seen = {e.service for e in entries}
        if (wait_for in actions and seen >= services) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wait_for in actions, actions
    assert seen >= services, seen
    return entries
