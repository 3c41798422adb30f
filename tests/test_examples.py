"""The examples run as users run them: against `tensafe up`, configured by TS_* variables."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run_example(stack, *args: str) -> subprocess.CompletedProcess:
    env = dict(stack.env, TS_API_KEY=stack.api_key, TS_BASE_URL=stack.target)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_hello(trainer_stack) -> None:
    out = run_example(trainer_stack, "examples/quickstart/01_hello_tensafe.py")
    assert out.returncode == 0, out.stderr
    assert "all services are serving" in out.stdout


def test_basic_training(trainer_stack) -> None:
    out = run_example(trainer_stack, "examples/quickstart/02_basic_training.py", "--model", "tiny", "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert "Step 3: loss=" in out.stdout


def test_lora_finetuning(trainer_stack, tiny_model) -> None:
    out = run_example(trainer_stack, "examples/training/lora_finetuning.py", "--model", "tiny", "--tokenizer",
                      str(tiny_model), "--steps", "3", "--batch-size", "2", "--samples", "1")
    assert out.returncode == 0, out.stderr
    assert "Before fine-tuning" in out.stdout and "After fine-tuning" in out.stdout
    assert "trained 3 steps" in out.stdout


def test_dp_training(trainer_stack) -> None:
    out = run_example(trainer_stack, "examples/quickstart/04_dp_training.py", "--model", "tiny")
    assert out.returncode == 0, out.stderr
    assert "Step 1: batch=" in out.stdout and "noise=True" in out.stdout
    # The default budget runs out within the 40 steps tried: the run ends on the accountant's refusal.
    assert "Budget exhausted after step" in out.stdout, out.stdout
    assert "epsilon spent" in out.stdout


def test_lora_finetuning_with_dp(trainer_stack, tiny_model) -> None:
    """What `make demo` runs, on the tiny model: DP fine-tuning that reports the epsilon it spent."""
    out = run_example(trainer_stack, "examples/training/lora_finetuning.py", "--model", "tiny", "--tokenizer",
                      str(tiny_model), "--steps", "3", "--batch-size", "4", "--samples", "1", "--dp")
    assert out.returncode == 0, out.stderr
    assert "trained 3 steps" in out.stdout, out.stdout
    assert "privacy: epsilon" in out.stdout and "3 steps accounted" in out.stdout, out.stdout


def test_wandb_tracking(trainer_stack, tmp_path) -> None:
    out = run_example(trainer_stack, "examples/integrations/wandb_tracking.py", "--model", "tiny", "--steps", "2",
                      "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "step 2: loss=" in out.stdout and list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_tracking_and_export(trainer_stack, tmp_path) -> None:
    out = run_example(trainer_stack, "examples/integrations/mlflow_tracking.py", "--model", "tiny", "--steps", "2",
                      "--store", str(tmp_path / "mlflow"), "--export", str(tmp_path / "hub"))
    assert out.returncode == 0, out.stderr
    assert "step 2: loss=" in out.stdout and (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert "differential privacy" in (tmp_path / "hub" / "README.md").read_text()


def _rlvr(trainer_stack, tiny_model, script: str, *extra: str) -> subprocess.CompletedProcess:
    return run_example(trainer_stack, f"examples/rlvr/{script}", "--model", "tiny", "--tokenizer", str(tiny_model),
                       "--iterations", "2", "--prompts", "4", "--max-new-tokens", "4", *extra)


def test_rlvr_reinforce_ppo_grpo(trainer_stack, tiny_model) -> None:
    """The three RLVR examples, two iterations each on the tiny model (which learns nothing in two: they run)."""
    for script, extra in (("reinforce.py", ()), ("ppo.py", ("--epochs", "2")), ("grpo.py", ("--num-samples", "2"))):
        out = _rlvr(trainer_stack, tiny_model, script, *extra)
        assert out.returncode == 0, out.stderr
        assert "Iteration 2: mean_reward=" in out.stdout and "2 updates (completed)" in out.stdout, out.stdout


def test_rlvr_reinforce_with_dp(trainer_stack, tiny_model) -> None:
    out = _rlvr(trainer_stack, tiny_model, "reinforce.py", "--dp")
    assert out.returncode == 0, out.stderr
    assert "privacy: epsilon" in out.stdout, out.stdout
