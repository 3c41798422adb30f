"""save_state / load_state through the vault: exact resumption, standard PEFT adapters, no pickle."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tg_tinker import ConflictError, LoRAConfig, OptimizerConfig, TrainingConfig, ValidationError

IDS = [[0, 45, 120, 77, 200, 31, 9, 150, 66, 88, 12, 5], [0, 99, 14, 230, 61, 7, 180, 42, 3, 111, 19, 250]]
BATCHES = [{"input_ids": [row[i:] + row[:i] for row in IDS]} for i in range(6)]


def config(dropout: float = 0.1) -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", seed=7, batch_size=2,
                          lora_config=LoRAConfig(rank=8, alpha=16, dropout=dropout,
                                                 target_modules=["q_proj", "v_proj"]),
                          optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.01))


@pytest.fixture
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


def train(tc, batches) -> list[float]:
    futures = [(tc.forward_backward(b), tc.optim_step()) for b in batches]
    return [fb.result(timeout=120).loss for fb, _ in futures]


def test_resumed_run_equals_the_uninterrupted_one(service) -> None:
    """Same seed and data: save -> new session -> load continues exactly (dropout on, so RNG matters)."""
    with service.create_training_client(config()) as straight:
        uninterrupted = train(straight, BATCHES)
    with service.create_training_client(config()) as first:
        head = train(first, BATCHES[:3])
        ckpt = first.save_state(include_optimizer=True, metadata={"epoch": 1, "validation_loss": 0.42})
        assert ckpt.encryption.algorithm == "AES-256-GCM" and ckpt.step == 3
        assert ckpt.metadata == {"epoch": 1, "validation_loss": 0.42}
    with service.create_training_client(config()) as resumed:
        loaded = resumed.load_state(ckpt.artifact_id)
        assert loaded.step == 3 and loaded.optimizer_restored
        tail = train(resumed, BATCHES[3:])
        assert resumed.get_info().step == 6
    assert head + tail == uninterrupted  # bit for bit, not approximately


def test_checkpoint_is_a_standard_peft_adapter_without_pickle(service, tiny_model, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with service.create_training_client(config(dropout=0.0)) as tc:
        train(tc, BATCHES[:2])
        ckpt = tc.save_state(include_optimizer=True)
        x = torch.tensor(IDS)
        expected = tc.forward({"input_ids": IDS}, return_logprobs=True).result(timeout=60).logprobs
    plaintext = service.decrypt_artifact(service.pull_artifact(ckpt.artifact_id))
    assert service.describe_artifact(ckpt.artifact_id).sha256 == ckpt.sha256
    with tarfile.open(fileobj=io.BytesIO(plaintext)) as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path, filter="data")
    assert names == ["adapter_config.json", "adapter_model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng.safetensors", "session.json"]
    assert all(n.endswith((".json", ".safetensors")) for n in names)  # nothing a pickle loader would read
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
    theirs = torch.gather(logp[:, :-1], 2, x[:, 1:, None])[..., 0]
    assert torch.allclose(theirs, torch.tensor(expected[:, 1:]), atol=1e-5)
    assert json.loads((tmp_path / "session.json").read_text())["step"] == 2


def test_load_refuses_a_mismatched_adapter_and_a_foreign_artifact(service, trainer_stack) -> None:
    with service.create_training_client(config()) as tc:
        train(tc, BATCHES[:1])
        ckpt = tc.save_state()
    other = TrainingConfig(model_ref="tiny", seed=7, lora_config=LoRAConfig(rank=4, alpha=8))
    with service.create_training_client(other) as tc:
        with pytest.raises(ConflictError) as err:
            tc.load_state(ckpt.artifact_id)
        assert "rank" in str(err.value)
        assert tc.get_info().step == 0
        note = service.artifacts.put(b"not a checkpoint", name="note")
        with pytest.raises(ValidationError):
            tc.load_state(note.artifact_id)
    out = trainer_stack.cli("keys", "create", "--tenant", "thief")
    with trainer_stack.client(api_key=out.stdout.strip().splitlines()[-1]) as thief, \
            thief.create_training_client(config()) as tc:
        from tg_tinker import NotFoundError

        with pytest.raises(NotFoundError):
            tc.load_state(ckpt.artifact_id)


def test_no_pickle_anywhere_in_the_services() -> None:
    pattern = re.compile(r"\bpickle\b|torch\.load\(|weights_only\s*=\s*False")
    offenders = [str(p) for p in Path(REPO / "services").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
