"""The privacy maths, kept apart from the bookkeeping (as Opacus keeps its accountants apart from its engine).

Every DP-SGD step is a Poisson-sampled Gaussian mechanism: each example joins the batch with
probability ``sample_rate`` and the clipped sum gets Gaussian noise of standard deviation
``noise_multiplier`` x clipping norm. A run of steps is kept as *counts per distinct
(noise_multiplier, sample_rate)*; an :class:`Accountant` composes each distinct step with
dp-accounting's ``compose(event, count)`` on ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(z)), count)``, so 10,000 identical steps are one composition, never 10,000.

Results are cached by (accountant, counts, delta): asking again for the same state costs a dict
lookup. Neighbouring datasets differ by adding or removing one example (the relation Poisson
sampling's guarantee is stated for).

Offered: ``pld`` (privacy loss distributions, the default: tight, pessimistic discretisation) and
``rdp`` (Renyi DP: a looser upper bound). dp-accounting 0.6.0 has no PRV accountant, so "prv" is
refused rather than silently replaced. GDP (the Gaussian-DP / CLT approximation) is not offered: it
is an approximation, not an upper bound, and never certifies a budget.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import ClassVar

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

DEFAULT = "pld"
# PLD discretisation of the privacy loss (dp-accounting's default); pessimistic, so epsilon is an upper bound.
PLD_DISCRETIZATION = 1e-4
# Only to narrow a calibration down before the exact PLD settles it.
PLD_COARSE_DISCRETIZATION = 1e-3
# Below this the privacy loss of a single step is so spread out that one PLD costs seconds to minutes
# (z = 0.05 takes ~15 s), and a single step already spends epsilon > 80 at delta = 1e-5 whatever the rate.
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e4
# CalibrateNoise: the returned multiplier is at most this fraction above the smallest one reaching the target.
CALIBRATION_RTOL = 1e-3

NEIGHBORING = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# The RDP accountant warns (through absl) each time it leaves out an order whose series did not converge;
# the bound stays valid (a minimum over fewer orders), so these are kept out of the server's log.
logging.getLogger("absl").addFilter(lambda record: "failed to converge" not in record.getMessage())

State = tuple[tuple[float, float, int], ...]  # sorted (noise_multiplier, sample_rate, steps)


def step_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate``."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


class Accountant(ABC):
    """Counts of composed steps per distinct (noise multiplier, sample rate), and their epsilon."""

    name: ClassVar[str]

    def __init__(self, state: Iterable[tuple[float, float, int]] = ()) -> None:
        self._counts: dict[tuple[float, float], int] = {}
        for noise, rate, steps in state:
            self.compose(noise, rate, steps)

    def compose(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        key = (float(noise_multiplier), float(sample_rate))
        self._counts[key] = self._counts.get(key, 0) + int(steps)

    @property
    def state(self) -> State:
        """What was composed, as sorted (noise_multiplier, sample_rate, steps): hashable, restorable."""
        return tuple(sorted((z, q, n) for (z, q), n in self._counts.items()))

    @property
    def num_steps(self) -> int:
        return sum(self._counts.values())

    def epsilon(self, delta: float) -> float:
        """Epsilon spent at ``delta`` (0 when nothing was composed)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._counts:
            return 0.0
        return _epsilon(self.name, self.state, float(delta))

    @classmethod
    @abstractmethod
    def fresh_dp_accountant(cls) -> dp_accounting.PrivacyAccountant:
        """An empty dp-accounting accountant of this kind."""


class _MemoPLDAccountant(pld_privacy_accountant.PLDAccountant):
    """dp-accounting's PLDAccountant, building the PLD of one Poisson-sampled Gaussian step once per
    (noise, rate) instead of once per composition (the build is ~90% of the cost; the numbers are the
    same: it is the very call PLDAccountant makes for that event, in dp-accounting 0.6.0)."""

    def _maybe_compose(self, event, count, do_compose):
        if (do_compose and isinstance(event, dp_accounting.PoissonSampledDpEvent)
                and isinstance(event.event, dp_accounting.GaussianDpEvent)
                and event.sampling_probability > 0 and event.event.noise_multiplier > 0):
            base = _gaussian_pld(event.event.noise_multiplier, event.sampling_probability,
                                 self._value_discretization_interval, self.neighboring_relation)
            self._pld = self._pld.compose(base.self_compose(count))
            return None
        return super()._maybe_compose(event, count, do_compose)


@lru_cache(maxsize=32)
def _gaussian_pld(noise: float, rate: float, interval: float,
                  relation: dp_accounting.NeighboringRelation) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise, value_discretization_interval=interval, sampling_prob=rate,
        neighboring_relation=relation)


class PLDAccountant(Accountant):
    name = "pld"

    @classmethod
    def fresh_dp_accountant(cls) -> dp_accounting.PrivacyAccountant:
        return _MemoPLDAccountant(NEIGHBORING, value_discretization_interval=PLD_DISCRETIZATION)


class RDPAccountant(Accountant):
    name = "rdp"

    @classmethod
    def fresh_dp_accountant(cls) -> dp_accounting.PrivacyAccountant:
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=NEIGHBORING)


ACCOUNTANTS: dict[str, type[Accountant]] = {cls.name: cls for cls in (PLDAccountant, RDPAccountant)}


def create(name: str, state: Iterable[tuple[float, float, int]] = ()) -> Accountant:
    try:
        return ACCOUNTANTS[name](state)
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}") from None


@lru_cache(maxsize=8)
def _composed(name: str, state: State) -> dp_accounting.PrivacyAccountant:
    acct = ACCOUNTANTS[name].fresh_dp_accountant()
    for noise, rate, steps in state:
        acct.compose(step_event(noise, rate, steps))
    return acct


# Epsilon per (accountant, state, delta): computed once, even when several threads ask at the same time
# (the others wait for the first), and kept for the most recent EPSILON_CACHE_SIZE answers.
EPSILON_CACHE_SIZE = 4096
_EpsKey = tuple[str, State, float]
_eps_cache: OrderedDict[_EpsKey, float] = OrderedDict()
_eps_inflight: dict[_EpsKey, Future] = {}
_eps_lock = threading.Lock()
_prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epsilon-prefetch")


def _epsilon(name: str, state: State, delta: float) -> float:
    key = (name, state, delta)
    with _eps_lock:
        if key in _eps_cache:
            _eps_cache.move_to_end(key)
            return _eps_cache[key]
        pending = _eps_inflight.get(key)
        if pending is None:
            pending = _eps_inflight[key] = Future()
            mine = True
        else:
            mine = False
    if not mine:
        return pending.result()
    try:
        value = float(_composed(name, state).get_epsilon(delta))
    except BaseException as exc:
        with _eps_lock:
            _eps_inflight.pop(key, None)
        pending.set_exception(exc)
        raise
    with _eps_lock:
        _eps_cache[key] = value
        while len(_eps_cache) > EPSILON_CACHE_SIZE:
            _eps_cache.popitem(last=False)
        _eps_inflight.pop(key, None)
    pending.set_result(value)
    return value


def prefetch(accountant: Accountant, delta: float) -> None:
    """Start computing ``accountant``'s epsilon at ``delta`` in the background (a later call for the same
    state is then answered from the cache, or waits for this computation rather than repeating it)."""
    if not accountant.num_steps:
        return
    key = (accountant.name, accountant.state, float(delta))
    with _eps_lock:
        if key in _eps_cache or key in _eps_inflight:
            return
    _prefetcher.submit(_swallow, *key)


def _swallow(name: str, state: State, delta: float) -> None:
    try:
        _epsilon(name, state, delta)
    except Exception:  # the caller who needs the value computes it again and sees the error
        logging.getLogger("tensafe.accountant").debug("epsilon prefetch failed", exc_info=True)


# Called after each epsilon evaluation of a calibration with its phase ("rdp", "coarse" or "exact")
# and its seconds, so that the caller can estimate how long the calibration will take.
Progress = Callable[[str, float], None]


def calibrate_noise(name: str, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    progress: Progress | None = None) -> tuple[float, float]:
    """The smallest noise multiplier (within :data:`CALIBRATION_RTOL`, and at least
    :data:`MIN_NOISE_MULTIPLIER`) whose ``steps`` steps at ``sample_rate`` spend at most
    ``target_epsilon`` at ``delta``, with that epsilon, computed exactly as recorded steps will be.

    Bisection on the noise (epsilon falls as it grows). For PLD, the bracket comes from the RDP answer
    (an upper bound on epsilon, hence a noise at least as large as PLD needs); the bisection runs on a
    PLD ten times coarser (:data:`PLD_COARSE_DISCRETIZATION`, about ten times faster at small noise),
    and a few evaluations of the exact PLD settle the answer within the same tolerance. Raises
    ValueError when even the largest multiplier is not enough.
    """
    if name != "pld":
        noise = _calibrate(_timed(_epsilon_of(name, delta, sample_rate, steps), "rdp", progress), target_epsilon,
                           1.0, growth=2.0, band=0.5)
        return noise, create(name, [(noise, sample_rate, steps)]).epsilon(delta)
    start, _ = calibrate_noise("rdp", target_epsilon, delta, sample_rate, steps, progress)
    coarse = _epsilon_of(name, delta, sample_rate, steps, PLD_COARSE_DISCRETIZATION)
    near = _calibrate(_timed(coarse, "coarse", progress), target_epsilon, start, growth=1.25, band=0.25)
    noise = _calibrate(_timed(_epsilon_of(name, delta, sample_rate, steps), "exact", progress), target_epsilon,
                       near, growth=1 + CALIBRATION_RTOL, band=2 * CALIBRATION_RTOL)
    return noise, create(name, [(noise, sample_rate, steps)]).epsilon(delta)


def _timed(eps: Callable[[float], float], phase: str, progress: Progress | None) -> Callable[[float], float]:
    if progress is None:
        return eps

    def timed(noise: float) -> float:
        t0 = time.perf_counter()
        value = eps(noise)
        progress(phase, time.perf_counter() - t0)
        return value

    return timed


def _epsilon_of(name: str, delta: float, sample_rate: float, steps: int,
                discretization: float = PLD_DISCRETIZATION) -> Callable[[float], float]:
    cls = ACCOUNTANTS[name]

    def eps(noise: float) -> float:
        acct = cls.fresh_dp_accountant() if name != "pld" else pld_privacy_accountant.PLDAccountant(
            NEIGHBORING, value_discretization_interval=discretization)  # not memoised: each noise is new
        acct.compose(step_event(noise, sample_rate, steps))
        return float(acct.get_epsilon(delta))

    return eps


def _calibrate(eps: Callable[[float], float], target_epsilon: float, hi: float, *, growth: float,
               band: float) -> float:
    """Bisection from a first guess ``hi``: multiplied by ``growth`` until it reaches the target, a lower
    end a fraction ``band`` below it (the bracket widened while that end still reaches the target),
    then halved to CALIBRATION_RTOL."""
    while eps(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(_unreachable(target_epsilon))
        hi = min(hi * growth, MAX_NOISE_MULTIPLIER)
    lo = max(hi * (1 - band), MIN_NOISE_MULTIPLIER)
    while lo > MIN_NOISE_MULTIPLIER and eps(lo) <= target_epsilon:
        hi, lo = lo, max(hi - 2 * (hi - lo), lo / 2, MIN_NOISE_MULTIPLIER)
    if lo <= MIN_NOISE_MULTIPLIER and eps(MIN_NOISE_MULTIPLIER) <= target_epsilon:
        hi = MIN_NOISE_MULTIPLIER
    else:  # invariant: eps(lo) > target >= eps(hi)
        while hi - lo > CALIBRATION_RTOL * hi:
            mid = (lo + hi) / 2
            if eps(mid) <= target_epsilon:
                hi = mid
            else:
                lo = mid
    return hi


def _unreachable(target_epsilon: float) -> str:
    return f"epsilon {target_epsilon} is out of reach even with noise multiplier {MAX_NOISE_MULTIPLIER:g}"
