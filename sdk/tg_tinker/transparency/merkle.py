"""RFC 9162 Merkle trees (identical to RFC 6962): hashing, and the roots and proofs the log serves.

``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)`` and the empty
tree's root is ``SHA-256("")``. The server stores only *perfect* subtree hashes: the node at
``(level, index)`` covers leaves ``[index * 2**level, (index + 1) * 2**level)``. A
``get(level, index) -> bytes`` callable reads them; every root and proof is computed from
``O(log n)`` such nodes per proof element, never from all the leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "MAX_TREE_SIZE",
    "GetNode",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "check_position",
    "completed_nodes",
    "CompactRange",
    "subtree_hash",
    "tree_root",
    "inclusion_proof",
    "consistency_proof",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_TREE_SIZE = 1 << 63  # sizes and indices are at most 63-bit, as in the Go implementations

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

GetNode = Callable[[int, int], bytes]
"""``get(level, index)``: the hash of the perfect subtree at ``(level, index)``."""


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


def check_position(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < MAX_TREE_SIZE:
        raise ValueError(f"{name} {value} is out of range [0, 2**63)")


def completed_nodes(leaf_index: int, leaf_hash: bytes, get: GetNode) -> list[tuple[int, int, bytes]]:
    """The perfect nodes that appending leaf ``leaf_index`` completes, bottom-up, level 0 included.

    ``get`` must return the already stored perfect nodes (the left siblings on the way up); store
    every returned ``(level, index, hash)`` before appending the next leaf. For a batch without a
    read-back, keep a :class:`CompactRange` instead.
    """
    check_position("leaf_index", leaf_index)
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
        check_position("size", size)
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
    check_position("start", start)
    check_position("end", end)
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
    check_position("index", index)
    check_position("size", size)
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
    check_position("m", m)
    check_position("n", n)
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

