"""The encrypted artifact container (format version 1): a header, then AES-256-GCM segments in STREAM.

Both the vault (encrypting on put, decrypting on get) and the SDK (decrypting a pulled artifact with its
unwrapped data key) use this package, so it imports only the standard library and ``cryptography``.
The format and the reasons behind it are in docs/artifact-format.md. Its modules, along the format's seams:
``_header`` (the header's layout, constants and parsing), ``_cipher`` (the segment cipher: key derivation,
STREAM nonces, AES-256-GCM), ``_buffers`` (byte queue, pipelined SHA-256) and ``_stream`` (the writer,
the reader and the helpers on them). Import from ``tg_tinker.container``; the submodules are private.

>>> import os
>>> key = os.urandom(32)
>>> blob = b"".join(encrypt_chunks([b"weights"], key, "tnt_a", "art_1"))
>>> decrypt_bytes(blob, key, "tnt_a", "art_1")
b'weights'
"""

from __future__ import annotations

from tg_tinker.container._header import (
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    KEY_SIZE,
    MAX_SEGMENT_SIZE,
    TAG_SIZE,
    ContainerHeader,
    read_header,
    stored_size,
)
from tg_tinker.container._header import MAGIC as MAGIC
from tg_tinker.container._header import MAX_SEGMENTS as MAX_SEGMENTS
from tg_tinker.container._header import NONCE_PREFIX_SIZE as NONCE_PREFIX_SIZE
from tg_tinker.container._header import SALT_SIZE as SALT_SIZE
from tg_tinker.container._stream import (
    ContainerReader,
    ContainerWriter,
    EncryptedStream,
    EncryptResult,
    decrypt_bytes,
    decrypt_chunks,
    encrypt_chunks,
)

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_SEGMENT_SIZE",
    "MAX_SEGMENT_SIZE",
    "TAG_SIZE",
    "KEY_SIZE",
    "ContainerHeader",
    "ContainerWriter",
    "ContainerReader",
    "EncryptedStream",
    "EncryptResult",
    "stored_size",
    "encrypt_chunks",
    "decrypt_chunks",
    "decrypt_bytes",
    "read_header",
]
