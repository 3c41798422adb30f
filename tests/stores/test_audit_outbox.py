"""AuditOutbox (tensafe.runtime.audit) below the stack, on SQLite and PostgreSQL, with a recording stand-in
for the ledger's channel. tests/adversarial/test_runtime.py covers refusals by a real ledger (SQLite)."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.audit import REFUSED_ACTION, AuditOutbox, outbox


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused with {self._code.name}"


class FakeLedger:
    """Stands in for the channel to the ledger: records each AppendEntries, or raises what it is told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[ledger_pb2.AuditEntry], tuple]] = []
        self.fail: list[grpc.RpcError] = []

    def unary_unary(self, method: str, *args, **kwargs):
        def call(request, timeout=None, metadata=()):
            if self.fail:
                raise self.fail.pop(0)
            self.calls.append((list(request.entries), tuple(metadata)))
            return ledger_pb2.AppendEntriesResponse()
        return call

    def sent(self) -> list[str]:
        return [e.entry_id for entries, _ in self.calls for e in entries]


@pytest.fixture(params=BACKENDS)
def engine(request, tmp_path) -> sa.Engine:
    return service_engine(request, "vault", tmp_path)


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def store(engine: sa.Engine, ledger: FakeLedger) -> AuditOutbox:
    return AuditOutbox(engine, lambda: ledger, lambda: "service-key", batch=3)


def entry(n: int, tenant: str = "acme") -> ledger_pb2.AuditEntry:
    e = ledger_pb2.AuditEntry(entry_id=f"e{n}-{uuid.uuid4().hex[:8]}", tenant_id=tenant, service="vault",
                              action="vault.PutArtifact", resource_id=f"art_{n}")
    e.time.FromNanoseconds(time.time_ns())
    return e


class TestAuditOutbox:
    def test_entries_are_delivered_in_order_in_batches(self, store: AuditOutbox, ledger: FakeLedger) -> None:
        made = [entry(i) for i in range(7)]
        for e in made:
            store.record(e)
        assert store.pending() == 7
        assert [store.deliver_once() for _ in range(4)] == [3, 3, 1, 0]
        assert ledger.sent() == [e.entry_id for e in made]
        assert [entries for entries, _ in ledger.calls][0] == made[:3]  # the entries exactly as recorded
        assert all(("authorization", "Bearer service-key") in md for _, md in ledger.calls)
        assert store.pending() == 0

    def test_an_entry_id_is_queued_once(self, store: AuditOutbox) -> None:
        e = entry(1)
        store.record(e)
        with pytest.raises(sa.exc.IntegrityError):
            store.record(e)
        assert store.pending() == 1

    def test_nothing_is_lost_while_the_ledger_is_down(self, store: AuditOutbox, ledger: FakeLedger) -> None:
        made = [entry(i) for i in range(2)]
        for e in made:
            store.record(e)
        ledger.fail = [Refused(grpc.StatusCode.UNAVAILABLE)]
        with pytest.raises(grpc.RpcError):
            store.deliver_once()
        assert store.pending() == 2 and ledger.sent() == []
        assert store.deliver_once() == 2
        assert ledger.sent() == [e.entry_id for e in made] and store.pending() == 0

    def test_without_the_services_key_nothing_is_sent_or_lost(self, engine: sa.Engine, ledger: FakeLedger) -> None:
        keyless = AuditOutbox(engine, lambda: ledger, lambda: "")
        keyless.record(entry(1))
        with pytest.raises(RuntimeError, match="service API key"):
            keyless.deliver_once()
        assert keyless.pending() == 1 and ledger.calls == []

    def test_a_refused_entry_is_replaced_and_the_rest_delivered(self, store: AuditOutbox, ledger: FakeLedger) -> None:
        made = [entry(i) for i in range(3)]
        for e in made:
            store.record(e)
        # The batch is refused for good, then (one by one) the first entry alone once more.
        ledger.fail = [Refused(grpc.StatusCode.INVALID_ARGUMENT), Refused(grpc.StatusCode.INVALID_ARGUMENT)]
        assert store.deliver_once() == 3
        sent = [entries[0] for entries, _ in ledger.calls]
        assert [e.entry_id for e in sent] == [e.entry_id for e in made]
        assert sent[0].action == REFUSED_ACTION and sent[0].details["original_action"] == "vault.PutArtifact"
        assert sent[0].details["refused_code"] == "INVALID_ARGUMENT"
        assert [e.action for e in sent[1:]] == ["vault.PutArtifact"] * 2
        assert store.pending() == 0

    def test_an_unreadable_row_is_sent_as_its_stand_in(self, store: AuditOutbox, engine: sa.Engine,
                                                       ledger: FakeLedger) -> None:
        with engine.begin() as conn:
            conn.execute(outbox.insert().values(entry_id="garbled", payload=b"\xff\xff not protobuf",
                                                created_at=time.time()))
        store.record(entry(1))
        assert store.deliver_once() == 2
        [stand_in, real] = [e for entries, _ in ledger.calls for e in entries]
        assert stand_in.action == REFUSED_ACTION and stand_in.entry_id.startswith("refused-")
        assert real.action == "vault.PutArtifact" and store.pending() == 0
