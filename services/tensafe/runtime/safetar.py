"""The one tar reader of the services: strict, bounded, and nothing is allocated from a declared size unchecked.

Artifacts (checkpoints, adapters) are tars that tenants can write byte by byte, so this reader
does not use :mod:`tarfile`, whose header parsing follows sparse maps, links and PAX records
before the caller sees a member (a 10 KB GNU sparse member declaring 1 GiB came back as 1 GiB
of zeros). It walks the 512-byte headers itself and accepts only:

* regular files (type ``0`` or NUL) with a flat name of ``[A-Za-z0-9._-]`` (no ``/``, no
  ``.``/``..``), each named once;
* PAX extended headers (``x``, ``g``) of bounded size whose records are ``path`` (checked as
  above), ``size`` (checked against the data), or informational keys (times, owners,
  ``comment``, ``SCHILY.*``/``LIBARCHIVE.*`` attributes); any ``GNU.sparse.*`` key is refused;
* GNU long names (``L``) of bounded size.

Everything else is refused naming what it is: sparse members (``S``, PAX sparse), hard and
symbolic links, directories, devices, FIFOs, contiguous files, GNU multi-volume parts, base-256
sizes, bad checksums, a member that reaches past the data, more members than allowed, or a
total beyond the limit. A member's size is compared with the bytes that are really there and
with the limit before any byte of it is copied, so the memory a tar can make the reader use is
at most its own length. Every refusal is ``InvalidArgument(field, ...)``; nothing else escapes.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import TypeGuard

from .errors import InvalidArgument

BLOCK = 512
DEFAULT_MAX_ARTIFACT_BYTES = 2048 << 20   # TENSAFE_MAX_ARTIFACT_MB's default
DEFAULT_MAX_MEMBERS = 32
MAX_NAME = 255
MAX_PAX_BYTES = 64 << 10
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_REGULAR = (b"0", b"\0")
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
               b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"S": "GNU sparse file",
               b"K": "GNU long link name", b"M": "GNU multi-volume part", b"V": "GNU volume header",
               b"D": "GNU dump directory", b"N": "GNU long name list"}
_PAX_INFO = {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "hdrcharset", "charset",
             "mode", "linkpath"}
_PAX_INFO_PREFIXES = ("SCHILY.", "LIBARCHIVE.")


def _octal(raw: bytes, what: str, field: str) -> int:
    """A header number field: octal digits, NUL/space padded. Base-256 (GNU) numbers are refused."""
    if raw[:1] in (b"\x80", b"\xff"):
        raise InvalidArgument(field, f"the tar's {what} uses base-256 encoding, which is not accepted")
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise InvalidArgument(field, f"the tar has a malformed {what} field")
    return int(text, 8)


def _checksum_ok(header: bytes, field: str) -> bool:
    stored = _octal(header[148:156], "checksum", field)
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
    return stored in (unsigned, signed)


def _check_name(name: str, field: str) -> str:
    if len(name) > MAX_NAME or not _NAME.fullmatch(name) or name in (".", ".."):
        shown = name[:64] + ("..." if len(name) > 64 else "")
        raise InvalidArgument(field, f"the tar holds an entry named {shown!r}: only flat names of letters, digits, "
                                     "'.', '_' and '-' are accepted (no folders, no paths)")
    return name


def _decode(raw: bytes, what: str, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(field, f"the tar's {what} is not UTF-8") from None


def _pax_records(body: bytes, field: str) -> dict[str, str]:
    """The records of a PAX header (``"<len> <key>=<value>\\n"`` each), checked."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        if body[pos] == 0:
            if body[pos:].count(0) != len(body) - pos:
                raise InvalidArgument(field, "the tar has a malformed PAX header record")
            break  # NUL padding after the last record
        space = body.find(b" ", pos, pos + 12)
        if space < 0 or not body[pos:space].isdigit():
            raise InvalidArgument(field, "the tar has a malformed PAX header record")
        length = int(body[pos:space])
        end = pos + length
        if length < 5 or end > len(body) or body[end - 1:end] != b"\n":
            raise InvalidArgument(field, "the tar has a malformed PAX header record")
        key, eq, value = body[space + 1:end - 1].partition(b"=")
        if not eq:
            raise InvalidArgument(field, "the tar has a malformed PAX header record")
        name = _decode(key, "PAX header key", field)
        if name.startswith("GNU.sparse"):
            raise InvalidArgument(field, "the tar holds a sparse member (PAX GNU.sparse header): not accepted")
        if name not in ("path", "size") and name not in _PAX_INFO and not name.startswith(_PAX_INFO_PREFIXES):
            raise InvalidArgument(field, f"the tar has an unsupported PAX header {name[:64]!r}")
        records[name] = _decode(value, f"PAX {name[:64]!r} value", field)
        pos = end
    return records


def is_buffer(value: object) -> TypeGuard[bytes | bytearray | memoryview[int]]:
    """Whether ``value`` is bytes, a bytearray or a memoryview."""
    return isinstance(value, (bytes, bytearray, memoryview))


def read_tar(data: object, *, field: str = "artifact_id", max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
             max_members: int = DEFAULT_MAX_MEMBERS,
             wanted: Collection[str] | None = None) -> dict[str, bytes]:
    """The regular files of the tar ``data`` by name (only those in ``wanted`` when given; the others are
    still checked), or ``InvalidArgument(field)`` saying why the tar is refused.

    ``max_bytes`` bounds the tar itself and the sum of its members' sizes; ``max_members`` the number of
    files (PAX and long-name headers count towards a bound of twice that).
    """
    if not is_buffer(data):
        raise InvalidArgument(field, "the artifact is not bytes")
    view = memoryview(data)
    if len(view) > max_bytes:
        raise InvalidArgument(field, f"the artifact is {len(view)} bytes, more than the limit of {max_bytes} "
                                     "(TENSAFE_MAX_ARTIFACT_MB)")
    if len(view) < BLOCK:
        raise InvalidArgument(field, "the artifact is not a tar (shorter than one tar block)")
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    total = headers = 0
    pos = 0
    pending: dict[str, str] = {}   # PAX records and GNU long name for the next member
    while True:
        if pos + BLOCK > len(view):
            if pos == len(view) and seen and not pending:
                break  # no end-of-archive blocks: tolerated, as tar and tarfile do
            raise InvalidArgument(field, "the tar ends inside a header")
        header = bytes(view[pos:pos + BLOCK])
        if header == b"\0" * BLOCK:
            if pending:
                raise InvalidArgument(field, "the tar ends after an extended header without its member")
            break
        headers += 1
        if headers > 2 * max_members + 2:
            raise InvalidArgument(field, f"the tar has more than {max_members} members")
        if not _checksum_ok(header, field):
            raise InvalidArgument(field, "the tar has a header with a bad checksum (not a tar, or corrupt)")
        kind = header[156:157]
        size = _octal(header[124:136], "size", field)
        start = pos + BLOCK
        available = len(view) - start
        if kind in (b"x", b"g", b"L"):
            if size > MAX_PAX_BYTES or size > available:
                raise InvalidArgument(field, f"the tar has an extended header of {size} bytes (at most "
                                             f"{MAX_PAX_BYTES}, and within the data)")
            body = bytes(view[start:start + size])
            if kind == b"L":
                pending["path"] = _decode(body.rstrip(b"\0"), "long name", field)
            else:
                records = _pax_records(body, field)
                if kind == b"x":
                    pending.update(records)
        elif kind in _REGULAR:
            magic = header[257:263]
            name = _decode(header[:100].split(b"\0", 1)[0], "member name", field)
            prefix = _decode(header[345:500].split(b"\0", 1)[0], "name prefix", field) \
                if magic == b"ustar\0" else ""
            if prefix:
                name = prefix + "/" + name
            if "path" in pending:
                name = pending["path"]
            if "size" in pending:
                if not pending["size"].isdigit() or len(pending["size"]) > 20:
                    raise InvalidArgument(field, "the tar has a malformed PAX size")
                size = int(pending["size"])
            pending = {}
            _check_name(name, field)
            if name in seen:
                raise InvalidArgument(field, f"the tar holds {name!r} twice")
            seen.add(name)
            if len(seen) > max_members:
                raise InvalidArgument(field, f"the tar has more than {max_members} members")
            if size > available:
                raise InvalidArgument(field, f"the tar's member {name!r} declares {size} bytes; only {available} "
                                             "follow it")
            total += size
            if total > max_bytes:
                raise InvalidArgument(field, f"the tar's members hold more than the limit of {max_bytes} bytes "
                                             "(TENSAFE_MAX_ARTIFACT_MB)")
            if wanted is None or name in wanted:
                files[name] = bytes(view[start:start + size])
        else:
            what = _TYPE_NAMES.get(kind, f"entry of type {kind!r}")
            raise InvalidArgument(field, f"the tar holds a {what}: only regular files are accepted")
        pos = start + -(-size // BLOCK) * BLOCK
    if not seen:
        raise InvalidArgument(field, "the tar holds no files")
    return files
