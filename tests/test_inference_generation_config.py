"""The hf backend applies a base model's ``generation_config`` processors as transformers' ``generate`` does:
``repetition_penalty`` and ``no_repeat_ngram_size`` (set in the model's generation_config.json, not by the
request), over each row's own prompt and tokens, greedy, in a shared batch. Greedy tokens equal ``generate``
with the same adapter, and the log-probabilities are the raw logits' (as the trainer takes them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapter_config import tar_of
from test_batching_inference import Run
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM

from tensafe.common.models import resolve_model_ref
from tensafe.inference.adapter import read_adapter
from tensafe.inference.hf_backend import HFBackend, HFBase

EOS = 1  # the tiny model's "</s>"
PROMPTS = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90], [1, 7, 7, 7]]
MAX_TOKENS = 24
# Each base: the generation_config fields it sets, and the same fields switched off (for the check that they matter).
CONFIGS = {
    "penalty": ({"repetition_penalty": 1.6}, {"repetition_penalty": 1.0}),
    "ngram": ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 0}),
    "both": ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}, {"repetition_penalty": 1.0,
                                                                       "no_repeat_ngram_size": 0}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model once per config, its generation_config.json setting that config's processors."""
    root = tmp_path_factory.mktemp("genconfig-models")
    for name, (fields, _) in CONFIGS.items():
        path = build_tiny_model(root / name)
        config_file = path / "generation_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    return root


@pytest.fixture(scope="module")
def adapter(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random factors (B not zero), saved the way PEFT saves one."""
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "penalty"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    out = tmp_path_factory.mktemp("genconfig-adapter")
    model.save_pretrained(str(out))
    return out


def reference(model_dir: Path, adapter: Path | None, ids: list[int], **off: object) -> tuple[list[int], list[float]]:
    """transformers' generate, greedy, one sequence, as the trainer's sample calls it (the generation_config
    read from the model's directory; ``off``: fields overridden); its tokens and their raw-logit logprobs."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, adapter_name="adp")
    model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=2,
                             eos_token_id=EOS, return_dict_in_generate=True, output_logits=True, **off)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=False)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request: pytest.FixtureRequest, models: Path, adapter: Path) -> Iterator[tuple[str, HFBase]]:
    name: str = request.param
    base = HFBackend().open(resolve_model_ref(name, models))
    files = {f: (adapter / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    base.add_adapter("adp", read_adapter(tar_of(files)))
    yield name, base
    base.close()


def test_generation_config_processors_apply_per_row_as_in_generate(served: tuple[str, HFBase], models: Path,
                                                                   adapter: Path) -> None:
    name, base = served
    model_dir = models / name
    assert base.processors, f"{name}: no processor read from the generation_config"
    jobs = [("adp", PROMPTS[0]), (None, PROMPTS[1]), ("adp", PROMPTS[2]), (None, PROMPTS[2])]
    expected = {i: reference(model_dir, adapter if a else None, ids) for i, (a, ids) in enumerate(jobs)}
    # The check is real: with the fields off, generate gives other tokens for at least one of these.
    plain = {i: reference(model_dir, adapter if a else None, ids, **CONFIGS[name][1])[0]
             for i, (a, ids) in enumerate(jobs)}
    assert any(plain[i] != expected[i][0] for i in expected), f"{name}: the fields change nothing here"
    steps, rows = base.stats["steps"], base.stats["rows"]
    runs = [Run(base, a, [ids], max_tokens=MAX_TOKENS, return_logprobs=True) for a, ids in jobs]
    for run in runs:
        run.wait()
    assert base.stats["rows"] - rows > base.stats["steps"] - steps  # the rows shared decode steps
    for i, run in enumerate(runs):
        tokens, logprobs = expected[i]
        assert run.tokens()[(0, 0)] == tokens, f"{name}: request {i}"
        assert [lp for c in run.chunks for lp in c.logprobs] == pytest.approx(logprobs, abs=1e-4)


def test_seeded_sampling_applies_them_before_the_warpers(served: tuple[str, HFBase], models: Path) -> None:
    """Sampling: generate's processors, then temperature/top-k/top-p, then the draw; the base alone (no adapter),
    seeded, equals generate with the CPU generator seeded the same."""
    name, base = served
    model: Any = AutoModelForCausalLM.from_pretrained(models / name).eval()
    ids = PROMPTS[2]
    x = torch.tensor([ids])
    torch.manual_seed(5)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                             do_sample=True, temperature=0.8, top_p=0.95, top_k=30, pad_token_id=2, eos_token_id=EOS)
    got = Run(base, None, [ids], max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, top_k=30, seed=5).wait()
    assert got.tokens()[(0, 0)] == out[0, len(ids):].tolist(), name


def test_unapplied_fields_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = build_tiny_model(tmp_path / "odd")
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "min_new_tokens": 3,
                                       "repetition_penalty": 1.2}))
    with caplog.at_level(logging.WARNING, logger="tensafe.inference.hf"):
        base = HFBackend().open(resolve_model_ref("odd", tmp_path))
    try:
        assert len(base.processors) == 1
        assert "min_new_tokens=3" in caplog.text and "repetition_penalty" not in caplog.text
    finally:
        base.close()
