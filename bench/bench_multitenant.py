"""Many tenants on one base: batched passes (training) and continuous batching (generation), each
against the same work one at a time, measured in the same run.

Training: N = 1, 2, 4, 8 sessions (one tenant each, LoRA rank 8 on q/k/v/o, dropout 0.05, the SDK's
default) on one shared base, each submitting ``--steps`` (forward_backward, optim_step) pairs on its own
batch. Anchor: the same sessions and ops with batching off (the worker runs one op at a time, as before
batching: ``pass_sessions = 1``). Measured: batching on, all sessions' ops queued at once. Figure:
aggregate training tokens/s, batched over one at a time.

Generation: 8 adapters (random LoRA factors on q/v) on one hf backend base. Anchor: one stream (one
request, one adapter) of ``--tokens`` greedy tokens. Measured: 8 concurrent streams, one per adapter,
the same length, in interleaved pairs. Figure: aggregate generated tokens/s, 8 streams over 1 (the
median pair). Training rounds are repeated (``--repeats``, interleaved) and the fastest of each kind kept.

In process (the trainer's and the hf backend's own classes, no gRPC): the figures are the batching's,
not the transport's (bench_trainer.py and bench_inference.py measure that).

    python bench/bench_multitenant.py [--models tiny smollm2] [--steps 3] [--rows 1] [--seq 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP policy as the server (see tensafe.cli)

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SESSIONS = (1, 2, 4, 8)


def _config(model_ref: str, seed: int):
    from tensafe.trainer.servicer import config_value
    from tg_tinker import LoRAConfig, TrainingConfig

    return config_value(TrainingConfig(model_ref=model_ref, seed=seed, batch_size=1,
                                       lora_config=LoRAConfig(rank=8, alpha=16, dropout=0.05,
                                                              target_modules=TARGETS)).to_proto())


def _batch(vocab: int, rows: int, seq: int, seed: int):
    from tensafe.trainer.servicer import batch_value
    from tg_tinker.training import batch_to_proto

    g = torch.Generator().manual_seed(seed)
    return batch_value(batch_to_proto({"input_ids": torch.randint(3, vocab, (rows, seq), generator=g).tolist()}))


def _wait(op) -> None:
    while op.end_time is None:
        time.sleep(0.001)
    if op.error is not None:
        raise RuntimeError(op.error.message)


def train_round(trainer, model_ref: str, n: int, steps: int, rows: int, seq: int,
                batched: bool) -> tuple[float, float]:
    """Seconds for n sessions to run ``steps`` forward_backward + optim_step each, all queued at once, and
    the ops per worker turn (a batched pass, or one turn of optimizer steps)."""
    sessions = [trainer.create_session(f"tenant-{i}", _config(model_ref, seed=i)) for i in range(n)]
    base = sessions[0].base
    base.pass_sessions = 8 if batched else 1
    vocab = base.vocab_size
    batches = [[_batch(vocab, rows, seq, 100 * i + k) for k in range(steps)] for i in range(n)]
    turns, ran = base.stats["passes"], base.stats["batched_ops"]
    try:
        ops = []
        start = time.perf_counter()
        for k in range(steps):  # each session's ops in order; the sessions' ops interleaved, as clients send
            for s, b in zip(sessions, batches, strict=True):
                ops.append(trainer.forward_backward(s.tenant_id, s.session_id, b[k]))
                ops.append(trainer.optim_step(s.tenant_id, s.session_id))
        for op in ops:
            _wait(op)
        wall = time.perf_counter() - start
        grouped, turns = base.stats["batched_ops"] - ran, base.stats["passes"] - turns
        single = len(ops) - grouped  # ops that ran alone, one turn each
        return wall, len(ops) / (turns + single)
    finally:
        for s in sessions:
            trainer.close(s.tenant_id, s.session_id)


def bench_training(name: str, model_dir: Path, steps: int, rows: int, seq: int, repeats: int) -> None:
    from tensafe.trainer.service import Trainer

    trainer = Trainer(model_dir.parent)
    try:
        train_round(trainer, model_dir.name, 2, 1, rows, seq, batched=True)  # load the base, warm up
        print(f"\n{name}: training, {steps} x (forward_backward + optim_step) per session, {rows} x {seq} tokens "
              f"per op, LoRA r8 q/k/v/o")
        print(f"{'sessions':>8}  {'one at a time':>14}  {'batched':>10}  {'tok/s 1-at-a-time':>18}  "
              f"{'tok/s batched':>14}  {'ratio':>6}  {'ops/turn':>8}")
        for n in SESSIONS:
            tokens = n * steps * rows * seq
            seq_runs, bat_runs = [], []
            for _ in range(repeats):  # interleaved, the fastest of each kept: the machine is shared
                seq_runs.append(train_round(trainer, model_dir.name, n, steps, rows, seq, batched=False)[0])
                bat_runs.append(train_round(trainer, model_dir.name, n, steps, rows, seq, batched=True))
            seq_s, (bat_s, per_turn) = min(seq_runs), min(bat_runs)
            print(f"{n:>8}  {seq_s:>13.2f}s  {bat_s:>9.2f}s  {tokens / seq_s:>18.1f}  {tokens / bat_s:>14.1f}  "
                  f"{seq_s / bat_s:>5.2f}x  {per_turn:>8.2f}", flush=True)
    finally:
        trainer.shutdown()


def _adapter_files(model_dir: Path, count: int) -> list:
    """``count`` adapters as PEFT saves them (random factors), read the way the inference service reads one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tensafe.inference.adapter import read_adapter

    out = []
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.02)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    tar.add(Path(d) / f, arcname=f)
        out.append(read_adapter(buf.getvalue()))
        base = model.unload()
    return out


def _streams(base, adapters: list[str], tokens: int) -> tuple[float, int]:
    from tensafe.inference.backend import ChunkQueue
    from tensafe.inference.generation import Sampling, validate

    prompt = [[1, *range(40, 56)]]
    runs = []
    start = time.perf_counter()
    for a in adapters:
        job = validate(base.tokenizer, [], prompt, Sampling(max_tokens=tokens, temperature=0.0), base.vocab_size,
                       base.max_length)
        out = ChunkQueue(threading.Event())
        got: list = []
        t = threading.Thread(target=lambda o=out, g=got: g.extend(o), daemon=True)
        base.start(a, job, out)
        t.start()
        runs.append((t, got))
    for t, _ in runs:
        t.join()
    wall = time.perf_counter() - start
    return wall, sum(len(c.token_ids) for _, got in runs for c in got)


def bench_generation(name: str, model_dir: Path, tokens: int, repeats: int) -> None:
    from tensafe.common.models import ModelLocation
    from tensafe.inference.hf_backend import HFBase

    base = HFBase(ModelLocation(model_dir, None, str(model_dir)))
    eos = base.tokenizer.eos_token_id
    try:
        names = [f"adp_{i}" for i in range(8)]
        for n, files in zip(names, _adapter_files(model_dir, 8), strict=True):
            base.add_adapter(n, files)
        _streams(base, names[:2], 4)  # warm up
        pairs = []
        for k in range(repeats):  # interleaved pairs: the machine is shared, the load moves between runs
            one_s, one_t = _streams(base, names[k % 8:k % 8 + 1], tokens)
            many_s, many_t = _streams(base, names, tokens)
            pairs.append((one_t / one_s, many_t / many_s))
        ratios = sorted(m / o for o, m in pairs)
        print(f"\n{name}: generation, greedy, {tokens} tokens per stream (EOS id {eos} may end one early)")
        for o, m in pairs:
            print(f"  1 stream {o:7.1f} tok/s, 8 streams (8 adapters) {m:7.1f} tok/s: {m / o:5.2f}x")
        print(f"  ratio, median of {len(pairs)}: {ratios[len(ratios) // 2]:.2f}x  (decode steps {base.stats['steps']}, "
              f"rows {base.stats['rows']})", flush=True)
    finally:
        base.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["training", "generation"], default=None)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            if name == "tiny":
                from tiny_model import build_tiny_model

                model_dir = build_tiny_model(tmp / "models" / "tiny")
            else:
                from tensafe.common.models import prepare_smollm2

                model_dir = prepare_smollm2(REPO / ".tensafe" / "models")
            if args.only != "generation":
                bench_training(name, model_dir, args.steps, args.rows, args.seq, args.repeats)
            if args.only != "training":
                bench_generation(name, model_dir, args.tokens, args.repeats + 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
