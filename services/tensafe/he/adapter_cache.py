"""Tenants' adapters in the he service: the row naming the vault artifact and layers, and the layers' weights
held in memory (read again from the vault, as the caller, after a restart).

The weights come from the one adapter-artifact reader (``tensafe.runtime.adapter_artifact``) through the
``read_artifact`` callable the service is built with (artifact id -> checked adapter, read as the calling
tenant). The per-call work caps (rank, width, layers) are checked on the adapter's shapes before anything
is prepared for it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tensafe.runtime.adapter_artifact import AdapterArtifact
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded

from . import adapters as adapter_files
from .compute import LoraLayer
from .store import AdapterRecord, HeStore

ReadArtifact = Callable[[str], AdapterArtifact]


@dataclass(frozen=True)
class HeLimits:
    """Per-tenant quota and per-call work caps (0: off); the settings named in each error."""

    computations: int = 32     # TENSAFE_QUOTA_HE_COMPUTATIONS: unfinished computations per tenant
    max_rank: int = 64         # TENSAFE_HE_MAX_RANK
    max_dim: int = 16384       # TENSAFE_HE_MAX_DIM: in_features and out_features of a layer
    max_layers: int = 256      # TENSAFE_HE_MAX_LAYERS: layers of one adapter


def matching(names: tuple[str, ...] | list[str], want: str) -> list[str]:
    """The layer names that ``want`` names (a full module name or a suffix such as "q_proj")."""
    name = adapter_files.module_name(want)
    return [n for n in names if n == name or n.endswith("." + name)]


class Adapters:
    def __init__(self, store: HeStore, read_artifact: ReadArtifact, limits: HeLimits) -> None:
        self.store = store
        self.read_artifact = read_artifact          # artifact id -> checked adapter, as the calling tenant
        self.limits = limits
        self._lock = threading.Lock()
        self._weights: dict[str, dict[str, LoraLayer]] = {}

    def load(self, tenant: str, artifact_id: str, key_id: str, layers: list[str]
             ) -> tuple[AdapterRecord, dict[str, LoraLayer]]:
        """Read the artifact, choose its layers, check the work caps, and record the adapter."""
        weights = adapter_files.layers(self.read_artifact(artifact_id))
        chosen = adapter_files.select(weights, list(layers), "layers")
        self._check_work(chosen, weights)
        record = AdapterRecord(adapter_id="hea_" + secrets.token_hex(12), tenant_id=tenant, artifact_id=artifact_id,
                               key_id=key_id, layers=tuple(chosen), created_at=time.time())
        self.store.insert_adapter(record)
        loaded = {n: weights[n] for n in chosen}
        with self._lock:
            self._weights[record.adapter_id] = loaded
        return record, loaded

    def _check_work(self, chosen: list[str], weights: dict[str, LoraLayer]) -> None:
        lim = self.limits
        if lim.max_layers and len(chosen) > lim.max_layers:
            raise QuotaExceeded("TENSAFE_HE_MAX_LAYERS", f"{len(chosen)} layers asked for; the he service loads at "
                                f"most {lim.max_layers} of one adapter (name fewer in `layers`)",
                                limit=lim.max_layers, current=len(chosen))
        for name in chosen:
            ly = weights[name]
            if lim.max_rank and ly.rank > lim.max_rank:
                raise QuotaExceeded("TENSAFE_HE_MAX_RANK", f"layer {name!r} has rank {ly.rank}; the he service "
                                    f"takes at most {lim.max_rank}", limit=lim.max_rank, current=ly.rank)
            width = max(ly.in_features, ly.out_features)
            if lim.max_dim and width > lim.max_dim:
                raise QuotaExceeded("TENSAFE_HE_MAX_DIM", f"layer {name!r} is {ly.in_features} -> {ly.out_features} "
                                    f"wide; the he service takes at most {lim.max_dim}", limit=lim.max_dim,
                                    current=width)

    def get(self, tenant: str, adapter_id: str) -> AdapterRecord:
        record = self.store.get_adapter(tenant, adapter_id) if adapter_id else None
        if record is None:
            raise NotFound("adapter", adapter_id)
        return record

    def list(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[AdapterRecord]:
        return self.store.list_adapters(tenant, after, limit)

    def of_context(self, tenant: str, key_id: str) -> list[str]:
        """The ids of the tenant's adapters loaded under ``key_id``."""
        return [a.adapter_id for a in self.store.list_adapters(tenant, None, 1 << 30) if a.key_id == key_id]

    def delete(self, tenant: str, adapter_id: str) -> None:
        self.store.delete_adapter(tenant, adapter_id)
        self.forget([adapter_id])

    def forget(self, adapter_ids: list[str]) -> None:
        """Drop the weights held for these adapters (their rows are gone)."""
        with self._lock:
            for adapter_id in adapter_ids:
                self._weights.pop(adapter_id, None)

    def weights(self, tenant: str, adapter_id: str) -> tuple[AdapterRecord, dict[str, LoraLayer], float]:
        """The adapter's layers and the seconds spent reading them (0 when held); after a restart they are
        read from the vault again, as the caller."""
        record = self.get(tenant, adapter_id)
        with self._lock:
            layers = self._weights.get(adapter_id)
        if layers is not None:
            return record, layers, 0.0
        t0 = time.perf_counter()
        weights = adapter_files.layers(self.read_artifact(record.artifact_id))
        missing = [n for n in record.layers if n not in weights]
        if missing:
            raise FailedPrecondition(f"artifact {record.artifact_id} no longer has layers {missing[:3]}")
        layers = {n: weights[n] for n in record.layers}
        with self._lock:
            self._weights[adapter_id] = layers
        return record, layers, time.perf_counter() - t0

    def layer_info(self, tenant: str, adapter_id: str) -> list[LoraLayer]:
        record, layers, _ = self.weights(tenant, adapter_id)
        return [layers[n] for n in record.layers]

    @staticmethod
    def choose(record: AdapterRecord, wanted: list[str], field_name: str) -> list[str]:
        """The adapter's loaded layers that ``wanted`` names (all when empty), or InvalidArgument(field_name)."""
        if not wanted:
            return list(record.layers)
        chosen: list[str] = []
        for want in wanted:
            hits = matching(record.layers, want)
            if not hits:
                raise InvalidArgument(field_name, f"layer {want!r} is not loaded in this adapter")
            chosen.extend(h for h in hits if h not in chosen)
        return chosen


__all__ = ["Adapters", "HeLimits", "ReadArtifact", "matching"]
