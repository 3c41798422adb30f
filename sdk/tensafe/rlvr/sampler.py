"""Rollouts: real generation by the training session's current weights (``TrainingClient.sample``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from tg_tinker.errors import ValidationError

from .trajectory import Trajectory, TrajectoryBatch, contexts_for

if TYPE_CHECKING:
    from tg_tinker import FutureHandle, SampleResult, TrainingClient

MAX_PROMPTS = 4096          # per generate_trajectories call
SAMPLE_WORK_TOKENS = 8192   # the trainer's default cap on prompts x samples x max_tokens per Sample call


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, field=field, code="INVALID_ARGUMENT")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with a transformers tokenizer (``tok(text).input_ids``, as the server encodes
    text prompts), an object with ``encode``, or a function ``text -> ids``."""
    if not callable(tokenizer):
        return [int(i) for i in tokenizer.encode(text)]
    out: Any = tokenizer(text)
    ids: Any = getattr(out, "input_ids", None)
    if ids is None and isinstance(out, Mapping):
        ids = cast(Mapping[str, Any], out)["input_ids"]
    seq = cast(Sequence[Any], out if ids is None else ids)
    return [int(i) for i in seq]


class RolloutSampler:
    """Samples trajectories from a training session's current weights, with their log-probabilities.

    ``generate_trajectories(prompts)`` sends the prompts as token ids (text prompts are encoded here with
    ``tokenizer``, the base model's, the same way the server encodes text) and asks for ``num_samples``
    completions of each, at most ``max_new_tokens`` tokens long, with the log-probability of every sampled
    token. Those are the model's own log-probabilities (its logits at temperature 1), which is what the
    policy-gradient ratios need: keep ``temperature=1.0``, ``top_p=1.0`` and ``top_k=0`` (the defaults) for
    unbiased gradients; other values sample from a different distribution than the one trained.

    Generation runs on the server, in the session, after every operation queued before it (so after the
    last update). Large rollouts are split into several Sample calls within the trainer's per-call cap.
    """

    def __init__(self, training_client: TrainingClient, max_new_tokens: int = 64, *, num_samples: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop: Sequence[str] | str | None = None, seed: int | None = None, tokenizer: Any = None) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise _invalid("max_new_tokens", f"must be a positive int, got {max_new_tokens!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise _invalid("num_samples", f"must be a positive int, got {num_samples!r}")
        if num_samples * max_new_tokens > SAMPLE_WORK_TOKENS:
            raise _invalid("max_new_tokens", f"num_samples x max_new_tokens = {num_samples * max_new_tokens} is "
                                             f"more than one Sample call may generate ({SAMPLE_WORK_TOKENS})")
        self.training_client = training_client
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.stop = stop
        self.seed = seed
        self.tokenizer = tokenizer
        self._calls = 0

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> tuple[list[str], list[list[int]]]:
        """(texts, token ids) of the prompts; text prompts need the sampler's ``tokenizer``."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise _invalid("prompts", "a non-empty list of prompts (strings, or lists of token ids)")
        if len(prompts) > MAX_PROMPTS:
            raise _invalid("prompts", f"at most {MAX_PROMPTS} prompts per call, got {len(prompts)}")
        texts: list[str] = []
        ids: list[list[int]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise _invalid("tokenizer", "text prompts need the base model's tokenizer on this side "
                                                "(RolloutSampler(..., tokenizer=tok)): the trainer is sent "
                                                "token ids, so that training sees exactly the sampled tokens")
                if not p:
                    raise _invalid(f"prompts[{i}]", "is empty")
                texts.append(p)
                ids.append(_encode(self.tokenizer, p))
            else:
                seq = [int(t) for t in p]
                if not seq or any(t < 0 for t in seq):
                    raise _invalid(f"prompts[{i}]", "token ids must be a non-empty list of ints >= 0")
                texts.append("")
                ids.append(seq)
        return texts, ids

    def generate_trajectories(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                              contexts: Sequence[Mapping[str, Any]] | None = None) -> TrajectoryBatch:
        """``num_samples`` trajectories per prompt, generated now by the session's current weights.

        ``contexts`` (one dict per prompt, e.g. ``{"answer": "42"}``) travel with the prompt's trajectories
        and are passed to the reward function by :meth:`TrajectoryBatch.score`."""
        texts, ids = self.encode(prompts)
        ctxs = contexts_for(texts, contexts)
        per_call = max(1, SAMPLE_WORK_TOKENS // (self.num_samples * self.max_new_tokens))
        futures: list[tuple[int, FutureHandle[SampleResult]]] = []
        for start in range(0, len(ids), per_call):
            seed = None if self.seed is None else self.seed + self._calls
            self._calls += 1
            futures.append((start, self.training_client.sample_async(
                ids[start:start + per_call], self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, stop=self.stop, seed=seed, num_samples=self.num_samples, return_logprobs=True)))
        trajectories: list[Trajectory] = []
        for start, future in futures:
            for s in future.result().samples:
                g = start + s.prompt_index
                trajectories.append(Trajectory(
                    prompt=texts[g] or s.prompt, response=s.completion, prompt_tokens=list(ids[g]),
                    response_tokens=list(s.token_ids), logprobs=list(s.logprobs), finish_reason=s.finish_reason,
                    group=g, sample_index=s.sample_index, context=dict(ctxs[g])))
        return TrajectoryBatch(trajectories)
