"""The audit ledger's cryptographic core: RFC 9162 Merkle proofs (signed checkpoints: test_signed_notes.py).

Known-answer vectors: the RFC 6962 tree of the Certificate Transparency / Trillian / transparency-dev
``merkle`` test suites. The signed-note known answer (Go's ``sumdb/note``) is in test_signed_notes.py.
``pymerkle`` serves as an independent implementation to cross-check against.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from tg_tinker.errors import TGTinkerError
from tg_tinker.transparency import (
    EMPTY_ROOT,
    CompactRange,
    VerificationError,
    completed_nodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    root_from_leaves,
    subtree_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

H = bytes.fromhex

# --- RFC 6962 known answers (test data of certificate-transparency-go, Trillian, transparency-dev/merkle)

RFC_LEAVES = [H(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                             "606162636465666768696a6b6c6d6e6f")]
RFC_ROOTS = [H(x) for x in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # size 0
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",  # size 8
)]
# (0-based leaf index, tree size, proof); the published vectors number leaves from 1.
RFC_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 1, []),
]
RFC_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
SOME_HASH = H("abacaba000000000000000000000000000000000000000000060061e00123456")

# --- helpers: the RFC's recursive definitions, written straight from RFC 9162 2.1.3.1 / 2.1.4.1


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return ref_path(m, leaves[:k]) + [root_from_leaves(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [root_from_leaves(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [root_from_leaves(leaves)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, leaves[:k], b) + [root_from_leaves(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [root_from_leaves(leaves[:k])]


def ref_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(leaves)) else ref_subproof(m, leaves, True)


class Store:
    """The server's perfect-node table, filled the way the ledger fills it."""

    def __init__(self, leaves: list[bytes] = ()) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.reads = 0
        self.size = 0
        for leaf in leaves:
            self.append(leaf)

    def get(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.nodes[(level, index)]

    def append(self, lh: bytes) -> list[tuple[int, int, bytes]]:
        done = completed_nodes(self.size, lh, self.get)
        for level, index, h in done:
            assert (level, index) not in self.nodes
            self.nodes[(level, index)] = h
        self.size += 1
        return done


def hashes(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(n)]


RFC_LEAF_HASHES = [leaf_hash(x) for x in RFC_LEAVES]
RFC_STORE = Store(RFC_LEAF_HASHES)


# --- Merkle tree: known answers


def test_hash_primitives() -> None:
    assert EMPTY_ROOT == RFC_ROOTS[0] == hashlib.sha256(b"").digest()
    assert leaf_hash(b"") == RFC_ROOTS[1]
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


@pytest.mark.parametrize("size", range(9))
def test_rfc6962_roots(size: int) -> None:
    assert root_from_leaves(RFC_LEAF_HASHES[:size]) == RFC_ROOTS[size]
    assert tree_root(size, RFC_STORE.get) == RFC_ROOTS[size]
    cr = CompactRange()
    for lh in RFC_LEAF_HASHES[:size]:
        cr.append(lh)
    assert cr.root() == RFC_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "proof"), RFC_INCLUSION)
def test_rfc6962_inclusion_vectors(index: int, size: int, proof: list[str]) -> None:
    want = [H(p) for p in proof]
    assert inclusion_proof(index, size, RFC_STORE.get) == want
    assert ref_path(index, RFC_LEAF_HASHES[:size]) == want
    verify_inclusion(RFC_LEAF_HASHES[index], index, size, want, RFC_ROOTS[size])


@pytest.mark.parametrize(("m", "n", "proof"), RFC_CONSISTENCY)
def test_rfc6962_consistency_vectors(m: int, n: int, proof: list[str]) -> None:
    want = [H(p) for p in proof]
    assert consistency_proof(m, n, RFC_STORE.get) == want
    assert ref_proof(m, RFC_LEAF_HASHES[:n]) == want
    verify_consistency(m, n, RFC_ROOTS[m], RFC_ROOTS[n], want)


# --- Merkle tree: the perfect-node store against the RFC's recursive definitions


def test_store_proofs_equal_reference_up_to_70() -> None:
    leaves = hashes(70, seed=1)
    store = Store(leaves)
    for n in range(1, 71):
        root = root_from_leaves(leaves[:n])
        assert tree_root(n, store.get) == root
        for i in range(n):
            proof = inclusion_proof(i, n, store.get)
            assert proof == ref_path(i, leaves[:n]), (i, n)
            verify_inclusion(leaves[i], i, n, proof, root)
        for m in range(0, n + 1):
            proof = consistency_proof(m, n, store.get)
            assert proof == ref_proof(m, leaves[:n]), (m, n)
            verify_consistency(m, n, root_from_leaves(leaves[:m]), root, proof)


def test_store_contains_exactly_the_perfect_nodes() -> None:
    leaves = hashes(37, seed=2)
    store = Store(leaves)
    want = {}
    for level in range(6):
        width = 1 << level
        for index in range(37 // width):
            want[(level, index)] = root_from_leaves(leaves[index * width:(index + 1) * width])
    assert store.nodes == want


def test_compact_range_matches_completed_nodes() -> None:
    leaves = hashes(100, seed=3)
    store = Store()
    cr = CompactRange()
    for i, lh in enumerate(leaves):
        assert cr.append(lh) == store.append(lh)
        assert cr.size == i + 1
        assert cr.root() == tree_root(i + 1, store.get) == root_from_leaves(leaves[: i + 1])
        rebuilt = CompactRange.from_store(i + 1, store.get)
        assert rebuilt.root() == cr.root() and rebuilt.size == cr.size
    copy = cr.copy()
    copy.append(leaves[0])
    assert copy.size == cr.size + 1 and cr.root() == root_from_leaves(leaves)
    assert CompactRange().root() == EMPTY_ROOT


def test_proofs_read_logarithmically_many_nodes() -> None:
    store = Store(hashes(1000, seed=4))
    store.reads = 0
    inclusion_proof(777, 1000, store.get)
    assert store.reads <= 2 * 10
    store.reads = 0
    consistency_proof(333, 999, store.get)
    assert store.reads <= 3 * 10
    store.reads = 0
    tree_root(999, store.get)
    assert store.reads == bin(999).count("1")


def test_subtree_hash_of_unaligned_ranges() -> None:
    leaves = hashes(40, seed=5)
    store = Store(leaves)
    for start in range(0, 40, 3):
        for end in range(start, 41, 5):
            assert subtree_hash(start, end, store.get) == root_from_leaves(leaves[start:end])


def test_proof_generation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(8, 8, RFC_STORE.get)
    with pytest.raises(ValueError):
        inclusion_proof(-1, 8, RFC_STORE.get)
    with pytest.raises(ValueError):
        consistency_proof(5, 4, RFC_STORE.get)
    with pytest.raises(ValueError):
        subtree_hash(5, 4, RFC_STORE.get)
    with pytest.raises(TypeError):
        inclusion_proof(1.0, 8, RFC_STORE.get)  # type: ignore[arg-type]


# --- Merkle tree: cross-check with pymerkle, an independent implementation


def test_cross_check_with_pymerkle() -> None:
    pymerkle = pytest.importorskip("pymerkle")
    rng = random.Random(6)
    sizes = sorted({1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300}
                   | {rng.randrange(1, 301) for _ in range(40)})
    for size in sizes:
        data = [rng.randbytes(rng.randrange(0, 30)) for _ in range(size)]
        tree = pymerkle.InmemoryTree(algorithm="sha256")  # RFC 6962 prefixes 0x00 / 0x01 ("security" on)
        for d in data:
            tree.append_entry(d)
        store = Store([leaf_hash(d) for d in data])
        for n in {size, rng.randrange(1, size + 1)}:
            theirs = tree.get_root(n)
            assert tree_root(n, store.get) == theirs
            for i in {0, n - 1, rng.randrange(n), rng.randrange(n)}:
                ours = inclusion_proof(i, n, store.get)
                their_proof = tree.prove_inclusion(i + 1, n)  # pymerkle counts leaves from 1
                assert their_proof.path == [tree.get_leaf(i + 1), *ours]  # base, then RFC PATH
                verify_inclusion(tree.get_leaf(i + 1), i, n, ours, theirs)
                pymerkle.verify_inclusion(leaf_hash(data[i]), tree_root(n, store.get), their_proof)
            for m in {1, n, rng.randrange(1, n + 1)}:
                ours = consistency_proof(m, n, store.get)
                their_proof = tree.prove_consistency(m, n)
                # pymerkle's consistency path has its own layout (not RFC 9162's), so compare what both
                # determine: the two roots, and each proof verifying against the other's roots.
                assert their_proof.retrieve_prior_state() == tree_root(m, store.get)
                assert their_proof.compute_root() == tree_root(n, store.get)
                verify_consistency(m, n, tree.get_root(m), theirs, ours)
                pymerkle.verify_consistency(tree_root(m, store.get), tree_root(n, store.get), their_proof)


# --- Merkle tree: adversarial verification


def _flip(h: bytes, bit: int = 3) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


def _rejects(fn, *args) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        fn(*args)
    assert info.value.code == "VERIFICATION_FAILED"
    assert isinstance(info.value, TGTinkerError)
    return info.value


def test_inclusion_rejects_corruptions() -> None:
    leaves = hashes(70, seed=7)
    store = Store(leaves)
    for n in (1, 2, 3, 5, 8, 13, 32, 33, 70):
        root = tree_root(n, store.get)
        for i in range(n):
            proof = inclusion_proof(i, n, store.get)
            leaf = leaves[i]
            probes = [
                (leaf, i - 1, n, proof, root), (leaf, i + 1, n, proof, root), (leaf, i ^ 2, n, proof, root),
                (leaf, i, n * 2, proof, root), (leaf, i, n // 2, proof, root),
                (leaf, i, n, proof, EMPTY_ROOT), (leaf, i, n, proof, SOME_HASH), (b"WrongLeaf", i, n, proof, root),
                (leaves[(i + 1) % 70], i, n, proof, root),  # a proof for another leaf
                (leaf, i, n, [*proof, b""], root), (leaf, i, n, [*proof, root], root),
                (leaf, i, n, [b"", *proof], root), (leaf, i, n, [root, *proof], root),
            ]
            probes += [(leaf, i, n, [*proof[:j], _flip(p), *proof[j + 1:]], root) for j, p in enumerate(proof)]
            if proof:
                probes.append((leaf, i, n, proof[:-1], root))
            if len(proof) > 1:
                probes.append((leaf, i, n, [proof[0], SOME_HASH, *proof[1:]], root))
            for probe in probes:
                with pytest.raises(VerificationError):
                    verify_inclusion(*probe)


def test_inclusion_edge_cases() -> None:
    data = leaf_hash(b"data")
    verify_inclusion(data, 0, 1, [], data)  # a one-leaf tree's root is its leaf
    for index, size in ((0, 0), (1, 0), (1, 1), (2, 1)):
        err = _rejects(verify_inclusion, data, index, size, [], data)
        assert f"{size}" in err.message
    _rejects(verify_inclusion, data, 0, 1, [], b"")
    _rejects(verify_inclusion, b"", 0, 1, [], data)
    _rejects(verify_inclusion, data, -1, 1, [], data)
    _rejects(verify_inclusion, data, True, 2, [data], data)
    _rejects(verify_inclusion, data, 0, 2, b"x" * 32, data)  # a bytes object is not a list of hashes
    err = _rejects(verify_inclusion, data, 3, 8, [data] * 2, data)
    assert "has 2 nodes" in err.message and "needs 3" in err.message and err.details["check"] == "inclusion"
    assert root_from_inclusion_proof(RFC_LEAF_HASHES[5], 5, 8, [H(p) for p in RFC_INCLUSION[1][2]]) == RFC_ROOTS[8]


def test_consistency_rejects_corruptions() -> None:
    leaves = hashes(70, seed=8)
    store = Store(leaves)
    for n in (2, 3, 5, 8, 9, 16, 17, 33, 70):
        root2 = tree_root(n, store.get)
        for m in range(1, n):
            root1 = tree_root(m, store.get)
            proof = consistency_proof(m, n, store.get)
            assert proof
            probes = [
                (m - 1, n, root1, root2, proof), (m + 1, n, root1, root2, proof), (m ^ 2, n, root1, root2, proof),
                (m, n * 2, root1, root2, proof), (m, n // 2, root1, root2, proof),
                (m, n, b"WrongRoot", root2, proof), (m, n, root1, b"WrongRoot", proof),
                (m, n, root2, root1, proof), (m, n, SOME_HASH, root2, proof), (m, n, root1, SOME_HASH, proof),
                (m, n, root1, root2, []), (m, n, root1, root2, proof[:-1]),
                (m, n, root1, root2, [*proof, b""]), (m, n, root1, root2, [*proof, root1]),
                (m, n, root1, root2, [*proof, root2]), (m, n, root1, root2, [b"", *proof]),
                (m, n, root1, root2, [root1, *proof]), (m, n, root1, root2, [root2, *proof]),
                (m, n, root1, root2, [proof[0], *proof]),
            ]
            probes += [(m, n, root1, root2, [*proof[:j], _flip(p, 4), *proof[j + 1:]]) for j, p in enumerate(proof)]
            for probe in probes:
                with pytest.raises(VerificationError):
                    verify_consistency(*probe)


def test_consistency_edge_cases() -> None:
    r1, r2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, r2, [])  # every tree extends the empty one
    verify_consistency(1, 1, r2, r2, [])
    verify_consistency(7, 7, r1, r1, [])
    _rejects(verify_consistency, 0, 0, r1, r2, [])
    _rejects(verify_consistency, 1, 1, r1, r2, [])  # same size, different roots: a fork
    _rejects(verify_consistency, 0, 5, r1, r2, [])  # the empty tree's root is fixed
    _rejects(verify_consistency, 0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    _rejects(verify_consistency, 0, 1, EMPTY_ROOT, r2, [EMPTY_ROOT])
    _rejects(verify_consistency, 1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    err = _rejects(verify_consistency, 2, 1, r1, r2, [])  # rollback
    assert "went back from 2 to 1" in err.message
    _rejects(verify_consistency, 1, 0, r1, r2, [])
    _rejects(verify_consistency, 1, 2, r1, r2, [])  # needs a proof
    _rejects(verify_consistency, -1, 2, r1, r2, [])


def test_consistency_detects_a_fork() -> None:
    leaves = hashes(40, seed=9)
    forked = list(leaves)
    forked[17] = leaf_hash(b"rewritten history")
    honest, evil = Store(leaves), Store(forked)
    for m in (18, 20, 32):
        for n in (m, 33, 40):
            old_root = tree_root(m, honest.get)
            new_root = tree_root(n, evil.get)
            for proof in (consistency_proof(m, n, evil.get), consistency_proof(m, n, honest.get)):
                with pytest.raises(VerificationError):
                    verify_consistency(m, n, old_root, new_root, proof)
    # A truncated log (prefix of the old one) is a rollback.
    _rejects(verify_consistency, 40, 30, tree_root(40, honest.get), tree_root(30, honest.get), [])
