"""Fine-tune a LoRA adapter on the synthetic Northwind Clinic FAQ, through a running TenSafe stack.

    tensafe up &                                   # or: make up
    TS_API_KEY=$(cat .tensafe/api_key) python examples/training/lora_finetuning.py

The model is looked up in the server's model directory (``<data dir>/models`` by default);
``python -m tensafe.trainer.models prepare-smollm2 --models-dir .tensafe/models`` puts
SmolLM2-135M-Instruct there. The tokenizer is read on this side from the same directory
(``--tokenizer``), because the client builds the token ids it sends.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from tg_tinker import LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig

HERE = Path(__file__).resolve().parent.parent


def chat(tok, prompt: str, response: str | None = None) -> list[int]:  # noqa: ANN001
    if not getattr(tok, "chat_template", None):  # a base model without a chat template
        text = f"Question: {prompt}\nAnswer:" + (f" {response}{tok.eos_token or ''}" if response is not None else "")
        return tok(text).input_ids
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    messages.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def make_batch(tok, records: list[dict]) -> dict:  # noqa: ANN001
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


def show_samples(tc, tok, heldout: list[dict], title: str) -> int:  # noqa: ANN001
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model_ref (path or name on the server)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: .tensafe/models/<model>)")
    parser.add_argument("--data", default=str(HERE / "data" / "clinic_faq.jsonl"))
    parser.add_argument("--heldout", default=str(HERE / "data" / "clinic_faq_heldout.jsonl"))
    parser.add_argument("--samples", type=int, default=6, help="held-out questions to ask before and after")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
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
            metadata={"dataset": Path(args.data).name, "example": "lora_finetuning"})
        with service.create_training_client(config) as tc:
            before = show_samples(tc, tok, heldout, "Before fine-tuning")
            bar = tqdm(range(args.steps), desc="fine-tuning", unit="step", file=sys.stdout)
            pending = None
            for _ in bar:
                batch = make_batch(tok, rng.sample(records, args.batch_size))
                # Queue this step before waiting for the previous one: the server is never idle.
                step = (tc.forward_backward(batch), tc.optim_step())
                if pending is not None:
                    bar.set_postfix(loss=f"{pending[0].result().loss:.3f}", step=pending[1].result().step)
                pending = step
            bar.close()
            final = pending[0].result().loss if pending else float("nan")
            print(f"trained {pending[1].result().step if pending else 0} steps; last batch loss {final:.3f}")
            after = show_samples(tc, tok, heldout, "After fine-tuning")
    print(f"\nheld-out facts: {before}/{len(heldout)} before, {after}/{len(heldout)} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
