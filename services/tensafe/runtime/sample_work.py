"""The per-call cap on generated tokens, one rule for the trainer's ``Sample`` and the inference service.

A call asks for prompts x samples x ``max_tokens`` tokens; past ``TENSAFE_MAX_SAMPLE_TOKENS`` it is refused
before any work, naming ``sampling.max_tokens``, so one call cannot hold a shared base for long.
"""

from __future__ import annotations

from typing import Protocol

from .errors import InvalidArgument

__all__ = ["MAX_SAMPLE_TOKENS_SETTING", "SampleWork", "check_sample_work"]

MAX_SAMPLE_TOKENS_SETTING = "TENSAFE_MAX_SAMPLE_TOKENS"


class SampleWork(Protocol):
    """What the cap reads: the trainer's ``SamplingSpec`` or the inference service's ``Sampling``."""

    @property
    def num_samples(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


def check_sample_work(num_prompts: int, sampling: SampleWork, limit: int) -> None:
    """Refuse a call whose prompts x samples x max_tokens exceeds ``limit`` (0: no limit), naming the field."""
    work = num_prompts * max(1, sampling.num_samples) * sampling.max_tokens
    if limit and work > limit:
        raise InvalidArgument("sampling.max_tokens",
                              f"{num_prompts} prompt(s) x {max(1, sampling.num_samples)} sample(s) x max_tokens "
                              f"{sampling.max_tokens} = {work} tokens exceeds the per-call limit of {limit} "
                              f"({MAX_SAMPLE_TOKENS_SETTING}); split the call", quota=MAX_SAMPLE_TOKENS_SETTING,
                              limit=limit)
