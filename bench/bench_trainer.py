"""One training step through SDK + gRPC + trainer, against the same step in-process.

Anchor: the same LoRA fine-tuning step written directly with transformers + PEFT + torch
(forward, token cross-entropy, backward, AdamW step) on the same model and batch, in this
process. Measured: `tensafe up` in a subprocess, driven through the SDK with each step's
forward_backward and optim_step queued before waiting on the previous step. The two are
interleaved (anchor, service, anchor, service) and the medians compared, because this
machine is shared and noisy. Then the server's resident memory with N = 1, 2, 4 sessions.

    python bench/bench_trainer.py [--models tiny smollm2] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP policy as the server (see tensafe.cli)

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def batch_for(vocab: int, batch: int, seq: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, seq), generator=g).tolist()


def in_process_steps(model_dir: Path, ids: list[list[int]], steps: int) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    base.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.tensor(ids)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        model.train()
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[2:]  # first steps warm up allocators


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`tensafe up` on a free port with TENSAFE_MODEL_DIR set; the benches' common server."""

    def __init__(self, model_root: Path, tmp: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, TENSAFE_MODEL_DIR=str(model_root), TENSAFE_METRICS_PORT="0",
                   TENSAFE_LOG_LEVEL="WARNING", TENSAFE_ACCESS_LOG="false",
                   TENSAFE_OPENAI_PORT="0", TENSAFE_TINKER_PORT="0")  # the HTTP edges: not measured, no fixed ports
        self.data = tmp / "data"
        self.proc = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(self.data),
                                      "--port", str(self.port)], env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ts-"):
                self.api_key = line.strip()
                break

    def client(self):
        from tg_tinker import ServiceClient

        return ServiceClient(api_key=self.api_key, base_url=f"127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def service_steps(client, model_ref: str, ids: list[list[int]], steps: int, dp_config=None) -> list[float]:
    """Steady-state step times of one session (a DP session with ``dp_config``), futures queued."""
    from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

    cfg = TrainingConfig(model_ref=model_ref, lora_config=LoRAConfig(rank=16, alpha=32, dropout=0.0,
                                                                     target_modules=TARGETS),
                         optimizer=OptimizerConfig(learning_rate=1e-4), batch_size=len(ids), seed=0,
                         dp_config=dp_config)
    batch = {"input_ids": ids, "attention_mask": [[1] * len(ids[0])] * len(ids), "labels": ids}
    with client.create_training_client(cfg) as tc:
        for _ in range(2):
            tc.forward_backward(batch)
            tc.optim_step().result()
        ends = []
        start = time.perf_counter()
        queued = [(tc.forward_backward(batch), tc.optim_step()) for _ in range(steps)]
        for _, opt in queued:
            result = opt.result()
            ends.append(time.perf_counter())
        if (result.dp_metrics is not None) != (dp_config is not None):
            raise RuntimeError("the session's DP setting is not the one asked for")
    # Steady-state step time: spacing between consecutive completions of the queued steps.
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)][1:]


def memory(server: Server, model_ref: str, counts: tuple[int, ...]) -> None:
    from tg_tinker import LoRAConfig, TrainingConfig

    with server.client() as client:
        idle = rss_mb(server.proc.pid)
        print(f"  server RSS with no session: {idle:.0f} MiB")
        sessions = []
        for n in counts:
            while len(sessions) < n:
                tc = client.create_training_client(TrainingConfig(
                    model_ref=model_ref, lora_config=LoRAConfig(rank=16, alpha=32, target_modules=TARGETS), seed=0))
                tc.forward_backward({"input_ids": [[1, 2, 3, 4]]})
                tc.optim_step().result()  # optimizer state allocated
                sessions.append(tc)
            info = sessions[0].get_info()
            print(f"  N={n}: RSS {rss_mb(server.proc.pid):.0f} MiB (+{rss_mb(server.proc.pid) - idle:.0f} MiB over "
                  f"idle; adapter {info.num_trainable_parameters * 4 / 2**20:.1f} MiB fp32, base "
                  f"{(info.num_parameters - info.num_trainable_parameters) * 4 / 2**20:.1f} MiB fp32)")
        for tc in sessions:
            tc.close()


def bench(name: str, model_dir: Path, batch: int, seq: int, steps: int, tmp: Path) -> None:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).vocab_size
    ids = batch_for(vocab, batch, seq)
    server = Server(model_dir.parent, tmp / name)
    try:
        anchor, service = [], []
        with server.client() as client:
            for _ in range(2):
                anchor += in_process_steps(model_dir, ids, steps)
                service += service_steps(client, model_dir.name, ids, steps)
        a, s = statistics.median(anchor), statistics.median(service)
        print(f"{name}: batch {batch} x {seq} tokens, LoRA r=16 on {'/'.join(TARGETS)}")
        print(f"  in-process step   {a * 1000:8.1f} ms (median of {len(anchor)})")
        print(f"  SDK+gRPC+trainer  {s * 1000:8.1f} ms (median of {len(service)}, futures queued)")
        print(f"  ratio             {s / a:8.3f}  (target <= 1.05 on SmolLM2)")
    finally:
        server.stop()
    fresh = Server(model_dir.parent, tmp / f"{name}-memory")  # memory from a clean start
    try:
        memory(fresh, model_dir.name, (1, 2, 4))
    finally:
        fresh.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            if name == "tiny":
                from tiny_model import build_tiny_model

                bench("tiny", build_tiny_model(tmp / "models" / "tiny"), 8, 64, args.steps * 3, tmp)
            else:
                from tensafe.common.models import prepare_smollm2

                bench("smollm2", prepare_smollm2(REPO / ".tensafe" / "models"), 8, 64, args.steps, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
