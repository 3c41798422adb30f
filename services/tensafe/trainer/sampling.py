"""Generation from a session's current weights (transformers ``generate``).

:func:`generate_steps` yields between sequences, so the base's worker can serve other
sessions between two of them, and stops between tokens once its cancel event is set.
The per-call cap on generated tokens is :mod:`tensafe.runtime.sample_work`, shared with inference. The
parameters come in as a plain ``values.SamplingSpec``; the result goes out as the future's
``SampleResult`` message.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.common.devices import model_device
from tg_tinker.decoding import cut_at_stop, ids_within

from .futures import OpCancelled
from .values import SamplingSpec

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


class _Cancelled(StoppingCriteria):
    """Ends ``generate`` at the next token once the op's cancel event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate(model, tokenizer, prompts: list[list[int]], texts: list[str],
             sampling: SamplingSpec) -> trainer_pb2.SampleResult:
    """All sequences at once (no slicing, no cancellation)."""
    steps = generate_steps(model, tokenizer, prompts, texts, sampling)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def generate_steps(model, tokenizer, prompts: list[list[int]], texts: list[str],
                   sampling: SamplingSpec,
                   cancel: threading.Event | None = None) -> Iterator[None]:
    """Yields between two sequences; returns the SampleResult. Raises OpCancelled (between tokens)
    once ``cancel`` is set."""
    temperature = sampling.temperature if sampling.temperature is not None else 1.0
    greedy = temperature == 0.0
    kwargs: dict = dict(max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        return_dict_in_generate=True, output_logits=sampling.return_logprobs)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=sampling.top_p if sampling.top_p is not None else 1.0,
                      top_k=sampling.top_k if sampling.top_k is not None and sampling.top_k > 0 else None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stops = [s for s in sampling.stop if s]
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    if cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    result = trainer_pb2.SampleResult()
    first = True
    for index, (ids, text) in enumerate(zip(prompts, texts, strict=True)):
        input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))
        for sample_index in range(max(1, sampling.num_samples)):
            if not first:
                yield  # other sessions' ops may run here; the RNG state stays with this session
            first = False
            _check_cancel(cancel, len(result.samples))
            model.eval()
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            _check_cancel(cancel, len(result.samples))
            generated = out.sequences[0, input_ids.shape[1]:].tolist()
            logprobs = []
            if sampling.return_logprobs:
                logprobs = [float(torch.log_softmax(step[0].float(), -1)[tok])
                            for step, tok in zip(out.logits, generated, strict=False)]
            finish = LENGTH
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in generated:
                end = generated.index(tokenizer.eos_token_id) + 1
                generated, logprobs, finish = generated[:end], logprobs[:end], STOP
            completion = tokenizer.decode(generated, skip_special_tokens=True)
            cut = cut_at_stop(completion, stops) if stops else None
            if cut is not None:
                completion, finish = cut, STOP
                generated = ids_within(tokenizer, generated, cut)
                logprobs = logprobs[: len(generated)]
            result.samples.append(trainer_pb2.SampledSequence(
                prompt_index=index, sample_index=sample_index, prompt=text, completion=completion,
                token_ids=generated, logprobs=logprobs, finish_reason=finish))
    return result


def _check_cancel(cancel: threading.Event | None, finished: int) -> None:
    if cancel is not None and cancel.is_set():
        raise OpCancelled(f"the sample was cancelled while running, after {finished} finished sequence(s)")
