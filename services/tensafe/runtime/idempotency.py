"""Apply a retried state-changing call once.

A client sends ``x-idempotency-key`` with every call that changes state. The
first call with a key claims it (a row in state ``running``), runs, and stores
its response or its final error. A retry with the same key and the same request
gets the stored answer without running again; a retry while the first is still
running waits for it; the same key with a different request is refused.
Transient failures (UNAVAILABLE, INTERNAL, ...) release the key so that a
retry runs again. Records are scoped to the caller's tenant.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import grpc
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .errors import FailedPrecondition, InvalidArgument

_metadata = sa.MetaData()
records = sa.Table(
    "idempotency_records",
    _metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("method", sa.String(256), primary_key=True),
    sa.Column("idempotency_key", sa.String(128), primary_key=True),
    sa.Column("request_digest", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Codes after which a retry should run the call again rather than replay the failure.
TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED,
})


@dataclass(frozen=True)
class StoredOutcome:
    """What the first call answered: a serialized response (code OK) or a serialized google.rpc.Status."""

    status_code: int
    payload: bytes


def request_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class IdempotencyStore:
    def __init__(self, engine: Engine, wait_seconds: float = 60.0, ttl_seconds: float = 86400.0) -> None:
        self.engine = engine
        self.wait_seconds = wait_seconds
        self.ttl_seconds = ttl_seconds

    def claim(self, tenant: str, method: str, key: str, digest: str) -> StoredOutcome | None:
        """Claim the key; return None if this call should run, or the stored outcome to replay."""
        if not key or len(key) > 128:
            raise InvalidArgument("x-idempotency-key", "must be 1 to 128 characters")
        deadline = time.monotonic() + self.wait_seconds
        where = sa.and_(records.c.tenant_id == tenant, records.c.method == method,
                        records.c.idempotency_key == key)
        while True:
            try:
                with self.engine.begin() as conn:
                    conn.execute(records.insert().values(
                        tenant_id=tenant, method=method, idempotency_key=key, request_digest=digest,
                        state="running", status_code=None, response=None, created_at=time.time()))
                return None
            except IntegrityError:
                pass
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(records).where(where)).first()
            if row is None:  # released between our insert and read: try to claim again
                continue
            if row.request_digest != digest:
                raise InvalidArgument(
                    "x-idempotency-key", "was already used for a different request; use a new key per request")
            if row.state == "done":
                return StoredOutcome(row.status_code, row.response)
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"a call with idempotency key {key!r} is still running",
                                         reason="FAILED_PRECONDITION")
            time.sleep(0.05)

    def complete(self, tenant: str, method: str, key: str, outcome: StoredOutcome) -> None:
        with self.engine.begin() as conn:
            conn.execute(records.update().where(sa.and_(
                records.c.tenant_id == tenant, records.c.method == method, records.c.idempotency_key == key,
            )).values(state="done", status_code=outcome.status_code, response=outcome.payload))

    def release(self, tenant: str, method: str, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(records.delete().where(sa.and_(
                records.c.tenant_id == tenant, records.c.method == method, records.c.idempotency_key == key)))

    def purge_expired(self) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(records.delete().where(records.c.created_at < time.time() - self.ttl_seconds))
            return res.rowcount or 0
