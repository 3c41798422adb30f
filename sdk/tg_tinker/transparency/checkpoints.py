"""C2SP ``tlog-checkpoint``: the signed statement of a log's size and root, and the client's view of a log.

The checkpoint body is ``origin\\n<size>\\n<base64 root>\\n`` (then any extension lines), carried in a
signed note (:mod:`.notes`). :class:`LogVerifier` remembers the last checkpoint it accepted and
refuses a newer one that is smaller (rollback) or not an extension of it (fork).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import VerificationError
from .merkle import HASH_SIZE, MAX_TREE_SIZE, check_position
from .notes import NoteSigner, NoteVerifier, b64decode, b64encode, sign_note, valid_text, verify_note
from .proofs import verify_consistency, verify_inclusion

__all__ = ["Checkpoint", "format_checkpoint", "parse_checkpoint", "sign_checkpoint", "open_checkpoint",
           "ConsistencyFetcher", "LogVerifier"]


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint body: origin, decimal size and base64 root lines (then any extension lines)."""
    if not isinstance(origin, str) or not origin or "\n" in origin or not valid_text(origin):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValueError("checkpoint origin must be a non-empty single line")
    check_position("size", size)
    if not isinstance(root, bytes) or len(root) != HASH_SIZE:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValueError(f"checkpoint root must be {HASH_SIZE} bytes")
    for ext in extensions:
        if not isinstance(ext, str) or not ext or "\n" in ext or not valid_text(ext):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise ValueError("checkpoint extension lines must be non-empty single lines")
    return "".join(f"{line}\n" for line in (origin, str(size), b64encode(root), *extensions))


def parse_checkpoint(body: str) -> Checkpoint:
    """Strictly parse a checkpoint body; raises :class:`VerificationError` when malformed."""
    c = "checkpoint"
    if not isinstance(body, str) or not body.endswith("\n"):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise VerificationError("checkpoint must be text ending with a newline", check=c)
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise VerificationError(f"checkpoint has {len(lines)} lines; it needs origin, size and root", check=c)
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise VerificationError("checkpoint origin line is empty", check=c)
    if not (size_text.isascii() and size_text.isdigit()) or (len(size_text) > 1 and size_text[0] == "0"):
        raise VerificationError(f"checkpoint size {size_text!r} is not a canonical decimal number", check=c)
    size = int(size_text)
    if size >= MAX_TREE_SIZE:
        raise VerificationError(f"checkpoint size {size} is too large", check=c)
    root = b64decode(root_text)
    if root is None:
        raise VerificationError("checkpoint root is not canonical padded base64", check=c)
    if len(root) != HASH_SIZE:
        raise VerificationError(f"checkpoint root is {len(root)} bytes, not {HASH_SIZE}", check=c)
    if any(not ext for ext in extensions):
        raise VerificationError("checkpoint has an empty extension line", check=c)
    return Checkpoint(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signers: Sequence[NoteSigner]) -> str:
    """The signed note of ``checkpoint``."""
    return sign_note(format_checkpoint(checkpoint.origin, checkpoint.size, checkpoint.root,
                                       checkpoint.extensions), signers)


def open_checkpoint(note: str, verifiers: Iterable[NoteVerifier], origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint note and parse it; checks the origin when one is given."""
    cp = parse_checkpoint(verify_note(note, verifiers))
    if origin is not None and cp.origin != origin:
        raise VerificationError(f"checkpoint is for log {cp.origin!r}, not {origin!r}", check="origin")
    return cp


ConsistencyFetcher = Callable[[int, int], Sequence[bytes]]
"""``fetch(old_size, new_size)``: the log's consistency proof between the two sizes."""


class LogVerifier:
    """A client's view of one log: its keys, its origin and the last checkpoint it accepted.

    :meth:`check` accepts a newer signed checkpoint only if it is signed by a known key, names this
    log and extends the remembered one (consistency proof); it refuses a rollback (smaller size) or
    a fork (same size with another root, or no valid consistency proof). The first checkpoint is
    trusted on first use unless the state was seeded. Persist :meth:`state` between runs.
    """

    def __init__(self, origin: str, verifiers: Iterable[NoteVerifier | str], *, size: int | None = None,
                 root: bytes | None = None) -> None:
        self.origin = origin
        self.verifiers = [NoteVerifier.from_vkey(v) if isinstance(v, str) else v for v in verifiers]
        if not self.verifiers:
            raise ValueError("LogVerifier needs at least one verifier key")
        if (size is None) != (root is None):
            raise ValueError("give both size and root, or neither")
        self._checkpoint: Checkpoint | None = None
        if size is not None and root is not None:
            check_position("size", size)
            if len(root) != HASH_SIZE:
                raise ValueError(f"root must be {HASH_SIZE} bytes")
            self._checkpoint = Checkpoint(origin, size, bytes(root))
        self._lock = threading.Lock()

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The last accepted checkpoint (``None`` before the first)."""
        return self._checkpoint

    def check(self, note: str, fetch_consistency: ConsistencyFetcher) -> Checkpoint:
        """Verify ``note`` and, if it is consistent with the last one, remember and return it."""
        cp = open_checkpoint(note, self.verifiers, self.origin)
        with self._lock:
            old = self._checkpoint
            if old is not None:
                if cp.size < old.size:
                    raise VerificationError(
                        f"log rolled back: checkpoint size {cp.size} is smaller than the {old.size} already seen",
                        check="rollback", size1=old.size, size2=cp.size)
                if cp.size == old.size:
                    if not hmac.compare_digest(cp.root, old.root):
                        raise VerificationError(
                            f"log forked: two different roots for tree size {cp.size}",
                            check="fork", size1=old.size, size2=cp.size)
                elif old.size > 0:
                    proof = fetch_consistency(old.size, cp.size)
                    try:
                        verify_consistency(old.size, cp.size, old.root, cp.root, proof)
                    except VerificationError as exc:
                        raise VerificationError(
                            f"log forked or proof invalid between sizes {old.size} and {cp.size}: {exc.message}",
                            check="fork", size1=old.size, size2=cp.size) from exc
                else:
                    verify_consistency(0, cp.size, old.root, cp.root, [])
            self._checkpoint = cp
        return cp

    def verify_inclusion(self, leaf_hash: bytes, index: int, proof: Sequence[bytes],
                         checkpoint: Checkpoint | None = None) -> None:
        """Check an inclusion proof against ``checkpoint`` (default: the last accepted one)."""
        cp = checkpoint or self._checkpoint
        if cp is None:
            raise VerificationError("no checkpoint verified yet", check="inclusion")
        verify_inclusion(leaf_hash, index, cp.size, proof, cp.root)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state: origin, verifier keys and the last accepted size and root."""
        cp = self._checkpoint
        return {
            "origin": self.origin,
            "vkeys": [v.vkey for v in self.verifiers],
            "size": cp.size if cp else None,
            "root": b64encode(cp.root) if cp else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any],
                   verifiers: Iterable[NoteVerifier | str] | None = None) -> LogVerifier:
        """Rebuild from :meth:`state`; ``verifiers`` (if given) replace the stored keys."""
        root_text = state.get("root")
        root = None
        if root_text is not None:
            root = b64decode(root_text)
            if root is None:
                raise ValueError("stored root is not base64")
        return cls(state["origin"], verifiers if verifiers is not None else state["vkeys"],
                   size=state.get("size"), root=root)

