"""The single-token protocol (PACKING_REPLICATED): one token in two rounds, x never seen in the clear.

Round 1 (``ComputeDelta`` with the ciphertext of x) returns each layer's blinded rank projection under a
fresh random rotation; the key holder decrypts, re-encrypts and sends it back; round 2 (``ComputeDelta``
with ``computation_id`` and ``layer_inputs``) expands it into the delta. Round 2 runs once per computation
and layer. The rotations, masks and blindings are prepared between requests (``prepare.Preparer``, from
masks the ``masks.MaskPool`` workers encrypt), or by the request itself when none is ready.
"""

from __future__ import annotations

import secrets
import time

from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from . import compute
from .adapter_cache import Adapters, matching
from .compute import Counts, LoraLayer, Timer
from .contexts import Contexts, LoadedContext
from .masks import MaskPool
from .pending import COMPUTATION_TTL_S, Computation, ComputeResult, DeltaResult, Pending, same_input, timings
from .prepare import Activity, Preparer


class TokenProtocol:
    def __init__(self, contexts: Contexts, adapters: Adapters, pending: Pending, masks: MaskPool,
                 activity: Activity, preparer: Preparer) -> None:
        self.contexts = contexts
        self.adapters = adapters
        self.pending = pending
        self.masks = masks
        self.activity = activity
        self.preparer = preparer

    def prepare(self, adapter_id: str, loaded: LoadedContext, layers: list[LoraLayer]) -> None:
        """Have the masks and blindings of single-token calls on ``layers`` prepared between requests."""
        slots, item = loaded.slots, 2 * loaded.record.poly_modulus_degree * 8
        for ly in layers:
            if ly.in_features > slots or ly.rank > slots:
                continue
            self.masks.expect(loaded.pool_key, loaded.engine_args, ly.in_features, compute.BLIND,
                              compute.ciphertexts_needed(ly.rank, ly.in_features, slots), item)
            self.masks.expect(loaded.pool_key, loaded.engine_args, ly.rank, compute.ZERO,
                              compute.ciphertexts_needed(ly.out_features, ly.rank, slots), item)
            self.preparer.want(adapter_id, loaded.pool_key, loaded.token, loaded.engine_args, ly)

    def _mask_source(self, loaded: LoadedContext) -> compute.MaskSource:
        return lambda block, kind, count, counts: self.masks.take(loaded.pool_key, loaded.token, loaded.engine_args,
                                                                  block, kind, count, counts)

    def compute(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes], num_tokens: int,
                computation_id: str, layer_inputs: list[tuple[str, list[bytes]]]) -> ComputeResult:
        """ComputeDelta with PACKING_REPLICATED: round 1 without ``computation_id``, round 2 with it."""
        with self.activity.request():
            if computation_id:
                return self.expand(tenant, computation_id, layers, layer_inputs)
            return self.project(tenant, adapter_id, layers, data, num_tokens)

    def project(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes],
                num_tokens: int) -> ComputeResult:
        t_start = time.perf_counter()
        if num_tokens not in (0, 1):
            raise InvalidArgument("num_tokens", "PACKING_REPLICATED takes one token; use PACKING_COLUMN for more")
        if len(data) != 1:
            raise InvalidArgument("ciphertexts", f"PACKING_REPLICATED takes one ciphertext of x, got {len(data)}")
        self.pending.check_room(tenant)
        record, weights, load = self.adapters.weights(tenant, adapter_id)
        chosen = self.adapters.choose(record, layers, "layers")
        d = same_input([weights[n] for n in chosen], "layers")
        loaded = self.contexts.loaded(tenant, record.key_id)
        compute.blocks_per_ciphertext(d, loaded.slots, "ciphertexts")
        timer = Timer()
        t0 = time.perf_counter()
        ct = loaded.token.load_input(data[0], "ciphertexts[0]")
        timer.deserialize += time.perf_counter() - t0
        comp = Computation(computation_id="hec_" + secrets.token_hex(12), tenant_id=tenant, adapter_id=adapter_id,
                           layers=chosen, packing="replicated", num_tokens=1, in_features=d, key_id=record.key_id,
                           expires=time.monotonic() + COMPUTATION_TTL_S)
        total, deltas = Counts(), []
        for name in chosen:
            counts = Counts()
            t0 = time.perf_counter()
            blinding = self.preparer.take(adapter_id, name)
            if isinstance(blinding, compute.TokenBlinding):
                counts.prepared_encryptions += len(blinding.first_masks)
            else:
                blinding = compute.prepare_token(loaded.token, weights[name], self._mask_source(loaded), counts)
            outs = compute.project_token(loaded.token, blinding, ct, counts)
            timer.compute += time.perf_counter() - t0
            comp.blindings[name] = blinding
            deltas.append(DeltaResult(name, compute.serialize_seal(outs, timer), counts, block_size=d, round=1))
            total.add(counts)
        self.pending.open(comp)
        self.activity.between_rounds(comp.computation_id)
        self.prepare(adapter_id, loaded, [weights[n] for n in chosen])
        return ComputeResult(deltas, total, timings(timer, t_start, load), comp.computation_id)

    def expand(self, tenant: str, computation_id: str, layers: list[str],
               layer_inputs: list[tuple[str, list[bytes]]]) -> ComputeResult:
        t_start = time.perf_counter()
        comp = self.pending.get(tenant, computation_id)
        if comp.packing != "replicated":
            raise InvalidArgument("computation_id", "is a column-packed computation")
        loaded = self.contexts.loaded(tenant, comp.key_id)
        if not layer_inputs:
            raise InvalidArgument("layer_inputs", "round 2 needs the blinded projections of each layer")
        wanted = {n for w in layers for n in matching(comp.layers, w)}
        timer, total, deltas, inputs = Timer(), Counts(), [], []
        for i, (want, data) in enumerate(layer_inputs):
            hits = matching(comp.layers, want)
            if len(hits) != 1:
                raise InvalidArgument(f"layer_inputs[{i}].layer", f"{want!r} is not one layer of this computation")
            if layers and hits[0] not in wanted:
                continue
            if len(data) != 1:
                raise InvalidArgument(f"layer_inputs[{i}].ciphertexts", "takes one ciphertext")
            t0 = time.perf_counter()
            inputs.append((hits[0], loaded.token.load_input(data[0], f"layer_inputs[{i}].ciphertexts[0]")))
            timer.deserialize += time.perf_counter() - t0
        # Round 2 runs once per computation and layer: its masks are fixed by round 1, so a second run on
        # another input would let the key holder subtract them away.
        with comp.lock:
            done = [name for name, _ in inputs if name not in comp.blindings]
            if done:
                raise FailedPrecondition(f"round 2 of computation {comp.computation_id} has already run for "
                                         f"{done[0]}; run the token again from round 1")
            blindings = [comp.blindings.pop(name) for name, _ in inputs]
            if not comp.blindings:
                self.activity.round_two(comp.computation_id)
        for (name, ct), blinding in zip(inputs, blindings, strict=True):
            counts = Counts()
            if blinding.prepared_ahead:
                counts.prepared_encryptions += len(blinding.second_masks)
            t0 = time.perf_counter()
            outs = compute.expand_token(loaded.token, blinding, ct, counts)
            timer.compute += time.perf_counter() - t0
            deltas.append(DeltaResult(name, compute.serialize_seal(outs, timer), counts,
                                      block_size=blinding.layer.rank, round=2))
            total.add(counts)
        return ComputeResult(deltas, total, timings(timer, t_start, 0.0), comp.computation_id)


__all__ = ["TokenProtocol"]
