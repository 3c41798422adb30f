"""Verifying the log's proofs on the client: RFC 9162 2.1.3.2 (inclusion) and 2.1.4.2 (consistency)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any, cast

from .errors import VerificationError
from .merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE, node_hash

__all__ = ["root_from_inclusion_proof", "verify_inclusion", "verify_consistency"]


def _check_size(check: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TREE_SIZE:
        raise VerificationError(f"{check} proof: {name} {value!r} is not a valid tree position", check=check)
    return value


def _check_hash(check: str, name: str, value: object) -> bytes:
    kind = type(value).__name__
    raw = bytes(cast("bytes | bytearray | memoryview[int]", value)) if isinstance(
        value, bytes | bytearray | memoryview) else None
    if raw is None or len(raw) != HASH_SIZE:
        size = len(raw) if raw is not None else kind
        raise VerificationError(f"{check} proof: {name} is not a {HASH_SIZE}-byte hash (got {size})", check=check)
    return raw


def _check_proof(check: str, proof: object, expected: int, what: str) -> list[bytes]:
    if isinstance(proof, bytes | bytearray | str) or not isinstance(proof, Sequence):
        raise VerificationError(f"{check} proof must be a sequence of hashes", check=check)
    proof = cast("Sequence[object]", proof)  # each node is checked below
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
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
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
            fr = node_hash(p, fr)
            sr = node_hash(p, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, p)
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

