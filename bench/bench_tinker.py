"""One SL step through the Tinker-compatible API with the unmodified ``tinker`` client, against the same step
through ``tg_tinker`` on the same stack and model.

Anchor: ``tg_tinker``'s forward_backward (cross_entropy, per-token weights, with the per-token logprobs the
Tinker result carries) + optim_step (AdamW, per-step params) on a trainer session, waiting for both, the batch
built once. Measured: the same datums through
``tinker.TrainingClient.forward_backward`` + ``optim_step`` (HTTP to the gateway, protobuf body, long-polled
futures; the gateway calls the same trainer through tg_tinker). Both sessions live in one ``tensafe up``; the
two are interleaved (anchor, gateway, anchor, ...) and the medians compared, because this machine is shared.

    python bench/bench_tinker.py [--model smollm2] [--steps 6] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ["TINKER_TELEMETRY"] = "0"

HUB = "meta-llama/Llama-3.2-1B"
TARGETS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def model_dir(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from tiny_model import build_tiny_model

        return build_tiny_model(tmp / "models" / "tiny")
    from tensafe.common.models import prepare_smollm2

    cache = Path(os.environ.get("TENSAFE_TEST_MODEL_CACHE", Path.home() / ".cache" / "tensafe-test-models"))
    return prepare_smollm2(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    import tinker
    from tinker import types

    from conftest import free_port, start_stack
    from tg_tinker.configs import LoRAConfig, OptimizerConfig, TrainingConfig

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model = model_dir(args.model, tmp)
        port = free_port()
        stack = start_stack(tmp, {"TENSAFE_MODEL_DIR": str(model.parent), "TENSAFE_TINKER_PORT": str(port),
                                  "TENSAFE_TINKER_MODELS": f"{HUB}={model.name}", "TENSAFE_ACCESS_LOG": "false"})
        try:
            rng = np.random.default_rng(0)
            tokens = rng.integers(3, 300, (args.batch, args.seq + 1))
            weights = np.ones((args.batch, args.seq), np.float32)
            weights[:, : args.seq // 4] = 0  # a "prompt" with no loss, as SL data has
            data = [types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                                loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": w.tolist()})
                    for row, w in zip(tokens, weights, strict=True)]
            width = args.seq + 1
            batch = {"input_ids": np.zeros((args.batch, width), np.int64),
                     "attention_mask": np.zeros((args.batch, width), np.int64),
                     "labels": np.full((args.batch, width), -100, np.int64),
                     "weights": np.zeros((args.batch, width), np.float32)}
            batch["input_ids"][:, :-1] = tokens[:, :-1]
            batch["attention_mask"][:, :-1] = 1
            batch["labels"][:, 1:] = tokens[:, 1:]
            batch["weights"][:, 1:] = weights
            adam = types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12)

            sc = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key="tml-" + stack.api_key)
            tc = sc.create_lora_training_client(base_model=HUB, rank=16, seed=0).result()
            tg = stack.client(timeout=600)
            twin = tg.create_training_client(TrainingConfig(
                model_ref=model.name, seed=0, lora_config=LoRAConfig(rank=16, alpha=32.0, dropout=0.0,
                                                                     target_modules=TARGETS),
                optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-12)))

            def anchor() -> float:
                t0 = time.perf_counter()
                fb = twin.forward_backward(batch, "cross_entropy", return_logprobs=True)  # as the gateway asks
                op = twin.optim_step(learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2,
                                     eps=adam.eps, weight_decay=adam.weight_decay, grad_clip_norm=adam.grad_clip_norm)
                fb.result()
                op.result()
                return time.perf_counter() - t0

            def gateway() -> float:
                t0 = time.perf_counter()
                fb = tc.forward_backward(data, "cross_entropy")
                op = tc.optim_step(adam)
                fb.result()
                op.result()
                return time.perf_counter() - t0

            for _ in range(2):  # warm-up: allocators, the first requests' connections
                anchor()
                gateway()
            a, g = [], []
            for _ in range(args.steps):
                a.append(anchor())
                g.append(gateway())
            ma, mg = statistics.median(a), statistics.median(g)
            print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, LoRA r=16 on all linear layers, "
                  f"{args.steps} interleaved steps")
            print(f"tg_tinker (anchor)      median {ma * 1000:8.1f} ms  [{', '.join(f'{x * 1000:.0f}' for x in a)}]")
            print(f"tinker client, gateway  median {mg * 1000:8.1f} ms  [{', '.join(f'{x * 1000:.0f}' for x in g)}]")
            print(f"ratio gateway / tg_tinker: {mg / ma:.3f} (target <= 1.10)")
            twin.close()
            tg.close()
            sc.close("success").result()
        finally:
            stack.process.stop()


if __name__ == "__main__":
    main()
