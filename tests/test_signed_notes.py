"""The audit ledger's signed checkpoints: C2SP signed notes (the ``PeterNeumann`` known answer of Go's
``golang.org/x/mod/sumdb/note``, key and note manglings), checkpoints, and the client's log verifier
following a growing log (rollback, fork and strangers refused). The Merkle proofs: test_transparency.py."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_transparency import RFC_ROOTS, SOME_HASH, Store, _rejects

from tg_tinker.transparency import (
    EMPTY_ROOT,
    Checkpoint,
    LogVerifier,
    NoteSigner,
    NoteVerifier,
    consistency_proof,
    format_checkpoint,
    inclusion_proof,
    leaf_hash,
    open_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    sign_note,
    tree_root,
    verify_note,
)

# --- Go sumdb/note known answer (golang.org/x/mod/sumdb/note examples)

GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann "
           "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


# --- Signed notes


def test_go_sumdb_note_known_answer() -> None:
    signer = NoteSigner.from_skey(GO_SKEY)
    assert signer.vkey == GO_VKEY and signer.skey == GO_SKEY
    assert signer.sign(GO_TEXT) == GO_NOTE  # Ed25519 is deterministic
    verifier = NoteVerifier.from_vkey(GO_VKEY)
    assert verifier.key_id.hex() == "c74f20a3" and verifier.vkey == GO_VKEY
    assert verify_note(GO_NOTE, [verifier]) == GO_TEXT
    assert verify_note(GO_NOTE.encode("utf-8"), [verifier]) == GO_TEXT


def test_vkey_manglings_are_rejected() -> None:
    for i in range(len(GO_VKEY) + 1):
        for j in range(i + 1, len(GO_VKEY) + 1):
            if (i, j) != (0, len(GO_VKEY)):
                with pytest.raises(ValueError):
                    NoteVerifier.from_vkey(GO_VKEY[i:j])
    for i, ch in enumerate(GO_VKEY):
        with pytest.raises(ValueError):
            NoteVerifier.from_vkey(GO_VKEY[:i] + chr(ord(ch) + 1) + GO_VKEY[i + 1:])
    pub = base64.b64decode(GO_VKEY.split("+", 2)[2])
    for bad in ("", "PeterNeumann", "PeterNeumann+c74f20a3",
                "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # upper-case id
                "PeterNeumann+c74f20a3+" + base64.b64encode(b"\x02" + pub[1:]).decode(),  # another algorithm
                "PeterNeumann+c74f20a3+" + base64.b64encode(pub + b"\x00").decode(),  # wrong length
                "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"):
        with pytest.raises(ValueError):
            NoteVerifier.from_vkey(bad)
    with pytest.raises(ValueError):
        NoteSigner("bad name", Ed25519PrivateKey.generate())
    with pytest.raises(ValueError):
        NoteSigner("a+b", Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def keys() -> tuple[NoteSigner, NoteSigner, NoteSigner]:
    return (NoteSigner.generate("ledger.tensafe.example/log"), NoteSigner.generate("ledger.tensafe.example/log"),
            NoteSigner.generate("witness.example"))


def test_note_signatures(keys) -> None:
    old, new, other = keys
    body = format_checkpoint("ledger.tensafe.example/log", 8, RFC_ROOTS[8])
    note = old.sign(body)
    assert note.startswith(body + "\n\u2014 ledger.tensafe.example/log ") and note.endswith("\n")
    assert verify_note(note, [old.verifier()]) == body
    assert verify_note(note, [NoteVerifier.from_vkey(old.vkey), other.verifier()]) == body
    # Signed by an unknown key only.
    err = _rejects(verify_note, note, [new.verifier(), other.verifier()])
    assert "no signature by a known key" in err.message
    _rejects(verify_note, note, [])
    # Modified body.
    _rejects(verify_note, note.replace("\n8\n", "\n9\n"), [old.verifier()])
    # Signature of another note.
    body2 = format_checkpoint("ledger.tensafe.example/log", 9, RFC_ROOTS[8])
    swapped = body2 + "\n" + old.sign(body).split("\n\n", 1)[1]
    err = _rejects(verify_note, swapped, [old.verifier()])
    assert "invalid signature by known key" in err.message
    # Key rotation: signed by the old and the new key; either verifier alone accepts it, and so does a
    # client that knows only one of them while the other signature comes from a key it does not know.
    both = sign_note(body, [old, new, other])
    assert both.count("\u2014 ") == 3
    for vs in ([old.verifier()], [new.verifier()], [other.verifier()], [old.verifier(), new.verifier()]):
        assert verify_note(both, vs) == body
    # A signature line under a known name but another key id is an unknown key: ignored.
    foreign = sign_note(body, [NoteSigner.generate(old.name), old])
    assert verify_note(foreign, [old.verifier()]) == body
    _rejects(verify_note, sign_note(body, [NoteSigner.generate(old.name)]), [old.verifier()])


def test_malformed_notes(keys) -> None:
    old = keys[0]
    v = [old.verifier()]
    body = format_checkpoint("o", 1, RFC_ROOTS[1])
    note = old.sign(body)
    sig_line = note[len(body) + 1:]
    blob = sig_line.split(" ")[2].strip()
    for bad in (
        body,  # no signatures
        body + sig_line,  # no blank line
        body + "\n",  # blank line, no signature
        note[:-1],  # last line without newline
        body + "\n" + sig_line.replace("\u2014", "-"),  # hyphen, not em dash
        body + "\n" + sig_line.replace("\u2014 ", "\u2014"),
        body + "\n" + f"\u2014 {old.name} {blob[:-1]}\n",  # bad base64 padding
        body + "\n" + f"\u2014 {old.name} {blob[:-4]}!!!!\n",  # not base64
        body + "\n" + f"\u2014 {old.name} AAAA\n",  # too short for key id + signature
        body + "\n" + f"\u2014 {old.name}\n",
        body + "\n" + f"\u2014 {old.name} {blob} extra\n",
        body + "\n" + sig_line + "\n",  # empty signature line
        body.replace("\n", "\r\n", 1) + "\n" + sig_line,  # control character
        body + "\n" + sig_line * 101,  # too many signatures
        b"\xff\xfe" + note.encode(),
        12345,
    ):
        _rejects(verify_note, bad, v)
    # Unknown signatures are ignored, but a malformed line still rejects the note.
    unknown = f"\u2014 someone.else {base64.b64encode(b'1234' + bytes(64)).decode()}\n"
    assert verify_note(body + "\n" + unknown + sig_line, v) == body
    # Repeated identical signatures by a known key are fine.
    assert verify_note(note + sig_line, v) == body
    with pytest.raises(ValueError):
        sign_note("no newline", [old])
    with pytest.raises(ValueError):
        sign_note("tab\tinside\n", [old])
    with pytest.raises(ValueError):
        sign_note(body, [])


# --- Checkpoints


def test_checkpoint_format_and_parse() -> None:
    body = format_checkpoint("example.com/log", 8, RFC_ROOTS[8])
    assert body == "example.com/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
    assert parse_checkpoint(body) == Checkpoint("example.com/log", 8, RFC_ROOTS[8])
    with_ext = format_checkpoint("o", 0, EMPTY_ROOT, ["— witness note", "Timestamp: 1"])
    assert parse_checkpoint(with_ext).extensions == ("— witness note", "Timestamp: 1")
    root = base64.b64encode(RFC_ROOTS[8]).decode()
    for bad in (
        "", "o\n8\n", "o\n8\n" + root, "\n8\n" + root + "\n", "o\n-1\n" + root + "\n", "o\n+8\n" + root + "\n",
        "o\n08\n" + root + "\n", "o\n8.0\n" + root + "\n", "o\n \n" + root + "\n", "o\n\u0668\n" + root + "\n",
        "o\n99999999999999999999\n" + root + "\n", "o\n8\n" + root.rstrip("=") + "\n",
        "o\n8\n" + root[:-2] + "x=\n", "o\n8\n" + base64.b64encode(b"x" * 31).decode() + "\n",
        "o\n8\n" + base64.b64encode(b"x" * 33).decode() + "\n", "o\n8\n" + root + "\n\n",
        "o\n8\n" + root.replace("+", "-") + "\n",
    ):
        err = _rejects(parse_checkpoint, bad)
        assert err.details["check"] == "checkpoint"
    for args in (("", 1, EMPTY_ROOT), ("a\nb", 1, EMPTY_ROOT), ("o", -1, EMPTY_ROOT), ("o", 1, b"short")):
        with pytest.raises((ValueError, TypeError)):
            format_checkpoint(*args)


def test_open_checkpoint(keys) -> None:
    old = keys[0]
    cp = Checkpoint(old.name, 5, RFC_ROOTS[5])
    note = sign_checkpoint(cp, [old])
    assert open_checkpoint(note, [old.verifier()], old.name) == cp
    err = _rejects(open_checkpoint, note, [old.verifier()], "another.log")
    assert err.details["check"] == "origin"


# --- The client's log verifier


class Log:
    """A toy log server: leaves, a perfect-node store and checkpoint notes."""

    def __init__(self, signer: NoteSigner, store: Store | None = None) -> None:
        self.signer = signer
        self.store = store or Store()

    def append(self, n: int, tag: bytes = b"") -> None:
        for _ in range(n):
            self.store.append(leaf_hash(tag + str(self.store.size).encode()))

    def note(self, size: int | None = None) -> str:
        size = self.store.size if size is None else size
        return sign_checkpoint(Checkpoint(self.signer.name, size, tree_root(size, self.store.get)), [self.signer])

    def consistency(self, m: int, n: int) -> list[bytes]:
        return consistency_proof(m, n, self.store.get)


def test_log_verifier_follows_a_growing_log(keys) -> None:
    signer = keys[0]
    log = Log(signer)
    client = LogVerifier(signer.name, [signer.vkey])
    assert client.checkpoint is None
    calls = []

    def fetch(m: int, n: int) -> list[bytes]:
        calls.append((m, n))
        return log.consistency(m, n)

    log.append(0)
    assert client.check(log.note(), fetch).size == 0  # the empty log
    for grow in (1, 1, 2, 5, 0, 13, 64, 1):
        log.append(grow)
        cp = client.check(log.note(), fetch)
        assert cp.size == log.store.size and client.checkpoint == cp
    assert calls == [(1, 2), (2, 4), (4, 9), (9, 22), (22, 86), (86, 87)]
    # Inclusion against the remembered checkpoint.
    client.verify_inclusion(leaf_hash(b"17"), 17, inclusion_proof(17, 87, log.store.get))
    _rejects(client.verify_inclusion, leaf_hash(b"18"), 17, inclusion_proof(17, 87, log.store.get))
    # State survives a JSON round trip.
    restored = LogVerifier.from_state(json.loads(json.dumps(client.state())))
    assert restored.checkpoint == Checkpoint(signer.name, 87, tree_root(87, log.store.get))
    log.append(3)
    assert restored.check(log.note(), fetch).size == 90


def test_log_verifier_rejects_rollback_fork_and_strangers(keys) -> None:
    signer, new, other = keys
    log = Log(signer)
    log.append(20)
    client = LogVerifier(signer.name, [signer.verifier()])
    client.check(log.note(), log.consistency)
    state = client.state()
    # Rollback: an older (smaller) checkpoint, validly signed.
    err = _rejects(client.check, log.note(10), log.consistency)
    assert err.details["check"] == "rollback"
    # Fork at the same size.
    evil = Log(signer)
    evil.append(20, tag=b"evil")
    err = _rejects(client.check, evil.note(), evil.consistency)
    assert err.details["check"] == "fork"
    # Fork at a larger size: history rewritten below the remembered size, then extended.
    evil2 = Log(signer)
    evil2.append(19)
    evil2.append(11, tag=b"x")
    err = _rejects(client.check, evil2.note(), evil2.consistency)
    assert err.details["check"] == "fork"
    # ... even when the server answers with the honest proof or garbage.
    log.append(10)
    _rejects(client.check, evil2.note(), log.consistency)
    _rejects(client.check, log.note(), lambda m, n: [SOME_HASH] * 3)
    # A checkpoint signed by an unknown key, or for another log.
    stranger = Log(other)
    stranger.store = log.store
    _rejects(client.check, stranger.note(), log.consistency)
    _rejects(client.check, Log(new, log.store).note(), log.consistency)
    err = _rejects(client.check, sign_checkpoint(Checkpoint("other.log", 30, tree_root(30, log.store.get)),
                                                  [signer]), log.consistency)
    assert err.details["check"] == "origin"
    # None of the failures moved the client's state; the honest successor is still accepted.
    assert client.state() == state
    assert client.check(log.note(), log.consistency).size == 30
    # Rotation: the client trusts the old and new key; a note signed by the new key only is accepted.
    rotated = LogVerifier.from_state(client.state(), [signer.verifier(), new.verifier()])
    log.signer = new
    log.append(2)
    assert rotated.check(log.note(), log.consistency).size == 32


def test_log_verifier_seeded_state(keys) -> None:
    signer = keys[0]
    log = Log(signer)
    log.append(9)
    seeded = LogVerifier(signer.name, [signer.vkey], size=4, root=tree_root(4, log.store.get))
    assert seeded.check(log.note(), log.consistency).size == 9
    wrong = LogVerifier(signer.name, [signer.vkey], size=4, root=SOME_HASH)
    _rejects(wrong.check, log.note(), log.consistency)
    with pytest.raises(ValueError):
        LogVerifier(signer.name, [])
    with pytest.raises(ValueError):
        LogVerifier(signer.name, [signer.vkey], size=4)
