"""The column-packed protocol: many tokens, one ciphertext per input dimension.

``AppendInput`` folds the chunks of x's columns (in order; a retried chunk is folded once) into each
layer's encrypted rank projections; once every input dimension is in, ``ComputeDelta`` (PACKING_COLUMN)
reads the output ciphertexts back, a response's worth at a time (``output_offset``/``output_count``).
"""

from __future__ import annotations

import secrets
import time

from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from . import compute
from .adapter_cache import Adapters
from .compute import ColumnProjection, Counts, Timer
from .contexts import Contexts
from .pending import COMPUTATION_TTL_S, Computation, ComputeResult, DeltaResult, Pending, same_input, timings


class ColumnProtocol:
    def __init__(self, contexts: Contexts, adapters: Adapters, pending: Pending, response_budget: int) -> None:
        self.contexts = contexts
        self.adapters = adapters
        self.pending = pending
        self.response_budget = response_budget   # bytes of ciphertexts one response may carry

    def append_input(self, tenant: str, computation_id: str, adapter_id: str, layers: list[str], num_tokens: int,
                     offset: int, data: list[bytes]) -> tuple[Computation, Counts, dict[str, float]]:
        t_start = time.perf_counter()
        load = 0.0
        if not computation_id:
            self.pending.check_room(tenant)
            record, weights, load = self.adapters.weights(tenant, adapter_id)
            chosen = self.adapters.choose(record, layers, "layers")
            d = same_input([weights[n] for n in chosen], "layers")
            loaded = self.contexts.loaded(tenant, record.key_id)
            if not 1 <= num_tokens <= loaded.slots:
                raise InvalidArgument("num_tokens", f"must be in [1, {loaded.slots}] (the context's slots)")
            comp = Computation(computation_id="hec_" + secrets.token_hex(12), tenant_id=tenant,
                               adapter_id=adapter_id, layers=chosen, packing="column", num_tokens=num_tokens,
                               expires=time.monotonic() + COMPUTATION_TTL_S, in_features=d,
                               projections={n: ColumnProjection(weights[n]) for n in chosen})
            self.pending.open(comp)
        else:
            comp = self.pending.get(tenant, computation_id)
            if comp.packing != "column":
                raise InvalidArgument("computation_id", "is a single-token computation; it takes no appended input")
            record = self.adapters.get(tenant, comp.adapter_id)
            loaded = self.contexts.loaded(tenant, record.key_id)
        counts, timer = Counts(), Timer()
        with comp.lock:
            if offset < 0 or offset > comp.received:
                raise InvalidArgument("offset", f"chunks come in order: expected offset {comp.received}, got {offset}")
            if offset + len(data) > comp.in_features:
                raise InvalidArgument("ciphertexts", f"{offset + len(data)} input dimensions; the layers take "
                                                     f"{comp.in_features}")
            skip = comp.received - offset  # a retried chunk is folded once
            fresh = data[skip:]
            t0 = time.perf_counter()
            cts = [loaded.token.load_input(b, f"ciphertexts[{skip + i}]", column=True) for i, b in enumerate(fresh)]
            timer.deserialize += time.perf_counter() - t0
            t0 = time.perf_counter()
            for name in comp.layers:
                comp.projections[name].fold(loaded.token, cts, comp.received, counts)
            timer.compute += time.perf_counter() - t0
            comp.received += len(fresh)
            if fresh:
                comp.ciphertext_bytes = max(comp.ciphertext_bytes, max(len(b) for b in fresh))
            comp.expires = time.monotonic() + COMPUTATION_TTL_S
        return comp, counts, timings(timer, t_start, load)

    def outputs(self, tenant: str, adapter_id: str, computation_id: str, layers: list[str], output_offset: int,
                output_count: int) -> ComputeResult:
        """ComputeDelta with PACKING_COLUMN: output ciphertexts [output_offset, +count) of each chosen layer."""
        comp = self.pending.get(tenant, computation_id)
        if comp.packing != "column" or (adapter_id and adapter_id != comp.adapter_id):
            raise InvalidArgument("computation_id", "is not a column-packed computation of this adapter")
        t_start = time.perf_counter()
        if not comp.complete:
            raise FailedPrecondition(f"computation {comp.computation_id} has {comp.received} of {comp.in_features} "
                                     "input dimensions; append the rest first")
        record = self.adapters.get(tenant, comp.adapter_id)
        loaded = self.contexts.loaded(tenant, record.key_id)
        chosen = [n for n in comp.layers if n in self.adapters.choose(record, layers, "layers")]
        if not chosen:
            raise InvalidArgument("layers", "names no layer of this computation")
        width = max(comp.projections[n].layer.out_features for n in chosen)
        if output_offset < 0 or output_offset >= width:
            raise InvalidArgument("output_offset", f"must be in [0, {width})")
        fit = max(1, self.response_budget // (max(comp.ciphertext_bytes, 1) * len(chosen)))
        count = min(output_count or fit, fit)
        if output_count < 0:
            raise InvalidArgument("output_count", "must be >= 0")
        timer, total = Timer(), Counts()
        deltas = []
        for name in chosen:
            proj = comp.projections[name]
            stop = min(output_offset + count, proj.layer.out_features)
            counts = Counts()
            t0 = time.perf_counter()
            with comp.lock:
                outs = compute.column_outputs(loaded.token, proj, min(output_offset, stop), stop, counts)
                comp.read_to[name] = max(comp.read_to.get(name, 0), stop)
            timer.compute += time.perf_counter() - t0
            deltas.append(DeltaResult(name, compute.serialize_seal(outs, timer), counts, output_offset=output_offset))
            total.add(counts)
        return ComputeResult(deltas, total, timings(timer, t_start, 0.0), comp.computation_id)


__all__ = ["ColumnProtocol"]
