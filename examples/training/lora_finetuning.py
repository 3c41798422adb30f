"""Fine-tune a LoRA adapter on the synthetic Northwind Clinic FAQ, through a running TenSafe stack.

    tensafe up &                                   # or: make up
    TS_API_KEY=$(cat .tensafe/api_key) python examples/training/lora_finetuning.py

The model is looked up in the server's model directory (``<data dir>/models`` by default);
``python -m tensafe.common.models prepare-smollm2 --models-dir .tensafe/models`` puts
SmolLM2-135M-Instruct there. The tokenizer is read on this side from the same directory
(``--tokenizer``), because the client builds the token ids it sends.

With ``--dp`` the run is differentially private (DP-SGD): batches are drawn by Poisson sampling
(``tg_tinker.data.PoissonSampler``, the sampling the accounting assumes), each example's gradient
is clipped, noise is added once per step, and the epsilon spent is printed as training goes. The
noise multiplier is calibrated so that ``--steps`` steps end at ``--target-epsilon`` unless
``--noise-multiplier`` is given.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from tg_tinker import DPBudgetExceededError, DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.data import PoissonSampler

HERE = Path(__file__).resolve().parent.parent


def chat(tok, prompt: str, response: str | None = None) -> list[int]:
    if not getattr(tok, "chat_template", None):  # a base model without a chat template
        text = f"Question: {prompt}\nAnswer:" + (f" {response}{tok.eos_token or ''}" if response is not None else "")
        return tok(text).input_ids
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    messages.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def make_batch(tok, records: list[dict]) -> dict:
    """Pad to the longest sequence; train only on the answer (prompt and padding labels are -100)."""
    rows = []
    for r in records:
        prompt_ids = chat(tok, r["prompt"])
        full = chat(tok, r["prompt"], r["response"])
        rows.append((full, len(prompt_ids)))
    width = max(len(full) for full, _ in rows)
    pad = tok.pad_token_id
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for full, n_prompt in rows:
        gap = width - len(full)
        batch["input_ids"].append(full + [pad] * gap)
        batch["attention_mask"].append([1] * len(full) + [0] * gap)
        batch["labels"].append([-100] * n_prompt + full[n_prompt:] + [-100] * gap)
    return batch


def show_samples(tc, tok, heldout: list[dict], title: str) -> int:
    prompts = [chat(tok, r["prompt"]) for r in heldout]
    result = tc.sample(prompts, max_tokens=48, temperature=0)
    hits = 0
    print(f"\n== {title} ==")
    for r, s in zip(heldout, result.samples, strict=True):
        found = any(k.lower() in s.completion.lower() for k in r.get("keywords", []))
        hits += found
        print(f"Q: {r['prompt']}\nA: {s.completion.strip()}\n   {'[knows the fact]' if found else ''}")
    print(f"{hits}/{len(heldout)} answers contain the clinic's fact")
    return hits


def report(bar, pending, losses):
    """Wait for a queued step and show its loss (and, in DP runs, the epsilon spent so far)."""
    fb, opt = pending
    if fb is not None:
        losses.append(fb.result().loss)
    result = opt.result()
    post = {"loss": f"{losses[-1]:.3f}" if losses else "-", "step": result.step}
    if result.dp_metrics is not None:
        post["epsilon"] = f"{result.dp_metrics.total_epsilon:.3f}"
    bar.set_postfix(post)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model_ref: a model name on the server")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: .tensafe/models/<model>)")
    parser.add_argument("--data", default=str(HERE / "data" / "clinic_faq.jsonl"))
    parser.add_argument("--heldout", default=str(HERE / "data" / "clinic_faq_heldout.jsonl"))
    parser.add_argument("--samples", type=int, default=6, help="held-out questions to ask before and after")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", action="store_true", help="train with differential privacy (DP-SGD)")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="with --dp: the privacy budget")
    parser.add_argument("--target-delta", type=float, default=1e-5, help="with --dp")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="with --dp; default: calibrated so that --steps steps end at --target-epsilon")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="with --dp: per-example clipping bound")
    args = parser.parse_args()

    tok_dir = args.tokenizer or str(Path(".tensafe/models") / args.model)
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    heldout = [json.loads(line) for line in Path(args.heldout).read_text().splitlines() if line.strip()]
    heldout = heldout[: args.samples]
    rng = random.Random(args.seed)

    with ServiceClient() as service:
        config = TrainingConfig(
            model_ref=args.model,
            lora_config=LoRAConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            optimizer=OptimizerConfig(name="adamw", learning_rate=args.learning_rate, weight_decay=0.0),
            batch_size=args.batch_size, seed=args.seed,
            dp_config=DPConfig(enabled=True, noise_multiplier=args.noise_multiplier,
                               max_grad_norm=args.max_grad_norm, target_epsilon=args.target_epsilon,
                               target_delta=args.target_delta, dataset_size=len(records),
                               max_steps=args.steps) if args.dp else None,
            metadata={"dataset": Path(args.data).name, "example": "lora_finetuning"})
        with service.create_training_client(config) as tc:
            before = show_samples(tc, tok, heldout, "Before fine-tuning")
            if args.dp:
                # Poisson sampling: each record joins a step's batch with probability batch_size / len(records).
                sampler = PoissonSampler.for_batch_size(len(records), args.batch_size, steps=args.steps,
                                                        seed=args.seed)
                batches = sampler.batches(records)
            else:
                batches = (rng.sample(records, args.batch_size) for _ in range(args.steps))
            bar = tqdm(batches, total=args.steps, desc="fine-tuning" + (" with DP" if args.dp else ""),
                       unit="step", file=sys.stdout)
            pending, losses, last = None, [], None
            try:
                for rows in bar:
                    # Queue this step before waiting for the previous one: the server is never idle.
                    fb = tc.forward_backward(make_batch(tok, rows)) if rows else None
                    step = (fb, tc.optim_step())
                    if pending is not None:
                        last = report(bar, pending, losses)
                    pending = step
                if pending is not None:
                    last = report(bar, pending, losses)
            except DPBudgetExceededError as exc:
                print(f"\nthe privacy budget is spent: {exc}")
            bar.close()
            final = losses[-1] if losses else float("nan")
            print(f"trained {tc.step} steps; last batch loss {final:.3f}")
            if args.dp and last is not None and last.dp_metrics is not None:
                dp = last.dp_metrics
                print(f"privacy: epsilon {dp.total_epsilon:.3f} spent of {dp.target_epsilon:g} at delta {dp.delta:g} "
                      f"(noise multiplier {dp.noise_multiplier:.3f}, clipping {dp.max_grad_norm:g}, sample rate "
                      f"{dp.sample_rate:.4f}, {dp.accounted_steps} steps accounted)")
            after = show_samples(tc, tok, heldout, "After fine-tuning")
    print(f"\nheld-out facts: {before}/{len(heldout)} before, {after}/{len(heldout)} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
