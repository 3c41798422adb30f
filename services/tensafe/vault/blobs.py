"""Where encrypted artifact bytes live: the blob-store interface and the local filesystem store.

Two stores implement :class:`BlobStore`: :class:`LocalBlobStore` (a directory: the default, one host) and
``blobstore_s3.S3BlobStore`` (an S3-compatible bucket that vault replicas share; the ``s3`` extra). Both give
the vault the same guarantees:

- a put is visible under its key only once every byte is stored: before :meth:`BlobWriter.commit` returns
  nothing is there (a put that fails, is aborted or whose process is killed leaves nothing under the key; what
  it left elsewhere is never read and is removed later);
- a put under an existing key replaces it whole, at once (the vault never does: every put has a new key);
- reads and writes stream (memory does not grow with the blob's size);
- :meth:`BlobStore.delete` removes the blob; a missing blob reads as :class:`FileNotFoundError`.

The store only keeps bytes: the vault authenticates them (AES-256-GCM, see ``tg_tinker.container``), so a blob
altered in the store is refused on read whichever store holds it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

# Blob keys are the vault's artifact ids ("art_" + hex); anything else is refused before it reaches a path or
# an object key.
_KEY = re.compile(r"[A-Za-z0-9_-]{3,128}")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a blob key")
    return key


def blob_name(key: str) -> str:
    """A blob's name under the store's root: ``<last two characters>/<key>`` (both stores)."""
    return f"{key[-2:]}/{check_key(key)}"


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> None:
        """Make the blob visible under its key, whole; after an error nothing new is visible."""
        ...

    def abort(self) -> None:
        """Drop what was written (idempotent; also after a failed commit)."""
        ...


class BlobStore(Protocol):
    def open_writer(self, key: str) -> BlobWriter: ...

    def read(self, key: str, chunk_size: int = 1 << 20, first: int | None = None) -> Iterator[bytes]:
        """The blob's bytes in chunks of ``chunk_size`` (the last may be shorter), after a first chunk of
        ``first`` bytes if given; :class:`FileNotFoundError` (when iterated) if there is no such blob."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; nothing happens if there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The blob's size in bytes; :class:`FileNotFoundError` if there is no such blob."""
        ...


class _LocalWriter:
    """Writes to a temporary name; commit = flush + fsync + atomic rename + fsync of the directory."""

    def __init__(self, final: Path, temp: Path) -> None:
        self.final, self.temp = final, temp
        self._fh: BinaryIO | None = open(temp, "xb")  # closed in commit/abort

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def commit(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp, self.final)
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.temp.unlink(missing_ok=True)


class LocalBlobStore:
    """A directory: ``<root>/<last two characters of the key>/<key>``; puts in flight under ``<root>/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Leftovers of puts that died half way (a crash): never visible, removed at start.
        for stale in self.tmp.glob("*.part"):
            stale.unlink(missing_ok=True)

    def path_of(self, key: str) -> Path:
        return self.root / blob_name(key)

    def open_writer(self, key: str) -> _LocalWriter:
        return _LocalWriter(self.path_of(key), self.tmp / f"{check_key(key)}.{secrets.token_hex(4)}.part")

    def read(self, key: str, chunk_size: int = 1 << 20, first: int | None = None) -> Iterator[bytes]:
        """Chunks of ``chunk_size`` bytes, after a first chunk of ``first`` bytes if given (so that a
        reader can align chunks with the container's segments and decrypt without copying)."""
        with open(self.path_of(key), "rb", buffering=0) as fh:
            if first:
                yield fh.read(first)
            while chunk := fh.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def size(self, key: str) -> int:
        return self.path_of(key).stat().st_size
