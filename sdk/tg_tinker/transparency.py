"""Verifiable audit log: RFC 9162 Merkle proofs and C2SP signed checkpoints.

This module is the cryptographic core shared by the ledger service (which builds proofs) and
tenants (who verify them on their own machines). It needs only the standard library and
``cryptography``.

Merkle tree (RFC 9162 section 2.1, identical to RFC 6962)
    ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)`` and the
    empty tree's root is ``SHA-256("")``. The server stores only *perfect* subtree hashes: the node
    at ``(level, index)`` covers leaves ``[index * 2**level, (index + 1) * 2**level)``. A
    ``get(level, index) -> bytes`` callable reads them; every root and proof is computed from
    ``O(log n)`` such nodes per proof element, never from all the leaves.

Signed checkpoints (C2SP ``tlog-checkpoint`` in a C2SP ``signed-note``)
    The checkpoint body is ``origin\\n<size>\\n<base64 root>\\n``; each signature line is
    ``— <key name> <base64(key id || Ed25519 signature)>`` and a note may carry several, so keys can
    rotate. Verifier keys use the ``<name>+<hex key id>+<base64(0x01 || public key)>`` form.

:class:`LogVerifier` ties the two together on the client: it remembers the last checkpoint it
accepted and refuses a newer one that is smaller (rollback) or not an extension of it (fork).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import TGTinkerError

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "VerificationError",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "CompactRange",
    "completed_nodes",
    "subtree_hash",
    "tree_root",
    "inclusion_proof",
    "consistency_proof",
    "verify_inclusion",
    "verify_consistency",
    "root_from_inclusion_proof",
    "NoteSigner",
    "NoteVerifier",
    "sign_note",
    "verify_note",
    "Checkpoint",
    "format_checkpoint",
    "parse_checkpoint",
    "sign_checkpoint",
    "open_checkpoint",
    "LogVerifier",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_TREE_SIZE = 1 << 63  # sizes and indices are at most 63-bit, as in the Go implementations

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_ALG_ED25519 = 0x01
_SIG_PREFIX = "\u2014 "  # EM DASH, space
_MAX_SIGNATURES = 100

GetNode = Callable[[int, int], bytes]
"""``get(level, index)``: the hash of the perfect subtree at ``(level, index)``."""


class VerificationError(TGTinkerError):
    """A proof, checkpoint or signed note did not verify; the message names the failed check.

    ``details["check"]`` names the check (for example ``inclusion``, ``consistency``, ``note``,
    ``checkpoint``, ``rollback``, ``fork``); other details carry the indices and sizes involved.
    """

    def __init__(self, message: str, *, check: str = "verification", details: Mapping[str, Any] | None = None,
                 request_id: str | None = None, **extra: Any) -> None:
        super().__init__(message, code="VERIFICATION_FAILED", details={"check": check, **(details or {}), **extra},
                         request_id=request_id)
        self.check = check


# ----------------------------------------------------------------------------------------------
# Hashing


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Reference MTH (RFC 9162 2.1.1) over a list of leaf hashes, for small trees and audits."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return bytes(leaf_hashes[0])
    k = _split(n)
    return node_hash(root_from_leaves(leaf_hashes[:k]), root_from_leaves(leaf_hashes[k:]))


# ----------------------------------------------------------------------------------------------
# Server side: perfect-node store, roots and proofs


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < MAX_TREE_SIZE:
        raise ValueError(f"{name} {value} is out of range [0, 2**63)")


def completed_nodes(leaf_index: int, leaf_hash: bytes, get: GetNode) -> list[tuple[int, int, bytes]]:
    """The perfect nodes that appending leaf ``leaf_index`` completes, bottom-up, level 0 included.

    ``get`` must return the already stored perfect nodes (the left siblings on the way up); store
    every returned ``(level, index, hash)`` before appending the next leaf. For a batch without a
    read-back, keep a :class:`CompactRange` instead.
    """
    _check_int("leaf_index", leaf_index)
    h = bytes(leaf_hash)
    level, index = 0, leaf_index
    out = [(0, leaf_index, h)]
    while index & 1:
        h = node_hash(get(level, index - 1), h)
        level += 1
        index >>= 1
        out.append((level, index, h))
    return out


class CompactRange:
    """The right edge of a tree: one perfect-node hash per set bit of its size.

    Appending returns the perfect nodes completed (like :func:`completed_nodes`) without reading
    the store, and :meth:`root` costs ``O(log n)`` hashes. Rebuild it at start-up with
    :meth:`from_store`.
    """

    __slots__ = ("_size", "_peaks")

    def __init__(self) -> None:
        self._size = 0
        self._peaks: list[bytes] = []  # left to right: largest subtree first

    @classmethod
    def from_store(cls, size: int, get: GetNode) -> CompactRange:
        """The compact range of a tree of ``size`` leaves, read from its stored perfect nodes."""
        _check_int("size", size)
        cr = cls()
        start = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                cr._peaks.append(bytes(get(level, start >> level)))
                start += 1 << level
        cr._size = size
        return cr

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; returns the ``(level, index, hash)`` of every node it completes."""
        index = self._size
        h = bytes(leaf_hash)
        out = [(0, index, h)]
        level = 0
        while index & 1:
            h = node_hash(self._peaks.pop(), h)
            level += 1
            index >>= 1
            out.append((level, index, h))
        self._peaks.append(h)
        self._size += 1
        return out

    def root(self) -> bytes:
        """MTH of the whole tree (RFC 9162: peaks folded right to left)."""
        if not self._peaks:
            return EMPTY_ROOT
        h = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            h = node_hash(peak, h)
        return h

    def copy(self) -> CompactRange:
        cr = CompactRange()
        cr._size = self._size
        cr._peaks = list(self._peaks)
        return cr


def subtree_hash(start: int, end: int, get: GetNode) -> bytes:
    """MTH of leaves ``[start, end)``, computed from stored perfect nodes only.

    A range that is a whole perfect node is one ``get``; otherwise it splits as RFC 9162 does (at
    the largest power of two below its size). Ranges that arise in roots and proofs are always
    aligned, so this costs ``O(log(end - start))`` reads.
    """
    _check_int("start", start)
    _check_int("end", end)
    if end < start:
        raise ValueError(f"subtree range [{start}, {end}) is reversed")
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and start % n == 0:
        return bytes(get(n.bit_length() - 1, start // n))
    if n == 1:  # unreachable (size 1 is always aligned) but keeps the recursion obviously finite
        return bytes(get(0, start))
    # Left parts are aligned perfect nodes whenever start is aligned; only the right spine recurses.
    k = _split(n)
    return node_hash(subtree_hash(start, start + k, get), subtree_hash(start + k, end, get))


def tree_root(size: int, get: GetNode) -> bytes:
    """MTH of the first ``size`` leaves."""
    return subtree_hash(0, size, get)


def inclusion_proof(index: int, size: int, get: GetNode) -> list[bytes]:
    """RFC 9162 2.1.3.1 ``PATH(index, D[0:size])``, deepest sibling first."""
    _check_int("index", index)
    _check_int("size", size)
    if index >= size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree_hash(start + k, end, get))
            end = start + k
        else:
            path.append(subtree_hash(start, start + k, get))
            start += k
    path.reverse()
    return path


def consistency_proof(m: int, n: int, get: GetNode) -> list[bytes]:
    """RFC 9162 2.1.4.1 ``PROOF(m, D[0:n])``; empty when ``m == 0`` or ``m == n``."""
    _check_int("m", m)
    _check_int("n", n)
    if m > n:
        raise ValueError(f"no consistency proof from size {m} to the smaller size {n}")
    if m == 0 or m == n:
        return []
    path: list[bytes] = []
    start, end, complete = 0, n, True  # SUBPROOF(m - start, D[start:end], complete)
    while True:
        if m == end:
            if not complete:
                path.append(subtree_hash(start, end, get))
            break
        k = _split(end - start)
        if m - start <= k:
            path.append(subtree_hash(start + k, end, get))
            end = start + k
        else:
            path.append(subtree_hash(start, start + k, get))
            start += k
            complete = False
    path.reverse()
    return path


# ----------------------------------------------------------------------------------------------
# Client side: proof verification (RFC 9162 2.1.3.2 and 2.1.4.2)


def _check_size(check: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TREE_SIZE:
        raise VerificationError(f"{check} proof: {name} {value!r} is not a valid tree position", check=check)
    return value


def _check_hash(check: str, name: str, value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, bytes | bytearray | memoryview) else type(value).__name__
        raise VerificationError(f"{check} proof: {name} is not a {HASH_SIZE}-byte hash (got {size})", check=check)
    return bytes(value)


def _check_proof(check: str, proof: Any, expected: int, what: str) -> list[bytes]:
    if isinstance(proof, bytes | bytearray | str) or not isinstance(proof, Sequence):
        raise VerificationError(f"{check} proof must be a sequence of hashes", check=check)
    if len(proof) != expected:
        raise VerificationError(f"{check} proof has {len(proof)} nodes; {what} needs {expected}",
                                check=check, proof_length=len(proof), expected_length=expected)
    return [_check_hash(check, f"proof node {i}", p) for i, p in enumerate(proof)]


def _inclusion_length(index: int, size: int) -> int:
    # Siblings below the point where the paths to `index` and to the last leaf diverge, plus one
    # left sibling per set bit above it (where the path runs along the right border).
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 2.1.3.2 steps 1-3); raises if malformed."""
    index = _check_size("inclusion", "leaf index", index)
    size = _check_size("inclusion", "tree size", size)
    if index >= size:
        raise VerificationError(f"inclusion proof: leaf index {index} is not in a tree of size {size}",
                                check="inclusion", index=index, size=size)
    r = _check_hash("inclusion", "leaf hash", leaf)
    path = _check_proof("inclusion", proof, _inclusion_length(index, size), f"leaf {index} of tree size {size}")
    fn, sn = index, size - 1
    for p in path:
        if sn == 0:  # cannot happen after the length check; kept as the RFC's own guard
            raise VerificationError("inclusion proof is too long", check="inclusion", index=index, size=size)
        if fn & 1 or fn == sn:
            r = hashlib.sha256(_NODE_PREFIX + p + r).digest()
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = hashlib.sha256(_NODE_PREFIX + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is too short", check="inclusion", index=index, size=size)
    return r


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    Raises :class:`VerificationError` naming the failed check.
    """
    root = _check_hash("inclusion", "root", root)
    got = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if not hmac.compare_digest(got, root):
        raise VerificationError(
            f"inclusion proof for leaf {index} does not lead to the root of tree size {size} "
            "(wrong leaf, index, size or proof)", check="inclusion", index=index, size=size)


def _consistency_length(size1: int, size2: int) -> int:
    # Inclusion path of leaf size1-1 in the tree of size2, minus the levels covered by the
    # largest perfect subtree ending at size1, plus that subtree's hash unless it is all of size1.
    shift = (size1 & -size1).bit_length() - 1
    length = _inclusion_length(size1 - 1, size2) - shift
    return length if size1 == 1 << shift else length + 1


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Check that the tree of ``size2`` leaves with ``root2`` extends the one of ``size1`` with ``root1``.

    ``size1 == size2`` requires an empty proof and equal roots; ``size1 == 0`` requires an empty
    proof and ``root1`` the empty tree's root (every tree extends the empty one). Raises
    :class:`VerificationError` on a rollback (``size1 > size2``), a fork or a malformed proof.
    """
    c = "consistency"
    size1 = _check_size(c, "first tree size", size1)
    size2 = _check_size(c, "second tree size", size2)
    root1 = _check_hash(c, "first root", root1)
    root2 = _check_hash(c, "second root", root2)
    if size1 > size2:
        raise VerificationError(f"consistency proof: tree size went back from {size1} to {size2}",
                                check=c, size1=size1, size2=size2)
    if size1 == size2 or size1 == 0:
        _check_proof(c, proof, 0, f"sizes {size1} -> {size2}")
        if size1 == 0 and not hmac.compare_digest(root1, EMPTY_ROOT):
            raise VerificationError("consistency proof: the root of the empty tree is not SHA-256('')",
                                    check=c, size1=size1, size2=size2)
        if size1 == size2 and not hmac.compare_digest(root1, root2):
            raise VerificationError(f"consistency proof: two different roots for the same tree size {size1}",
                                    check=c, size1=size1, size2=size2)
        return
    path = _check_proof(c, proof, _consistency_length(size1, size2), f"sizes {size1} -> {size2}")
    if size1 & (size1 - 1) == 0:  # step 2: size1 is a perfect subtree; its root is the seed
        path = [root1, *path]
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for p in path[1:]:
        if sn == 0:  # cannot happen after the length check; kept as the RFC's own guard
            raise VerificationError("consistency proof is too long", check=c, size1=size1, size2=size2)
        if fn & 1 or fn == sn:
            fr = hashlib.sha256(_NODE_PREFIX + p + fr).digest()
            sr = hashlib.sha256(_NODE_PREFIX + p + sr).digest()
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = hashlib.sha256(_NODE_PREFIX + sr + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is too short", check=c, size1=size1, size2=size2)
    if not hmac.compare_digest(fr, root1):
        raise VerificationError(f"consistency proof does not lead to the root of the first tree (size {size1})",
                                check=c, size1=size1, size2=size2)
    if not hmac.compare_digest(sr, root2):
        raise VerificationError(f"consistency proof does not lead to the root of the second tree (size {size2}): "
                                "the log forked or the proof is wrong", check=c, size1=size1, size2=size2)


# ----------------------------------------------------------------------------------------------
# Signed notes (C2SP signed-note, Ed25519)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict, canonical standard base64 (padded); ``None`` when malformed."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if _b64encode(raw) == text else None


def _valid_key_name(name: Any) -> bool:
    return (isinstance(name, str) and name != "" and "+" not in name
            and not any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name))


def _valid_text(text: str) -> bool:
    return not any((ord(ch) < 0x20 and ch != "\n") or ord(ch) == 0x7F for ch in text)


def _key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([_ALG_ED25519]) + public_key).digest()[:4]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class NoteSigner:
    """Signs notes with an Ed25519 key under a key name (the log's origin, usually)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not _valid_key_name(name):
            raise ValueError(f"invalid key name {name!r}: it must be non-empty, without spaces or '+'")
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519PrivateKey")
        self.name = name
        self._key = private_key
        self.public_key = _raw_public(private_key.public_key())
        self.key_id = _key_id(name, self.public_key)

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> NoteSigner:
        """Parse the ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`` form (Go ``sumdb/note``)."""
        parts = skey.split("+", 4) if isinstance(skey, str) else []
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise ValueError("malformed signer key: expected PRIVATE+KEY+<name>+<id>+<key>")
        raw = _b64decode(parts[4])
        if raw is None or len(raw) != 33 or raw[0] != _ALG_ED25519:
            raise ValueError("malformed signer key: the key is not base64(0x01 || 32-byte Ed25519 seed)")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if parts[3] != signer.key_id.hex():
            raise ValueError("malformed signer key: the key id does not match the name and key")
        return signer

    @property
    def skey(self) -> str:
        seed = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{_b64encode(bytes([_ALG_ED25519]) + seed)}"

    @property
    def vkey(self) -> str:
        """The verifier key to give to clients: ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        return f"{self.name}+{self.key_id.hex()}+{_b64encode(bytes([_ALG_ED25519]) + self.public_key)}"

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.public_key)

    def signature_line(self, body: str) -> str:
        """The ``— <name> <base64(key id || signature)>\\n`` line for ``body``."""
        sig = self._key.sign(_check_body(body).encode("utf-8"))
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_id + sig)}\n"

    def sign(self, body: str) -> str:
        """The complete signed note: ``body``, a blank line and this key's signature line."""
        return sign_note(body, [self])


def _check_body(body: Any) -> str:
    if not isinstance(body, str) or not body.endswith("\n"):
        raise ValueError("a note body must be text ending with a newline")
    if not _valid_text(body):
        raise ValueError("a note body must not contain control characters other than newline")
    return body


def sign_note(body: str, signers: Sequence[NoteSigner]) -> str:
    """``body`` signed by every signer (one signature line each), e.g. the old and new key while rotating."""
    _check_body(body)
    if not signers:
        raise ValueError("sign_note needs at least one signer")
    return body + "\n" + "".join(s.signature_line(body) for s in signers)


class NoteVerifier:
    """Verifies one key's signatures; build it from the key's vkey string."""

    def __init__(self, name: str, public_key: bytes) -> None:
        if not _valid_key_name(name):
            raise ValueError(f"invalid key name {name!r}")
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_key = public_key
        self.key_id = _key_id(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<8 hex digits key id>+<base64(0x01 || 32-byte public key)>``."""
        parts = vkey.split("+", 2) if isinstance(vkey, str) else []
        if len(parts) != 3:
            raise ValueError("malformed verifier key: expected <name>+<key id>+<key>")
        name, key_id, key = parts
        if len(key_id) != 8 or any(ch not in "0123456789abcdef" for ch in key_id):
            raise ValueError("malformed verifier key: the key id is not 8 lowercase hex digits")
        raw = _b64decode(key)
        if raw is None or len(raw) != 33:
            raise ValueError("malformed verifier key: the key is not base64 of 33 bytes")
        if raw[0] != _ALG_ED25519:
            raise ValueError(f"unsupported verifier key algorithm 0x{raw[0]:02x} (only Ed25519, 0x01)")
        verifier = cls(name, raw[1:])
        if verifier.key_id.hex() != key_id:
            raise ValueError("malformed verifier key: the key id does not match the name and key")
        return verifier

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{_b64encode(bytes([_ALG_ED25519]) + self.public_key)}"

    def verify(self, body: str, signature: bytes) -> bool:
        try:
            self._key.verify(signature, body.encode("utf-8"))
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"NoteVerifier({self.vkey!r})"


def verify_note(note: str, verifiers: Iterable[NoteVerifier]) -> str:
    """The body of ``note`` when at least one signature by a known key verifies.

    Signatures by unknown keys (name and key id not among ``verifiers``) are ignored. Raises
    :class:`VerificationError` on a malformed note, an invalid signature by a known key, or when no
    known key signed.
    """
    c = "note"
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationError("signed note is not UTF-8", check=c) from None
    if not isinstance(note, str):
        raise VerificationError("signed note must be text", check=c)
    if not _valid_text(note):
        raise VerificationError("signed note contains control characters", check=c)
    split = note.rfind("\n\n")
    if split < 0:
        raise VerificationError("signed note has no blank line before its signatures", check=c)
    body, sig_block = note[: split + 1], note[split + 2:]
    if not sig_block or not sig_block.endswith("\n"):
        raise VerificationError("signed note has no signature lines, or they do not end with a newline", check=c)
    known: dict[tuple[str, bytes], NoteVerifier] = {(v.name, v.key_id): v for v in verifiers}
    lines = sig_block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise VerificationError(f"signed note has more than {_MAX_SIGNATURES} signatures", check=c)
    verified: list[str] = []
    seen: set[tuple[str, bytes]] = set()
    for number, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise VerificationError(f"signature line {number} does not start with an em dash and a space", check=c)
        name, sep, blob = line[len(_SIG_PREFIX):].partition(" ")
        raw = _b64decode(blob) if sep else None
        if not _valid_key_name(name) or raw is None or len(raw) < 5:
            raise VerificationError(f"signature line {number} is malformed (key name or base64 signature)",
                                    check=c, line=number)
        key = (name, raw[:4])
        verifier = known.get(key)
        if verifier is None or key in seen:
            continue  # C2SP: signatures by unknown keys are ignored
        seen.add(key)
        if not verifier.verify(body, raw[4:]):
            raise VerificationError(f"invalid signature by known key {name} ({raw[:4].hex()}) on line {number}",
                                    check=c, key=name, line=number)
        verified.append(name)
    if not verified:
        raise VerificationError("signed note carries no signature by a known key", check=c)
    return body


# ----------------------------------------------------------------------------------------------
# Checkpoints (C2SP tlog-checkpoint)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint body: origin, decimal size and base64 root lines (then any extension lines)."""
    if not isinstance(origin, str) or not origin or "\n" in origin or not _valid_text(origin):
        raise ValueError("checkpoint origin must be a non-empty single line")
    _check_int("size", size)
    if not isinstance(root, bytes) or len(root) != HASH_SIZE:
        raise ValueError(f"checkpoint root must be {HASH_SIZE} bytes")
    for ext in extensions:
        if not isinstance(ext, str) or not ext or "\n" in ext or not _valid_text(ext):
            raise ValueError("checkpoint extension lines must be non-empty single lines")
    return "".join(f"{line}\n" for line in (origin, str(size), _b64encode(root), *extensions))


def parse_checkpoint(body: str) -> Checkpoint:
    """Strictly parse a checkpoint body; raises :class:`VerificationError` when malformed."""
    c = "checkpoint"
    if not isinstance(body, str) or not body.endswith("\n"):
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
    root = _b64decode(root_text)
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
            _check_int("size", size)
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
            "root": _b64encode(cp.root) if cp else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any],
                   verifiers: Iterable[NoteVerifier | str] | None = None) -> LogVerifier:
        """Rebuild from :meth:`state`; ``verifiers`` (if given) replace the stored keys."""
        root_text = state.get("root")
        root = None
        if root_text is not None:
            root = _b64decode(root_text)
            if root is None:
                raise ValueError("stored root is not base64")
        return cls(state["origin"], verifiers if verifiers is not None else state["vkeys"],
                   size=state.get("size"), root=root)
