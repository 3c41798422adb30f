"""Pending computations of the he service, shared by both packings: what a computation holds between calls,
the per-tenant quota of unfinished ones, and the results both protocols return.

Kept in this process's memory only (the encrypted rank projections of a column computation, the random
rotation and blinding of a single token's first round); a computation unused for
:data:`COMPUTATION_TTL_S` expires. Another tenant's computation id does not exist for a caller.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tensafe.runtime.errors import InvalidArgument, NotFound, QuotaExceeded

from .compute import ColumnProjection, Counts, LoraLayer, Timer, TokenBlinding
from .group import GroupBlinding, GroupLayout

COMPUTATION_TTL_S = 600.0


@dataclass
class Computation:
    computation_id: str
    tenant_id: str
    adapter_id: str
    layers: list[str]
    packing: str                                 # "column", "replicated" or "tokens" (ComputeTokens)
    num_tokens: int
    expires: float
    in_features: int
    key_id: str = ""
    received: int = 0
    ciphertext_bytes: int = 0
    read_to: dict[str, int] = field(default_factory=dict)   # column: output ciphertexts read, per layer
    projections: dict[str, ColumnProjection] = field(default_factory=dict)
    blindings: dict[str, TokenBlinding] = field(default_factory=dict)
    layout: GroupLayout | None = None                        # tokens: the layers' layout
    token_blindings: list[GroupBlinding] = field(default_factory=list)  # tokens: one per token until round 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def complete(self) -> bool:
        return self.packing != "column" or self.received == self.in_features

    @property
    def finished(self) -> bool:
        """Nothing more to come: a token whose round 2 ran, a column computation whose outputs were all read
        (once at least). Finished computations give way to new ones under the tenant's quota."""
        if self.packing == "replicated":
            return not self.blindings
        if self.packing == "tokens":
            return not self.token_blindings
        return self.complete and all(self.read_to.get(n, 0) >= p.layer.out_features
                                     for n, p in self.projections.items())


@dataclass
class DeltaResult:
    layer: str
    ciphertexts: list[bytes]
    counts: Counts
    block_size: int = 0
    output_offset: int = 0
    round: int = 0


@dataclass
class ComputeResult:
    deltas: list[DeltaResult]
    counts: Counts
    timings: dict[str, float]
    computation_id: str = ""


class Pending:
    """The unfinished computations of every tenant, oldest first, under TENSAFE_QUOTA_HE_COMPUTATIONS."""

    def __init__(self, limit: int) -> None:
        self.limit = limit                  # unfinished computations per tenant; 0: no quota
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Computation] = OrderedDict()

    def _room(self, tenant: str) -> str | None:
        """Under the lock: make room for one more computation of ``tenant`` (expired ones go, then the
        oldest finished one if the quota is reached); the id to drop, or QuotaExceeded when none can go."""
        now = time.monotonic()
        for cid in [c for c, p in self._pending.items() if p.expires < now]:
            del self._pending[cid]
        mine = [p for p in self._pending.values() if p.tenant_id == tenant]
        if not self.limit or len(mine) < self.limit:
            return None
        finished = [p.computation_id for p in mine if p.finished]
        if not finished:
            raise QuotaExceeded("TENSAFE_QUOTA_HE_COMPUTATIONS", f"the tenant has {len(mine)} unfinished HE "
                                "computations, the most allowed: finish them (read a column computation's outputs, "
                                f"run a token's round 2) or let them expire ({COMPUTATION_TTL_S:.0f} s after "
                                "their last use)", limit=self.limit, current=len(mine))
        return finished[0]

    def check_room(self, tenant: str) -> None:
        """Refuse a new computation before any work is done for it when the tenant's quota is full."""
        with self._lock:
            self._room(tenant)

    def open(self, comp: Computation) -> None:
        with self._lock:
            drop = self._room(comp.tenant_id)
            if drop is not None:
                del self._pending[drop]  # the oldest of this tenant's finished computations gives way
            self._pending[comp.computation_id] = comp

    def get(self, tenant: str, computation_id: str) -> Computation:
        with self._lock:
            comp = self._pending.get(computation_id) if computation_id else None
        if comp is None or comp.tenant_id != tenant or comp.expires < time.monotonic():
            raise NotFound("computation", computation_id)
        return comp

    def drop_adapter(self, adapter_id: str) -> None:
        with self._lock:
            for cid in [c for c, comp in self._pending.items() if comp.adapter_id == adapter_id]:
                del self._pending[cid]


def same_input(layers: list[LoraLayer], field_name: str) -> int:
    """The input width the layers of one call share, or InvalidArgument(field_name)."""
    dims = {lay.in_features for lay in layers}
    if len(dims) != 1:
        raise InvalidArgument(field_name, f"layers of one call share their input x; these take {sorted(dims)} "
                                          "input features")
    return dims.pop()


def timings(timer: Timer, started: float, load: float) -> dict[str, float]:
    return {**timer.ms(), "total_ms": (time.perf_counter() - started) * 1e3, "load_ms": load * 1e3}


__all__ = ["COMPUTATION_TTL_S", "ComputeResult", "Computation", "DeltaResult", "Pending", "same_input", "timings"]
