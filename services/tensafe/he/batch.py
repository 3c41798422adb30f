"""ComputeTokens: the single-token protocol for several tokens and several layers sharing their input, one
call per round.

Two-plane generation asks for q_proj and v_proj of a block together (they read the same hidden states),
and for a prompt's or several sequences' tokens together. Per token everything is as in ``token.py``:
a fresh rotation Q and blinding rho per layer, masks whose block sums are rho (round 1) or zero (round
2), each output ``rescale(ct * w) + Enc_pk(masks)`` with a fresh public-key encryption of its masks, and
round 2 once per computation. What changes is the layout (``group.GroupLayout``): the layers' rows
share each token's output ciphertexts, and round 2 takes one ciphertext per token for all its layers.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from . import compute, group
from .adapter_cache import Adapters
from .compute import Counts, Timer
from .contexts import Contexts, LoadedContext
from .group import GroupBlinding, GroupLayout
from .masks import MaskPool
from .pending import COMPUTATION_TTL_S, Computation, Pending, same_input, timings
from .prepare import Activity, Preparer

# Tokens of one call, and tokens x layers (each holds a blinding of about 1 MB until round 2).
MAX_TOKENS = 64
MAX_TOKEN_LAYERS = 256


@dataclass
class TokensResult:
    computation_id: str
    round: int
    layout: GroupLayout
    tokens: list[list[bytes]]
    counts: Counts
    timings: dict[str, float]


class BatchProtocol:
    def __init__(self, contexts: Contexts, adapters: Adapters, pending: Pending, masks: MaskPool,
                 activity: Activity, preparer: Preparer, response_budget: int) -> None:
        self.contexts = contexts
        self.adapters = adapters
        self.pending = pending
        self.masks = masks
        self.activity = activity
        self.preparer = preparer
        self.response_budget = response_budget

    def compute(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes],
                computation_id: str) -> TokensResult:
        with self.activity.request():
            if computation_id:
                return self.expand(tenant, computation_id, data)
            return self.project(tenant, adapter_id, layers, data)

    def _want(self, adapter_id: str, loaded: LoadedContext, layout: GroupLayout, tokens: int) -> None:
        """Have blindings of this group prepared between requests, and masks kept ready for all the groups
        of the adapter (two-plane generation asks for them one after another)."""
        self.preparer.want_group(adapter_id, loaded.pool_key, loaded.token, loaded.engine_args, layout, tokens)
        groups = max(1, self.preparer.groups(adapter_id)) * tokens
        item = 2 * loaded.record.poly_modulus_degree * 8
        self.masks.expect(loaded.pool_key, loaded.engine_args, layout.block, compute.BLIND, layout.first * groups, item)
        self.masks.expect(loaded.pool_key, loaded.engine_args, layout.block2, compute.ZERO, layout.second * groups,
                          item)

    def _source(self, loaded: LoadedContext) -> compute.MaskSource:
        return lambda block, kind, count, counts: self.masks.take(loaded.pool_key, loaded.token, loaded.engine_args,
                                                                  block, kind, count, counts)

    def _check_size(self, loaded: LoadedContext, layout: GroupLayout, tokens: int) -> None:
        """Both rounds' responses must fit a message: refused before any work."""
        n = loaded.record.poly_modulus_degree
        per_ct = 2 * n * 8 + 256  # a ciphertext at the last level (one 64-bit prime) and its header
        fits = self.response_budget // (max(layout.first, layout.second) * per_ct)
        if tokens > fits:
            raise InvalidArgument("ciphertexts", f"{tokens} tokens through these layers do not fit one response "
                                                 f"(at most {fits}); send fewer tokens per call")

    def project(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes]) -> TokensResult:
        t_start = time.perf_counter()
        if not data:
            raise InvalidArgument("ciphertexts", "round 1 takes one ciphertext of x per token; got none")
        if len(data) > MAX_TOKENS:
            raise InvalidArgument("ciphertexts", f"at most {MAX_TOKENS} tokens per call, got {len(data)}")
        self.pending.check_room(tenant)
        record, weights, load = self.adapters.weights(tenant, adapter_id)
        chosen = self.adapters.choose(record, layers, "layers")
        if len(data) * len(chosen) > MAX_TOKEN_LAYERS:
            raise InvalidArgument("ciphertexts", f"{len(data)} tokens x {len(chosen)} layers exceeds "
                                                 f"{MAX_TOKEN_LAYERS} per call; send fewer tokens or layers")
        same_input([weights[n] for n in chosen], "layers")
        loaded = self.contexts.loaded(tenant, record.key_id)
        layout = group.group_layout([weights[n] for n in chosen], loaded.slots, "layers")
        self._check_size(loaded, layout, len(data))
        timer = Timer()
        t0 = time.perf_counter()
        cts = [loaded.token.load_input(c, f"ciphertexts[{i}]") for i, c in enumerate(data)]
        timer.deserialize += time.perf_counter() - t0
        comp = Computation(computation_id="hec_" + secrets.token_hex(12), tenant_id=tenant, adapter_id=adapter_id,
                           layers=list(layout.names), packing="tokens", num_tokens=len(cts),
                           in_features=layout.block, key_id=record.key_id,
                           expires=time.monotonic() + COMPUTATION_TTL_S, layout=layout)
        total, outs = Counts(), []
        for ct in cts:
            t0 = time.perf_counter()
            blinding = self.preparer.take(adapter_id, layout.names)
            if isinstance(blinding, GroupBlinding):
                total.prepared_encryptions += len(blinding.first_masks)
            else:
                blinding = group.prepare_group(loaded.token, layout, self._source(loaded), total)
            result = group.project_group(loaded.token, blinding, ct, total)
            timer.compute += time.perf_counter() - t0
            comp.token_blindings.append(blinding)
            outs.append(compute.serialize_seal(result, timer))
        self.pending.open(comp)
        self.activity.between_rounds(comp.computation_id)
        self._want(adapter_id, loaded, layout, len(cts))
        return TokensResult(comp.computation_id, 1, layout, outs, total, timings(timer, t_start, load))

    def expand(self, tenant: str, computation_id: str, data: list[bytes]) -> TokensResult:
        t_start = time.perf_counter()
        comp = self.pending.get(tenant, computation_id)
        if comp.packing != "tokens" or comp.layout is None:
            raise InvalidArgument("computation_id", "is not a ComputeTokens computation")
        if len(data) != comp.num_tokens:
            raise InvalidArgument("ciphertexts", f"round 2 takes one ciphertext per token of round 1 "
                                                 f"({comp.num_tokens}), got {len(data)}")
        loaded = self.contexts.loaded(tenant, comp.key_id)
        timer = Timer()
        t0 = time.perf_counter()
        cts = [loaded.token.load_input(c, f"ciphertexts[{i}]") for i, c in enumerate(data)]
        timer.deserialize += time.perf_counter() - t0
        # Round 2 runs once per computation: its masks are fixed by round 1 (see token.py).
        with comp.lock:
            if not comp.token_blindings:
                raise FailedPrecondition(f"round 2 of computation {comp.computation_id} has already run; run the "
                                         "tokens again from round 1")
            blindings, comp.token_blindings = comp.token_blindings, []
        self.activity.round_two(comp.computation_id)
        total, outs = Counts(), []
        for ct, blinding in zip(cts, blindings, strict=True):
            if blinding.prepared_ahead:
                total.prepared_encryptions += len(blinding.second_masks)
            t0 = time.perf_counter()
            result = group.expand_group(loaded.token, blinding, ct, total)
            timer.compute += time.perf_counter() - t0
            outs.append(compute.serialize_seal(result, timer))
        return TokensResult(comp.computation_id, 2, comp.layout, outs, total, timings(timer, t_start, 0.0))


__all__ = ["MAX_TOKENS", "MAX_TOKEN_LAYERS", "BatchProtocol", "TokensResult"]
