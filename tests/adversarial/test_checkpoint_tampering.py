"""A tenant edits the JSON and tensors of its own checkpoint and loads it back: every malformed part is refused
with a clear error (never INTERNAL) before anything of the session changes.

The adapter config and weights are covered by test_artifacts.py; this file covers the rest of a checkpoint:
session.json, optimizer.json, optimizer.safetensors and rng.safetensors.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tg_tinker import ConflictError, LoRAConfig, OptimizerConfig, TrainingConfig, ValidationError

IDS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]
BATCH = {"input_ids": IDS}


def _config() -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", seed=5, batch_size=2,
                          lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))


def _files(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[dict[str, bytes]], None]:
    def apply(files: dict[str, bytes]) -> None:
        value = json.loads(files[name])
        out = edit(value)
        files[name] = json.dumps(value if out is None else out).encode()
    return apply


def _edit_tensors(name: str, edit: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def apply(files: dict[str, bytes]) -> None:
        tensors = dict(st_load(files[name]))
        edit(tensors)
        files[name] = st_save(tensors)
    return apply


def _set(files: dict[str, bytes], name: str, data: bytes) -> None:
    files[name] = data


def _first_state_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("exp_avg"))


TAMPERINGS: dict[str, Callable[[dict[str, bytes]], None]] = {
    "session_json_not_json": lambda f: _set(f, "session.json", b"{not json"),
    "session_json_a_list": lambda f: _set(f, "session.json", b"[1, 2]"),
    "session_json_not_utf8": lambda f: _set(f, "session.json", b"\xff\xfe\x00"),
    "negative_step": _edit_json("session.json", lambda r: r.update(step=-5)),
    "step_a_string": _edit_json("session.json", lambda r: r.update(step="12")),
    "huge_tokens_processed": _edit_json("session.json", lambda r: r.update(tokens_processed=1 << 70)),
    "dp_a_string": _edit_json("session.json", lambda r: r.update(dp="none")),
    "optimizer_json_not_json": lambda f: _set(f, "optimizer.json", b"\x00\x01"),
    "optimizer_groups_missing": _edit_json("optimizer.json", lambda m: m.pop("param_groups")),
    "optimizer_extra_group": _edit_json("optimizer.json", lambda m: m["param_groups"].append(m["param_groups"][0])),
    "optimizer_unknown_setting": _edit_json("optimizer.json", lambda m: m["param_groups"][0].update(evil=1)),
    "optimizer_setting_an_object": _edit_json("optimizer.json", lambda m: m["param_groups"][0].update(lr={"x": 1})),
    "optimizer_params_reordered": _edit_json("optimizer.json",
                                             lambda m: m["param_groups"][0].update(params=[99, 100])),
    "optimizer_scalars_bad_index": _edit_json("optimizer.json", lambda m: m.update(scalars={"9999": {"step": 1}})),
    "optimizer_state_wrong_shape": _edit_tensors("optimizer.safetensors", lambda t: t.update(
        {_first_state_key(t): torch.zeros(3, 3)})),
    "optimizer_state_unknown_name": _edit_tensors("optimizer.safetensors", lambda t: t.update(
        {"0.evil": torch.zeros(1)})),
    "optimizer_state_bad_index": _edit_tensors("optimizer.safetensors", lambda t: t.update(
        {"x.exp_avg": torch.zeros(1)})),
    "optimizer_state_past_the_params": _edit_tensors("optimizer.safetensors", lambda t: t.update(
        {"9999.exp_avg": torch.zeros(1)})),
    "optimizer_safetensors_garbage": lambda f: _set(f, "optimizer.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
    "rng_missing_cpu": _edit_tensors("rng.safetensors", lambda t: t.update({"gpu": t.pop("cpu")})),
    "rng_wrong_size": _edit_tensors("rng.safetensors", lambda t: t.update(cpu=torch.zeros(7, dtype=torch.uint8))),
    "rng_garbage": lambda f: _set(f, "rng.safetensors", b"garbage"),
}


@pytest.fixture(scope="module")
def checkpoint(trainer_stack) -> bytes:
    with trainer_stack.client(retry_count=2) as client, client.create_training_client(_config()) as tc:
        for _ in range(2):
            tc.forward_backward(BATCH)
            tc.optim_step()
        return client.get_artifact(tc.save_state(include_optimizer=True).artifact_id)


def test_the_untouched_checkpoint_loads(trainer_stack, checkpoint) -> None:
    """The tamperings below mean something only if the original loads, optimizer included."""
    with trainer_stack.client(retry_count=2) as client, client.create_training_client(_config()) as tc:
        upload = client.artifacts.put(_tar(_files(checkpoint)), kind="checkpoint", name="untouched",
                                      content_type="application/x-tar")
        loaded = tc.load_state(upload.artifact_id)
        assert loaded.optimizer_restored and loaded.step == 2


def test_a_tampered_checkpoint_is_refused_and_leaves_the_session_as_it_was(trainer_stack, checkpoint) -> None:
    wrong = []
    with trainer_stack.client(retry_count=2) as client, client.create_training_client(_config()) as tc:
        tc.forward_backward(BATCH)
        tc.optim_step()
        before = tc.forward(BATCH, return_logprobs=True).result(timeout=120).logprobs
        info_before = tc.get_info()
        for name, tamper in TAMPERINGS.items():
            files = _files(checkpoint)
            tamper(files)
            upload = client.artifacts.put(_tar(files), kind="checkpoint", name=name, content_type="application/x-tar")
            try:
                tc.load_state(upload.artifact_id)
                wrong.append(f"{name}: loaded")
            except (ValidationError, ConflictError):
                pass
            except Exception as exc:  # noqa: BLE001 - anything else (INTERNAL above all) is the failure
                wrong.append(f"{name}: {type(exc).__name__} {exc}")
        assert not wrong, "\n".join(wrong)
        after = tc.forward(BATCH, return_logprobs=True).result(timeout=120).logprobs
        assert tc.get_info().step == info_before.step
        assert before is not None and np.array_equal(before, after)  # no weight changed
        tc.forward_backward(BATCH)
        tc.optim_step().result(timeout=120)  # and the session still trains
