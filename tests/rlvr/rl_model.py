"""A tiny Llama that has learnt something, for RL tests: the random tiny model (tests/tiny_model.py) predicts
near-uniformly and a LoRA adapter barely moves it, so policy gradients have nothing to work with.

``build_rl_model(dir)`` builds the tiny model, then fine-tunes ALL its weights (in process, plain torch) on a
toy corpus where each prompt of PROMPTS is followed by one of ANIMALS: the model then completes a prompt with
one animal name, about uniformly, and stops (EOS). The RL task of tests/rlvr is to make it say TARGET.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ["Once upon a time there was a", "In the park I saw a", "The story is about a", "My friend has a",
           "On the floor slept a", "In the garden there was a"]
ANIMALS = ["cat", "dog", "fox", "bird", "robot", "tree"]
TARGET = "cat"


def build_rl_model(dir: Path, steps: int = 30, seed: int = 0) -> Path:
    from tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dir = build_tiny_model(Path(dir), seed=seed)
    tok = AutoTokenizer.from_pretrained(str(dir))
    model = AutoModelForCausalLM.from_pretrained(str(dir))
    rows = [tok(f"{p} {a}.").input_ids + [tok.eos_token_id] for p in PROMPTS for a in ANIMALS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread of a busy machine
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(dir)
    return dir
