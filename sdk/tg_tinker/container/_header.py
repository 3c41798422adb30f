"""The container's header (its layout, encoding and parsing), the format's constants, and the checks and
errors the rest of the container shares. Standard library only, plus :class:`tg_tinker.errors.IntegrityError`."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tg_tinker.errors import IntegrityError

FORMAT_VERSION = 1
DEFAULT_SEGMENT_SIZE = 1 << 20
# A reader buffers up to two segments before it can authenticate anything, and the segment size comes from
# the (not yet authenticated) header: the bound keeps a forged header from making a reader buffer gigabytes.
MAX_SEGMENT_SIZE = 1 << 24
TAG_SIZE = 16
KEY_SIZE = 32
MAGIC = b"TSAF"
NONCE_PREFIX_SIZE = 7
SALT_SIZE = 16
MAX_SEGMENTS = 1 << 32  # the segment counter in the nonce is a u32

_FIXED = struct.Struct(">4sBI7s16s")  # magic, version, segment size, nonce prefix, salt: 32 bytes
_LEN = struct.Struct(">H")


@dataclass(frozen=True)
class ContainerHeader:
    """The parsed header of a container. Every field is authenticated (as associated data) by each segment."""

    version: int
    segment_size: int
    nonce_prefix: bytes
    salt: bytes
    tenant_id: str
    artifact_id: str

    def encode(self) -> bytes:
        """The header's bytes, exactly as written at the start of the container."""
        tenant, artifact = _id_bytes(self.tenant_id, "tenant_id"), _id_bytes(self.artifact_id, "artifact_id")
        return b"".join((_FIXED.pack(MAGIC, self.version, self.segment_size, self.nonce_prefix, self.salt),
                         _LEN.pack(len(tenant)), tenant, _LEN.pack(len(artifact)), artifact))


def stored_size(plaintext_size: int, header_len: int, segment_size: int) -> int:
    """Bytes a container takes for ``plaintext_size`` bytes of plaintext (an empty one still has a final segment)."""
    segments = max(1, -(-plaintext_size // segment_size))
    return header_len + plaintext_size + segments * TAG_SIZE


def read_header(prefix: bytes | bytearray | memoryview) -> tuple[ContainerHeader, int]:
    """Parse the header at the start of ``prefix``; return it and its length in bytes.

    Use it to find which tenant and artifact a pulled blob belongs to. The header is not authenticated until
    a segment is decrypted with it. Raises :class:`IntegrityError` if the bytes are not a version 1 header or
    ``prefix`` ends before the header does.
    """
    parsed = parse_header(memoryview(prefix).cast("B"), None)
    if parsed is None:
        raise integrity_error(None, f"truncated: the header is incomplete ({len(prefix)} bytes)")
    return parsed


def parse_header(buf: memoryview, artifact_id: str | None) -> tuple[ContainerHeader, int] | None:
    """The header and its length, None if ``buf`` ends before the header does; raises on a bad header."""
    if len(buf) >= 4 and bytes(buf[:4]) != MAGIC:
        raise integrity_error(artifact_id, "bad header: not a TenSafe artifact container (wrong magic bytes)")
    if len(buf) >= 5 and buf[4] != FORMAT_VERSION:
        raise integrity_error(artifact_id, f"bad header: unsupported format version {buf[4]} (this SDK reads "
                                           f"version {FORMAT_VERSION})")
    if len(buf) < _FIXED.size:
        return None
    _, version, segment_size, prefix, salt = _FIXED.unpack_from(buf)
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise integrity_error(artifact_id,
                              f"bad header: segment size {segment_size} is outside 1..{MAX_SEGMENT_SIZE}")
    offset = _FIXED.size
    ids: list[str] = []
    for name in ("tenant id", "artifact id"):
        if len(buf) < offset + _LEN.size:
            return None
        (length,) = _LEN.unpack_from(buf, offset)
        offset += _LEN.size
        if len(buf) < offset + length:
            return None
        try:
            value = bytes(buf[offset:offset + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise integrity_error(artifact_id, f"bad header: the {name} is not valid UTF-8") from None
        if not value:
            raise integrity_error(artifact_id, f"bad header: the {name} is empty")
        ids.append(value)
        offset += length
    return ContainerHeader(version, segment_size, bytes(prefix), bytes(salt), ids[0], ids[1]), offset


def check_key(data_key: bytes) -> None:
    """Raise :class:`ValueError` unless ``data_key`` is a 32-byte data key."""
    if not isinstance(data_key, bytes | bytearray) or len(data_key) != KEY_SIZE:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValueError(f"the data key must be {KEY_SIZE} bytes")


def integrity_error(artifact_id: str | None, what: str) -> IntegrityError:
    """The :class:`IntegrityError` for ``what`` went wrong with artifact ``artifact_id`` (None: not known)."""
    name = artifact_id if artifact_id is not None else "(unknown: the header could not be read)"
    return IntegrityError(f"artifact {name}: {what}", code="INTEGRITY_ERROR", details={"artifact_id": artifact_id})


def _id_bytes(value: str, name: str) -> bytes:
    if not isinstance(value, str) or not value:  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValueError(f"{name} must be a non-empty string")
    encoded = value.encode("utf-8")
    if len(encoded) > 0xFFFF:
        raise ValueError(f"{name} must be at most 65535 bytes in UTF-8")
    return encoded
