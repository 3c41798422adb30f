"""Generation from a session's current weights (transformers ``generate``)."""

from __future__ import annotations

import torch

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tg_tinker.decoding import cut_at_stop, ids_within

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


def generate(model, tokenizer, prompts: list[list[int]], texts: list[str],  # noqa: ANN001
             sampling: common_pb2.SamplingParams) -> trainer_pb2.SampleResult:
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    greedy = temperature == 0.0
    kwargs: dict = dict(max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        return_dict_in_generate=True, output_logits=sampling.return_logprobs)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
                      top_k=sampling.top_k if sampling.HasField("top_k") and sampling.top_k > 0 else None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stops = [s for s in sampling.stop if s]
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    if sampling.HasField("seed"):
        torch.manual_seed(sampling.seed)
    model.eval()
    result = trainer_pb2.SampleResult()
    for index, (ids, text) in enumerate(zip(prompts, texts, strict=True)):
        input_ids = torch.tensor([ids], dtype=torch.long)
        for sample_index in range(max(1, sampling.num_samples)):
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
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
