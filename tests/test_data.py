"""The Poisson sampler that the DP guarantee assumes."""

from __future__ import annotations

import math

import pytest

from tg_tinker.data import PoissonSampler


def test_inclusion_is_independent_with_the_sample_rate() -> None:
    sampler = PoissonSampler(dataset_size=200, sample_rate=0.05, steps=2000, seed=1)
    batches = list(sampler)
    assert len(batches) == 2000
    sizes = [len(b) for b in batches]
    mean = sum(sizes) / len(sizes)
    # Binomial(200, 0.05): mean 10, std 3.08; the mean of 2000 draws is within 5 standard errors.
    assert abs(mean - 10) < 5 * 3.08 / math.sqrt(2000)
    var = sum((s - mean) ** 2 for s in sizes) / len(sizes)
    assert 0.8 * 9.5 < var < 1.2 * 9.5  # a fixed batch size would have variance 0
    counts = [0] * 200
    for b in batches:
        assert b == sorted(set(b))
        for i in b:
            counts[i] += 1
    assert all(40 < c < 170 for c in counts)  # every example is drawn about 100 times
    assert any(s == 0 for s in sizes) or min(sizes) < 5  # sizes vary, empty batches are possible


def test_expected_batch_size_and_reproducibility() -> None:
    s = PoissonSampler.for_batch_size(1000, 8, seed=3)
    assert s.sample_rate == 0.008 and len(s) == 125
    assert list(PoissonSampler(50, 0.1, steps=5, seed=9)) == list(PoissonSampler(50, 0.1, steps=5, seed=9))
    data = [f"example {i}" for i in range(50)]
    for batch in PoissonSampler(50, 0.2, steps=3, seed=2).batches(data):
        assert all(x in data for x in batch)


@pytest.mark.parametrize("kwargs", [dict(dataset_size=0, sample_rate=0.1), dict(dataset_size=10, sample_rate=0),
                                    dict(dataset_size=10, sample_rate=1.5), dict(dataset_size=10, sample_rate=0.1,
                                                                                 steps=0)])
def test_bad_parameters(kwargs) -> None:
    with pytest.raises(ValueError):
        PoissonSampler(**kwargs)
    with pytest.raises(ValueError):
        list(PoissonSampler(10, 0.5, steps=1).batches([1, 2, 3]))
