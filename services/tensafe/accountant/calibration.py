"""Noise calibrations: computed once per parameters, shared by retries, kept, and bounded by the caller's deadline.

A calibration is deterministic and can take a minute (small noise makes each PLD evaluation cost
seconds), longer than a caller may wait. So each one runs in a thread of its own, keyed by the
tenant and its parameters (accountant, target epsilon, delta, sample rate, steps):

- a request whose calibration is running *joins* it (single flight), however many retries come;
- a finished calibration's answer is kept (the last :data:`CACHE_SIZE` of them, least recently used
  first out), and a request for it is answered at once;
- a caller waits at most until its own deadline (less the margin of ``runtime.peers``). When the
  calibration's estimated end (from the time of its first evaluations) is past that, it is told at
  once, with DEADLINE_TOO_SHORT naming what to do; otherwise it is told when its time is up. Either
  way the calibration goes on, and the same request again joins it or reads its answer: work is
  never orphaned, nor started twice.

Keys include the tenant, so one tenant's timing never reveals another's DP parameters. A tenant
has at most ``TENSAFE_QUOTA_CALIBRATIONS`` distinct calibrations running at once (QUOTA_EXCEEDED past
it). An answer that is an error (an epsilon out of reach) is kept like a value: it is as deterministic.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from tensafe.runtime.errors import DeadlineTooShort, InvalidArgument, QuotaExceeded
from tensafe.runtime.peers import deadline_margin

from . import accounting

CACHE_SIZE = 256
# Estimated cost of a PLD calibration after its first coarse evaluation, in units of that evaluation:
# about ten more coarse ones and four to five at the exact discretisation (ten times dearer each).
# Measured 43-52 on three parameter sets (docs/privacy.md); the estimate need not be exact.
PLD_COST_FACTOR = 50
# An RDP bisection takes about 12 evaluations (the PLD calibration starts with one).
RDP_EVALUATIONS = 12
# A caller is told at once only when the estimated end is this much past its deadline (estimates err).
EARLY_ANSWER_SLACK = 1.25

CALIBRATIONS = Counter("tensafe_accountant_calibrations_total",
                       "CalibrateNoise requests, by how they were answered: computed (a calibration started), "
                       "joined (one was running) or cached (one had finished)", ["source"])

Key = tuple[str, str, float, float, float, int]  # tenant, accountant, epsilon, delta, sample rate, steps
Compute = Callable[..., tuple[float, float]]


@dataclass
class _Job:
    key: Key
    started: float = field(default_factory=time.monotonic)
    expected_end: float | None = None      # time.monotonic() at which it should finish (an estimate)
    rdp_seconds: list[float] = field(default_factory=list)
    coarse_seen: bool = False
    done: bool = False
    value: tuple[float, float] | None = None
    error: Exception | None = None        # an InvalidArgument is kept like a value; anything else is not


class Calibrations:
    def __init__(self, max_per_tenant: int, compute: Compute = accounting.calibrate_noise,
                 cache_size: int = CACHE_SIZE) -> None:
        self.max_per_tenant = max_per_tenant
        self.compute = compute
        self.cache_size = cache_size
        self._cond = threading.Condition()
        self._cache: OrderedDict[Key, _Job] = OrderedDict()
        self._running: dict[Key, _Job] = {}
        self.started = 0   # calibrations computed by this process (also the metric above)

    def calibrate(self, tenant: str, accountant: str, target_epsilon: float, delta: float, sample_rate: float,
                  steps: int, time_remaining: float | None) -> tuple[float, float]:
        """(noise multiplier, its epsilon); waits at most ``time_remaining`` seconds less a margin."""
        key: Key = (tenant, accountant, float(target_epsilon), float(delta), float(sample_rate), int(steps))
        with self._cond:
            job = self._cache.get(key)
            if job is not None:
                self._cache.move_to_end(key)
                CALIBRATIONS.labels("cached").inc()
                return self._outcome(job)
            job = self._running.get(key)
            if job is None:
                mine = sum(1 for k in self._running if k[0] == tenant)
                if self.max_per_tenant and mine >= self.max_per_tenant:
                    raise QuotaExceeded("TENSAFE_QUOTA_CALIBRATIONS", f"{mine} noise calibrations of this tenant are "
                                        f"running (at most {self.max_per_tenant}); wait for one to finish, or give "
                                        "dp_config.noise_multiplier", limit=self.max_per_tenant, current=mine)
                job = self._running[key] = _Job(key)
                self.started += 1
                CALIBRATIONS.labels("computed").inc()
                threading.Thread(target=self._run, args=(job,), name="calibrate", daemon=True).start()
            else:
                CALIBRATIONS.labels("joined").inc()
        return self._wait(job, time_remaining)

    # -- the computation -------------------------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        _, accountant, epsilon, delta, rate, steps = job.key
        value, error = None, None
        try:
            value = self.compute(accountant, epsilon, delta, rate, steps,
                                 lambda phase, seconds: self._progress(job, phase, seconds))
        except ValueError as exc:
            error = InvalidArgument("target_epsilon", str(exc))
        except Exception as exc:  # noqa: BLE001 - unexpected: the waiters hear INTERNAL, nothing is kept
            error = exc
        with self._cond:
            job.done, job.value, job.error = True, value, error
            self._running.pop(job.key, None)
            if isinstance(error, InvalidArgument) or error is None:
                self._cache[job.key] = job
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._cond.notify_all()

    def _progress(self, job: _Job, phase: str, seconds: float) -> None:
        now = time.monotonic()
        with self._cond:
            if phase == "rdp":
                job.rdp_seconds.append(seconds)
                mean = sum(job.rdp_seconds) / len(job.rdp_seconds)
                # The RDP bisection's end; a PLD calibration takes longer still (a lower bound for it).
                left = max(RDP_EVALUATIONS - len(job.rdp_seconds), 1)
                job.expected_end = max(job.expected_end or 0.0, now + left * mean)
            elif phase == "coarse" and not job.coarse_seen:
                job.coarse_seen = True
                job.expected_end = now + PLD_COST_FACTOR * seconds
            else:
                return
            self._cond.notify_all()

    # -- waiting -----------------------------------------------------------------------------------------
    def _wait(self, job: _Job, time_remaining: float | None) -> tuple[float, float]:
        now = time.monotonic()
        until = None if time_remaining is None else now + time_remaining - deadline_margin(time_remaining)
        with self._cond:
            while not job.done:
                now = time.monotonic()
                if until is not None:
                    left = until - now
                    if job.expected_end is not None and job.expected_end - now > EARLY_ANSWER_SLACK * max(left, 0):
                        raise self._too_short(job, now, left, estimated=True)
                    if left <= 0:
                        raise self._too_short(job, now, left, estimated=False)
                    self._cond.wait(left)
                else:
                    self._cond.wait()
        return self._outcome(job)

    @staticmethod
    def _outcome(job: _Job) -> tuple[float, float]:
        if job.error is not None:
            raise job.error
        assert job.value is not None
        return job.value

    @staticmethod
    def _too_short(job: _Job, now: float, left: float, *, estimated: bool) -> DeadlineTooShort:
        _, _, epsilon, delta, rate, steps = job.key
        what = f"noise calibration (epsilon {epsilon:g}, delta {delta:g}, sample rate {rate:g}, {steps} steps)"
        hint = ("raise the call's timeout (ServiceClient(timeout=...) or TS_TIMEOUT), or give "
                "dp_config.noise_multiplier; the calibration goes on here, and the same request again "
                "returns its result (at once, once it is done)")
        ran = now - job.started
        remaining = max(left, 0.0)
        if estimated and job.expected_end is not None:
            needed = job.expected_end - job.started
            return DeadlineTooShort(f"the {what} needs about {needed:.0f} s in all ({ran:.1f} s so far), more "
                                    f"than the {remaining:.1f} s left of this call's deadline", hint=hint,
                                    needed_s=needed, remaining_s=remaining)
        return DeadlineTooShort(f"the {what} was still running ({ran:.1f} s so far) when this call's deadline "
                                "came", hint=hint, remaining_s=remaining)


__all__ = ["CACHE_SIZE", "Calibrations"]
