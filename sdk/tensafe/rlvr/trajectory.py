"""Trajectories (one sampled completion of one prompt) and the batches the algorithms train on."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

import numpy as np

from tg_tinker.errors import ValidationError

IGNORE_INDEX = -100

RewardFn = Callable[..., float]
"""A reward: ``fn(prompt, completion, **context) -> float``."""


@dataclass
class Trajectory:
    """One completion of one prompt, as the session's policy sampled it.

    ``response_tokens`` and ``logprobs`` (the sampling log-probability of each of them, under the
    weights that sampled it) come from the server; ``reward`` is set by a reward function
    (:meth:`TrajectoryBatch.score`, or by hand as ``traj.reward = fn(traj.prompt, traj.response)``).
    ``group`` numbers the prompt within its batch: the completions of one prompt share it.
    """

    prompt: str
    response: str
    prompt_tokens: list[int]
    response_tokens: list[int]
    logprobs: list[float]
    finish_reason: str = "length"
    group: int = 0
    sample_index: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    reward: float | None = None
    reward_error: str | None = None
    ref_logprobs: list[float] | None = None  # the reference model's, per response token (KL penalty)

    @property
    def num_tokens(self) -> int:
        return len(self.response_tokens)


class TrajectoryBatch(Sequence[Trajectory]):
    """The trajectories of one rollout: iterate it, index it, read its rewards."""

    def __init__(self, trajectories: Sequence[Trajectory] = ()) -> None:
        self.trajectories: list[Trajectory] = list(trajectories)

    def __len__(self) -> int:
        return len(self.trajectories)

    @overload
    def __getitem__(self, index: int) -> Trajectory: ...

    @overload
    def __getitem__(self, index: slice) -> TrajectoryBatch: ...

    def __getitem__(self, index: int | slice) -> Trajectory | TrajectoryBatch:
        if isinstance(index, slice):
            return TrajectoryBatch(self.trajectories[index])
        return self.trajectories[index]

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.trajectories)

    def __repr__(self) -> str:
        mean = f"{self.mean_reward:.4g}" if self.trajectories and self.scored else "unscored"
        return f"TrajectoryBatch({len(self)} trajectories, mean_reward={mean})"

    @property
    def scored(self) -> bool:
        return all(t.reward is not None for t in self.trajectories)

    def rewards(self) -> np.ndarray:
        """float64 [N]; every trajectory must have a reward (ValidationError naming the first without)."""
        out = np.zeros(len(self.trajectories))
        for i, t in enumerate(self.trajectories):
            if t.reward is None:
                raise ValidationError(f"trajectory {i} has no reward: score the batch first (batch.score(fn))",
                                      field=f"batch[{i}].reward", code="INVALID_ARGUMENT")
            value = float(t.reward)
            if not math.isfinite(value):
                raise ValidationError(f"trajectory {i} has a non-finite reward {value!r}",
                                      field=f"batch[{i}].reward", code="INVALID_ARGUMENT")
            out[i] = value
        return out

    @property
    def mean_reward(self) -> float:
        return float(self.rewards().mean()) if self.trajectories else 0.0

    @property
    def std_reward(self) -> float:
        return float(self.rewards().std()) if self.trajectories else 0.0

    @property
    def groups(self) -> np.ndarray:
        """int64 [N]: the prompt each trajectory belongs to."""
        return np.array([t.group for t in self.trajectories], dtype=np.int64)

    @property
    def reward_errors(self) -> list[tuple[int, str]]:
        """(index, error) of each trajectory whose reward function raised."""
        return [(i, t.reward_error) for i, t in enumerate(self.trajectories) if t.reward_error is not None]

    def score(self, reward_fn: RewardFn, *, error_reward: float = 0.0, **context: Any) -> TrajectoryBatch:
        """Set every trajectory's reward to ``reward_fn(prompt, response, **traj.context, **context)``.

        A reward function that raises, or returns something that is not a finite number, does not stop the
        batch: that trajectory gets ``error_reward`` and its ``reward_error`` says what went wrong
        (``batch.reward_errors`` lists them; the algorithms report their number as ``reward_errors``)."""
        if not math.isfinite(error_reward):
            raise ValidationError("error_reward must be finite", field="error_reward", code="INVALID_ARGUMENT")
        for t in self.trajectories:
            try:
                value: Any = reward_fn(t.prompt, t.response, **{**t.context, **context})
                if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
                    raise TypeError(f"the reward must be a number, got {type(value).__name__}")
                number = float(cast(float, value))
                if not math.isfinite(number):
                    raise ValueError(f"the reward is not finite: {number!r}")
                t.reward, t.reward_error = number, None
            except Exception as exc:  # noqa: BLE001 - one failing reward is reported, not fatal
                t.reward, t.reward_error = float(error_reward), f"{type(exc).__name__}: {exc}"
        return self


def to_training_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float] | np.ndarray,
                      pad_token_id: int, *, with_ref: bool = False,
                      old_logprobs: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """The ``forward_backward`` batch of some trajectories: one row each, prompt + response, right-padded.

    Labels are the response tokens (the prompt and the padding are ``-100``); ``old_logprobs`` and
    ``advantages`` are aligned like the server's token log-probabilities (position t holds the values of
    ``labels[:, t]``): the sampling log-probabilities (or ``old_logprobs`` given here, one list per
    trajectory) and the trajectory's advantage on its response tokens, 0 elsewhere. ``with_ref`` adds
    ``ref_logprobs`` (from each trajectory's ``ref_logprobs``)."""
    if len(advantages) != len(trajectories):
        raise ValidationError(f"{len(advantages)} advantages for {len(trajectories)} trajectories",
                              field="advantages", code="INVALID_ARGUMENT")
    width = max(len(t.prompt_tokens) + len(t.response_tokens) for t in trajectories)
    n = len(trajectories)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    adv = np.zeros((n, width), dtype=np.float32)
    old = np.zeros((n, width), dtype=np.float32)
    ref = np.zeros((n, width), dtype=np.float32)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_tokens), len(t.response_tokens)
        lp = t.logprobs if old_logprobs is None else old_logprobs[i]
        if len(lp) != r:
            raise ValidationError(f"trajectory {i} has {r} response tokens but {len(lp)} log-probabilities",
                                  field=f"batch[{i}].logprobs", code="INVALID_ARGUMENT")
        input_ids[i, :p] = t.prompt_tokens
        input_ids[i, p:p + r] = t.response_tokens
        attention[i, :p + r] = 1
        labels[i, p:p + r] = t.response_tokens
        adv[i, p:p + r] = float(advantages[i])
        old[i, p:p + r] = lp
        if with_ref:
            if t.ref_logprobs is None or len(t.ref_logprobs) != r:
                raise ValidationError(f"trajectory {i} has no reference log-probabilities",
                                      field=f"batch[{i}].ref_logprobs", code="INVALID_ARGUMENT")
            ref[i, p:p + r] = t.ref_logprobs
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                             "advantages": adv, "old_logprobs": old}
    if with_ref:
        batch["ref_logprobs"] = ref
    return batch


def response_logprobs(trajectories: Sequence[Trajectory], logprobs: np.ndarray) -> list[list[float]]:
    """Per trajectory, the response tokens' entries of a [B, T] token log-probability array of
    :func:`to_training_batch`'s layout (what ``forward(..., return_logprobs=True)`` returns)."""
    out: list[list[float]] = []
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_tokens), len(t.response_tokens)
        out.append([float(v) for v in logprobs[i, p:p + r]])
    return out


def contexts_for(prompts: Sequence[Any], contexts: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if contexts is None:
        return [{} for _ in prompts]
    if len(contexts) != len(prompts):
        raise ValidationError(f"{len(contexts)} contexts for {len(prompts)} prompts", field="contexts",
                              code="INVALID_ARGUMENT")
    return [dict(c) for c in contexts]
