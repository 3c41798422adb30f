"""Encrypted masks for the single-token path, prepared ahead of the requests that use them.

Every output ciphertext of a single token carries a fresh public-key encryption of its masks (it hides
the products in the slots and re-randomises the ciphertext). Those encryptions depend on nothing in
the request, only on the tenant's public key and the block size, and a public-key encryption costs
more than the rest of an output together (about 2 ms at N = 8192 against 1.5 ms). So the he service
prepares them in worker processes (SEAL holds Python's GIL, threads would not run beside a request)
and a request takes ready ones; what is not ready is made in the request, the same way.

Each mask is used once and dropped. The masks and their block sums (a round's blinding rho) stay in
the he service's memory; a worker holds public contexts only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .compute import Counts, SealEngine

log = logging.getLogger(__name__)

# Masks made per worker task; the pool holds at most this many bytes of masks per key and block.
BATCH = 4
MAX_POOL_BYTES = 64 << 20

# -- the worker process -------------------------------------------------------------------------------------
# A plain child process (python -m tensafe.he.masks) reading tasks from stdin and writing results to
# stdout as length-prefixed frames: unlike multiprocessing's spawn it never re-imports the parent's
# __main__, so an embedding script needs no main guard.
_ENGINES: dict[bytes, SealEngine] = {}


def _worker_masks(digest: bytes, public_context: bytes, scale: float, block: int, kind: str,
                  count: int) -> list[tuple[bytes, np.ndarray]]:
    import tenseal as ts

    from tg_tinker.he.seal import to_bytes

    engine = _ENGINES.get(digest)
    if engine is None:
        if len(_ENGINES) >= 8:
            _ENGINES.pop(next(iter(_ENGINES)))
        engine = _ENGINES[digest] = SealEngine(ts.context_from(public_context), scale)
    out = []
    for _ in range(count):
        ct, sums = engine.masks(block, kind)
        out.append((to_bytes(ct), sums))
    return out


# A frame: a JSON header, then the byte strings it counts, each length-prefixed (plain data, no objects).
def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _read_frame(stream: IO[bytes]) -> tuple[dict, list[bytes]] | None:
    head = _read_exact(stream, 8)
    if head is None:
        return None
    header = json.loads(_read_exact(stream, struct.unpack("<Q", head)[0]) or b"null")
    blobs = []
    for _ in range(int(header["blobs"])):
        size = _read_exact(stream, 8)
        blob = _read_exact(stream, struct.unpack("<Q", size)[0]) if size else None
        if blob is None:
            return None
        blobs.append(blob)
    return header, blobs


def _write_frame(stream: IO[bytes], header: dict, blobs: list[bytes]) -> None:
    head = json.dumps({**header, "blobs": len(blobs)}).encode()
    parts = [struct.pack("<Q", len(head)), head]
    for blob in blobs:
        parts += [struct.pack("<Q", len(blob)), blob]
    stream.write(b"".join(parts))
    stream.flush()


def _task_frame(task: tuple) -> tuple[dict, list[bytes]]:
    digest, public_context, scale, block, kind, count = task
    return {"scale": scale, "block": block, "kind": kind, "count": count}, [digest, public_context]


def _serve() -> None:
    """The worker's loop: one task in, one result (or the error's text) out, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result stream
    while (frame := _read_frame(stdin)) is not None:
        header, (digest, public_context) = frame
        try:
            masks = _worker_masks(digest, public_context, float(header["scale"]), int(header["block"]),
                                  str(header["kind"]), int(header["count"]))
        except Exception as exc:  # noqa: BLE001 - reported to the service, which then makes masks itself
            _write_frame(stdout, {"status": "error", "message": f"{type(exc).__name__}: {exc}"}, [])
            continue
        blobs = [part for data, sums in masks for part in (data, np.asarray(sums, dtype="<f8").tobytes())]
        _write_frame(stdout, {"status": "ok"}, blobs)


class _Worker:
    """One mask worker process; results come back in the order tasks went in. A writer thread feeds
    it, so no caller (nor the reader thread, which refills from its callbacks) ever blocks on a pipe."""

    def __init__(self, on_result: Callable[[Callable, object, str | None], None]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tensafe.he.masks"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, close_fds=True)
        self._callbacks: deque[Callable] = deque()
        self._tasks: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._on_result = on_result
        threading.Thread(target=self._write, daemon=True, name="he-mask-writer").start()
        threading.Thread(target=self._read, daemon=True, name="he-mask-reader").start()

    @property
    def busy(self) -> int:
        return len(self._callbacks)

    def submit(self, task: tuple, callback: Callable) -> None:
        with self._lock:
            self._callbacks.append(callback)
            self._tasks.put(task)

    def _write(self) -> None:
        stream = self.proc.stdin
        try:
            while (task := self._tasks.get()) is not None:
                _write_frame(stream, *_task_frame(task))  # type: ignore[arg-type]
        except (OSError, ValueError):
            pass  # the worker is gone: the reader reports it
        finally:
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def _read(self) -> None:
        while True:
            try:
                frame = _read_frame(self.proc.stdout)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a broken stream ends the worker
                frame = None
            if frame is None:
                while self._callbacks:
                    self._on_result(self._callbacks.popleft(), None, "the mask worker exited")
                return
            header, blobs = frame
            callback = self._callbacks.popleft()
            if header.get("status") == "ok":
                masks = [(blobs[i], np.frombuffer(blobs[i + 1], dtype="<f8").copy()) for i in range(0, len(blobs), 2)]
                self._on_result(callback, masks, None)
            else:
                self._on_result(callback, None, str(header.get("message", "the mask worker failed")))

    def close(self) -> None:
        self._tasks.put(None)
        self.proc.terminate()  # it holds nothing worth finishing: masks not yet delivered are dropped
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the pool, in the he service ------------------------------------------------------------------------------
@dataclass
class _Queue:
    ready: deque = field(default_factory=deque)     # (bytes, sums)
    pending: int = 0
    target: int = 0


class MaskPool:
    """Per (tenant, key id, context digest, block, kind): a queue of ready masks refilled by worker
    processes up to twice the largest number one call has asked for."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else max(1, min(4, (os.cpu_count() or 2) - 1))
        self._workers: list[_Worker] = []
        self._queues: dict[tuple, _Queue] = {}
        self._lock = threading.Lock()
        self._broken = self.workers == 0
        self._closed = False
        self.made_inline = 0
        self.taken_ready = 0

    def expect(self, key: tuple, engine_args: tuple[bytes, bytes, float], block: int, kind: str, per_call: int,
               item_bytes: int) -> None:
        """A call will take ``per_call`` masks of this block and kind: keep twice that ready."""
        limit = max(1, MAX_POOL_BYTES // max(item_bytes, 1))
        with self._lock:
            q = self._queues.setdefault(key + (block, kind), _Queue())
            q.target = min(limit, max(q.target, 2 * per_call))
        self._refill(key + (block, kind), engine_args, block, kind)

    def take(self, key: tuple, engine: SealEngine, engine_args: tuple[bytes, bytes, float], block: int,
             kind: str, count: int, counts: Counts | None = None) -> list[tuple[object, np.ndarray]]:
        """``count`` masks: ready ones first, the rest made here (both counted in ``counts``)."""
        from tg_tinker.he.seal import load_ciphertext

        qkey = key + (block, kind)
        with self._lock:
            q = self._queues.setdefault(qkey, _Queue())
            q.target = max(q.target, min(2 * count, max(1, MAX_POOL_BYTES // (1 << 17))))
            ready = [q.ready.popleft() for _ in range(min(count, len(q.ready)))]
        out: list[tuple[object, np.ndarray]] = [(load_ciphertext(engine.seal_context, data), sums)
                                                for data, sums in ready]
        out.extend(engine.masks(block, kind) for _ in range(count - len(out)))
        with self._lock:
            self.taken_ready += len(ready)
            self.made_inline += count - len(ready)
        if counts is not None:
            counts.prepared_encryptions += len(ready)
            counts.encryptions += count - len(ready)
        self._refill(qkey, engine_args, block, kind)
        return out

    def _refill(self, qkey: tuple, engine_args: tuple[bytes, bytes, float], block: int, kind: str) -> None:
        while True:
            with self._lock:  # decide under the lock, write to a worker's pipe outside it
                if self._broken or self._closed:
                    return
                q = self._queues.get(qkey)
                if q is None:
                    return
                n = min(BATCH, q.target - len(q.ready) - q.pending)
                if n <= 0:
                    return
                q.pending += n
            try:
                worker = self._worker()
                worker.submit((*engine_args, block, kind, n),
                              lambda value, error, n=n: self._done(qkey, engine_args, block, kind, n, value, error))
            except Exception as exc:  # noqa: BLE001 - no worker: masks are made within requests
                self._give_up(qkey, n, exc)
                return

    def _worker(self) -> _Worker:
        with self._lock:
            if not self._workers:
                self._workers = [_Worker(self._deliver) for _ in range(self.workers)]
            return min(self._workers, key=lambda w: w.busy)

    @staticmethod
    def _deliver(callback: Callable, value: object, error: str | None) -> None:
        callback(value, error)

    def _done(self, qkey: tuple, engine_args: tuple[bytes, bytes, float], block: int, kind: str, n: int,
              value: object, error: str | None) -> None:
        if error is not None:
            self._give_up(qkey, n, error)
            return
        with self._lock:
            q = self._queues.get(qkey)
            if q is None:
                return
            q.pending -= n
            q.ready.extend(value)  # type: ignore[arg-type]
        self._refill(qkey, engine_args, block, kind)

    def _give_up(self, qkey: tuple, n: int, exc: object) -> None:
        with self._lock:
            if qkey in self._queues:
                self._queues[qkey].pending -= n
            if self._closed or self._broken:
                return
            self._broken = True
        log.warning("he: the mask workers failed (%s); single-token masks are now made within each request", exc)

    def forget(self, tenant: str, key_id: str) -> None:
        """Drop the masks of a deleted context."""
        with self._lock:
            for qkey in [k for k in self._queues if k[0] == tenant and k[1] == key_id]:
                del self._queues[qkey]

    def ready(self, key: tuple, block: int, kind: str) -> int:
        with self._lock:
            q = self._queues.get(key + (block, kind))
            return len(q.ready) if q else 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
            self._queues.clear()
        for worker in workers:
            worker.close()


__all__ = ["MaskPool"]


if __name__ == "__main__":
    _serve()
