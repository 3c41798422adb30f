"""Apply a retried state-changing call once.

A client sends ``x-idempotency-key`` with every call that changes state. The
first call with a key claims it (a row in state ``running``), runs, and stores
its response or its final error. A retry with the same key and the same request
gets the stored answer without running again; a retry while the first is still
running waits for it; the same key with a different request is refused.
Transient failures (UNAVAILABLE, INTERNAL, ...) release the key so that a
retry runs again. Records are scoped to the caller's tenant.

A process that dies mid-call (kill -9, a crash, a lost node) cannot release its keys, so each
running record names the process's *epoch* (a random id per start), and each epoch heartbeats in
``idempotency_epochs``. A process restarted on the same address (the same *instance*: host, bound
address, service) releases its previous epochs' running keys as it starts; keys of another
process (a replica sharing the database) are released once its heartbeat is older than
``TENSAFE_IDEMPOTENCY_LEASE_SECONDS``, by whichever process next meets them. The retry then runs
again; work that must be counted once across such a retry is made idempotent by the service
itself (the accountant records a DP step once per step id). A process whose key was released
cannot overwrite the retry's outcome: completing or releasing needs its own epoch on the row.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
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
    sa.Column("epoch", sa.String(64), nullable=True),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_idempotency_created", records.c.created_at)
sa.Index("ix_idempotency_epoch", records.c.epoch)
epochs = sa.Table(
    "idempotency_epochs",
    _metadata,
    sa.Column("epoch", sa.String(64), primary_key=True),
    sa.Column("instance", sa.String(256), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_idempotency_epochs_instance", epochs.c.instance)
log = logging.getLogger("tensafe.idempotency")

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
    def __init__(self, engine: Engine, wait_seconds: float = 60.0, ttl_seconds: float = 86400.0, *,
                 instance: str = "", lease_seconds: float = 30.0) -> None:
        self.engine = engine
        self.wait_seconds = wait_seconds
        self.ttl_seconds = ttl_seconds
        self.instance = instance[:256]
        self.lease_seconds = lease_seconds
        self.epoch = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(epochs.insert().values(epoch=self.epoch, instance=self.instance, started_at=now,
                                                heartbeat_at=now))
        released = self.release_abandoned(same_instance=True)
        if released:
            log.warning("released %d idempotency keys held by calls of a previous run that never finished",
                        released)

    # -- epochs ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Heartbeat this process's epoch (every third of the lease) until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="idempotency-heartbeat", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop heartbeating and give up the epoch: keys still held are released for retries."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            with self.engine.begin() as conn:
                conn.execute(records.delete().where(sa.and_(records.c.epoch == self.epoch,
                                                            records.c.state == "running")))
                conn.execute(epochs.delete().where(epochs.c.epoch == self.epoch))
        except Exception:  # stopping goes on; the lease releases them later
            log.exception("could not release this process's idempotency keys")

    def _beat(self) -> None:
        while not self._stop.wait(max(self.lease_seconds / 3, 0.2)):
            try:
                with self.engine.begin() as conn:
                    conn.execute(epochs.update().where(epochs.c.epoch == self.epoch)
                                 .values(heartbeat_at=time.time()))
                self.release_abandoned()
            except Exception:  # the next beat tries again
                log.exception("idempotency heartbeat failed")

    def release_abandoned(self, same_instance: bool = False) -> int:
        """Release running keys of epochs that are gone: stale heartbeats (and, with ``same_instance``,
        every other epoch of this instance: a restart). Returns how many keys were released."""
        now = time.time()
        stale = epochs.c.heartbeat_at < now - self.lease_seconds
        if same_instance and self.instance:
            stale = sa.or_(stale, epochs.c.instance == self.instance)
        with self.engine.begin() as conn:
            gone = [r.epoch for r in conn.execute(sa.select(epochs.c.epoch).where(
                sa.and_(stale, epochs.c.epoch != self.epoch)))]
            running = records.c.state == "running"
            # Rows written before epochs existed, or by an epoch whose row is already gone.
            orphaned = sa.and_(running, records.c.created_at < now - self.lease_seconds, sa.or_(
                records.c.epoch.is_(None), ~records.c.epoch.in_(sa.select(epochs.c.epoch))))
            released = conn.execute(records.delete().where(orphaned)).rowcount or 0
            if gone:
                released += conn.execute(records.delete().where(sa.and_(running, records.c.epoch.in_(gone))))\
                    .rowcount or 0
                conn.execute(epochs.delete().where(epochs.c.epoch.in_(gone)))
        return released

    def _holder_alive(self, epoch: str | None) -> bool:
        if epoch == self.epoch:
            return True
        if epoch is None:
            return True  # an old row: released by the sweep once older than the lease
        with self.engine.connect() as conn:
            beat = conn.execute(sa.select(epochs.c.heartbeat_at).where(epochs.c.epoch == epoch)).scalar()
        return beat is not None and beat >= time.time() - self.lease_seconds

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
                        state="running", status_code=None, response=None, created_at=time.time(),
                        epoch=self.epoch))
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
            if not self._holder_alive(row.epoch):  # its process is gone: the call will never finish there
                with self.engine.begin() as conn:
                    conn.execute(records.delete().where(sa.and_(where, records.c.state == "running",
                                                                records.c.epoch == row.epoch)))
                log.warning("released idempotency key %r of %s: the process running it is gone", key, method)
                continue
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"a call with idempotency key {key!r} is still running",
                                         reason="FAILED_PRECONDITION")
            time.sleep(0.05)

    def complete(self, tenant: str, method: str, key: str, outcome: StoredOutcome) -> None:
        with self.engine.begin() as conn:
            conn.execute(records.update().where(sa.and_(
                records.c.tenant_id == tenant, records.c.method == method, records.c.idempotency_key == key,
                records.c.epoch == self.epoch,
            )).values(state="done", status_code=outcome.status_code, response=outcome.payload))

    def release(self, tenant: str, method: str, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(records.delete().where(sa.and_(
                records.c.tenant_id == tenant, records.c.method == method, records.c.idempotency_key == key,
                records.c.epoch == self.epoch)))

    def purge_expired(self) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(records.delete().where(records.c.created_at < time.time() - self.ttl_seconds))
            return res.rowcount or 0
