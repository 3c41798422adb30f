"""The segment cipher: AES-256-GCM under a key derived (HKDF-SHA256) from the artifact's data key, a salt and
the artifact's identity, with STREAM nonces (prefix || segment index || last flag) and the whole header as
associated data. Standard library and ``cryptography`` only."""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tg_tinker.container._header import MAX_SEGMENTS, ContainerHeader

_NONCE_TAIL = struct.Struct(">IB")  # segment index, last flag
_KDF_LABEL = b"tensafe-artifact-v1|"


class SegmentCipher:
    """AES-256-GCM under the artifact's derived key, with STREAM nonces: prefix || index (u32) || last flag."""

    def __init__(self, data_key: bytes, header: ContainerHeader, raw_header: bytes) -> None:
        info = _KDF_LABEL + header.tenant_id.encode() + b"|" + header.artifact_id.encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt, info=info).derive(data_key)
        self._aead = AESGCM(key)
        self.header = header
        self._prefix = header.nonce_prefix
        self._aad = raw_header  # the whole header: binds version, segment size, prefix, salt, tenant and artifact
        self._last_seen = False
        self.index = 0

    def _nonce(self, index: int, last: bool) -> bytes:
        return self._prefix + _NONCE_TAIL.pack(index, 1 if last else 0)

    def _advance(self, last: bool) -> int:
        if self._last_seen:
            raise ValueError("no segment may follow the final one")
        if self.index >= MAX_SEGMENTS:
            raise ValueError(f"a container holds at most {MAX_SEGMENTS} segments; use a larger segment size")
        self._last_seen = last
        index, self.index = self.index, self.index + 1
        return index

    def encrypt(self, plaintext: bytes | memoryview, last: bool) -> bytes:
        nonce = self._nonce(self.index, last)
        self._advance(last)
        return self._aead.encrypt(nonce, plaintext, self._aad)

    def decrypt(self, segment: bytes | memoryview, last: bool) -> bytes:
        """The plaintext of the next segment; raises ``InvalidTag`` if it does not authenticate."""
        plaintext = self._aead.decrypt(self._nonce(self.index, last), segment, self._aad)
        self._advance(last)
        return plaintext

    def authenticates(self, segment: bytes | memoryview, index: int, last: bool) -> bool:
        """Whether ``segment`` authenticates as segment ``index`` with that last flag (state unchanged)."""
        if index >= MAX_SEGMENTS:
            return False
        try:
            self._aead.decrypt(self._nonce(index, last), segment, self._aad)
        except InvalidTag:
            return False
        return True
