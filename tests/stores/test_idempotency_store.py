"""IdempotencyStore (tensafe.runtime.idempotency) below the stack, on SQLite and PostgreSQL.

tests/adversarial/test_runtime.py covers the lease of a replica that stopped (SQLite); this class covers
the rest of the store's promises on both backends."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument
from tensafe.runtime.idempotency import IdempotencyStore, StoredOutcome, records


@pytest.fixture(params=BACKENDS)
def engine(request, tmp_path) -> sa.Engine:
    return service_engine(request, "vault", tmp_path)


@pytest.fixture
def store(engine: sa.Engine):
    store = IdempotencyStore(engine, wait_seconds=5, instance="host|127.0.0.1:1|vault")
    yield store
    store.close()


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(records)).scalar_one()


class TestIdempotencyStore:
    def test_the_first_call_runs_and_a_retry_replays_it(self, store: IdempotencyStore) -> None:
        assert store.claim("t1", "/m", "k1", "d1") is None
        store.complete("t1", "/m", "k1", StoredOutcome(0, b"response"))
        assert store.claim("t1", "/m", "k1", "d1") == StoredOutcome(0, b"response")
        assert store.claim("t1", "/m", "k1", "d1") == StoredOutcome(0, b"response")

    def test_a_key_is_scoped_to_tenant_and_method(self, store: IdempotencyStore) -> None:
        assert store.claim("t1", "/m", "k1", "d1") is None
        store.complete("t1", "/m", "k1", StoredOutcome(3, b"status"))
        assert store.claim("t2", "/m", "k1", "other request") is None  # another tenant's key: runs
        assert store.claim("t1", "/other", "k1", "d1") is None
        assert store.claim("t1", "/m", "k1", "d1") == StoredOutcome(3, b"status")

    def test_a_key_reused_for_another_request_is_refused(self, store: IdempotencyStore) -> None:
        assert store.claim("t1", "/m", "k1", "d1") is None
        store.complete("t1", "/m", "k1", StoredOutcome(0, b"r"))
        with pytest.raises(InvalidArgument, match="different request"):
            store.claim("t1", "/m", "k1", "d2")
        for bad in ("", "k" * 129):
            with pytest.raises(InvalidArgument):
                store.claim("t1", "/m", bad, "d1")

    def test_release_lets_the_retry_run_again(self, store: IdempotencyStore, engine: sa.Engine) -> None:
        assert store.claim("t1", "/m", "k1", "d1") is None
        store.release("t1", "/m", "k1")
        assert count(engine) == 0
        assert store.claim("t1", "/m", "k1", "d1") is None

    def test_concurrent_claims_run_once_and_the_others_replay(self, store: IdempotencyStore) -> None:
        outcomes: list[StoredOutcome | None] = []
        barrier = threading.Barrier(6)

        def call() -> None:
            barrier.wait()
            outcome = store.claim("t1", "/m", "k1", "d1")
            if outcome is None:
                time.sleep(0.3)  # runs while the others wait
                store.complete("t1", "/m", "k1", StoredOutcome(0, b"once"))
            outcomes.append(outcome)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(outcomes) == 6 and outcomes.count(None) == 1
        assert [o for o in outcomes if o is not None] == [StoredOutcome(0, b"once")] * 5

    def test_a_retry_waits_only_so_long_for_a_running_call(self, engine: sa.Engine) -> None:
        first = IdempotencyStore(engine, instance="a")
        first.start()  # heartbeats: its key is not taken from it
        impatient = IdempotencyStore(engine, wait_seconds=0.5, instance="b")
        try:
            assert first.claim("t1", "/m", "k1", "d1") is None
            start = time.monotonic()
            with pytest.raises(FailedPrecondition, match="still running"):
                impatient.claim("t1", "/m", "k1", "d1")
            assert time.monotonic() - start < 5
            # Only the holder completes or releases its key.
            impatient.complete("t1", "/m", "k1", StoredOutcome(0, b"not mine"))
            impatient.release("t1", "/m", "k1")
            first.complete("t1", "/m", "k1", StoredOutcome(0, b"mine"))
            assert impatient.claim("t1", "/m", "k1", "d1") == StoredOutcome(0, b"mine")
        finally:
            impatient.close()
            first.close()

    def test_a_restart_on_the_same_instance_releases_its_running_keys(self, engine: sa.Engine) -> None:
        crashed = IdempotencyStore(engine, instance="host|addr|vault")  # never closed: as after kill -9
        assert crashed.claim("t1", "/m", "running", "d1") is None
        assert crashed.claim("t1", "/m", "done", "d1") is None
        crashed.complete("t1", "/m", "done", StoredOutcome(0, b"kept"))
        other_instance = IdempotencyStore(engine, instance="other|addr|vault")
        assert count(engine) == 2  # another instance's start takes nothing
        restarted = IdempotencyStore(engine, instance="host|addr|vault")
        try:
            assert count(engine) == 1
            assert restarted.claim("t1", "/m", "running", "d1") is None
            assert restarted.claim("t1", "/m", "done", "d1") == StoredOutcome(0, b"kept")
        finally:
            restarted.close()
            other_instance.close()

    def test_close_gives_running_keys_back_and_keeps_outcomes(self, engine: sa.Engine) -> None:
        store = IdempotencyStore(engine, instance="x")
        assert store.claim("t1", "/m", "k1", "d1") is None
        assert store.claim("t1", "/m", "k2", "d1") is None
        store.complete("t1", "/m", "k2", StoredOutcome(0, b"r"))
        store.close()
        assert count(engine) == 1
        with engine.connect() as conn:
            assert conn.execute(sa.select(records.c.idempotency_key)).scalars().all() == ["k2"]

    def test_purge_expired_removes_only_old_records(self, engine: sa.Engine) -> None:
        store = IdempotencyStore(engine, ttl_seconds=3600)
        try:
            for key in ("old", "new"):
                assert store.claim("t1", "/m", key, "d") is None
                store.complete("t1", "/m", key, StoredOutcome(0, b""))
            with engine.begin() as conn:
                conn.execute(records.update().where(records.c.idempotency_key == "old")
                             .values(created_at=time.time() - 7200))
            assert store.purge_expired() == 1
            assert store.claim("t1", "/m", "old", "another request") is None  # forgotten: a new call
            assert store.claim("t1", "/m", "new", "d") == StoredOutcome(0, b"")
        finally:
            store.close()
