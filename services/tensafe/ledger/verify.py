"""`tensafe ledger verify`: recompute the log from its entries and check every signed checkpoint.

Reads the ledger's database directly (an auditor's copy will do) and trusts nothing in it:
each leaf hash is recomputed from the stored entry bytes, the tree from those leaves, and
each checkpoint's signature and root are checked against them. Since every checkpoint is
checked against the same recomputed tree, they are also consistent with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from tg_tinker.transparency import CompactRange, NoteVerifier, VerificationError, leaf_hash, open_checkpoint

from .store import LedgerStore


@dataclass
class VerifyReport:
    entries: int
    checkpoints: int
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_log(engine: Engine, verifier: NoteVerifier, origin: str) -> VerifyReport:
    store = LedgerStore(engine)
    notes = {c.tree_size: (c.root_hash, c.note) for c in store.list_checkpoints(0, None)}
    tree = CompactRange()
    count = 0
    good_size = 0
    for idx, entry_id, entry, stored_hash in store.all_leaves():
        if idx != count:
            return VerifyReport(count, 0, f"entry index {count} is missing (next stored index is {idx})")
        if leaf_hash(entry) != stored_hash:
            return VerifyReport(count, 0, f"entry {idx} ({entry_id}): its bytes do not match its leaf hash")
        tree.append(stored_hash)
        count += 1
        if count in notes:
            problem = _check_checkpoint(count, tree.root(), notes[count], verifier, origin)
            if problem:
                return VerifyReport(count, 0, f"{problem}; the first altered entry is among indices "
                                              f"{good_size}..{count - 1}")
            good_size = count
    beyond = sorted(size for size in notes if size > count)
    if beyond:
        return VerifyReport(count, 0, f"checkpoint of size {beyond[0]} is signed but the log has only {count} "
                                      "entries (entries were removed)")
    return VerifyReport(count, len(notes))


def _check_checkpoint(size: int, root: bytes, stored: tuple[bytes, str], verifier: NoteVerifier,
                      origin: str) -> str | None:
    stored_root, note = stored
    try:
        checkpoint = open_checkpoint(note, [verifier], origin=origin)
    except VerificationError as exc:
        return f"checkpoint of size {size}: {exc.message}"
    if checkpoint.size != size or checkpoint.root != stored_root:
        return f"checkpoint of size {size}: the signed note does not match its database row"
    if checkpoint.root != root:
        return f"checkpoint of size {size}: the entries no longer hash to its signed root"
    return None
