"""Durable ledger appends per second (SQLite and PostgreSQL) and proof verifications per second.

Appends: 16 threads each append single entries as fast as the log acknowledges them (the
log group-commits whoever is waiting); every acknowledgement means the entries, their
Merkle nodes and a signed checkpoint are committed (SQLite: synchronous=FULL). Anchor:
inserting the same leaf rows with the same commit pattern and no Merkle tree or signature.
Verifications: verify_inclusion of 20-node proofs (a 1,000,000-leaf log) against the 21
SHA-256 calls they cost, done directly with hashlib.

    python bench/bench_ledger.py [--seconds 5] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import tempfile
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.ledger.service import MerkleLog, canonical_entry
from tensafe.ledger.store import LedgerStore, leaves
from tensafe.runtime.db import RUNTIME_VERSIONS, create_engine, migrate
from tg_tinker.transparency import NoteSigner, inclusion_proof, leaf_hash, node_hash, verify_inclusion

LEDGER_VERSIONS = Path(__file__).resolve().parent.parent / "services" / "tensafe" / "ledger" / "migrations"


def entry() -> ledger_pb2.AuditEntry:
    e = ledger_pb2.AuditEntry(entry_id=uuid.uuid4().hex, tenant_id="bench", service="vault",
                              action="vault.PutArtifact", resource_id="art_" + secrets.token_hex(12),
                              request_id=uuid.uuid4().hex, request_digest=os.urandom(32))
    e.time.FromNanoseconds(time.time_ns())
    return e


def run_threads(seconds: float, threads: int, work) -> int:
    done = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            work()
            done[i] += 1

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done)


def bench_appends(name: str, url: str, schema: str | None, seconds: float, threads: int) -> None:
    sync = "FULL"
    engine = create_engine(url, schema=schema, sqlite_synchronous=sync)
    migrate(engine, [RUNTIME_VERSIONS, LEDGER_VERSIONS], version_table="alembic_version_ledger")
    log = MerkleLog(LedgerStore(engine), NoteSigner.generate("bench/ledger"), "bench/ledger")
    n = run_threads(seconds, threads, lambda: log.append([entry()]))
    log.close()
    # Anchor: the same rows, committed the way the log commits them (one transaction per group), no tree.
    lock = threading.Lock()
    pending: list[dict] = []

    def plain() -> None:
        e = entry()
        data = canonical_entry(e)
        row = dict(idx=None, entry_id=e.entry_id, tenant_id=e.tenant_id, time=time.time(), service=e.service,
                   action=e.action, resource_id=e.resource_id, entry=data, leaf_hash=leaf_hash(data))
        with lock:  # one writer, like the log's committer, taking every row waiting
            pending.append(row)
            batch = pending[:]
            pending.clear()
            if not batch:
                return
            with engine.begin() as conn:
                start = conn.execute(sa.select(sa.func.max(leaves.c.idx))).scalar_one()
                start = 0 if start is None else start + 1
                for k, r in enumerate(batch):
                    r["idx"] = start + k
                conn.execute(leaves.insert(), batch)

    m = run_threads(seconds, threads, plain)
    engine.dispose()
    print(f"{name}: {n / seconds:8.0f} durable appends/s through the log ({threads} writers, group commit); "
          f"plain inserts {m / seconds:8.0f}/s; ratio {n / max(m, 1):.2f}")


def bench_verify(seconds: float) -> None:
    size, index = 1_000_000, 123_457
    leaves_h = {}

    def get(level: int, idx: int) -> bytes:  # a synthetic tree: any consistent hashes will do
        key = (level, idx)
        if key not in leaves_h:
            leaves_h[key] = hashlib.sha256(f"{level}/{idx}".encode()).digest() if level == 0 else \
                node_hash(get(level - 1, 2 * idx), get(level - 1, 2 * idx + 1))
        return leaves_h[key]

    from tg_tinker.transparency import tree_root

    proof = inclusion_proof(index, size, get)
    root, leaf = tree_root(size, get), get(0, index)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        verify_inclusion(leaf, index, size, proof, root)
        count += 1
    rate = count / (time.perf_counter() - start)
    count, start = 0, time.perf_counter()
    data = b"\x01" + bytes(64)
    while time.perf_counter() - start < seconds:
        for _ in range(len(proof) + 1):
            hashlib.sha256(data).digest()
        count += 1
    anchor = count / (time.perf_counter() - start)
    print(f"verify_inclusion ({len(proof)}-node proofs): {rate:8.0f}/s; the same {len(proof) + 1} SHA-256 calls "
          f"alone {anchor:8.0f}/s; ratio {rate / anchor:.2f} (target >= 2,000/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--pg", default=os.environ.get("TENSAFE_TEST_PG_URL",
                                                       "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_appends("SQLite", f"sqlite:///{tmp}/ledger.db", None, args.seconds, args.threads)
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        bench_appends("PostgreSQL", args.pg, schema, args.seconds, args.threads)
    except OperationalError as exc:
        print(f"PostgreSQL: skipped ({str(exc).splitlines()[0]})")
    finally:
        try:
            engine = sa.create_engine(args.pg)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
        except OperationalError:
            pass
    bench_verify(args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
