"""The ledger's logic: an append-only Merkle log (RFC 9162 hashing) with signed checkpoints.

Appends from concurrent calls are committed together (group commit): one transaction
holds every waiting batch, its leaves, the perfect subtree hashes they complete and a
new signed checkpoint, and no call is acknowledged before that transaction is durable.
Leaves, nodes and checkpoints are append-only in the database itself (triggers, see
store.py), so two checkpoints signed by this log are always consistent with each other.

An entry is a ``tensafe.api.ledger.v1.AuditEntry``: that message is the ledger's record format (a
leaf commits to its deterministic encoding, docs/ledger.md), so the logic takes it as it is.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.audit import entry_problem
from tensafe.runtime.config import ServerConfig
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

from .store import CheckpointRecord, LeafRecord, LedgerStore

MAX_BATCH = 2000


def canonical_entry(entry: ledger_pb2.AuditEntry) -> bytes:
    """The bytes a leaf commits to: deterministic protobuf encoding of the AuditEntry (docs/ledger.md)."""
    return entry.SerializeToString(deterministic=True)


def load_signers(config: ServerConfig) -> list[NoteSigner]:
    """Every configured signing key (TENSAFE_LEDGER_KEY_FILE may list several, comma-separated, to rotate
    keys: checkpoints carry one signature per key while clients move to the new verifier key)."""
    paths = [Path(p.strip()) for p in config.ledger_key_file.split(",") if p.strip()] or [config.ledger_key_path()]
    signers = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"ledger signing key {path} is missing: run `tensafe init` or set "
                                    "TENSAFE_LEDGER_KEY_FILE")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        signers.append(NoteSigner(config.ledger_origin, key))
    return signers


def load_signer(config: ServerConfig) -> NoteSigner:
    """The first (current) signing key."""
    return load_signers(config)[0]


@dataclass(frozen=True)
class Appended:
    entry_id: str
    index: int
    duplicate: bool


class MerkleLog:
    def __init__(self, store: LedgerStore, signers: NoteSigner | list[NoteSigner], origin: str) -> None:
        self.store = store
        self.signers = signers if isinstance(signers, list) else [signers]
        self.origin = origin
        with store.reading() as (size, node):  # the right edge of the tree, kept in memory by the single writer
            self._range = CompactRange.from_store(size, node)
        self._queue: queue.Queue[tuple[list[ledger_pb2.AuditEntry], Future] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._commit_loop, name="ledger-append", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(10)

    # -- appends -------------------------------------------------------------------------------
    def append(self, entries: list[ledger_pb2.AuditEntry], timeout: float = 60) -> tuple[list[Appended], int]:
        """Each entry's index (an entry id already in the log keeps its index: ``duplicate``) and the tree
        size after the commit that holds them; returns once that commit is durable."""
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
        """One commit of every waiting batch (this thread is the log's only writer)."""
        tree = self._range.copy()
        size = tree.size
        existing = self.store.indices(e.entry_id for batch in batches for e in batch)
        fresh: dict[tuple[int, int], bytes] = {}
        rows: list[LeafRecord] = []
        out = []
        for batch in batches:
            appended = []
            for entry in batch:
                if entry.entry_id in existing:  # delivered before: exactly once
                    appended.append(Appended(entry.entry_id, existing[entry.entry_id], True))
                    continue
                data = canonical_entry(entry)
                h = leaf_hash(data)
                rows.append(LeafRecord(
                    idx=size, entry_id=entry.entry_id, tenant_id=entry.tenant_id,
                    time=entry.time.ToNanoseconds() / 1e9 if entry.HasField("time") else time.time(),
                    service=entry.service, action=entry.action, resource_id=entry.resource_id, entry=data,
                    leaf_hash=h))
                for level, index, node in tree.append(h):
                    fresh[(level, index)] = node
                existing[entry.entry_id] = size
                appended.append(Appended(entry.entry_id, size, False))
                size += 1
            out.append(appended)
        if rows:
            root = tree.root()
            note = sign_note(format_checkpoint(self.origin, size, root), self.signers)
            self.store.commit(rows, fresh, CheckpointRecord(size, root, note, time.time()))
            self._range = tree  # committed: the new right edge is the log's
        return [(appended, size) for appended in out]

    # -- reads ---------------------------------------------------------------------------------
    def size(self) -> int:
        return self.store.size()

    def latest_checkpoint(self) -> CheckpointRecord:
        found = self.store.latest_checkpoint()
        if found is None:
            raise NotFound("checkpoint", "latest")
        return found

    def checkpoint(self, size: int) -> CheckpointRecord:
        found = self.store.checkpoint(size)
        if found is None:
            raise NotFound("checkpoint", str(size))
        return found

    def list_checkpoints(self, after: int, limit: int) -> list[CheckpointRecord]:
        return self.store.list_checkpoints(after, limit)

    def entries(self, tenant_id: str | None, *, start: float | None = None, end: float | None = None,
                action: str = "", resource_id: str = "", service: str = "", after_index: int = -1,
                limit: int = 100) -> list[tuple[int, bytes, bytes]]:
        """(index, canonical entry, leaf hash), ascending; ``tenant_id`` None means every tenant (verify)."""
        return self.store.entries(tenant_id, start=start, end=end, action=action, resource_id=resource_id,
                                  service=service, after_index=after_index, limit=limit)

    def inclusion(self, tenant_id: str, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """The leaf and its proof against the tree of ``size``; only for the caller's own entries."""
        leaf = self.store.leaf(index)
        if leaf is None or leaf[0] != tenant_id:
            raise NotFound("ledger entry", str(index))
        with self.store.reading() as (current, node):
            _check_size(size, current)
            if index >= size:
                raise InvalidArgument("tree_size", f"must be greater than the leaf index {index}")
            return leaf[1], inclusion_proof(index, size, node)

    def consistency(self, first: int, second: int) -> list[bytes]:
        if not 0 <= first <= second:
            raise InvalidArgument("first_tree_size", "must be between 0 and second_tree_size")
        with self.store.reading() as (current, node):
            _check_size(second, current)
            return consistency_proof(first, second, node)


def _check_size(size: int, current: int) -> None:
    if size <= 0 or size > current:
        raise InvalidArgument("tree_size", f"must be between 1 and the log size {current}")
