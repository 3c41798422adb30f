"""The ledger's logic: an append-only Merkle log (RFC 9162 hashing) with signed checkpoints.

Appends from concurrent calls are committed together (group commit): one transaction
holds every waiting batch, its leaves, the perfect subtree hashes they complete and a
new signed checkpoint, and no call is acknowledged before that transaction is durable.
Leaves, nodes and checkpoints are append-only in the database itself (triggers), so
two checkpoints signed by this log are always consistent with each other.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.audit import entry_problem
from tensafe.runtime.errors import InvalidArgument, NotFound
from tensafe.runtime.ids import bounded
from tg_tinker.transparency import (
    CompactRange,
    NoteSigner,
    consistency_proof,
    format_checkpoint,
    inclusion_proof,
    leaf_hash,
    sign_note,
)

metadata = sa.MetaData()
leaves = sa.Table(
    "ledger_leaves", metadata,
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("entry_id", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("service", sa.String(32), nullable=False),
    sa.Column("action", sa.String(128), nullable=False),
    sa.Column("resource_id", sa.String(128), nullable=False),
    sa.Column("entry", sa.LargeBinary, nullable=False),
    sa.Column("leaf_hash", sa.LargeBinary, nullable=False),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_ledger_leaves_tenant", leaves.c.tenant_id, leaves.c.idx)
nodes = sa.Table(
    "ledger_nodes", metadata,
    sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
)
checkpoints = sa.Table(
    "ledger_checkpoints", metadata,
    sa.Column("tree_size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root_hash", sa.LargeBinary, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

MAX_BATCH = 2000


def canonical_entry(entry: ledger_pb2.AuditEntry) -> bytes:
    """The bytes a leaf commits to: deterministic protobuf encoding of the AuditEntry (docs/ledger.md)."""
    return entry.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Appended:
    entry_id: str
    index: int
    duplicate: bool


class NodeReader:
    """Perfect subtree hashes: the ones written in this transaction first, then the database."""

    def __init__(self, conn: Connection, fresh: dict[tuple[int, int], bytes] | None = None) -> None:
        self.conn = conn
        self.fresh = fresh if fresh is not None else {}

    def __call__(self, level: int, index: int) -> bytes:
        found = self.fresh.get((level, index))
        if found is not None:
            return found
        row = self.conn.execute(sa.select(nodes.c.hash).where(sa.and_(nodes.c.level == level,
                                                                      nodes.c.idx == index))).first()
        if row is None:
            raise KeyError(f"missing Merkle node ({level}, {index})")
        return row.hash


class MerkleLog:
    def __init__(self, engine: Engine, signers: NoteSigner | list[NoteSigner], origin: str) -> None:
        self.engine = engine
        self.signers = signers if isinstance(signers, list) else [signers]
        self.origin = origin
        with engine.connect() as conn:  # the right edge of the tree, kept in memory by the single writer
            self._range = CompactRange.from_store(self._size(conn), NodeReader(conn))
        self._queue: queue.Queue[tuple[list[ledger_pb2.AuditEntry], Future] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._commit_loop, name="ledger-append", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(10)

    # -- appends -------------------------------------------------------------------------------
    def append(self, entries: list[ledger_pb2.AuditEntry], timeout: float = 60) -> tuple[list[Appended], int]:
        if len(entries) > MAX_BATCH:
            raise InvalidArgument("entries", f"at most {MAX_BATCH} entries per call")
        for i, e in enumerate(entries):
            problem = entry_problem(e)  # the bounds every entry keeps (runtime.audit.LIMITS)
            if problem is not None:
                raise InvalidArgument(f"entries[{i}].{problem[0]}", problem[1], entry_id=bounded(e.entry_id, 64))
        if not entries:
            return [], self.size()
        done: Future = Future()
        self._queue.put((list(entries), done))
        return done.result(timeout)

    def _commit_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            count = len(item[0])
            while count < MAX_BATCH:  # whoever is waiting now joins this commit
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                count += len(nxt[0])
            try:
                results = self._commit([entries for entries, _ in batch])
                for (_, fut), result in zip(batch, results, strict=True):
                    fut.set_result(result)
            except Exception as exc:  # noqa: BLE001 - every waiting caller learns of the failure
                for _, fut in batch:
                    fut.set_exception(exc)

    def _commit(self, batches: list[list[ledger_pb2.AuditEntry]]) -> list[tuple[list[Appended], int]]:
        with self.engine.begin() as conn:
            tree = self._range.copy()
            size = tree.size
            ids = {e.entry_id for batch in batches for e in batch}
            existing = dict(conn.execute(sa.select(leaves.c.entry_id, leaves.c.idx)
                                         .where(leaves.c.entry_id.in_(ids))).all()) if ids else {}
            fresh: dict[tuple[int, int], bytes] = {}
            rows, out = [], []
            for batch in batches:
                appended = []
                for entry in batch:
                    if entry.entry_id in existing:  # delivered before: exactly once
                        appended.append(Appended(entry.entry_id, int(existing[entry.entry_id]), True))
                        continue
                    data = canonical_entry(entry)
                    h = leaf_hash(data)
                    rows.append(dict(idx=size, entry_id=entry.entry_id, tenant_id=entry.tenant_id,
                                     time=entry.time.ToNanoseconds() / 1e9 if entry.HasField("time") else time.time(),
                                     service=entry.service, action=entry.action, resource_id=entry.resource_id,
                                     entry=data, leaf_hash=h))
                    for level, index, node in tree.append(h):
                        fresh[(level, index)] = node
                    existing[entry.entry_id] = size
                    appended.append(Appended(entry.entry_id, size, False))
                    size += 1
                out.append(appended)
            if rows:
                conn.execute(leaves.insert(), rows)
                conn.execute(nodes.insert(), [dict(level=lv, idx=ix, hash=h) for (lv, ix), h in fresh.items()])
                root = tree.root()
                note = sign_note(format_checkpoint(self.origin, size, root), self.signers)
                conn.execute(checkpoints.insert().values(tree_size=size, root_hash=root, note=note,
                                                         created_at=time.time()))
        self._range = tree  # committed: the new right edge is the log's
        return [(appended, size) for appended in out]

    # -- reads ---------------------------------------------------------------------------------
    def size(self) -> int:
        with self.engine.connect() as conn:
            return self._size(conn)

    @staticmethod
    def _size(conn: Connection) -> int:
        last = conn.execute(sa.select(sa.func.max(leaves.c.idx))).scalar_one()
        return 0 if last is None else int(last) + 1

    def latest_checkpoint(self) -> tuple[int, bytes, str, float]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints).order_by(checkpoints.c.tree_size.desc()).limit(1)).first()
        if row is None:
            raise NotFound("checkpoint", "latest")
        return row.tree_size, row.root_hash, row.note, row.created_at

    def checkpoint(self, size: int) -> tuple[int, bytes, str, float]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints).where(checkpoints.c.tree_size == size)).first()
        if row is None:
            raise NotFound("checkpoint", str(size))
        return row.tree_size, row.root_hash, row.note, row.created_at

    def list_checkpoints(self, after: int, limit: int) -> list[tuple[int, bytes, str, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(checkpoints).where(checkpoints.c.tree_size > after)
                                .order_by(checkpoints.c.tree_size).limit(limit))
            return [(r.tree_size, r.root_hash, r.note, r.created_at) for r in rows]

    def entries(self, tenant_id: str | None, *, start: float | None = None, end: float | None = None,
                action: str = "", resource_id: str = "", service: str = "", after_index: int = -1,
                limit: int = 100) -> list[tuple[int, bytes, bytes]]:
        """(index, canonical entry, leaf hash), ascending; ``tenant_id`` None means every tenant (verify)."""
        q = sa.select(leaves.c.idx, leaves.c.entry, leaves.c.leaf_hash).where(leaves.c.idx > after_index)
        if tenant_id is not None:
            q = q.where(leaves.c.tenant_id == tenant_id)
        if start is not None:
            q = q.where(leaves.c.time >= start)
        if end is not None:
            q = q.where(leaves.c.time < end)
        for column, value in ((leaves.c.action, action), (leaves.c.resource_id, resource_id),
                              (leaves.c.service, service)):
            if value:
                q = q.where(column == value)
        with self.engine.connect() as conn:
            return [(r.idx, r.entry, r.leaf_hash) for r in conn.execute(q.order_by(leaves.c.idx).limit(limit))]

    def inclusion(self, tenant_id: str, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """The leaf and its proof against the tree of ``size``; only for the caller's own entries."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leaves.c.tenant_id, leaves.c.leaf_hash).where(leaves.c.idx == index)).first()
            if row is None or row.tenant_id != tenant_id:
                raise NotFound("ledger entry", str(index))
            self._check_size(conn, size)
            if index >= size:
                raise InvalidArgument("tree_size", f"must be greater than the leaf index {index}")
            return row.leaf_hash, inclusion_proof(index, size, NodeReader(conn))

    def consistency(self, first: int, second: int) -> list[bytes]:
        if not 0 <= first <= second:
            raise InvalidArgument("first_tree_size", "must be between 0 and second_tree_size")
        with self.engine.connect() as conn:
            self._check_size(conn, second)
            return consistency_proof(first, second, NodeReader(conn))

    @staticmethod
    def _check_size(conn: Connection, size: int) -> None:
        current = MerkleLog._size(conn)
        if size <= 0 or size > current:
            raise InvalidArgument("tree_size", f"must be between 1 and the log size {current}")
