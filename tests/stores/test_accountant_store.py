"""AccountantStore below the stack: one class, run on SQLite and PostgreSQL (conftest.BACKENDS)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.accountant.store import ACTIVE, CLOSED, EXHAUSTED, AccountantStore, BudgetRecord, StepRecord, steps


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> AccountantStore:
    return AccountantStore(service_engine(request, "accountant", tmp_path))


def budget(budget_id: str, tenant: str = "t1", session: str | None = None, created_at: float = 1.0) -> BudgetRecord:
    return BudgetRecord(budget_id=budget_id, tenant_id=tenant, session_id=session or f"sess_{budget_id}",
                        target_epsilon=3.0, target_delta=1e-5, accountant="pld", sample_rate=0.01,
                        spent_epsilon=0.0, num_steps=0, state=ACTIVE, version=0, created_at=created_at,
                        updated_at=created_at)


def step(b: BudgetRecord, step_id: str, *, noise: float = 1.1, rate: float = 0.01, n: int = 1,
         eps: float = 0.1) -> StepRecord:
    return StepRecord(budget_id=b.budget_id, step_id=step_id, seq=b.version + 1, noise_multiplier=noise,
                      sample_rate=rate, num_steps=n, epsilon_after=eps, recorded_at=10.0 + b.version)


class TestAccountantStore:
    def test_budget_round_trip(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        assert store.get_budget("t1", "bud_1") == b
        assert store.budget_for_session("t1", b.session_id) == b
        assert store.get_budget("t1", "bud_2") is None

    def test_another_tenant_sees_no_budget(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        assert store.get_budget("t2", "bud_1") is None
        assert store.budget_for_session("t2", b.session_id) is None
        assert store.list_budgets("t2", "", None, 100) == []
        # The same session name under another tenant is another budget.
        store.insert_budget(budget("bud_2", tenant="t2", session=b.session_id))
        assert store.budget_for_session("t2", b.session_id).budget_id == "bud_2"
        assert store.budget_for_session("t1", b.session_id).budget_id == "bud_1"

    def test_one_budget_per_session_and_unique_ids(self, store: AccountantStore) -> None:
        store.insert_budget(budget("bud_1", session="s"))
        with pytest.raises(sa.exc.IntegrityError):
            store.insert_budget(budget("bud_2", session="s"))
        with pytest.raises(sa.exc.IntegrityError):
            store.insert_budget(budget("bud_1", session="other"))
        assert [b.budget_id for b in store.list_budgets("t1", "", None, 100)] == ["bud_1"]

    def test_list_pages_in_created_order(self, store: AccountantStore) -> None:
        for bid, t in (("bud_c", 1.0), ("bud_b", 2.0), ("bud_a", 2.0), ("bud_d", 3.0)):
            store.insert_budget(budget(bid, created_at=t, session="s2" if bid == "bud_d" else None))
        store.insert_budget(budget("bud_x", tenant="t2", created_at=1.5))
        assert [b.budget_id for b in store.list_budgets("t1", "", None, 100)] == ["bud_c", "bud_a", "bud_b", "bud_d"]
        first = store.list_budgets("t1", "", None, 2)
        assert [b.budget_id for b in first] == ["bud_c", "bud_a"]
        rest = store.list_budgets("t1", "", (first[-1].created_at, first[-1].budget_id), 2)
        assert [b.budget_id for b in rest] == ["bud_b", "bud_d"]
        assert [b.budget_id for b in store.list_budgets("t1", "s2", None, 100)] == ["bud_d"]

    def test_append_step_updates_the_budget_and_counts(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        s1 = step(b, "s1", eps=0.2)
        after = store.append_step(b, s1, ACTIVE)
        assert (after.version, after.spent_epsilon, after.num_steps, after.state) == (1, 0.2, 1, ACTIVE)
        assert after.updated_at == s1.recorded_at
        assert store.get_step("bud_1", "s1") == s1
        after = store.append_step(after, step(after, "s2", n=4, eps=0.5), ACTIVE)
        after = store.append_step(after, step(after, "s3", noise=2.0, rate=0.02, eps=0.6), EXHAUSTED)
        assert (after.version, after.num_steps, after.state) == (3, 6, EXHAUSTED)
        assert store.counts("bud_1") == {(1.1, 0.01): 5, (2.0, 0.02): 1}
        assert store.get_budget("t1", "bud_1") == after
        assert store.counts("bud_other") == {}

    def test_a_stale_version_writes_nothing(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        assert store.append_step(b, step(b, "s1"), ACTIVE) is not None
        # Computed from version 0, which is gone: refused, and neither the step nor its counts are kept.
        assert store.append_step(b, replace(step(b, "s2"), seq=1), ACTIVE) is None
        assert store.set_state(b, CLOSED) is None
        assert store.get_step("bud_1", "s2") is None
        assert store.counts("bud_1") == {(1.1, 0.01): 1}
        assert store.get_budget("t1", "bud_1").version == 1

    def test_concurrent_writers_of_one_version_cannot_both_spend(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        results: list[BudgetRecord | None] = []
        barrier = threading.Barrier(6)

        def write(i: int) -> None:
            barrier.wait()
            try:
                results.append(store.append_step(b, step(b, f"s{i}"), ACTIVE))
            except sa.exc.DBAPIError:  # a conflicting writer may also be refused by the database itself
                results.append(None)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(r is not None for r in results) == 1 and len(results) == 6
        assert store.get_budget("t1", "bud_1").num_steps == 1 and store.counts("bud_1") == {(1.1, 0.01): 1}
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(steps)).scalar_one() == 1

    def test_steps_are_listed_in_sequence_pages(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        for i in range(5):
            b = store.append_step(b, step(b, f"step_{9 - i}"), ACTIVE)  # ids out of order: seq decides
        assert [s.seq for s in store.list_steps("bud_1", 0, 100)] == [1, 2, 3, 4, 5]
        assert [s.step_id for s in store.list_steps("bud_1", 0, 2)] == ["step_9", "step_8"]
        assert [s.seq for s in store.list_steps("bud_1", 2, 2)] == [3, 4]
        assert store.list_steps("bud_1", 5, 2) == []

    def test_a_step_id_is_recorded_once_per_budget(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        b = store.append_step(b, step(b, "s1"), ACTIVE)
        with pytest.raises(sa.exc.IntegrityError):
            store.append_step(b, step(b, "s1"), ACTIVE)
        assert store.get_budget("t1", "bud_1").version == 1  # the budget update rolled back with it

    def test_close(self, store: AccountantStore) -> None:
        b = budget("bud_1")
        store.insert_budget(b)
        closed = store.set_state(b, CLOSED)
        assert (closed.state, closed.version) == (CLOSED, 1)
        assert store.get_budget("t1", "bud_1") == closed
