"""Verifiable audit log: RFC 9162 Merkle proofs and C2SP signed checkpoints.

The cryptographic core shared by the ledger service (which builds proofs) and tenants (who verify
them on their own machines). It needs only the standard library and ``cryptography``.

:mod:`.merkle`
    RFC 9162 (= RFC 6962) hashing and the server side: roots and proofs computed from the stored
    perfect subtree hashes, ``O(log n)`` reads each; :class:`CompactRange` for appending.
:mod:`.proofs`
    The client side: inclusion and consistency proofs checked (RFC 9162 2.1.3.2 and 2.1.4.2).
:mod:`.notes`
    C2SP signed notes with Ed25519 keys (several signatures per note, so keys can rotate).
:mod:`.checkpoints`
    C2SP ``tlog-checkpoint`` bodies in signed notes, and :class:`LogVerifier`, which ties the two
    together on the client: it remembers the last checkpoint it accepted and refuses a newer one
    that is smaller (rollback) or not an extension of it (fork).

Every name is importable from ``tg_tinker.transparency`` itself.
"""

from .checkpoints import (
    Checkpoint,
    ConsistencyFetcher,
    LogVerifier,
    format_checkpoint,
    open_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
)
from .errors import VerificationError
from .merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MAX_TREE_SIZE,
    CompactRange,
    GetNode,
    completed_nodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    subtree_hash,
    tree_root,
)
from .notes import NoteSigner, NoteVerifier, sign_note, verify_note
from .proofs import root_from_inclusion_proof, verify_consistency, verify_inclusion

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
    "MAX_TREE_SIZE",
    "GetNode",
    "ConsistencyFetcher",
]
