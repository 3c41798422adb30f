"""The he service's logic: public contexts, adapters loaded from the vault, and encrypted LoRA deltas.
No gRPC here, no SQL (``store.py``); every call is for one tenant, and another tenant's context, adapter or
computation does not exist for it.

What the service may hold: public CKKS contexts (public key, relinearisation keys; never a secret key,
no Galois keys: nothing here rotates), the tenant's adapter weights (in memory, loaded from the vault
as the tenant), ciphertexts, and per pending computation the encrypted rank projections (column
packing) or the random rotation and blinding of a single token's first round. It never sees x or the
delta in the clear.

The parts: ``contexts`` (context checks and SEAL objects), ``adapter_cache`` (adapter rows and weights,
work caps), ``computations`` (pending computations and their quota), ``column`` and ``token`` (the two
packing protocols). This class only wires them together and keeps the three caches consistent.
"""

from __future__ import annotations

from tensafe.runtime.errors import InvalidArgument
from tg_tinker.he.params import HESchemeParams

from .adapter_cache import Adapters, HeLimits, ReadArtifact
from .batch import BatchProtocol, TokensResult
from .column import ColumnProtocol
from .compute import Counts, LoraLayer
from .contexts import MAX_CONTEXT_BYTES, Contexts, check_params, inspect_context
from .masks import MaskPool
from .pending import COMPUTATION_TTL_S, Computation, ComputeResult, DeltaResult, Pending
from .prepare import Activity, Preparer
from .store import AdapterRecord, ContextRecord, HeStore
from .token import TokenProtocol

# Response budget as a share of the largest message: headroom for the envelope and the counts.
_RESPONSE_SHARE = 0.75


class HeService:
    def __init__(self, store: HeStore, read_artifact: ReadArtifact, max_message_bytes: int,
                 mask_workers: int | None = None, limits: HeLimits | None = None) -> None:
        self.store = store
        self.limits = limits or HeLimits()
        self.response_budget = int(max_message_bytes * _RESPONSE_SHARE)
        self.contexts = Contexts(store)
        self.adapters = Adapters(store, read_artifact, self.limits)
        self.pending = Pending(self.limits.computations)
        self.masks = MaskPool(mask_workers)
        self.activity = Activity()
        self.preparer = Preparer(self.masks, self.activity)
        self.column = ColumnProtocol(self.contexts, self.adapters, self.pending, self.response_budget)
        self.token = TokenProtocol(self.contexts, self.adapters, self.pending, self.masks, self.activity,
                                   self.preparer)
        self.batch = BatchProtocol(self.contexts, self.adapters, self.pending, self.masks, self.activity,
                                   self.preparer, self.response_budget)

    def close(self) -> None:
        self.preparer.close()
        self.masks.close()

    # -- contexts ---------------------------------------------------------------------------------------
    def register_context(self, tenant: str, key_id: str, data: bytes, params: HESchemeParams) -> ContextRecord:
        return self.contexts.register(tenant, key_id, data, params)

    def get_context(self, tenant: str, key_id: str) -> ContextRecord:
        return self.contexts.get(tenant, key_id)

    def list_contexts(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[ContextRecord]:
        return self.contexts.list(tenant, after, limit)

    def delete_context(self, tenant: str, key_id: str) -> None:
        """The context, the adapters loaded under it, and everything prepared for them."""
        self.contexts.get(tenant, key_id)
        doomed = self.adapters.of_context(tenant, key_id)
        self.contexts.delete(tenant, key_id)
        self.adapters.forget(doomed)
        self.masks.forget(tenant, key_id)
        self.preparer.forget(lambda _adapter, pool_key: pool_key[:2] == (tenant, key_id))

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(self, tenant: str, artifact_id: str, key_id: str, layers: list[str]
                     ) -> tuple[AdapterRecord, dict[str, LoraLayer]]:
        if not artifact_id:
            raise InvalidArgument("artifact_id", "is required")
        if not key_id:
            raise InvalidArgument("key_id", "is required")
        self.contexts.get(tenant, key_id)
        record, weights = self.adapters.load(tenant, artifact_id, key_id, layers)
        self.token.prepare(record.adapter_id, self.contexts.loaded(tenant, key_id), list(weights.values()))
        return record, weights

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        return self.adapters.get(tenant, adapter_id)

    def list_adapters(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[AdapterRecord]:
        return self.adapters.list(tenant, after, limit)

    def unload_adapter(self, tenant: str, adapter_id: str) -> None:
        self.adapters.get(tenant, adapter_id)
        self.adapters.delete(tenant, adapter_id)
        self.pending.drop_adapter(adapter_id)
        self.preparer.forget(lambda adapter, _pool_key: adapter == adapter_id)

    def weights(self, tenant: str, adapter_id: str) -> tuple[AdapterRecord, dict[str, LoraLayer], float]:
        return self.adapters.weights(tenant, adapter_id)

    def layer_info(self, tenant: str, adapter_id: str) -> list[LoraLayer]:
        return self.adapters.layer_info(tenant, adapter_id)

    # -- compute ----------------------------------------------------------------------------------------
    def append_input(self, tenant: str, computation_id: str, adapter_id: str, layers: list[str], num_tokens: int,
                     offset: int, data: list[bytes]) -> tuple[Computation, Counts, dict[str, float]]:
        return self.column.append_input(tenant, computation_id, adapter_id, layers, num_tokens, offset, data)

    def compute_delta(self, tenant: str, adapter_id: str, layers: list[str], packing: str, data: list[bytes],
                      num_tokens: int, computation_id: str, layer_inputs: list[tuple[str, list[bytes]]],
                      output_offset: int, output_count: int) -> ComputeResult:
        if packing == "column":
            return self.column.outputs(tenant, adapter_id, computation_id, layers, output_offset, output_count)
        if packing != "replicated":
            raise InvalidArgument("packing", "must be PACKING_COLUMN or PACKING_REPLICATED")
        return self.token.compute(tenant, adapter_id, layers, data, num_tokens, computation_id, layer_inputs)

    def compute_tokens(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes],
                       computation_id: str) -> TokensResult:
        return self.batch.compute(tenant, adapter_id, layers, data, computation_id)


__all__ = ["COMPUTATION_TTL_S", "MAX_CONTEXT_BYTES", "ComputeResult", "DeltaResult", "HeLimits", "HeService",
           "TokensResult", "check_params", "inspect_context"]
