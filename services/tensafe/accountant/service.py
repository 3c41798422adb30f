"""The accountant's logic: budgets and the durable record of DP steps. No gRPC here; every call is
for one tenant, and another tenant's budget does not exist for it.

A step is recorded only if the budget's epsilon *with* it stays within the target, and it is on disk
before the caller hears yes (the trainer releases the noised update only after that). A repeated
step id is answered from its record and counted once. Nothing is ever given back: steps are never
deleted, and a budget can be closed but not reset or recreated for its session.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import weakref
from dataclasses import dataclass

from tensafe.runtime.context import note_audit
from tensafe.runtime.errors import AlreadyExists, DPBudgetExceeded, FailedPrecondition, InvalidArgument, NotFound

from . import accounting
from .calibration import Calibrations
from .store import ACTIVE, CLOSED, EXHAUSTED, AccountantStore, BudgetRecord, StepRecord

MAX_ID = 256
MAX_SESSION_ID = 128
MAX_STEPS_PER_RECORD = 1_000_000
_CAS_ATTEMPTS = 8


@dataclass(frozen=True)
class EpsilonReport:
    epsilon: float
    delta: float
    num_steps: int
    accountant: str


def _check_delta(field: str, delta: float) -> None:
    if not (0 < delta < 1):
        raise InvalidArgument(field, f"must be in (0, 1), got {delta}")


def _check_epsilon(field: str, epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidArgument(field, f"must be a finite number > 0, got {epsilon}")


def _check_rate(field: str, rate: float) -> None:
    if not (0 < rate <= 1):
        raise InvalidArgument(field, f"must be in (0, 1] (expected batch size / dataset size), got {rate}")


def _check_noise(field: str, noise: float) -> None:
    if not (math.isfinite(noise) and noise > 0):
        raise InvalidArgument(field, f"must be a finite number > 0, got {noise}")
    if not accounting.MIN_NOISE_MULTIPLIER <= noise <= accounting.MAX_NOISE_MULTIPLIER:
        raise InvalidArgument(field, f"must be in [{accounting.MIN_NOISE_MULTIPLIER}, "
                                     f"{accounting.MAX_NOISE_MULTIPLIER:g}], got {noise} (below "
                                     f"{accounting.MIN_NOISE_MULTIPLIER} one step alone spends epsilon > 80)")


def _check_steps(field: str, steps: int) -> None:
    if not 1 <= steps <= MAX_STEPS_PER_RECORD:
        raise InvalidArgument(field, f"must be in [1, {MAX_STEPS_PER_RECORD}], got {steps}")


def _check_id(field: str, value: str, limit: int = MAX_ID) -> None:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters")


def check_accountant(field: str, name: str) -> None:
    if name not in accounting.ACCOUNTANTS:
        raise InvalidArgument(field, f"unknown accountant {name!r}; choose from {', '.join(accounting.ACCOUNTANTS)}")


class Budgets:
    def __init__(self, store: AccountantStore) -> None:
        self.store = store
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()

    def _lock(self, budget_id: str) -> threading.Lock:
        """Serialises the writers of one budget in this process (the version check covers other processes)."""
        with self._locks_guard:
            lock = self._locks.get(budget_id)
            if lock is None:
                lock = self._locks[budget_id] = threading.Lock()
            return lock

    # -- budgets -----------------------------------------------------------------------------------
    def create(self, tenant_id: str, session_id: str, target_epsilon: float, target_delta: float,
               accountant: str, sample_rate: float) -> BudgetRecord:
        _check_id("session_id", session_id, MAX_SESSION_ID)
        _check_epsilon("target_epsilon", target_epsilon)
        _check_delta("target_delta", target_delta)
        check_accountant("accountant_type", accountant)
        _check_rate("sample_rate", sample_rate)
        existing = self.store.budget_for_session(tenant_id, session_id)
        if existing is not None:
            raise AlreadyExists(f"session {session_id!r} already has budget {existing.budget_id} (a session's "
                                "budget is never replaced: spent privacy is not given back)",
                                budget_id=existing.budget_id, session_id=session_id)
        now = time.time()
        record = BudgetRecord(budget_id="bud_" + secrets.token_hex(12), tenant_id=tenant_id, session_id=session_id,
                              target_epsilon=float(target_epsilon), target_delta=float(target_delta),
                              accountant=accountant, sample_rate=float(sample_rate), spent_epsilon=0.0, num_steps=0,
                              state=ACTIVE, version=0, created_at=now, updated_at=now)
        note_audit(session_id=session_id, target_epsilon=repr(record.target_epsilon),
                   target_delta=repr(record.target_delta), accountant=accountant,
                   sample_rate=repr(record.sample_rate))
        try:
            self.store.insert_budget(record)
        except Exception:
            # Two creates for one session racing: the unique constraint let one through.
            existing = self.store.budget_for_session(tenant_id, session_id)
            if existing is None:
                raise
            raise AlreadyExists(f"session {session_id!r} already has budget {existing.budget_id}",
                                budget_id=existing.budget_id, session_id=session_id) from None
        return record

    def get(self, tenant_id: str, budget_id: str) -> BudgetRecord:
        record = self.store.get_budget(tenant_id, budget_id) if budget_id else None
        if record is None:
            raise NotFound("budget", budget_id)
        return record

    def list(self, tenant_id: str, session_id: str, after: tuple[float, str] | None, limit: int
             ) -> list[BudgetRecord]:
        """The tenant's budgets ordered by (created_at, budget_id), the first ``limit`` after ``after``."""
        return self.store.list_budgets(tenant_id, session_id, after, limit)

    def close(self, tenant_id: str, budget_id: str) -> BudgetRecord:
        with self._lock(budget_id):
            for _ in range(_CAS_ATTEMPTS):
                budget = self.get(tenant_id, budget_id)
                if budget.state == CLOSED:
                    return budget
                closed = self.store.set_state(budget, CLOSED)
                if closed is not None:
                    return closed
        raise FailedPrecondition(f"budget {budget_id} kept changing while being closed; retry")

    # -- steps -------------------------------------------------------------------------------------
    def record_step(self, tenant_id: str, budget_id: str, step_id: str, noise_multiplier: float,
                    sample_rate: float | None = None, num_steps: int | None = None
                    ) -> tuple[StepRecord, BudgetRecord, bool]:
        """Records ``num_steps`` (default 1) steps; (the step's record, the budget after it, duplicate)."""
        _check_id("budget_id", budget_id)
        _check_id("step_id", step_id)
        _check_noise("noise_multiplier", noise_multiplier)
        if sample_rate is not None:
            _check_rate("sample_rate", sample_rate)
        n = 1 if num_steps is None else int(num_steps)
        _check_steps("num_steps", n)
        with self._lock(budget_id):
            for _ in range(_CAS_ATTEMPTS):
                budget = self.get(tenant_id, budget_id)
                existing = self.store.get_step(budget_id, step_id)
                if existing is not None:
                    note_audit(session_id=budget.session_id, step_id=step_id, duplicate="true",
                               epsilon_after=repr(existing.epsilon_after))
                    return self._duplicate(existing, budget, noise_multiplier, sample_rate, n), budget, True
                if budget.state == CLOSED:
                    raise FailedPrecondition(f"budget {budget_id} is closed: it takes no more steps",
                                             budget_id=budget_id)
                rate = float(sample_rate if sample_rate is not None else budget.sample_rate)
                # Read after the budget row: if another writer commits in between, the version check fails.
                acct = accounting.create(budget.accountant, [(z, q, c) for (z, q), c in
                                                             self.store.counts(budget_id).items()])
                acct.compose(noise_multiplier, rate, n)
                eps_after = acct.epsilon(budget.target_delta)
                note_audit(session_id=budget.session_id, step_id=step_id, noise_multiplier=repr(noise_multiplier),
                           sample_rate=repr(rate), num_steps=n, epsilon_before=repr(budget.spent_epsilon),
                           epsilon_after=repr(eps_after), target_epsilon=repr(budget.target_epsilon),
                           target_delta=repr(budget.target_delta))
                if eps_after > budget.target_epsilon:
                    raise DPBudgetExceeded(
                        f"step {step_id!r} would bring epsilon to {eps_after:.6g} at delta {budget.target_delta:g}, "
                        f"past the target {budget.target_epsilon:g} (spent {budget.spent_epsilon:.6g}); "
                        "it was not recorded", budget_id=budget_id, step_id=step_id,
                        spent_epsilon=repr(budget.spent_epsilon), epsilon_with_step=repr(eps_after),
                        target_epsilon=repr(budget.target_epsilon))
                # Would one more such step still fit? (Computed now, it is the next call's check, cached.)
                acct.compose(noise_multiplier, rate, 1)
                state = EXHAUSTED if acct.epsilon(budget.target_delta) > budget.target_epsilon else ACTIVE
                step = StepRecord(budget_id=budget_id, step_id=step_id, seq=budget.version + 1,
                                  noise_multiplier=float(noise_multiplier), sample_rate=rate, num_steps=n,
                                  epsilon_after=eps_after, recorded_at=time.time())
                after = self.store.append_step(budget, step, state)
                if after is not None:
                    # The next record of the same kind will need one more step's epsilon (for its state
                    # check): start it now, while the trainer computes that step.
                    if state == ACTIVE:
                        acct.compose(noise_multiplier, rate, 1)
                        accounting.prefetch(acct, budget.target_delta)
                    return step, after, False
        raise FailedPrecondition(f"budget {budget_id} kept changing while recording step {step_id!r}; retry")

    @staticmethod
    def _duplicate(existing: StepRecord, budget: BudgetRecord, noise: float, rate: float | None,
                   n: int) -> StepRecord:
        same = (existing.noise_multiplier == noise and existing.num_steps == n
                and existing.sample_rate == (rate if rate is not None else budget.sample_rate))
        if not same:
            raise AlreadyExists(f"step {existing.step_id!r} was recorded with other parameters (noise "
                                f"{existing.noise_multiplier}, sample rate {existing.sample_rate}, "
                                f"{existing.num_steps} steps)", budget_id=budget.budget_id,
                                step_id=existing.step_id)
        return existing

    def list_steps(self, tenant_id: str, budget_id: str, after_seq: int, limit: int) -> list[StepRecord]:
        self.get(tenant_id, budget_id)
        return self.store.list_steps(budget_id, after_seq, limit)

    def epsilon(self, tenant_id: str, budget_id: str, delta: float | None = None) -> EpsilonReport:
        """Epsilon spent at ``delta`` (default: the budget's). At the budget's delta it is the figure
        committed with the last step; at another delta the composition is cached by (steps, delta)."""
        if delta is not None:
            _check_delta("delta", delta)
        budget = self.get(tenant_id, budget_id)
        if delta is None or delta == budget.target_delta:
            return EpsilonReport(budget.spent_epsilon, budget.target_delta, budget.num_steps, budget.accountant)
        counts = self.store.counts(budget_id)
        acct = accounting.create(budget.accountant, [(z, q, c) for (z, q), c in counts.items()])
        return EpsilonReport(acct.epsilon(delta), float(delta), acct.num_steps, budget.accountant)


def calibrate_noise(calibrations: Calibrations, tenant_id: str, target_epsilon: float, target_delta: float,
                    sample_rate: float, num_steps: int, accountant: str, time_remaining: float | None
                    ) -> tuple[float, float]:
    """The smallest noise multiplier keeping ``num_steps`` steps within the target, and its epsilon:
    computed once per tenant and parameters, waited for at most ``time_remaining`` (see calibration.py)."""
    _check_epsilon("target_epsilon", target_epsilon)
    _check_delta("target_delta", target_delta)
    _check_rate("sample_rate", sample_rate)
    _check_steps("num_steps", num_steps)
    check_accountant("accountant_type", accountant)
    return calibrations.calibrate(tenant_id, accountant, target_epsilon, target_delta, sample_rate, num_steps,
                                  time_remaining)


def remaining(budget: BudgetRecord) -> float:
    return max(0.0, budget.target_epsilon - budget.spent_epsilon)


__all__ = ["Budgets", "EpsilonReport", "calibrate_noise", "remaining"]
