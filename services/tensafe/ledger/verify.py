"""`tensafe ledger verify`: recompute the log from its entries and check every signed checkpoint.

Reads the ledger's database directly (an auditor's copy will do) and trusts nothing in it:
each leaf hash is recomputed from the stored entry bytes, the tree from those leaves, and
each checkpoint's signature and root are checked against them. Since every checkpoint is
checked against the same recomputed tree, they are also consistent with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from tg_tinker.transparency import CompactRange, NoteVerifier, VerificationError, leaf_hash, open_checkpoint

from .store import LedgerStore


@dataclass
class VerifyReport:
    entries: int
    checkpoints: int
    problem: str | None = None
    # Entries [0, verified) hash to a signed root that verifies: evidence. Past it: unverifiable (after a
    # problem) or not yet signed.
    verified: int = 0
    root_hash: bytes = b""  # the signed root of the tree of size ``verified``

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_log(engine: Engine, verifier: NoteVerifier, origin: str,
               on_leaf: Callable[[int, bytes, bytes], None] | None = None) -> VerifyReport:
    """``on_leaf(index, entry bytes, leaf hash)`` sees every leaf read, before it is checked (the caller keeps
    only those below the report's ``verified``)."""
    store = LedgerStore(engine)
    notes = {c.tree_size: (c.root_hash, c.note) for c in store.list_checkpoints(0, None)}
    tree = CompactRange()
    count = 0
    good_size, good_root = 0, b""
    for idx, entry_id, entry, stored_hash in store.all_leaves():
        if on_leaf is not None:
            on_leaf(idx, entry, stored_hash)
        if idx != count:
            return VerifyReport(count, 0, f"entry index {count} is missing (next stored index is {idx})",
                                good_size, good_root)
        if leaf_hash(entry) != stored_hash:
            return VerifyReport(count, 0, f"entry {idx} ({entry_id}): its bytes do not match its leaf hash",
                                good_size, good_root)
        tree.append(stored_hash)
        count += 1
        if count in notes:
            problem = _check_checkpoint(count, tree.root(), notes[count], verifier, origin)
            if problem:
                return VerifyReport(count, 0, f"{problem}; the first altered entry is among indices "
                                              f"{good_size}..{count - 1}", good_size, good_root)
            good_size, good_root = count, notes[count][0]
    beyond = sorted(size for size in notes if size > count)
    if beyond:
        return VerifyReport(count, 0, f"checkpoint of size {beyond[0]} is signed but the log has only {count} "
                                      "entries (entries were removed)", good_size, good_root)
    return VerifyReport(count, len(notes), None, good_size, good_root)


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
