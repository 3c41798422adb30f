"""Audit entries: recorded durably in the service's own database, delivered to the ledger later.

Recording is a local insert, so a user call never waits for the ledger. A deliverer thread
sends the outbox to the ledger in order, in batches, as the services' own identity
(tenant ``tensafe-system``); an entry leaves the outbox only once the ledger has
acknowledged it, and the ledger keeps one leaf per entry id, so every entry arrives
exactly once even when the ledger is down, slow or restarted.

Every field of an entry is bounded when it is built (:data:`LIMITS`; a longer string keeps its start
and a digest of the whole, ``runtime.ids.bounded``), and the ledger refuses an entry past those
bounds (:func:`entry_problem`). Delivery never wedges on one entry: an entry the ledger refuses for
good (INVALID_ARGUMENT and the like, as opposed to UNAVAILABLE) is replaced, in the outbox, by a
bounded ``audit.entry_refused`` entry that keeps its id, service, tenant, time and the SHA-256 of
the refused bytes, and that one is delivered in its place: nothing is dropped silently.
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

from .ids import bounded

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

# The most characters of each string field of an entry (the ledger's columns and its own check agree).
LIMITS = {"entry_id": 64, "tenant_id": 128, "actor": 160, "key_id": 128, "service": 32, "action": 128,
          "resource_id": 128, "request_id": 128, "trace_id": 64}
MAX_DETAILS = 32
MAX_DETAIL_KEY = 64
MAX_DETAIL_VALUE = 512
MAX_DIGEST_BYTES = 64
MAX_ENTRY_BYTES = 16 * 1024
REFUSED_ACTION = "audit.entry_refused"
# Codes after which the ledger will refuse the same entry again: the entry is replaced, not retried.
PERMANENT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED})
MAX_BATCH_BYTES = 4 << 20


def entry_problem(entry: ledger_pb2.AuditEntry) -> tuple[str, str] | None:
    """(field, what is wrong) when ``entry`` is past the bounds every entry keeps, else None."""
    if not entry.entry_id:
        return "entry_id", "is required"
    if not entry.service or not entry.action:
        return ("service" if not entry.service else "action"), "is required"
    for name, limit in LIMITS.items():
        if len(getattr(entry, name)) > limit:
            return name, f"must be at most {limit} characters"
    if len(entry.request_digest) > MAX_DIGEST_BYTES:
        return "request_digest", f"must be at most {MAX_DIGEST_BYTES} bytes"
    if len(entry.details) > MAX_DETAILS:
        return "details", f"at most {MAX_DETAILS} entries"
    for key, value in entry.details.items():
        if len(key) > MAX_DETAIL_KEY or len(value) > MAX_DETAIL_VALUE:
            return f"details[{bounded(key, 40)!r}]", (f"keys of at most {MAX_DETAIL_KEY} and values of at most "
                                                      f"{MAX_DETAIL_VALUE} characters")
    if entry.ByteSize() > MAX_ENTRY_BYTES:
        return "entry", f"must be at most {MAX_ENTRY_BYTES} bytes serialized"
    return None


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


def outcome_for(code: grpc.StatusCode | None, reason: str) -> ledger_pb2.AuditOutcome:
    if code in (None, grpc.StatusCode.OK):
        return SUCCESS
    if code in _DENIED_CODES or reason in _DENIED_REASONS:
        return DENIED
    return FAILED


def build_entry(*, service: str, action: str, tenant_id: str, key_id: str, outcome: ledger_pb2.AuditOutcome,
                request_id: str,
                resource: str = "", digest: bytes = b"", details: dict[str, str] | None = None
                ) -> ledger_pb2.AuditEntry:
    """An entry with every field bounded (:data:`LIMITS`): what a request carried can never make it
    too large for the ledger."""
    span = trace.get_current_span().get_span_context()
    key_id = bounded(key_id, LIMITS["key_id"])
    kept = dict(list((details or {}).items())[:MAX_DETAILS])
    entry = ledger_pb2.AuditEntry(
        entry_id=uuid.uuid4().hex, tenant_id=bounded(tenant_id, LIMITS["tenant_id"]),
        actor=f"key:{key_id}" if key_id else "anonymous", key_id=key_id,
        service=bounded(service, LIMITS["service"]), action=bounded(action, LIMITS["action"]),
        resource_id=bounded(resource, LIMITS["resource_id"]), outcome=outcome,
        request_id=bounded(request_id, LIMITS["request_id"]),
        trace_id=format(span.trace_id, "032x") if span.trace_id else "", request_digest=digest[:MAX_DIGEST_BYTES],
        details={bounded(k, MAX_DETAIL_KEY): bounded(v, MAX_DETAIL_VALUE) for k, v in kept.items()})
    entry.time.FromNanoseconds(time.time_ns())
    return entry


def refused_entry(payload: bytes, code: str, message: str) -> ledger_pb2.AuditEntry:
    """The bounded stand-in for an outbox entry the ledger refused for good (``payload``: its bytes).

    It keeps the original's id (the ledger never accepted it, so the id is free; a payload without a
    usable id gets one derived from its digest, stable across retries), time, service, tenant, key,
    request and outcome, bounded, and says in ``details`` what was refused and why."""
    digest = hashlib.sha256(payload).hexdigest()
    try:
        original = ledger_pb2.AuditEntry.FromString(payload)
    except Exception:  # noqa: BLE001 - a payload that does not even parse is still accounted for
        original = ledger_pb2.AuditEntry()
    entry_id = original.entry_id if 0 < len(original.entry_id) <= LIMITS["entry_id"] else "refused-" + digest[:32]
    entry = ledger_pb2.AuditEntry(
        entry_id=entry_id, tenant_id=bounded(original.tenant_id, LIMITS["tenant_id"]),
        actor=bounded(original.actor, LIMITS["actor"]), key_id=bounded(original.key_id, LIMITS["key_id"]),
        service=bounded(original.service, LIMITS["service"]) or "audit", action=REFUSED_ACTION,
        resource_id=bounded(original.resource_id, LIMITS["resource_id"]), outcome=original.outcome,
        request_id=bounded(original.request_id, LIMITS["request_id"]),
        trace_id=original.trace_id if len(original.trace_id) <= LIMITS["trace_id"] else "",
        request_digest=original.request_digest[:MAX_DIGEST_BYTES],
        details={"original_action": bounded(original.action, MAX_DETAIL_VALUE), "original_sha256": digest,
                 "original_bytes": str(len(payload)), "refused_code": code,
                 "refused_message": bounded(message, MAX_DETAIL_VALUE)})
    if original.HasField("time"):
        entry.time.CopyFrom(original.time)
    else:
        entry.time.FromNanoseconds(time.time_ns())
    return entry


def _minimal_refused_entry(payload: bytes, code: str) -> ledger_pb2.AuditEntry:
    """The last resort when even the stand-in was refused: no field copied from the original."""
    digest = hashlib.sha256(payload).hexdigest()
    entry = ledger_pb2.AuditEntry(entry_id="refused-" + digest[:32], actor="service:audit", service="audit",
                                  action=REFUSED_ACTION, details={"original_sha256": digest, "refused_code": code,
                                                                  "original_bytes": str(len(payload))})
    entry.time.FromNanoseconds(time.time_ns())
    return entry


def audit_digest(request: Any) -> bytes:
    if hasattr(request, "SerializeToString"):
        return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    return b""


def _permanent(err: grpc.RpcError) -> bool:
    """Whether the ledger (or the channel) will refuse the same request again, whatever the wait."""
    code = err.code()
    if code not in PERMANENT_CODES:
        return False
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a rate limit or quota passes; a too-large message does not
        from .errors import call_status, reason_metadata

        status = call_status(err)
        reason = reason_metadata(status)[0] if status is not None else None
        return reason not in ("RATE_LIMITED", "QUOTA_EXCEEDED")
    return True


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
        """Send the oldest waiting entries; returns how many the ledger acknowledged.

        An entry past the bounds is replaced before it is sent; when the ledger refuses a batch for good,
        its entries go one by one and each refused one is replaced (:func:`refused_entry`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.c.seq, outbox.c.payload).order_by(outbox.c.seq)
                                .limit(self.batch)).all()
        if not rows:
            return 0
        key = self._service_key()
        if not key:
            raise RuntimeError("no service API key (TENSAFE_SERVICE_API_KEY or <data dir>/service_key)")
        batch: list[tuple[int, ledger_pb2.AuditEntry]] = []
        size = 0
        for seq, payload in rows:
            if batch and size + len(payload) > MAX_BATCH_BYTES:
                break
            entry = self._parse_or_replace(seq, payload)
            batch.append((seq, entry))
            size += entry.ByteSize()
        try:
            self._append([e for _, e in batch], key)
        except grpc.RpcError as err:
            if not _permanent(err):
                raise
            log.warning("the ledger refused a batch of %d audit entries (%s: %s); delivering them one by one",
                        len(batch), err.code().name, err.details())
            for seq, entry in batch:
                self._deliver_alone(seq, entry, key)
            return len(batch)
        with self.engine.begin() as conn:
            conn.execute(outbox.delete().where(outbox.c.seq <= batch[-1][0]))
        return len(batch)

    def _append(self, entries: list[ledger_pb2.AuditEntry], key: str) -> None:
        ledger_pb2_grpc.LedgerServiceStub(self._channel()).AppendEntries(
            ledger_pb2.AppendEntriesRequest(entries=entries), timeout=5,
            metadata=(("authorization", f"Bearer {key}"),))

    def _parse_or_replace(self, seq: int, payload: bytes) -> ledger_pb2.AuditEntry:
        """The entry stored at ``seq``, or its stand-in when it does not parse or is past the bounds."""
        try:
            entry = ledger_pb2.AuditEntry.FromString(payload)
            problem = entry_problem(entry)
        except Exception:  # noqa: BLE001 - an unreadable payload is replaced like a refused one
            problem = ("entry", "does not parse as an AuditEntry")
        else:
            if problem is None:
                return entry
        return self._replace(seq, payload, "INVALID_ARGUMENT", f"{problem[0]}: {problem[1]} (refused before sending)")

    def _replace(self, seq: int, payload: bytes, code: str, message: str,
                 minimal: bool = False) -> ledger_pb2.AuditEntry:
        """Swap the outbox row's entry for its bounded stand-in (durably, so a restart sends the stand-in)."""
        entry = _minimal_refused_entry(payload, code) if minimal else refused_entry(payload, code, message)
        with self.engine.begin() as conn:
            conn.execute(outbox.update().where(outbox.c.seq == seq).values(payload=entry.SerializeToString()))
        log.error("audit entry %s (%d bytes, sha256 %s) refused (%s: %s); replaced by %s", entry.entry_id,
                  len(payload), hashlib.sha256(payload).hexdigest()[:16], code, bounded(message, 200), REFUSED_ACTION)
        return entry

    def _deliver_alone(self, seq: int, entry: ledger_pb2.AuditEntry, key: str) -> None:
        original = entry.SerializeToString()
        for attempt in ("original", "stand-in", "minimal"):
            try:
                self._append([entry], key)
                break
            except grpc.RpcError as err:
                if not _permanent(err) or attempt == "minimal":
                    raise
                entry = self._replace(seq, original, err.code().name, err.details() or "",
                                      minimal=attempt == "stand-in")
        with self.engine.begin() as conn:
            conn.execute(outbox.delete().where(outbox.c.seq == seq))

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
            except Exception:  # delivery retries; entries stay in the outbox
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.exception("audit delivery failed; entries stay in the outbox")
