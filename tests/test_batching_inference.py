"""Continuous batching in the hf inference backend: concurrent requests for different adapters on one base
share each decode step (each row through its own adapter), join and leave between steps, and give what each
gives alone: greedy tokens equal to transformers' ``generate`` with that adapter active, seeded samples equal
to the same request run alone; stop strings and cancellation still end a sequence."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapter_config import tar_of
from transformers import AutoModelForCausalLM

from tensafe.common.models import resolve_model_ref
from tensafe.inference.adapter import read_adapter
from tensafe.inference.backend import ChunkQueue
from tensafe.inference.generation import STOP, Sampling, validate
from tensafe.inference.hf_backend import HFBackend, HFBase

ADAPTERS = {  # name: (rank, target modules)
    "adp_qv": (4, ["q_proj", "v_proj"]),
    "adp_all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "adp_mlp": (2, ["down_proj"]),
}
EOS = 1  # the tiny model's "</s>"
PROMPTS = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100, 110, 120], [1, 7], [1, 200, 201, 202, 203, 204]]


@pytest.fixture(scope="module")
def saved(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each adapter saved the way PEFT saves one, with random factors (LoRA B is not zero)."""
    out = {}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def base(tiny_model: Path, saved: dict[str, Path]) -> Iterator[HFBase]:
    b = HFBackend().open(resolve_model_ref("tiny", tiny_model.parent))
    for name, path in saved.items():
        files = {f: (path / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        b.add_adapter(name, read_adapter(tar_of(files)))
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(tiny_model: Path, saved: dict[str, Path]):
    """transformers' generate with one adapter active (None: the base), greedy: the one-at-a-time path."""
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), saved["adp_qv"],
                                     adapter_name="adp_qv")
    for name in ("adp_all", "adp_mlp"):
        peft.load_adapter(saved[name], adapter_name=name)
    peft.eval()

    def generate(adapter: str | None, ids: list[int], max_tokens: int) -> list[int]:
        x = torch.tensor([ids])
        kw = dict(max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=2, eos_token_id=EOS)
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            else:
                peft.set_adapter(adapter)
                out = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        return out[0, len(ids):].tolist()

    return generate


class Run:
    """One request on the base: its chunks, gathered on a thread."""

    def __init__(self, base: HFBase, adapter: str | None, prompts: list[list[int]], **sampling) -> None:
        sampling.setdefault("temperature", 0.0)
        job = validate(base.tokenizer, [], prompts, Sampling(**sampling), base.vocab_size, base.max_length)
        self.out = ChunkQueue(threading.Event())
        self.chunks: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        base.start(adapter, job, self.out)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.chunks.extend(self.out)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def wait(self) -> Run:
        self.thread.join(120)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self

    def started(self) -> Run:
        deadline = time.monotonic() + 60
        while not self.chunks and self.thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return self

    def tokens(self) -> dict[tuple[int, int], list[int]]:
        seqs: dict[tuple[int, int], list[int]] = {}
        for c in self.chunks:
            seqs.setdefault((c.prompt_index, c.sample_index), []).extend(c.token_ids)
        return seqs

    def texts(self) -> dict[tuple[int, int], str]:
        seqs: dict[tuple[int, int], str] = {}
        for c in self.chunks:
            seqs[(c.prompt_index, c.sample_index)] = seqs.get((c.prompt_index, c.sample_index), "") + c.text
        return seqs


def test_concurrent_greedy_requests_for_different_adapters_equal_generate_alone(base: HFBase, reference) -> None:
    jobs = [("adp_qv", [PROMPTS[0]], 12), ("adp_all", [PROMPTS[1]], 5), (None, [PROMPTS[2]], 9),
            ("adp_mlp", [PROMPTS[3]], 14), ("adp_qv", [PROMPTS[1], PROMPTS[2]], 6), ("adp_all", [PROMPTS[3]], 10)]
    steps, rows = base.stats["steps"], base.stats["rows"]
    first = [Run(base, a, p, max_tokens=n, return_logprobs=True) for a, p, n in jobs[:4]]
    first[0].started()  # the rest join a batch that is already decoding
    later = [Run(base, a, p, max_tokens=n, return_logprobs=True) for a, p, n in jobs[4:]]
    runs = [r.wait() for r in first + later]
    assert base.stats["rows"] - rows > base.stats["steps"] - steps  # steps decoded several rows at once
    for (adapter, prompts, n), run in zip(jobs, runs, strict=True):
        got = run.tokens()
        for i, ids in enumerate(prompts):
            assert got[(i, 0)] == reference(adapter, ids, n), f"{adapter} prompt {i}"
        finals = [c for c in run.chunks if c.finish_reason]
        assert len(finals) == len(prompts) and all(len(c.logprobs) == len(c.token_ids) for c in run.chunks)
    # The same requests one at a time: the same tokens, and the same log-probabilities to float tolerance.
    for (adapter, prompts, n), run in zip(jobs, runs, strict=True):
        alone = Run(base, adapter, prompts, max_tokens=n, return_logprobs=True).wait()
        assert alone.tokens() == run.tokens()
        lp_alone = [lp for c in alone.chunks for lp in c.logprobs]
        lp_batched = [lp for c in run.chunks for lp in c.logprobs]
        assert lp_batched == pytest.approx(lp_alone, abs=1e-4)


def test_seeded_samples_stops_and_cancellation_in_a_batch(base: HFBase, reference) -> None:
    seeded = dict(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, num_samples=2, seed=11)
    stopped_text = Run(base, "adp_all", [PROMPTS[1]], max_tokens=12).wait().texts()[(0, 0)]
    stop = stopped_text[3:5]  # a string the greedy completion contains
    long = Run(base, "adp_mlp", [PROMPTS[0]], max_tokens=200)
    together = [Run(base, "adp_qv", [PROMPTS[0], PROMPTS[3]], **seeded),
                Run(base, "adp_all", [PROMPTS[1]], max_tokens=12, stops=[stop]),
                Run(base, None, [PROMPTS[2]], max_tokens=8)]
    long.started()
    long.out.cancelled.set()
    long.thread.join(60)
    assert not long.thread.is_alive()
    assert len(long.tokens().get((0, 0), [])) < 200  # stopped at a step, not at its length
    for r in together:
        r.wait()
    alone = Run(base, "adp_qv", [PROMPTS[0], PROMPTS[3]], **seeded).wait()
    assert alone.tokens() == together[0].tokens() and len(alone.tokens()) == 4  # seeded: same draws
    cut = together[1].texts()[(0, 0)]
    assert stop not in cut and stopped_text.startswith(cut) and len(cut) < len(stopped_text)
    assert [c.finish_reason for c in together[1].chunks if c.finish_reason] == [STOP]
    assert together[2].tokens()[(0, 0)] == reference(None, PROMPTS[2], 8)
    # A removed adapter ends its request with an error; the base serves the others on.
    base.remove_adapter("adp_mlp")
    gone = Run(base, "adp_mlp", [PROMPTS[0]], max_tokens=4)
    gone.thread.join(60)
    assert gone.error is not None and getattr(gone.error, "field", "") == "adapter_id"
    assert Run(base, "adp_qv", [PROMPTS[2]], max_tokens=3).wait().tokens()[(0, 0)] == \
        reference("adp_qv", PROMPTS[2], 3)
