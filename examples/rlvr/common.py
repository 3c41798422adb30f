"""What the three RLVR examples share: the arguments, the session and the verifiable task.

The task is arithmetic with a checkable answer: "What is 7 + 5?" is rewarded 1 when the completion's last
number is 12 (the ``numeric_answer`` reward, each prompt's answer passed as its context).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from transformers import AutoTokenizer

from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model_ref: a model name on the server")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: .tensafe/models/<model>)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="arithmetic questions in the prompt set")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    return p


def tokenizer(args: argparse.Namespace):
    path = args.tokenizer or str(Path(".tensafe") / "models" / args.model)
    return AutoTokenizer.from_pretrained(path)


def session(args: argparse.Namespace, **kwargs) -> TrainingConfig:
    return TrainingConfig(model_ref=args.model, seed=args.seed,
                          lora_config=LoRAConfig(rank=16, alpha=32, dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          optimizer=OptimizerConfig(name="adam", learning_rate=args.learning_rate), **kwargs)


def arithmetic(n: int, seed: int) -> tuple[list[str], list[dict]]:
    """``n`` questions and, for each, its context: the answer the reward checks."""
    rng = random.Random(seed)
    prompts, contexts = [], []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        prompts.append(f"Question: What is {a} + {b}? Answer with a number.\nAnswer:")
        contexts.append({"answer": a + b})
    return prompts, contexts


def show(log) -> None:
    for i, h in enumerate(log.history, 1):
        print(f"Iteration {i}: mean_reward={h.mean_reward:.3f} kl={h.kl:.4f} clip_fraction={h.clip_fraction:.3f} "
              f"entropy={h.entropy:.3f} loss={h.loss:.4f}")
    print(f"{len(log.history)} updates ({log.stopped}); mean reward {log.history[0].mean_reward:.3f} -> "
          f"{log.history[-1].mean_reward:.3f}")
