"""Audit entries: recorded durably in the service's own database, delivered to the ledger later.

Recording is a local insert, so a user call never waits for the ledger. A deliverer thread
sends the outbox to the ledger in order, in batches, as the services' own identity
(tenant ``tensafe-system``); an entry leaves the outbox only once the ledger has
acknowledged it, and the ledger keeps one leaf per entry id, so every entry arrives
exactly once even when the ledger is down, slow or restarted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.engine import Engine

from tensafe.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger("tensafe.audit")

_metadata = sa.MetaData()
outbox = sa.Table(
    "audit_outbox", _metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("entry_id", sa.String(64), nullable=False, unique=True),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

SUCCESS = ledger_pb2.AUDIT_OUTCOME_SUCCESS
DENIED = ledger_pb2.AUDIT_OUTCOME_DENIED
FAILED = ledger_pb2.AUDIT_OUTCOME_FAILED
_DENIED_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}
_DENIED_REASONS = {"DP_BUDGET_EXCEEDED", "RATE_LIMITED", "TENANT_MISMATCH"}
# Reads that touch secrets or plaintext are audited like changes.
# Reads that touch a tenant's data or keys: each is audited like a state-changing call.
AUDITED_READS = {"vault.GetArtifact", "vault.PullArtifact", "vault.UnwrapDataKey", "inference.Generate"}
_ID_FIELDS = ("artifact_id", "session_id", "budget_id", "adapter_id", "context_id", "future_id", "key_id")


def resource_id(*messages: Any) -> str:
    """The first resource id found in the response, then the request (one level of nesting)."""
    for msg in messages:
        if msg is None or not hasattr(msg, "ListFields"):
            continue
        for candidates in (msg.ListFields(), [f for _, v in msg.ListFields() if hasattr(v, "ListFields")
                                              for f in v.ListFields()]):
            for field, value in candidates:
                if field.name in _ID_FIELDS and isinstance(value, str) and value:
                    return value
    return ""


def outcome_for(code: grpc.StatusCode | None, reason: str) -> int:
    if code in (None, grpc.StatusCode.OK):
        return SUCCESS
    if code in _DENIED_CODES or reason in _DENIED_REASONS:
        return DENIED
    return FAILED


def build_entry(*, service: str, action: str, tenant_id: str, key_id: str, outcome: int, request_id: str,
                resource: str = "", digest: bytes = b"", details: dict[str, str] | None = None
                ) -> ledger_pb2.AuditEntry:
    span = trace.get_current_span().get_span_context()
    entry = ledger_pb2.AuditEntry(entry_id=uuid.uuid4().hex, tenant_id=tenant_id,
                                  actor=f"key:{key_id}" if key_id else "anonymous", key_id=key_id,
                                  service=service, action=action, resource_id=resource, outcome=outcome,
                                  request_id=request_id, trace_id=format(span.trace_id, "032x") if span.trace_id
                                  else "", request_digest=digest, details=details or {})
    entry.time.FromNanoseconds(time.time_ns())
    return entry


def audit_digest(request: Any) -> bytes:
    if hasattr(request, "SerializeToString"):
        return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    return b""


class AuditOutbox:
    """The service's durable queue of entries for the ledger, and its deliverer."""

    def __init__(self, engine: Engine, channel_for_ledger: Callable[[], grpc.Channel], service_key: Callable[[], str],
                 interval: float = 0.2, batch: int = 500) -> None:
        self.engine = engine
        self._channel = channel_for_ledger
        self._service_key = service_key
        self.interval = interval
        self.batch = batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, entry: ledger_pb2.AuditEntry) -> None:
        with self.engine.begin() as conn:
            conn.execute(outbox.insert().values(entry_id=entry.entry_id, payload=entry.SerializeToString(),
                                                created_at=time.time()))
        self._wake.set()

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-delivery", daemon=True)
        self._thread.start()

    def flush(self, seconds: float = 2.0) -> None:
        """Deliver what is waiting, for up to ``seconds``; whatever is left stays for the next start."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if not self.deliver_once():
                    return
            except Exception:  # noqa: BLE001 - the outbox keeps it
                return

    def stop(self) -> None:
        """End background delivery (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def deliver_once(self) -> int:
        """Send the oldest waiting entries; returns how many the ledger acknowledged."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.c.seq, outbox.c.payload).order_by(outbox.c.seq)
                                .limit(self.batch)).all()
        if not rows:
            return 0
        key = self._service_key()
        if not key:
            raise RuntimeError("no service API key (TENSAFE_SERVICE_API_KEY or <data dir>/service_key)")
        request = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry.FromString(p) for _, p in rows])
        ledger_pb2_grpc.LedgerServiceStub(self._channel()).AppendEntries(
            request, timeout=5, metadata=(("authorization", f"Bearer {key}"),))
        with self.engine.begin() as conn:
            conn.execute(outbox.delete().where(outbox.c.seq <= rows[-1][0]))
        return len(rows)

    def _run(self) -> None:
        backoff = self.interval
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            try:
                while self.deliver_once():
                    pass
                backoff = self.interval
            except grpc.RpcError as err:
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("ledger unreachable (%s); %d audit entries wait in the outbox", err.code().name,
                            self.pending())
            except Exception:  # noqa: BLE001 - delivery retries; entries stay in the outbox
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.exception("audit delivery failed; entries stay in the outbox")
