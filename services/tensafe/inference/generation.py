"""What a generation request means, independent of the backend that runs it.

* :func:`validate` checks the sampling parameters and the prompts the way the trainer's
  ``Sample`` does (same fields, same limits), and tokenizes text prompts.
* :class:`~tg_tinker.decoding.SequenceStream` (shared with the SDK's two-plane generation)
  turns one sequence's tokens into the increments sent to the client, ending it with the
  rules of the trainer's sampling (``tensafe.trainer.sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensafe.api.common.v1 import common_pb2
from tensafe.runtime.errors import InvalidArgument
from tg_tinker.decoding import CANCELLED, LENGTH, STOP, Chunk, SequenceStream

__all__ = ["CANCELLED", "LENGTH", "STOP", "Chunk", "GenerationJob", "SequenceStream", "validate",
           "validate_sampling"]

MAX_SAMPLES = 64


@dataclass(frozen=True)
class GenerationJob:
    """A validated request: token ids per prompt (and their text), and the sampling parameters."""

    prompts: list[list[int]]
    texts: list[str]
    sampling: common_pb2.SamplingParams

    @property
    def temperature(self) -> float:
        return self.sampling.temperature if self.sampling.HasField("temperature") else 1.0

    @property
    def top_p(self) -> float:
        return self.sampling.top_p if self.sampling.HasField("top_p") else 1.0

    @property
    def top_k(self) -> int:
        return self.sampling.top_k if self.sampling.HasField("top_k") else 0

    @property
    def num_samples(self) -> int:
        return max(1, self.sampling.num_samples)

    @property
    def stops(self) -> list[str]:
        return [s for s in self.sampling.stop if s]


def validate_sampling(sp: common_pb2.SamplingParams) -> None:
    if sp.max_tokens <= 0:
        raise InvalidArgument("sampling.max_tokens", "must be > 0")
    if sp.HasField("temperature") and not sp.temperature >= 0:
        raise InvalidArgument("sampling.temperature", "must be >= 0 (0 is greedy)")
    if sp.HasField("top_p") and not 0 < sp.top_p <= 1:
        raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
    if sp.HasField("top_k") and sp.top_k < 0:
        raise InvalidArgument("sampling.top_k", "must be >= 0 (0 disables it)")
    if sp.num_samples < 0 or sp.num_samples > MAX_SAMPLES:
        raise InvalidArgument("sampling.num_samples", f"must be between 1 and {MAX_SAMPLES}")


def validate(tokenizer, prompts: list[str], prompt_token_ids: list[list[int]],
             sampling: common_pb2.SamplingParams, vocab_size: int, max_length: int) -> GenerationJob:
    """A GenerationJob from the request's prompts, or InvalidArgument naming the field."""
    validate_sampling(sampling)
    if prompts and prompt_token_ids:
        raise InvalidArgument("prompts", "give prompts as text or as token ids, not both")
    if not prompts and not prompt_token_ids:
        raise InvalidArgument("prompts", "at least one prompt is required")
    if prompts:
        texts = list(prompts)
        ids = [list(tokenizer(t).input_ids) for t in texts]
        name = "prompts"
    else:
        ids = [list(p) for p in prompt_token_ids]
        texts = [tokenizer.decode(p) for p in ids]
        name = "prompt_token_ids"
    for i, seq in enumerate(ids):
        if not seq:
            raise InvalidArgument(f"{name}[{i}]", "is empty")
        if min(seq) < 0 or max(seq) >= vocab_size:
            raise InvalidArgument(f"{name}[{i}]", f"token ids must be in [0, {vocab_size})")
        if len(seq) + sampling.max_tokens > max_length:
            raise InvalidArgument("sampling.max_tokens", f"prompt {i} ({len(seq)} tokens) plus max_tokens exceeds "
                                                         f"the model's limit of {max_length}")
    return GenerationJob(ids, texts, sampling)
