"""Where encrypted artifact bytes live: a small interface and the local filesystem store."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def open_writer(self, key: str) -> BlobWriter: ...

    def read(self, key: str, chunk_size: int = 1 << 20, first: int | None = None) -> Iterator[bytes]: ...

    def delete(self, key: str) -> None: ...

    def path_of(self, key: str) -> Path: ...


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
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Leftovers of puts that died half way (a crash): never visible, removed at start.
        for stale in self.tmp.glob("*.part"):
            stale.unlink(missing_ok=True)

    def path_of(self, key: str) -> Path:
        return self.root / key[-2:] / key

    def open_writer(self, key: str) -> _LocalWriter:
        return _LocalWriter(self.path_of(key), self.tmp / f"{key}.{secrets.token_hex(4)}.part")

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
