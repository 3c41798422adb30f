"""Advantages for the policy-gradient algorithms (numpy, client side): normalisation, per-prompt group means
and group-relative advantages, a running-mean baseline, and the choice among them by ``baseline``."""

from __future__ import annotations

import numpy as np

from tg_tinker.errors import ValidationError

EPS = 1e-6


def invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, field=field, code="INVALID_ARGUMENT")



def normalize(advantages: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(A - mean A) / (std A + eps) over the batch (population std); all-equal advantages give zeros."""
    a = np.asarray(advantages, dtype=np.float64)
    return (a - a.mean()) / (a.std() + eps) if a.size else a


def group_means(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per trajectory, the mean reward of its group (the completions of the same prompt)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = rewards[rows].mean()
    return out


def group_advantages(rewards: np.ndarray, groups: np.ndarray, scale: bool = True, eps: float = EPS) -> np.ndarray:
    """GRPO: A_i = (r_i - mean of i's group) / (std of i's group + eps) (population std; without ``scale``
    only the mean is subtracted). Every group needs at least two trajectories."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(r)
    for g in np.unique(groups):
        rows = groups == g
        if int(rows.sum()) < 2:
            raise invalid("num_samples", f"prompt {int(g)} has one trajectory: group-relative advantages need "
                                          "num_samples >= 2 per prompt (RolloutSampler(..., num_samples=k))")
        centred = r[rows] - r[rows].mean()
        out[rows] = centred / (r[rows].std() + eps) if scale else centred
    return out


class RunningBaseline:
    """An exponential moving average of the batches' mean rewards; its first value is the first batch's mean."""

    def __init__(self, momentum: float = 0.9, value: float | None = None) -> None:
        if not 0 <= momentum < 1:
            raise invalid("baseline_momentum", f"must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.value = value

    def advantages(self, rewards: np.ndarray) -> np.ndarray:
        """r - b with the baseline as it was before this batch, then the batch is folded into it."""
        mean = float(np.mean(rewards)) if len(rewards) else 0.0
        b = mean if self.value is None else self.value
        self.value = self.momentum * b + (1 - self.momentum) * mean
        return np.asarray(rewards, dtype=np.float64) - b


def baseline_advantages(rewards: np.ndarray, groups: np.ndarray, baseline: str, value: float,
                         running: RunningBaseline) -> np.ndarray:
    if baseline == "none":
        return rewards.astype(np.float64)
    if baseline == "constant":
        return rewards - value
    if baseline == "group":
        if len(np.unique(groups)) == len(groups):
            raise invalid("baseline", "the 'group' baseline needs several trajectories per prompt "
                                       "(RolloutSampler(..., num_samples=k), k >= 2)")
        return rewards - group_means(rewards, groups)
    return running.advantages(rewards)
