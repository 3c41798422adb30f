"""A DP-SGD step against the same non-private step: time and peak memory, as ratios.

Anchor: the non-private LoRA step on the same model, batch, sequence length, LoRA config and
optimizer, measured in the same run.

1. Through the service: one `tensafe up`; a DP session (per-sample clipping, CSPRNG noise, the
   step recorded with the accountant before it is applied) and a non-DP session train on the same
   batch, with futures queued; rounds alternate (plain, DP, plain, DP) and medians are compared.
2. In-process, one fresh subprocess per variant: the trainer's own DP engine
   (tensafe.trainer.dp.PerSampleClipper + SecureGaussian) against the plain PEFT step; step time and
   the peak resident memory of the steps over the memory after loading (the peak is reset after
   loading through /proc/self/clear_refs).

    python bench/bench_dp.py [--models tiny smollm2] [--steps 8] [--only in-process|service]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP policy as the server

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 8, 64


def batch_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (BATCH, SEQ), generator=g).tolist()


# ------------------------------------------------------------------------------ through the service


def dp_config():
    from tg_tinker import DPConfig

    return DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=8.0, target_delta=1e-6,
                    dataset_size=1_000_000)


def through_service(name: str, model_dir: Path, ids: list[list[int]], steps: int, tmp: Path) -> float:
    from bench_trainer import Server, service_steps

    server = Server(model_dir.parent, tmp / f"{name}-service")
    try:
        plain, private = [], []
        with server.client() as client:
            for _ in range(2):
                plain += service_steps(client, model_dir.name, ids, steps)
                private += service_steps(client, model_dir.name, ids, steps, dp_config())
    finally:
        server.stop()
    p, d = statistics.median(plain), statistics.median(private)
    print("  through the service (SDK + gRPC + trainer + accountant), futures queued:")
    print(f"    non-DP step {p * 1000:8.1f} ms   DP step {d * 1000:8.1f} ms   ratio {d / p:6.3f}  (target <= 1.15)")
    return d / p


# ------------------------------------------------------------------------------- in-process child


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(model_dir: str, variant: str, steps: int) -> None:
    """Runs in its own process: load, reset the peak, time `steps` steps, report peak over loaded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tensafe.trainer.dp import PerSampleClipper, SecureGaussian, lora_layers
    from tensafe.trainer.losses import LossInputs, resolve_loss

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    base.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
                           adapter_name="ses_bench")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.tensor(batch_for(AutoConfig.from_pretrained(model_dir, local_files_only=True).vocab_size))
    mask = torch.ones_like(x)
    loss = resolve_loss("token_ce")
    clipper = PerSampleClipper(lora_layers(model, "ses_bench"), 1.0) if variant == "dp" else None
    noise = SecureGaussian()

    def run_model() -> LossInputs:
        model.train(True)
        return LossInputs(logits=model(input_ids=x, attention_mask=mask).logits.float(), input_ids=x,
                          attention_mask=mask, labels=x)

    def step() -> None:
        if clipper is None:
            loss(run_model()).loss.backward()
        else:
            clipper.per_sample_backward(run_model, loss)
            for p, g in clipper.noised_mean(1.0, BATCH, noise).items():
                p.grad = g
            clipper.reset()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocators and optimizer state warm up
    loaded = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"median_s": statistics.median(times), "loaded_mib": loaded / 1024,
                      "peak_mib": peak / 1024}))


def in_process(model_dir: Path, steps: int) -> tuple[float, float]:
    out = {}
    for variant in ("plain", "dp", "plain", "dp"):
        proc = subprocess.run([sys.executable, __file__, "--child", str(model_dir), variant, str(steps)],
                              capture_output=True, text=True, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        prev = out.get(variant)
        if prev is None or got["median_s"] < prev["median_s"]:
            out[variant] = got  # the quieter of two runs
    p, d = out["plain"], out["dp"]
    t_ratio = d["median_s"] / p["median_s"]
    m_ratio = d["peak_mib"] / p["peak_mib"]
    print("  in-process (the trainer's DP engine vs the plain PEFT step), fresh process each:")
    print(f"    non-DP step {p['median_s'] * 1000:8.1f} ms   DP step {d['median_s'] * 1000:8.1f} ms   "
          f"ratio {t_ratio:6.3f}  (target <= 1.3)")
    print(f"    peak RSS    {p['peak_mib']:8.0f} MiB  DP        {d['peak_mib']:8.0f} MiB  ratio {m_ratio:6.3f}  "
          f"(target <= 1.2; loaded model {p['loaded_mib']:.0f} MiB; DP extra "
          f"{d['peak_mib'] - p['peak_mib']:+.0f} MiB)")
    return t_ratio, m_ratio


def bench(name: str, model_dir: Path, steps: int, tmp: Path, only: str | None = None) -> None:
    from transformers import AutoConfig

    ids = batch_for(AutoConfig.from_pretrained(str(model_dir), local_files_only=True).vocab_size)
    print(f"{name}: batch {BATCH} x {SEQ} tokens, LoRA r=16 on {'/'.join(TARGETS)}, AdamW; DP: clip 1.0, noise 1.0")
    if only != "service":
        in_process(model_dir, steps)
    if only != "in-process":
        through_service(name, model_dir, ids, steps, tmp)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", choices=["in-process", "service"], help="run one of the two comparisons")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            if name == "tiny":
                from tiny_model import build_tiny_model

                bench("tiny", build_tiny_model(tmp / "models" / "tiny"), args.steps * 4, tmp, args.only)
            else:
                from tensafe.common.models import prepare_smollm2

                bench("smollm2", prepare_smollm2(REPO / ".tensafe" / "models"), args.steps, tmp, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
