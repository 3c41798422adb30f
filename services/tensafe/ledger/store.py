"""The ledger's SQL records: the leaves (canonical entries), the perfect subtree hashes and the signed
checkpoints.

All three tables are append-only in the database itself (triggers created by the migration refuse
UPDATE and DELETE), so nothing here ever rewrites a row. One commit (:meth:`LedgerStore.commit`)
writes a batch of leaves, the nodes they complete and the checkpoint over them, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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

NodeGetter = Callable[[int, int], bytes]


@dataclass(frozen=True)
class LeafRecord:
    idx: int
    entry_id: str
    tenant_id: str
    time: float
    service: str
    action: str
    resource_id: str
    entry: bytes       # the canonical entry bytes the leaf commits to
    leaf_hash: bytes


@dataclass(frozen=True)
class CheckpointRecord:
    tree_size: int
    root_hash: bytes
    note: str          # the signed note
    created_at: float


def _node(conn: Connection, level: int, index: int) -> bytes:
    row = conn.execute(sa.select(nodes.c.hash).where(sa.and_(nodes.c.level == level, nodes.c.idx == index))).first()
    if row is None:
        raise KeyError(f"missing Merkle node ({level}, {index})")
    return row.hash


def _size(conn: Connection) -> int:
    last = conn.execute(sa.select(sa.func.max(leaves.c.idx))).scalar_one()
    return 0 if last is None else int(last) + 1


class LedgerStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writes ------------------------------------------------------------------------------------
    def commit(self, rows: list[LeafRecord], new_nodes: dict[tuple[int, int], bytes],
               checkpoint: CheckpointRecord) -> None:
        """One transaction: the leaves, the perfect subtree hashes they complete and the checkpoint over
        them. An IntegrityError (a leaf index, entry id, node or tree size already stored) writes nothing."""
        with self.engine.begin() as conn:
            conn.execute(leaves.insert(), [r.__dict__ for r in rows])
            if new_nodes:
                conn.execute(nodes.insert(), [dict(level=lv, idx=ix, hash=h) for (lv, ix), h in new_nodes.items()])
            conn.execute(checkpoints.insert().values(**checkpoint.__dict__))

    # -- reads -------------------------------------------------------------------------------------
    def size(self) -> int:
        """The number of leaves (the next leaf's index)."""
        with self.engine.connect() as conn:
            return _size(conn)

    def indices(self, entry_ids: Iterable[str]) -> dict[str, int]:
        """entry id -> leaf index, for the ids already in the log."""
        ids = list(set(entry_ids))
        if not ids:
            return {}
        with self.engine.connect() as conn:
            return {e: int(i) for e, i in conn.execute(sa.select(leaves.c.entry_id, leaves.c.idx)
                                                        .where(leaves.c.entry_id.in_(ids)))}

    def node(self, level: int, index: int) -> bytes:
        """One perfect subtree hash; KeyError when it is not stored."""
        with self.engine.connect() as conn:
            return _node(conn, level, index)

    @contextmanager
    def reading(self) -> Iterator[tuple[int, NodeGetter]]:
        """(the log size, a node getter) read on one connection, for a proof computed against that size."""
        with self.engine.connect() as conn:
            yield _size(conn), lambda level, index: _node(conn, level, index)

    def leaf(self, index: int) -> tuple[str, bytes] | None:
        """(tenant id, leaf hash) of the leaf at ``index``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leaves.c.tenant_id, leaves.c.leaf_hash).where(leaves.c.idx == index)).first()
        return (row.tenant_id, row.leaf_hash) if row else None

    def entries(self, tenant_id: str | None, *, start: float | None = None, end: float | None = None,
                action: str = "", resource_id: str = "", service: str = "", after_index: int = -1,
                limit: int = 100) -> list[tuple[int, bytes, bytes]]:
        """(index, canonical entry, leaf hash), ascending; ``tenant_id`` None means every tenant."""
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

    def all_leaves(self) -> Iterator[tuple[int, str, bytes, bytes]]:
        """(index, entry id, canonical entry, leaf hash) of every leaf, ascending, streamed."""
        with self.engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=5000).execute(
                sa.select(leaves.c.idx, leaves.c.entry_id, leaves.c.entry, leaves.c.leaf_hash)
                .order_by(leaves.c.idx))
            for r in rows:
                yield r.idx, r.entry_id, r.entry, r.leaf_hash

    def latest_checkpoint(self) -> CheckpointRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints).order_by(checkpoints.c.tree_size.desc()).limit(1)).first()
        return CheckpointRecord(**row._mapping) if row else None

    def checkpoint(self, size: int) -> CheckpointRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints).where(checkpoints.c.tree_size == size)).first()
        return CheckpointRecord(**row._mapping) if row else None

    def list_checkpoints(self, after: int, limit: int | None) -> list[CheckpointRecord]:
        """Checkpoints of tree size > ``after``, ascending; every one when ``limit`` is None."""
        q = sa.select(checkpoints).where(checkpoints.c.tree_size > after).order_by(checkpoints.c.tree_size)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [CheckpointRecord(**r._mapping) for r in conn.execute(q)]
