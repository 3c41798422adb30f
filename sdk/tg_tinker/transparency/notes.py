"""C2SP signed notes with Ed25519 keys: the envelope of every checkpoint.

A note is a text body, a blank line and signature lines ``— <key name> <base64(key id || signature)>``;
a note may carry several, so keys can rotate. Verifier keys use the
``<name>+<hex key id>+<base64(0x01 || public key)>`` form, signer keys Go ``sumdb/note``'s
``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import VerificationError

__all__ = ["NoteSigner", "NoteVerifier", "sign_note", "verify_note", "b64encode", "b64decode", "valid_text"]

_ALG_ED25519 = 0x01
_SIG_PREFIX = "\u2014 "  # EM DASH, space
_MAX_SIGNATURES = 100


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes | None:
    """Strict, canonical standard base64 (padded); ``None`` when malformed."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if b64encode(raw) == text else None


def _valid_key_name(name: Any) -> bool:
    return (isinstance(name, str) and name != "" and "+" not in name
            and not any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name))


def valid_text(text: str) -> bool:
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
        if not isinstance(private_key, Ed25519PrivateKey):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
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
        parts = skey.split("+", 4) if isinstance(skey, str) else []  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise ValueError("malformed signer key: expected PRIVATE+KEY+<name>+<id>+<key>")
        raw = b64decode(parts[4])
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
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{b64encode(bytes([_ALG_ED25519]) + seed)}"

    @property
    def vkey(self) -> str:
        """The verifier key to give to clients: ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        return f"{self.name}+{self.key_id.hex()}+{b64encode(bytes([_ALG_ED25519]) + self.public_key)}"

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.public_key)

    def signature_line(self, body: str) -> str:
        """The ``— <name> <base64(key id || signature)>\\n`` line for ``body``."""
        sig = self._key.sign(_check_body(body).encode("utf-8"))
        return f"{_SIG_PREFIX}{self.name} {b64encode(self.key_id + sig)}\n"

    def sign(self, body: str) -> str:
        """The complete signed note: ``body``, a blank line and this key's signature line."""
        return sign_note(body, [self])


def _check_body(body: Any) -> str:
    if not isinstance(body, str) or not body.endswith("\n"):
        raise ValueError("a note body must be text ending with a newline")
    if not valid_text(body):
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
        if not isinstance(public_key, bytes) or len(public_key) != 32:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_key = public_key
        self.key_id = _key_id(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<8 hex digits key id>+<base64(0x01 || 32-byte public key)>``."""
        parts = vkey.split("+", 2) if isinstance(vkey, str) else []  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        if len(parts) != 3:
            raise ValueError("malformed verifier key: expected <name>+<key id>+<key>")
        name, key_id, key = parts
        if len(key_id) != 8 or any(ch not in "0123456789abcdef" for ch in key_id):
            raise ValueError("malformed verifier key: the key id is not 8 lowercase hex digits")
        raw = b64decode(key)
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
        return f"{self.name}+{self.key_id.hex()}+{b64encode(bytes([_ALG_ED25519]) + self.public_key)}"

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
    if not isinstance(note, str):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise VerificationError("signed note must be text", check=c)
    if not valid_text(note):
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
        raw = b64decode(blob) if sep else None
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

