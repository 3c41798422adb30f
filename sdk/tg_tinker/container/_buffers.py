"""The reader's and writer's buffers: a queue of byte views that slices without copying, and the plaintext's
SHA-256, hashed on a helper thread while the calling thread runs AES-GCM. Standard library only."""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor


class Pieces:
    """A FIFO of immutable byte views; ``take`` slices without copying when one piece holds the whole request."""

    def __init__(self) -> None:
        self._views: deque[memoryview] = deque()
        self.size = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not view:
            return
        if not isinstance(view.obj, bytes):
            view = memoryview(view.tobytes())  # the caller may reuse a mutable buffer after update returns
        self._views.append(view)
        self.size += len(view)

    def take(self, n: int) -> bytes | memoryview:
        if n == 0:
            return b""
        first = self._views[0]
        if len(first) >= n:
            taken = first[:n]
            if len(first) == n:
                self._views.popleft()
            else:
                self._views[0] = first[n:]
        else:
            parts: list[bytes | memoryview] = []
            need = n
            while need:
                view = self._views.popleft()
                if len(view) > need:
                    self._views.appendleft(view[need:])
                    view = view[:need]
                parts.append(view)
                need -= len(view)
            taken = b"".join(parts)
        self.size -= n
        return taken


_PIPELINE_MIN = 1 << 16  # below this, handing a buffer to another thread costs more than hashing it here
# Two hashes queued keep the helper busy: with one, each segment also pays the helper's wake-up latency
# (measured: 0.97x of SHA-256 alone with two, 0.89x with one, 0.89x hashing inline on the calling thread).
_PIPELINE_DEPTH = 2


class PlaintextDigest:
    """SHA-256 of the plaintext, hashed on a helper thread while the calling thread runs AES-GCM.

    hashlib releases the GIL for large buffers, so hashing overlaps encryption (or decryption) and whatever
    the caller does between segments. The helper is one thread per digest, so the updates run in order; at
    most ``_PIPELINE_DEPTH`` segments are queued, which bounds the extra memory held alive.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queued: deque[Future[None]] = deque()
        self._helper: ThreadPoolExecutor | None = None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if len(data) < _PIPELINE_MIN:
            self._drain(0)
            self._hash.update(data)
            return
        self._drain(_PIPELINE_DEPTH - 1)
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsaf-sha256")
        self._queued.append(self._helper.submit(self._hash.update, data))

    def digest(self) -> bytes:
        self.close()
        return self._hash.digest()

    def close(self) -> None:
        self._drain(0)
        if self._helper is not None:
            self._helper.shutdown(wait=False)
            self._helper = None

    def _drain(self, keep: int) -> None:
        while len(self._queued) > keep:
            self._queued.popleft().result()


class PlaintextSize:
    """Counts the plaintext without hashing it (a reader built with ``digest=False``)."""

    def __init__(self) -> None:
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)

    def digest(self) -> None:
        return None

    def close(self) -> None:
        pass
