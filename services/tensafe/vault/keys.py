"""The key hierarchy: master key -> per-tenant KEK (versioned) -> per-artifact DEK.

Only wrapped keys are ever stored. A KEK is wrapped by the master key with AES-256-GCM,
its associated data naming the tenant and version; a DEK is wrapped by a KEK, its
associated data naming the tenant, the artifact and the KEK version, so a wrapped key
moved to another row or tenant does not unwrap.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.runtime.config import ServerConfig

KEY_BYTES = 32
_NONCE = 12


class KeyUnwrapError(Exception):
    """A wrapped key did not authenticate: wrong key, or the record was altered."""


class MasterKey(Protocol):
    """Wraps and unwraps KEKs. A KMS plugs in here (wrap/unwrap calls to the KMS)."""

    key_id: str

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...


def aead_wrap(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def aead_unwrap(key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], aad)
    except (InvalidTag, ValueError):
        raise KeyUnwrapError("wrapped key failed authentication") from None


class LocalMasterKey:
    """A 32-byte master key held in this process (from a file or the environment)."""

    def __init__(self, key: bytes, key_id: str) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the vault master key must be {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.key_id = key_id

    @classmethod
    def from_file(cls, path: Path) -> LocalMasterKey:
        if not path.exists():
            raise FileNotFoundError(f"vault master key {path} is missing: run `tensafe init`, or set "
                                    "TENSAFE_MASTER_KEY_FILE / TENSAFE_MASTER_KEY")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(f"vault master key {path} is readable by others (mode {mode:o}); chmod 600 it")
        return cls(path.read_bytes(), key_id=f"file:{path.name}")

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        return aead_wrap(self._key, plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return aead_unwrap(self._key, wrapped, aad)


def load_master_key(config: ServerConfig) -> MasterKey:
    if config.master_key:
        try:
            raw = base64.b64decode(config.master_key, validate=True)
        except ValueError:
            raise ValueError("TENSAFE_MASTER_KEY must be base64") from None
        return LocalMasterKey(raw, key_id="env:TENSAFE_MASTER_KEY")
    path = Path(config.master_key_file) if config.master_key_file else config.data_dir / "master.key"
    return LocalMasterKey.from_file(path)


def kek_aad(tenant_id: str, version: int) -> bytes:
    return f"tensafe-kek|{tenant_id}|{version}".encode()


def dek_aad(tenant_id: str, artifact_id: str, kek_version: int) -> bytes:
    return f"tensafe-dek|{tenant_id}|{artifact_id}|{kek_version}".encode()
