"""Single-token blindings prepared between requests.

A single-token computation on a layer needs, besides x, a fresh rotation Q, the encoded rows of Q A and
of s B Q^T, the encoded -rho and one encrypted mask per output ciphertext (compute.TokenBlinding).
None of it depends on the request, so one thread of the he service prepares them while no request
runs (it pauses between encodings when one arrives), from masks its workers encrypted
(masks.MaskPool). A request takes a ready blinding for its layer, or prepares one itself.

Each blinding is used by one computation and dropped; they live only in this process's memory.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import compute, group
from .compute import Counts, LoraLayer, SealEngine, TokenBlinding
from .group import GroupBlinding, GroupLayout
from .masks import MaskPool

log = logging.getLogger(__name__)

READY_PER_LAYER = 2
MAX_READY_PER_GROUP = 8
MAX_BYTES = 256 << 20
# How long the he service waits for a single token's second round before preparing again.
ROUND_GAP_S = 0.5
# Quiet time after a request before preparing: tokens sent back to back (a few ms apart) then find
# the preparing thread asleep instead of competing with the key holder for the cores.
QUIET_S = 0.01
SWITCH_INTERVAL_S = 0.001


class Activity:
    """When single-token work is under way: a request running, or a token between its two rounds (the
    key holder decrypting and re-encrypting). The preparing thread shares the GIL with requests, so it
    waits for neither."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._between: dict[str, float] = {}    # computation id -> until when its round 2 is awaited
        self._last = float("-inf")              # when the last request ended

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last = time.monotonic()
                self._cond.notify_all()

    def between_rounds(self, computation_id: str) -> None:
        with self._cond:
            self._between[computation_id] = time.monotonic() + ROUND_GAP_S

    def round_two(self, computation_id: str) -> None:
        with self._cond:
            self._between.pop(computation_id, None)
            self._cond.notify_all()

    def wait_idle(self) -> None:
        """Return when no request runs, no token waits for its second round and the last request ended
        QUIET_S ago."""
        self._wait(eager=False)

    def wait_no_request(self) -> None:
        """Return when no request runs: a group's blindings (ComputeTokens, two-plane generation) are
        prepared while the key holder works between rounds and while its plaintext plane runs, which is
        when the next block's are needed."""
        self._wait(eager=True)

    def _wait(self, eager: bool) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for cid in [c for c, until in self._between.items() if until <= now]:
                    del self._between[cid]
                if eager:
                    if not self._active:
                        return
                    self._cond.wait(timeout=0.1)
                    continue
                quiet_at = self._last + QUIET_S
                if not self._active and not self._between and now >= quiet_at:
                    return
                until = min(self._between.values(), default=max(quiet_at, now + (0.1 if self._active else 0)))
                self._cond.wait(timeout=max(until - now, 0) + 1e-3)


Blinding = TokenBlinding | GroupBlinding


@dataclass
class _Entry:
    pool_key: tuple
    engine: SealEngine
    engine_args: tuple[bytes, bytes, float]
    needs: tuple[tuple[int, str, int], ...]           # (block, kind, count) of the masks one blinding takes
    make: Callable[[compute.MaskSource, Callable[[], None]], Blinding]
    name: str
    eager: bool = False                               # prepared whenever no request runs (groups)
    target: int = READY_PER_LAYER                     # blindings to keep ready: what one call takes, at least 2
    ready: deque[Blinding] = field(default_factory=deque)


class Preparer:
    def __init__(self, masks: MaskPool, activity: Activity) -> None:
        self.masks = masks
        self.activity = activity
        # (adapter id, layer name or a group's names) -> its ready blindings
        self._entries: dict[tuple[str, str | tuple[str, ...]], _Entry] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.bytes = 0

    def want(self, adapter_id: str, pool_key: tuple, engine: SealEngine, engine_args: tuple[bytes, bytes, float],
             layer: LoraLayer) -> None:
        """Keep blindings of ``layer`` ready (up to READY_PER_LAYER, within MAX_BYTES in all)."""
        slots = engine.slots
        needs = ((layer.in_features, compute.BLIND, compute.ciphertexts_needed(layer.rank, layer.in_features, slots)),
                 (layer.rank, compute.ZERO, compute.ciphertexts_needed(layer.out_features, layer.rank, slots)))

        def make(source: compute.MaskSource, pause: Callable[[], None]) -> Blinding:
            return compute.prepare_token(engine, layer, source, Counts(), pause=pause)

        self._want((adapter_id, layer.name), _Entry(pool_key, engine, engine_args, needs, make, layer.name))

    def want_group(self, adapter_id: str, pool_key: tuple, engine: SealEngine,
                   engine_args: tuple[bytes, bytes, float], layout: GroupLayout, tokens: int = 1) -> None:
        """Keep one-token blindings of ``layout``'s layers together (ComputeTokens) ready; its layers'
        own entries, and any other group holding one of them, give way (a client calling them as a group
        takes no single-layer blinding). As many are kept ready as the last call had ``tokens`` (2 to 8),
        within MAX_BYTES in all."""
        needs = ((layout.block, compute.BLIND, layout.first), (layout.block2, compute.ZERO, layout.second))

        def make(source: compute.MaskSource, pause: Callable[[], None]) -> Blinding:
            return group.prepare_group(engine, layout, source, Counts(), pause=pause)

        names = set(layout.names)
        with self._cond:
            # A layer is prepared in one entry at most: so an adapter has no more entries than layers.
            for key in [k for k in self._entries if k[0] == adapter_id and k[1] != layout.names
                        and names.intersection((k[1],) if isinstance(k[1], str) else k[1])]:
                self.bytes -= sum(b.nbytes for b in self._entries.pop(key).ready)
        self._want((adapter_id, layout.names), _Entry(pool_key, engine, engine_args, needs, make,
                                                      "+".join(layout.names), eager=True))
        with self._cond:  # a call's tokens each take one: keep what the last call took ready for the next
            entry = self._entries.get((adapter_id, layout.names))
            if entry is not None:
                entry.target = max(READY_PER_LAYER, min(tokens, MAX_READY_PER_GROUP))

    def _want(self, key: tuple, entry: _Entry) -> None:
        with self._cond:
            if self._closed:
                return
            if key not in self._entries:
                self._entries[key] = entry
            if self._thread is None:
                # SEAL holds the GIL: a request arriving while this thread encodes waits for the interpreter's
                # switch interval (5 ms by default) before it may run; 1 ms bounds that wait.
                sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
                self._thread = threading.Thread(target=self._run, daemon=True, name="he-prepare")
                self._thread.start()
            self._cond.notify_all()

    def take(self, adapter_id: str, layer: str | tuple[str, ...]) -> Blinding | None:
        with self._cond:
            entry = self._entries.get((adapter_id, layer))
            if entry is None or not entry.ready:
                return None
            blinding = entry.ready.popleft()
            self.bytes -= blinding.nbytes
            self._cond.notify_all()
            return blinding

    def groups(self, adapter_id: str) -> int:
        """How many groups of layers (want_group) of the adapter are kept ready."""
        with self._cond:
            return sum(1 for k in self._entries if k[0] == adapter_id and isinstance(k[1], tuple))

    def ready(self, adapter_id: str, layer: str | tuple[str, ...]) -> int:
        with self._cond:
            entry = self._entries.get((adapter_id, layer))
            return len(entry.ready) if entry else 0

    def forget(self, match: Callable[[str, tuple], bool]) -> None:
        """Drop the entries (adapter id, pool key) that ``match``: an unloaded adapter, a deleted context."""
        with self._cond:
            for key in [k for k, e in self._entries.items() if match(k[0], e.pool_key)]:
                entry = self._entries.pop(key)
                self.bytes -= sum(b.nbytes for b in entry.ready)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._entries.clear()
            self._cond.notify_all()

    # -- the thread --------------------------------------------------------------------------------------
    def _next(self) -> tuple[_Entry | None, bool]:
        """The entry with the fewest ready blindings whose masks are ready (or None), and whether some
        entry waits for masks."""
        best, waiting = None, False
        for entry in self._entries.values():
            if len(entry.ready) >= entry.target or self.bytes >= MAX_BYTES:
                continue
            waiting = True
            if best is None or len(entry.ready) < len(best.ready):
                if all(self.masks.ready(entry.pool_key, block, kind) >= count for block, kind, count in entry.needs):
                    best = entry
        return best, waiting

    def _source(self, entry: _Entry) -> compute.MaskSource:
        return lambda block, kind, count, counts: self.masks.take(entry.pool_key, entry.engine, entry.engine_args,
                                                                  block, kind, count, counts)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                entry, waiting = self._next()
                if entry is None:
                    # Masks arrive from the workers without a notification: look again soon while some
                    # layer waits for them; otherwise sleep until a take, a want or close.
                    self._cond.wait(timeout=0.02 if waiting else None)
                    continue
            try:
                wait = self.activity.wait_no_request if entry.eager else self.activity.wait_idle
                wait()
                blinding = entry.make(self._source(entry), wait)
            except Exception:  # a request prepares its own blinding instead
                log.exception("he: preparing a single-token blinding for %s failed", entry.name)
                with self._cond:
                    self._entries = {k: e for k, e in self._entries.items() if e is not entry}
                continue
            blinding.prepared_ahead = True
            with self._cond:
                if any(e is entry for e in self._entries.values()):
                    entry.ready.append(blinding)
                    self.bytes += blinding.nbytes


__all__ = ["Activity", "Preparer", "READY_PER_LAYER"]
