"""tg_tinker.integrations against a live stack: MLflow (SQLite store) and W&B (offline) log what the steps
returned and the artifact ids, never data; a checkpoint exported as a PEFT directory loads with PEFT and
computes what the trainer computes, with a model card stating its DP guarantee."""

from __future__ import annotations

import glob
import json
import struct

import numpy as np
import pytest
import torch

from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig, ValidationError
from tg_tinker.integrations import MLflowTracker, WandbTracker, export_peft

ROWS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]
BATCH = {"input_ids": ROWS, "attention_mask": [[1] * 8] * 2, "labels": ROWS}
SECRET = "patient 4471-22 has condition X"  # in the session's metadata: must never reach a tracker


def _config(dp: bool) -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", batch_size=2, lora_config=LoRAConfig(rank=2, alpha=4.0),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.5), seed=11,
                          metadata={"note": SECRET},
                          dp_config=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                                             target_epsilon=50.0, target_delta=1e-5, dataset_size=100)
                          if dp else None)


def _train(tc, tracker, steps: int = 3) -> list[tuple]:
    tracker.log_session(tc)
    seen = []
    for step in range(1, steps + 1):
        fb = tc.forward_backward(BATCH).result(timeout=60)
        opt = tc.optim_step().result(timeout=60)
        tracker.log_step(step, fb, opt)
        seen.append((fb, opt))
    return seen


def _wandb_records(run_dir: str) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of CRC, length, type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(glob.glob(f"{run_dir}/run-*.wandb")[0], "rb").read()
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


@pytest.fixture
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


def test_mlflow_logs_the_steps_epsilon_and_artifact_ids(service, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    with service.create_training_client(_config(dp=True)) as tc, \
            MLflowTracker(uri, experiment="clinic", run_name="dp-run") as tracker:
        seen = _train(tc, tracker)
        artifact = tc.save_state(include_optimizer=False).artifact_id
        tracker.log_artifact(artifact, step=3)
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dp_config.noise_multiplier"] == "1.0"
    assert run.data.params["lora_config.rank"] == "2" and run.data.params["session_id"] == tc.session_id
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    eps = [m.value for m in sorted(client.get_metric_history(run_id, "epsilon"), key=lambda m: m.step)]
    assert loss == pytest.approx([fb.loss for fb, _ in seen])
    assert eps == pytest.approx([opt.dp_metrics.total_epsilon for _, opt in seen]) and eps[0] < eps[-1]
    assert run.data.tags["artifact.checkpoint.last"] == artifact
    everything = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert SECRET not in everything and "note" not in run.data.params


def test_wandb_offline_logs_the_same(service, tmp_path) -> None:
    with service.create_training_client(_config(dp=False)) as tc, \
            WandbTracker(project="clinic", dir=tmp_path) as tracker:
        seen = _train(tc, tracker, steps=2)
        artifact = tc.save_state(include_optimizer=False).artifact_id
        tracker.log_artifact(artifact, step=2)
    (run_dir,) = glob.glob(f"{tmp_path}/wandb/offline-run-*")
    records = _wandb_records(run_dir)
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["loss"] for h in history] == pytest.approx([fb.loss for fb, _ in seen])
    assert [h["_step"] for h in history] == [1, 2] and all("epsilon" not in h for h in history)
    summary = {u.key or u.nested_key[0]: u.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update}
    assert json.loads(summary["artifact.checkpoint.last"]) == artifact
    raw = open(glob.glob(f"{run_dir}/run-*.wandb")[0], "rb").read()
    assert SECRET.encode() not in raw


def test_trackers_refuse_bad_names(tmp_path) -> None:
    with pytest.raises(ValidationError) as err:
        MLflowTracker("ftp://x", experiment="e")
    assert err.value.field == "tracking_uri"
    with pytest.raises(ValidationError) as err:
        MLflowTracker(str(tmp_path / "store"), experiment="bad\nname")
    assert err.value.field == "experiment"
    with pytest.raises(ValidationError) as err:
        WandbTracker(project="p", mode="sometimes")
    assert err.value.field == "mode"
    tracker = MLflowTracker(str(tmp_path / "store"), experiment="e")  # a directory: its own SQLite store
    tracker.close()
    assert (tmp_path / "store" / "mlflow.db").is_file() and tracker.tracking_uri.startswith("sqlite:///")
    with pytest.raises(ValidationError) as err:
        MLflowTracker(str(tmp_path / "store"), experiment="bad\nname")
    assert err.value.field == "experiment"


def test_export_peft_loads_with_peft_and_states_the_guarantee(service, tiny_model, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with service.create_training_client(_config(dp=True)) as tc:
        for _ in range(2):
            tc.forward_backward(BATCH)
            tc.optim_step().result(timeout=60)
        server = tc.forward(BATCH, return_logprobs=True).result(timeout=60).logprobs
        artifact = tc.save_state(include_optimizer=False).artifact_id
        spent = tc.get_info().total_epsilon
    card = export_peft(service, artifact, tmp_path / "hub", base_model="org/tiny-llama")
    files = sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["r"] == 2
    readme = (tmp_path / "hub" / "README.md").read_text()
    assert "base_model: \"org/tiny-llama\"" in readme and "differential-privacy" in readme
    assert f"({spent:.4g}, 1e-05)-differential privacy" in readme and card.dp_covered
    assert "declared" in readme  # client-sampled batches are said to be so
    # The exported adapter is the trained one: PEFT computes the trainer's log-probabilities.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(tmp_path / "hub")).eval()
    ids = torch.tensor(ROWS)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
    np.testing.assert_allclose(logp, np.asarray(server)[:, 1:], atol=1e-4)
    with pytest.raises(ValidationError):
        export_peft(service, artifact, tmp_path / "hub")  # not empty: nothing overwritten
