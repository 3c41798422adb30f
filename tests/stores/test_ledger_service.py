"""The ledger's logic (service.MerkleLog) in-process over its real store, on SQLite and PostgreSQL:
appends with group commit, proofs that verify against signed checkpoints, and tampering found."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.ledger.service import MerkleLog, canonical_entry
from tensafe.ledger.store import LedgerStore
from tensafe.ledger.verify import verify_log
from tensafe.runtime.errors import InvalidArgument, NotFound
from tg_tinker.transparency import (
    NoteSigner,
    VerificationError,
    leaf_hash,
    open_checkpoint,
    verify_consistency,
    verify_inclusion,
)

ORIGIN = "tensafe.test/ledger"
SIGNER = NoteSigner.generate(ORIGIN)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> LedgerStore:
    return LedgerStore(service_engine(request, "ledger", tmp_path))


@pytest.fixture
def log(store: LedgerStore):
    log = MerkleLog(store, SIGNER, ORIGIN)
    yield log
    log.close()


def entry(entry_id: str, tenant: str = "t1", action: str = "vault.PutArtifact") -> ledger_pb2.AuditEntry:
    return ledger_pb2.AuditEntry(entry_id=entry_id, tenant_id=tenant, service="vault", action=action,
                                 resource_id=f"art_{entry_id}")


def signed_root(log: MerkleLog, size: int) -> bytes:
    checkpoint = open_checkpoint(log.checkpoint(size).note, [SIGNER.verifier()], origin=ORIGIN)
    assert checkpoint.size == size
    return checkpoint.root


class TestMerkleLog:
    def test_append_is_exactly_once_per_entry_id(self, log: MerkleLog) -> None:
        appended, size = log.append([entry("a"), entry("b"), entry("c")])
        assert [(a.entry_id, a.index, a.duplicate) for a in appended] == [("a", 0, False), ("b", 1, False),
                                                                          ("c", 2, False)]
        assert size == 3
        again, size = log.append([entry("b"), entry("d"), entry("d")])
        assert [(a.index, a.duplicate) for a in again] == [(1, True), (3, False), (3, True)]
        assert size == 4 == log.size()
        assert log.append([]) == ([], 4)
        # What is stored is the canonical entry, under the caller's tenant.
        [(index, data, h)] = log.entries("t1", after_index=2, limit=1)
        assert (index, data, h) == (3, canonical_entry(entry("d")), leaf_hash(canonical_entry(entry("d"))))

    def test_entries_past_the_bounds_are_refused_before_anything_is_written(self, log: MerkleLog) -> None:
        with pytest.raises(InvalidArgument, match="entries\\[1\\]"):
            log.append([entry("ok"), ledger_pb2.AuditEntry(entry_id="x", service="vault", action="")])
        with pytest.raises(InvalidArgument):
            log.append([entry(f"e{i}") for i in range(2001)])
        assert log.size() == 0

    def test_concurrent_appends_get_distinct_dense_indices(self, log: MerkleLog) -> None:
        threads, per_thread = 8, 25
        results: dict[str, tuple[int, int]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(threads)

        def run(t: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    [appended], size = log.append([entry(f"t{t}-{i}", tenant=f"tenant{t % 2}")])
                    assert not appended.duplicate and size > appended.index
                    results[appended.entry_id] = (appended.index, size)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert errors == []
        total = threads * per_thread
        assert sorted(index for index, _ in results.values()) == list(range(total))
        assert log.size() == total
        # Every acknowledged append is covered by a signed checkpoint, and each stored leaf is its own entry.
        for entry_id, (index, size) in results.items():
            assert log.checkpoint(size).tree_size == size
            [(found, data, _)] = log.entries(None, after_index=index - 1, limit=1)
            assert found == index and ledger_pb2.AuditEntry.FromString(data).entry_id == entry_id
        assert verify_log(log.store.engine, SIGNER.verifier(), ORIGIN).ok

    def test_inclusion_and_consistency_proofs_verify(self, log: MerkleLog) -> None:
        log.append([entry(f"a{i}", tenant="t1" if i % 3 else "t2") for i in range(7)])
        log.append([entry(f"b{i}") for i in range(6)])
        for size in (7, 13):
            root = signed_root(log, size)
            for index, _, h in log.entries("t1", limit=100):
                if index >= size:
                    continue
                leaf, proof = log.inclusion("t1", index, size)
                assert leaf == h
                verify_inclusion(leaf, index, size, proof, root)
                with pytest.raises(VerificationError):  # the proof is for that leaf only
                    verify_inclusion(leaf_hash(b"another entry"), index, size, proof, root)
        verify_consistency(7, 13, signed_root(log, 7), signed_root(log, 13), log.consistency(7, 13))
        with pytest.raises(VerificationError):
            verify_consistency(7, 13, signed_root(log, 13), signed_root(log, 13), log.consistency(7, 13))

    def test_proofs_are_for_the_callers_entries_and_real_sizes(self, log: MerkleLog) -> None:
        log.append([entry("a", tenant="t1"), entry("b", tenant="t2")])
        with pytest.raises(NotFound):
            log.inclusion("t2", 0, 2)  # t1's entry
        with pytest.raises(NotFound):
            log.inclusion("t1", 5, 2)
        for index, size in ((0, 3), (0, 0), (1, 1)):
            with pytest.raises(InvalidArgument):
                log.inclusion("t2" if index else "t1", index, size)
        with pytest.raises(InvalidArgument):
            log.consistency(2, 3)
        with pytest.raises(InvalidArgument):
            log.consistency(2, 1)
        with pytest.raises(NotFound):
            log.checkpoint(5)

    def test_a_restarted_log_continues_the_same_tree(self, store: LedgerStore, log: MerkleLog) -> None:
        log.append([entry(f"a{i}") for i in range(5)])
        first_root = signed_root(log, 5)
        log.close()
        again = MerkleLog(store, SIGNER, ORIGIN)
        try:
            assert again.append([entry("a2")])[0][0].duplicate  # its entry ids are known after a restart
            again.append([entry(f"b{i}") for i in range(4)])
            assert again.latest_checkpoint().tree_size == 9
            verify_consistency(5, 9, first_root, signed_root(again, 9), again.consistency(5, 9))
        finally:
            again.close()

    def test_an_edited_entry_is_found(self, store: LedgerStore, log: MerkleLog) -> None:
        log.append([entry(f"a{i}") for i in range(4)])
        log.append([entry(f"b{i}") for i in range(4)])
        report = verify_log(store.engine, SIGNER.verifier(), ORIGIN)
        assert (report.ok, report.entries, report.checkpoints) == (True, 8, 2)
        assert not verify_log(store.engine, NoteSigner.generate(ORIGIN).verifier(), ORIGIN).ok
        # Someone with the database drops the guard and rewrites entry 5 (bytes and leaf hash together).
        forged = canonical_entry(entry("b1", action="vault.ListArtifacts"))
        with store.engine.begin() as conn:
            if store.engine.dialect.name == "sqlite":
                conn.execute(sa.text("DROP TRIGGER ledger_leaves_no_update"))
            else:
                conn.execute(sa.text("DROP TRIGGER ledger_leaves_append_only ON ledger_leaves"))
            conn.execute(sa.text("UPDATE ledger_leaves SET entry = :e, leaf_hash = :h WHERE idx = 5"),
                         {"e": forged, "h": leaf_hash(forged)})
        report = verify_log(store.engine, SIGNER.verifier(), ORIGIN)
        assert not report.ok and "no longer hash to its signed root" in report.problem
        assert "among indices 4..7" in report.problem
        # The forged leaf does not verify against the signed root either.
        leaf, proof = log.inclusion("t1", 5, 8)
        assert leaf == leaf_hash(forged)
        with pytest.raises(VerificationError):
            verify_inclusion(leaf, 5, 8, proof, signed_root(log, 8))
        # Bytes edited without their leaf hash are named at once.
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE ledger_leaves SET entry = :e WHERE idx = 2"), {"e": b"edited"})
        report = verify_log(store.engine, SIGNER.verifier(), ORIGIN)
        assert not report.ok and report.problem.startswith("entry 2 (a2)")
