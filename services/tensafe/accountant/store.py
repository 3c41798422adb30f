"""The accountant's SQL records: budgets, every recorded step, and per budget the step counts per
distinct (noise multiplier, sample rate) that the maths composes.

Steps are never deleted or rewritten: a budget can be closed, not reset. Every change to a budget
bumps its ``version``; a step is committed only if the version it was computed from is still the
current one (compare-and-swap), so two writers can never both spend the same remaining budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tensafe.runtime.pagination import after_clause

metadata = sa.MetaData()
budgets = sa.Table(
    "accountant_budgets", metadata,
    sa.Column("budget_id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("session_id", sa.String(128), nullable=False),
    sa.Column("target_epsilon", sa.Double, nullable=False),
    sa.Column("target_delta", sa.Double, nullable=False),
    sa.Column("accountant", sa.String(16), nullable=False),
    sa.Column("sample_rate", sa.Double, nullable=False),
    sa.Column("spent_epsilon", sa.Double, nullable=False),
    sa.Column("num_steps", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("tenant_id", "session_id", name="uq_accountant_budgets_session"),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_accountant_budgets_tenant", budgets.c.tenant_id, budgets.c.created_at)
steps = sa.Table(
    "accountant_steps", metadata,
    sa.Column("budget_id", sa.String(64), sa.ForeignKey("accountant_budgets.budget_id"), primary_key=True),
    sa.Column("step_id", sa.String(256), primary_key=True),
    # The budget's version right after this record: orders the steps of a budget.
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("noise_multiplier", sa.Double, nullable=False),
    sa.Column("sample_rate", sa.Double, nullable=False),
    sa.Column("num_steps", sa.BigInteger, nullable=False),
    sa.Column("epsilon_after", sa.Double, nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.UniqueConstraint("budget_id", "seq", name="uq_accountant_steps_seq"),
)
counts = sa.Table(
    "accountant_counts", metadata,
    sa.Column("budget_id", sa.String(64), sa.ForeignKey("accountant_budgets.budget_id"), primary_key=True),
    sa.Column("noise_multiplier", sa.Double, primary_key=True),
    sa.Column("sample_rate", sa.Double, primary_key=True),
    sa.Column("num_steps", sa.BigInteger, nullable=False),
)

ACTIVE, EXHAUSTED, CLOSED = "active", "exhausted", "closed"


@dataclass(frozen=True)
class BudgetRecord:
    budget_id: str
    tenant_id: str
    session_id: str
    target_epsilon: float
    target_delta: float
    accountant: str
    sample_rate: float
    spent_epsilon: float
    num_steps: int
    state: str
    version: int
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Any) -> BudgetRecord:
        return cls(**dict(row._mapping))


@dataclass(frozen=True)
class StepRecord:
    budget_id: str
    step_id: str
    seq: int
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    epsilon_after: float
    recorded_at: float

    @classmethod
    def from_row(cls, row: Any) -> StepRecord:
        return cls(**dict(row._mapping))


class AccountantStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert_budget(self, record: BudgetRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(budgets.insert().values(**record.__dict__))

    def get_budget(self, tenant_id: str, budget_id: str) -> BudgetRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(budgets).where(sa.and_(
                budgets.c.budget_id == budget_id, budgets.c.tenant_id == tenant_id))).first()
        return BudgetRecord.from_row(row) if row else None

    def budget_for_session(self, tenant_id: str, session_id: str) -> BudgetRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(budgets).where(sa.and_(
                budgets.c.tenant_id == tenant_id, budgets.c.session_id == session_id))).first()
        return BudgetRecord.from_row(row) if row else None

    def list_budgets(self, tenant_id: str, session_id: str, after: tuple[float, str] | None, limit: int
                     ) -> list[BudgetRecord]:
        query = sa.select(budgets).where(budgets.c.tenant_id == tenant_id)
        if session_id:
            query = query.where(budgets.c.session_id == session_id)
        if after is not None:
            query = query.where(after_clause((budgets.c.created_at, budgets.c.budget_id), after))
        query = query.order_by(budgets.c.created_at, budgets.c.budget_id).limit(limit)
        with self.engine.connect() as conn:
            return [BudgetRecord.from_row(r) for r in conn.execute(query)]

    def get_step(self, budget_id: str, step_id: str) -> StepRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(steps).where(sa.and_(
                steps.c.budget_id == budget_id, steps.c.step_id == step_id))).first()
        return StepRecord.from_row(row) if row else None

    def list_steps(self, budget_id: str, after_seq: int, limit: int) -> list[StepRecord]:
        query = (sa.select(steps).where(sa.and_(steps.c.budget_id == budget_id, steps.c.seq > after_seq))
                 .order_by(steps.c.seq).limit(limit))
        with self.engine.connect() as conn:
            return [StepRecord.from_row(r) for r in conn.execute(query)]

    def counts(self, budget_id: str) -> dict[tuple[float, float], int]:
        """Steps composed so far per distinct (noise multiplier, sample rate)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(counts.c.noise_multiplier, counts.c.sample_rate, counts.c.num_steps)
                                .where(counts.c.budget_id == budget_id))
            return {(float(z), float(q)): int(n) for z, q, n in rows}

    def append_step(self, budget: BudgetRecord, step: StepRecord, state: str) -> BudgetRecord | None:
        """Commits ``step`` if ``budget`` is still at the version the step was computed from; the
        budget after it, or None when another change came first (nothing is written then)."""
        now = step.recorded_at
        with self.engine.begin() as conn:
            res = conn.execute(budgets.update().where(sa.and_(
                budgets.c.budget_id == budget.budget_id, budgets.c.version == budget.version)).values(
                version=step.seq, spent_epsilon=step.epsilon_after, num_steps=budget.num_steps + step.num_steps,
                state=state, updated_at=now))
            if res.rowcount != 1:
                return None
            conn.execute(steps.insert().values(**step.__dict__))
            key = sa.and_(counts.c.budget_id == budget.budget_id, counts.c.noise_multiplier == step.noise_multiplier,
                          counts.c.sample_rate == step.sample_rate)
            res = conn.execute(counts.update().where(key).values(num_steps=counts.c.num_steps + step.num_steps))
            if res.rowcount != 1:
                conn.execute(counts.insert().values(budget_id=budget.budget_id, noise_multiplier=step.noise_multiplier,
                                                    sample_rate=step.sample_rate, num_steps=step.num_steps))
            row = conn.execute(sa.select(budgets).where(budgets.c.budget_id == budget.budget_id)).one()
        return BudgetRecord.from_row(row)

    def set_state(self, budget: BudgetRecord, state: str) -> BudgetRecord | None:
        with self.engine.begin() as conn:
            res = conn.execute(budgets.update().where(sa.and_(
                budgets.c.budget_id == budget.budget_id, budgets.c.version == budget.version)).values(
                version=budget.version + 1, state=state, updated_at=time.time()))
            if res.rowcount != 1:
                return None
            row = conn.execute(sa.select(budgets).where(budgets.c.budget_id == budget.budget_id)).one()
        return BudgetRecord.from_row(row)
