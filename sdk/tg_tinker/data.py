"""Batches for DP-SGD: Poisson sampling.

The privacy guarantee of DP-SGD as TenSafe accounts it (the accountant composes
Poisson-subsampled Gaussian mechanisms with sample rate q = expected batch size /
dataset size) assumes that every step's batch was drawn by including each example
independently with probability q. Fixed-size shuffled batches do not satisfy that
assumption; use :class:`PoissonSampler` when you train with ``DPConfig(enabled=True)``.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class PoissonSampler:
    """Each step includes every example independently with probability ``sample_rate``.

    Batches therefore vary in size (possibly empty); their expected size is
    ``sample_rate * len(dataset)``. ``steps`` batches are drawn per pass (default: one
    epoch's worth, ``round(1 / sample_rate)``). Without a seed the randomness comes from the
    operating system's CSPRNG; a seed is for reproducible tests only.
    """

    def __init__(self, dataset_size: int, sample_rate: float, steps: int | None = None,
                 seed: int | None = None) -> None:
        if dataset_size <= 0:
            raise ValueError("dataset_size must be > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError("sample_rate must be in (0, 1]")
        self.dataset_size = dataset_size
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        if self.steps <= 0:
            raise ValueError("steps must be > 0")
        self._rng = random.Random(seed) if seed is not None else secrets.SystemRandom()

    @classmethod
    def for_batch_size(cls, dataset_size: int, expected_batch_size: int, **kwargs: int | None) -> PoissonSampler:
        """The sampler whose expected batch size is ``expected_batch_size`` (q = batch / dataset)."""
        if not 0 < expected_batch_size <= dataset_size:
            raise ValueError("expected_batch_size must be in 1..dataset_size")
        return cls(dataset_size, expected_batch_size / dataset_size, **kwargs)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        """Indices of each step's batch."""
        for _ in range(self.steps):
            yield [i for i in range(self.dataset_size) if self._rng.random() < self.sample_rate]

    def batches(self, dataset: Sequence[T]) -> Iterator[list[T]]:
        """The examples of each step's batch."""
        if len(dataset) != self.dataset_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, the sampler expects {self.dataset_size}")
        for indices in self:
            yield [dataset[i] for i in indices]
