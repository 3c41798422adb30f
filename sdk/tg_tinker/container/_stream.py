"""The container's writer and reader, streaming and in constant memory, and the helpers built on them
(:func:`encrypt_chunks`, :func:`decrypt_chunks`, :func:`decrypt_bytes`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag

from tg_tinker.container._buffers import Pieces, PlaintextDigest, PlaintextSize
from tg_tinker.container._cipher import SegmentCipher
from tg_tinker.container._header import (
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    MAX_SEGMENT_SIZE,
    NONCE_PREFIX_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    ContainerHeader,
    check_key,
    integrity_error,
    parse_header,
)
from tg_tinker.errors import IntegrityError


@dataclass(frozen=True)
class EncryptResult:
    """What an encryption pass recorded: the plaintext's SHA-256 and size, and the container's size."""

    header: ContainerHeader
    plaintext_sha256: bytes
    plaintext_size: int
    stored_size: int


class ContainerWriter:
    """Encrypts one artifact as a stream: write :attr:`header`, then every list from :meth:`update`, then
    :meth:`finalize`'s segment. Buffers less than two segments whatever the artifact's size.

    ``data_key`` is the artifact's 32-byte data key; the AES-256-GCM key is derived from it, a random salt and
    the artifact's identity. After :meth:`finalize`, :attr:`plaintext_sha256`, :attr:`plaintext_size` and
    :attr:`stored_size` are set.
    """

    def __init__(self, data_key: bytes, tenant_id: str, artifact_id: str,
                 segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        check_key(data_key)
        if not isinstance(segment_size, int) or not 1 <= segment_size <= MAX_SEGMENT_SIZE:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise ValueError(f"segment_size must be an int in 1..{MAX_SEGMENT_SIZE}, got {segment_size!r}")
        self.container_header = ContainerHeader(FORMAT_VERSION, segment_size, os.urandom(NONCE_PREFIX_SIZE),
                                                os.urandom(SALT_SIZE), tenant_id, artifact_id)
        self.header: bytes = self.container_header.encode()
        self._seal = SegmentCipher(data_key, self.container_header, self.header)
        self._pending = Pieces()
        self._digest = PlaintextDigest()
        self._stored = len(self.header)
        self._done = False
        self.plaintext_sha256: bytes | None = None
        self.plaintext_size: int | None = None
        self.stored_size: int | None = None

    @property
    def segment_size(self) -> int:
        return self.container_header.segment_size

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add plaintext; return the encrypted segments it completed, in order (often none).

        A full segment stays buffered until more data or :meth:`finalize` arrives, since it may be the final one.
        ``bytes`` are buffered without a copy; a mutable buffer is copied, so the caller may reuse it.
        """
        if self._done:
            raise ValueError("the container writer is already finalized")
        self._pending.append(data)
        size = self.segment_size
        out: list[bytes] = []
        while self._pending.size > size:
            out.append(self._encrypt(self._pending.take(size), last=False))
        return out

    def finalize(self) -> bytes:
        """Return the final segment (last flag set) and record the digest and sizes."""
        if self._done:
            raise ValueError("the container writer is already finalized")
        segment = self._encrypt(self._pending.take(self._pending.size), last=True)
        self._done = True
        self.plaintext_sha256 = self._digest.digest()
        self.plaintext_size = self._digest.size
        self.stored_size = self._stored
        return segment

    def result(self) -> EncryptResult:
        """The recorded digest and sizes (after :meth:`finalize`)."""
        sha256, size, stored = self.plaintext_sha256, self.plaintext_size, self.stored_size
        if not self._done or sha256 is None or size is None or stored is None:
            raise RuntimeError("the container writer is not finalized yet")
        return EncryptResult(self.container_header, sha256, size, stored)

    def _encrypt(self, plaintext: bytes | memoryview, last: bool) -> bytes:
        self._digest.update(plaintext)  # hashed on a helper thread while this thread encrypts
        segment = self._seal.encrypt(plaintext, last)
        self._stored += len(segment)
        return segment


class ContainerReader:
    """Decrypts and verifies one container as a stream, in constant memory.

    ``tenant_id`` and ``artifact_id`` are the identity the caller expects; the header must name them. ``None``
    takes the identity from the header (still authenticated by every segment). :meth:`update` returns the
    plaintext of each segment as soon as it is authenticated; the artifact is complete and untruncated only
    once :meth:`finalize` has returned (it returns the final segment's plaintext). Raises
    :class:`IntegrityError` on any tampering.
    """

    def __init__(self, data_key: bytes, tenant_id: str | None = None, artifact_id: str | None = None, *,
                 digest: bool = True) -> None:
        """``digest=False`` skips the plaintext SHA-256 (``plaintext_sha256`` stays None): the AEAD tags and
        the STREAM nonces already authenticate every byte, its order and the end, so a reader that does not
        need the digest saves the hashing, the slowest step of decryption."""
        check_key(data_key)
        self._data_key = data_key
        self._expected_tenant = tenant_id
        self._expected_artifact = artifact_id
        self._head: bytearray | None = bytearray()
        self.header: ContainerHeader | None = None
        self._open: SegmentCipher | None = None
        self._pending = Pieces()
        self._digest = PlaintextDigest() if digest else PlaintextSize()
        self._done = False
        self.plaintext_sha256: bytes | None = None
        self.plaintext_size: int | None = None

    @property
    def artifact_id(self) -> str | None:
        """The artifact named in errors: the expected one, else the header's once parsed."""
        if self._expected_artifact is not None:
            return self._expected_artifact
        return self.header.artifact_id if self.header is not None else None

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add container bytes; return the plaintext of every segment completed and authenticated by them.

        The last segment is held back until :meth:`finalize`, since only the end of input shows which is last.
        """
        if self._done:
            raise ValueError("the container reader is already finalized")
        if self._head is not None:
            self._head += data
            parsed = parse_header(memoryview(self._head), self.artifact_id)
            if parsed is None:
                return []
            header, length = parsed
            self._start(header, bytes(self._head[:length]))
            data, self._head = bytes(self._head[length:]), None
        self._pending.append(data)
        block = self._cipher().header.segment_size + TAG_SIZE
        out: list[bytes] = []
        while self._pending.size > block:  # more bytes follow, so this segment is not the final one
            out.append(self._decrypt(self._pending.take(block), last=False))
        return out

    def finalize(self) -> bytes:
        """Authenticate the final segment and return its plaintext; then :attr:`plaintext_sha256` and
        :attr:`plaintext_size` are set. Raises :class:`IntegrityError` if the header or the final segment is
        missing, or data follows the final segment."""
        if self._done:
            raise ValueError("the container reader is already finalized")
        self._done = True
        if self._head is not None:
            raise self._error(f"truncated: the header is incomplete ({len(self._head)} bytes)")
        rest = self._pending.take(self._pending.size)
        index = self._cipher().index
        if not rest:
            raise self._error(f"truncated: final segment missing (the stream ends after segment {index - 1})")
        if len(rest) < TAG_SIZE:
            raise self._error(f"truncated: segment {index} is incomplete ({len(rest)} bytes)")
        plaintext = self._decrypt(rest, last=True)
        self.plaintext_sha256 = self._digest.digest()
        self.plaintext_size = self._digest.size
        return plaintext

    def _start(self, header: ContainerHeader, raw: bytes) -> None:
        expected = (self._expected_tenant, self._expected_artifact)
        if any(want is not None and want != got for want, got in zip(expected, (header.tenant_id,
                                                                               header.artifact_id), strict=True)):
            raise self._error(f"header identity mismatch: the header names tenant {header.tenant_id!r} and "
                              f"artifact {header.artifact_id!r}, expected tenant {self._expected_tenant!r} and "
                              f"artifact {self._expected_artifact!r}")
        self.header = header
        self._open = SegmentCipher(self._data_key, header, raw)

    def _cipher(self) -> SegmentCipher:
        """The segment cipher, set with :attr:`header` once the header is parsed (callers check ``_head`` first)."""
        if self._open is None:
            raise RuntimeError("the container header has not been read yet")
        return self._open

    def _decrypt(self, segment: bytes | memoryview, last: bool) -> bytes:
        cipher = self._cipher()
        index = cipher.index
        try:
            plaintext = cipher.decrypt(segment, last)
        except InvalidTag:
            raise self._error(self._diagnose(segment, index, last)) from None
        if not last and len(plaintext) != cipher.header.segment_size:  # unreachable with a valid tag; kept explicit
            raise self._error(f"segment {index} has the wrong length")
        self._digest.update(plaintext)
        return plaintext

    def _diagnose(self, segment: bytes | memoryview, index: int, last: bool) -> str:
        # Only on the failure path: try the other last flag, which tells truncation and trailing data apart
        # from corruption. Neither outcome releases plaintext.
        if self._cipher().authenticates(segment, index, not last):
            if last:
                return f"truncated: final segment missing (the stream ends after segment {index})"
            return f"trailing data after final segment {index}"
        if last:
            return (f"segment {index} (the final one) failed authentication: corrupted, truncated mid-segment, "
                    "followed by trailing data, or the wrong data key")
        return f"segment {index} failed authentication: corrupted, reordered, spliced, or the wrong data key"

    def _error(self, what: str) -> IntegrityError:
        self._done = True
        self._digest.close()
        return integrity_error(self.artifact_id, what)


class EncryptedStream:
    """The container bytes of :func:`encrypt_chunks`: iterate it (header first, then each segment); once it
    is exhausted, :attr:`result` holds the plaintext's SHA-256 and the sizes."""

    def __init__(self, writer: ContainerWriter, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self._writer = writer
        self._chunks = chunks
        self._started = False

    @property
    def header(self) -> ContainerHeader:
        return self._writer.container_header

    @property
    def result(self) -> EncryptResult:
        """Available once the stream is exhausted; raises :class:`RuntimeError` before."""
        return self._writer.result()

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("an EncryptedStream can be iterated only once")
        self._started = True
        writer = self._writer
        yield writer.header
        for chunk in self._chunks:
            # segment-sized slices keep each update's output list to one segment, whatever the chunk size
            yield from _sliced(writer.update, chunk, writer.segment_size)
        yield writer.finalize()


def encrypt_chunks(chunks: Iterable[bytes | bytearray | memoryview], data_key: bytes, tenant_id: str,
                   artifact_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> EncryptedStream:
    """Encrypt a stream of plaintext chunks into a container, lazily and in constant memory."""
    return EncryptedStream(ContainerWriter(data_key, tenant_id, artifact_id, segment_size), chunks)


def decrypt_chunks(chunks: Iterable[bytes | bytearray | memoryview], data_key: bytes, tenant_id: str | None,
                   artifact_id: str | None) -> Iterator[bytes]:
    """Decrypt a stream of container bytes, yielding authenticated plaintext as it goes.

    Raises :class:`IntegrityError` on tampering; the plaintext is complete only when the iterator is exhausted
    without an error.
    """
    reader = ContainerReader(data_key, tenant_id, artifact_id)
    for chunk in chunks:
        block = reader.header.segment_size + TAG_SIZE if reader.header is not None else DEFAULT_SEGMENT_SIZE
        yield from _sliced(reader.update, chunk, block)
    final = reader.finalize()
    if final:
        yield final


def decrypt_bytes(container: bytes | bytearray | memoryview, data_key: bytes, tenant_id: str | None = None,
                  artifact_id: str | None = None) -> bytes:
    """Decrypt a whole container held in memory (for example one pulled with ``pull_artifact``).

    ``None`` for ``tenant_id`` or ``artifact_id`` takes it from the header; it is still authenticated.
    """
    reader = ContainerReader(data_key, tenant_id, artifact_id)
    parts = reader.update(container)
    parts.append(reader.finalize())
    return b"".join(parts)


# -- internals ---------------------------------------------------------------------------------------------


def _sliced(update: Any, chunk: bytes | bytearray | memoryview, step: int) -> Iterator[bytes]:
    view = memoryview(chunk).cast("B")
    if not isinstance(view.obj, bytes):
        view = memoryview(view.tobytes())  # the caller may reuse a mutable buffer once we yield
    for start in range(0, len(view), step):
        yield from update(view[start:start + step])
