"""TENSAFE_DEVICE / TENSAFE_DTYPE: one resolver, clear errors for a device this machine lacks, the base in its
dtype with the LoRA factors and every DP quantity in float32 (tensafe.common.devices)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import REPO, base_env, tensafe_cmd
from tensafe.common import devices
from tensafe.common.devices import Placement
from tensafe.common.models import load_base_model, resolve_model_ref
from tensafe.runtime.config import ConfigError
from tensafe.trainer.dp import PerSampleClipper
from tensafe.trainer.losses import LossInputs, resolve_loss

NO_CUDA = not torch.cuda.is_available()


def test_defaults_resolve_to_this_machine() -> None:
    p = devices.from_env({})
    if NO_CUDA:
        assert p == Placement(torch.device("cpu"), torch.float32)
    else:
        assert p.device == torch.device("cuda", 0) and p.dtype in (torch.bfloat16, torch.float16)
    assert devices.resolve("cpu", "bfloat16") == Placement(torch.device("cpu"), torch.bfloat16)
    assert devices.resolve(" CPU ", "Float32").dtype == torch.float32


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "cuda:1234", "mps", "auto:1"])
def test_malformed_device_names_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"TENSAFE_DEVICE=.*use one of auto, cpu, cuda, cuda:N"):
        devices.from_env({"TENSAFE_DEVICE": bad})


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_a_startup_error(asked: str) -> None:
    with pytest.raises(ConfigError) as err:
        devices.from_env({"TENSAFE_DEVICE": asked})
    assert f"TENSAFE_DEVICE={asked!r}" in str(err.value) and "TENSAFE_DEVICE=cpu" in str(err.value)


def test_dtypes_checked_against_the_device() -> None:
    with pytest.raises(ConfigError, match="TENSAFE_DTYPE='int8'"):
        devices.from_env({"TENSAFE_DEVICE": "cpu", "TENSAFE_DTYPE": "int8"})
    with pytest.raises(ConfigError, match="TENSAFE_DTYPE=float16 is for CUDA"):
        devices.from_env({"TENSAFE_DEVICE": "cpu", "TENSAFE_DTYPE": "float16"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir made by `tensafe init` (keys, the default tenant), shared by both services' checks."""
    d = tmp_path_factory.mktemp("devices") / "data"
    init = subprocess.run(tensafe_cmd("init", "--data-dir", str(d)), env=base_env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert init.returncode == 0, init.stderr
    return d


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("service", ["trainer", "inference"])
def test_server_refuses_to_start_on_an_absent_device(service: str, data_dir: Path) -> None:
    """`tensafe serve` with TENSAFE_DEVICE=cuda on a CPU machine: exit 2, the setting named, nothing served."""
    env = base_env(TENSAFE_DEVICE="cuda:0", TENSAFE_PORT="0")
    done = subprocess.run(tensafe_cmd("serve", service, "--data-dir", str(data_dir)), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error: TENSAFE_DEVICE='cuda:0'" in done.stderr
    assert "serving on" not in done.stdout


def test_bf16_base_keeps_lora_and_dp_arithmetic_in_fp32(tiny_model: Path) -> None:
    """A bfloat16 base: the weights are bf16, the LoRA factors fp32, and per-sample clipping yields fp32 sums
    whose rows are each clipped to the bound (norms computed in float64)."""
    loc = resolve_model_ref(tiny_model.name, tiny_model.parent)
    model, tok = load_base_model(loc, devices.resolve("cpu", "bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          adapter_name="s")
    lora = [p for n, p in peft.named_parameters() if ".s." in n]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    layers = [m for n, m in peft.named_modules() if n.endswith(("lora_A.s", "lora_B.s"))]
    clipper = PerSampleClipper(layers, max_grad_norm=1e-3, expected=lora)
    for p in lora:
        p.requires_grad_(True)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids] * 3)
    mask = torch.ones_like(ids)

    def run() -> LossInputs:
        logits = peft(input_ids=ids, attention_mask=mask).logits.float()
        return LossInputs(logits=logits, input_ids=ids, attention_mask=mask, labels=ids, advantages=None,
                          old_logprobs=None, extra={})

    clipper.per_sample_backward(run, resolve_loss("token_ce"))
    assert clipper.rows == 3
    assert {t.dtype for t in clipper.summed.values()} == {torch.float32}
    total = torch.sqrt(sum(t.double().pow(2).sum() for t in clipper.summed.values()))
    assert 0 < float(total) <= 3 * 1e-3 * (1 + 1e-5)  # three rows, each clipped to 1e-3
    clipper.close()


@pytest.mark.parametrize(("env", "field"), [({"TENSAFE_DEVICE": "gpu0"}, "TENSAFE_DEVICE='gpu0'"),
                                            ({"TENSAFE_DTYPE": "int8"}, "TENSAFE_DTYPE='int8'")])
def test_server_config_checks_device_settings(env: dict[str, str], field: str, tmp_path: Path) -> None:
    """TENSAFE_DEVICE / TENSAFE_DTYPE are ServerConfig settings (README table): a malformed value is a
    ConfigError naming it at load, before any service or torch is touched."""
    from tensafe.runtime.config import ServerConfig

    with pytest.raises(ConfigError, match=field):
        ServerConfig.load(environ=env, env_file=tmp_path / "none.env")
    ok = ServerConfig.load(environ={"TENSAFE_DEVICE": "cuda:1", "TENSAFE_DTYPE": "bfloat16"},
                           env_file=tmp_path / "none.env")
    assert (ok.device, ok.dtype) == ("cuda:1", "bfloat16")


def test_configured_placement_is_the_process_default(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a server configured (from its ServerConfig, .env included) is what load_base_model uses when no
    placement is passed, even though the process environment says nothing."""
    monkeypatch.delenv("TENSAFE_DEVICE", raising=False)
    monkeypatch.delenv("TENSAFE_DTYPE", raising=False)
    monkeypatch.setattr(devices, "_configured", None)
    assert devices.configure("cpu", "bfloat16") == Placement(torch.device("cpu"), torch.bfloat16)
    model, _ = load_base_model(resolve_model_ref(tiny_model.name, tiny_model.parent))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_device_in_the_env_file_stops_the_start(data_dir: Path, tmp_path: Path) -> None:
    """TENSAFE_DEVICE set only in the .env file (not the process environment) is honoured: exit 2, named."""
    env_file = tmp_path / "server.env"
    env_file.write_text("TENSAFE_DEVICE=cuda\n")
    env = base_env(TENSAFE_PORT="0", TENSAFE_ENV_FILE=str(env_file))
    env.pop("TENSAFE_DEVICE", None)
    done = subprocess.run(tensafe_cmd("serve", "trainer", "--data-dir", str(data_dir)), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error: TENSAFE_DEVICE='cuda'" in done.stderr
