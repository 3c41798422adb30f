"""The audit's statistics: exposure, membership AUC, and the one-run empirical lower bound on epsilon
(Steinke, Nasr & Jagielski 2023; see the package docstring)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def exposure(rank: int, candidates: int) -> float:
    """Estimated exposure in bits: log2 of the candidate space over the rank, from ``candidates`` samples."""
    return math.log2(candidates + 1) - math.log2(rank)


def auc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(a member's score > a non-member's), ties counting half (the Mann-Whitney AUC)."""
    if not members or not others:
        return float("nan")
    wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


# ----------------------------------------------------------------------------- the epsilon lower bound


def one_run_epsilon_bound(members: Sequence[float], others: Sequence[float], delta: float, alpha: float = 0.05,
                          ks: Sequence[int] | None = None) -> float:
    """Empirical lower bound on epsilon (confidence ``1 - alpha``) from one run's canary scores.

    Steinke, Nasr & Jagielski (2023), Theorem 3.1 / Proposition 5.1: m canaries, each included by an
    independent fair coin; guesses for r of them, v right. Under (eps, delta)-DP,
    P[v right] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + delta-term; the delta term is taken as
    ``2 * m * delta`` here (at least theirs: a larger term only lowers the bound). The guesses: "in"
    for the k highest scores, "out" for the k lowest (k in ``ks``, default m/16, m/8, m/4, 3m/8 and m/2;
    Bonferroni over the k). Returns the largest epsilon ruled in (0 when none).
    """
    scored = [(s, True) for s in members] + [(s, False) for s in others]
    random.Random(0).shuffle(scored)  # ties fall in an order that does not depend on membership
    scored.sort(key=lambda t: t[0])
    m = len(scored)
    if m < 2:
        return 0.0
    if ks is None:
        ks = sorted({max(1, m // 16), max(1, m // 8), max(1, m // 4), max(1, 3 * m // 8), m // 2})
    level = alpha / len(ks)
    slack = 2 * m * delta
    best = 0.0
    for k in ks:
        low, high = scored[:k], scored[m - k:]
        right = sum(not inc for _, inc in low) + sum(inc for _, inc in high)
        r = 2 * k
        best = max(best, _largest_ruled_out(r, right, level - slack))
    return best


def _largest_ruled_out(r: int, right: int, level: float) -> float:
    """The epsilon at which P[Binomial(r, p(eps)) >= right] = level (p(eps) = e^eps / (1 + e^eps))."""
    if level <= 0 or right <= r / 2:
        return 0.0

    from scipy import stats

    def tail(eps: float) -> float:
        p = 1 / (1 + math.exp(-eps))
        return float(stats.binom.sf(right - 1, r, p))

    if tail(0.0) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= level:
        hi *= 2
        if hi > 100:
            return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def max_demonstrable_epsilon(m: int, alpha: float = 0.05) -> float:
    """The most any audit with m canaries (all guessed right) can show at confidence 1 - alpha."""
    p = alpha ** (1 / m)
    return math.log(p / (1 - p))
