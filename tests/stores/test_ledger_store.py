"""LedgerStore below the stack: one class, run on SQLite and PostgreSQL (conftest.BACKENDS)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.ledger.store import CheckpointRecord, LeafRecord, LedgerStore, checkpoints, leaves, nodes
from tg_tinker.transparency import CompactRange, leaf_hash


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> LedgerStore:
    return LedgerStore(service_engine(request, "ledger", tmp_path))


def leaf(idx: int, tenant: str = "t1", *, action: str = "vault.PutArtifact", service: str = "vault",
         resource: str = "", time: float | None = None, entry_id: str | None = None) -> LeafRecord:
    data = f"entry {idx} of {tenant}".encode()
    return LeafRecord(idx=idx, entry_id=entry_id or f"e{idx}", tenant_id=tenant, time=float(idx) if time is None
                      else time, service=service, action=action, resource_id=resource or f"r{idx}", entry=data,
                      leaf_hash=leaf_hash(data))


def commit(store: LedgerStore, tree: CompactRange, rows: list[LeafRecord]) -> CheckpointRecord:
    fresh = {}
    for r in rows:
        for level, index, h in tree.append(r.leaf_hash):
            fresh[(level, index)] = h
    cp = CheckpointRecord(tree.size, tree.root(), f"note {tree.size}", 1000.0 + tree.size)
    store.commit(rows, fresh, cp)
    return cp


class TestLedgerStore:
    def test_an_empty_log(self, store: LedgerStore) -> None:
        assert store.size() == 0
        assert store.latest_checkpoint() is None and store.checkpoint(1) is None
        assert store.list_checkpoints(0, None) == []
        assert store.entries(None) == [] and list(store.all_leaves()) == []
        assert store.leaf(0) is None and store.indices(["e0"]) == {}
        with pytest.raises(KeyError):
            store.node(0, 0)

    def test_commit_round_trip(self, store: LedgerStore) -> None:
        tree = CompactRange()
        rows = [leaf(i) for i in range(5)]
        cp = commit(store, tree, rows)
        assert store.size() == 5
        assert store.latest_checkpoint() == cp == store.checkpoint(5)
        assert store.indices(["e0", "e3", "e3", "nope"]) == {"e0": 0, "e3": 3}
        assert store.leaf(2) == ("t1", rows[2].leaf_hash)
        assert list(store.all_leaves()) == [(r.idx, r.entry_id, r.entry, r.leaf_hash) for r in rows]
        # The nodes written let a fresh tree resume at the same root (what a restarted ledger does).
        with store.reading() as (size, node):
            assert size == 5
            assert CompactRange.from_store(size, node).root() == cp.root_hash
            assert node(0, 4) == rows[4].leaf_hash
        assert store.node(0, 1) == rows[1].leaf_hash

    def test_a_commit_is_all_or_nothing(self, store: LedgerStore) -> None:
        tree = CompactRange()
        commit(store, tree, [leaf(0), leaf(1)])
        # The second batch repeats an entry id: the unique constraint refuses it, and nothing of it stays.
        with pytest.raises(sa.exc.IntegrityError):
            commit(store, tree.copy(), [leaf(2), leaf(3, entry_id="e0")])
        assert store.size() == 2
        assert [c.tree_size for c in store.list_checkpoints(0, None)] == [2]
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(nodes).where(nodes.c.idx >= 2)
                                .where(nodes.c.level == 0)).scalar_one() == 0
        # So does a leaf index already taken.
        with pytest.raises(sa.exc.IntegrityError):
            commit(store, tree.copy(), [leaf(1, entry_id="fresh")])
        assert store.size() == 2

    @pytest.mark.parametrize("table", [leaves, nodes, checkpoints])
    def test_the_database_refuses_rewrites(self, store: LedgerStore, table: sa.Table) -> None:
        commit(store, CompactRange(), [leaf(0), leaf(1)])
        column = next(c for c in table.c if isinstance(c.type, sa.LargeBinary))
        for statement in (table.update().values({column.name: b"x"}), table.delete()):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
                conn.execute(statement)
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() > 0
        assert store.latest_checkpoint().tree_size == 2

    def test_entries_filter_by_tenant_and_fields_in_index_order(self, store: LedgerStore) -> None:
        rows = [leaf(0, "t1", action="a.X"), leaf(1, "t2", action="a.X"), leaf(2, "t1", action="a.Y", service="he"),
                leaf(3, "t1", action="a.X", resource="art_1"), leaf(4, "t2"), leaf(5, "t1", action="a.X")]
        commit(store, CompactRange(), rows)
        idx = lambda found: [i for i, _, _ in found]  # noqa: E731
        assert idx(store.entries("t1")) == [0, 2, 3, 5]
        assert idx(store.entries("t2")) == [1, 4]
        assert idx(store.entries(None)) == [0, 1, 2, 3, 4, 5]
        assert idx(store.entries("t1", action="a.X")) == [0, 3, 5]
        assert idx(store.entries("t1", service="he")) == [2]
        assert idx(store.entries("t1", resource_id="art_1")) == [3]
        assert idx(store.entries("t1", start=2.0, end=5.0)) == [2, 3]
        assert store.entries("t3") == []
        assert store.entries("t1", limit=1) == [(0, rows[0].entry, rows[0].leaf_hash)]
        # Pages: after the last index seen.
        pages, after = [], -1
        while page := store.entries("t1", after_index=after, limit=3):
            pages.append(idx(page))
            after = page[-1][0]
        assert pages == [[0, 2, 3], [5]]

    def test_checkpoints_page_in_tree_size_order(self, store: LedgerStore) -> None:
        tree = CompactRange()
        made = [commit(store, tree, [leaf(i)]) for i in range(5)]
        assert store.list_checkpoints(0, None) == made
        assert [c.tree_size for c in store.list_checkpoints(0, 2)] == [1, 2]
        assert [c.tree_size for c in store.list_checkpoints(2, 2)] == [3, 4]
        assert [c.tree_size for c in store.list_checkpoints(4, 2)] == [5]
        assert store.latest_checkpoint() == made[-1]
        assert store.checkpoint(3) == made[2]
