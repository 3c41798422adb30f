"""Private inference with HE-LoRA: encrypt on the tenant's machine, compute on the he service, decrypt here.

Two packings, chosen by the number of tokens (see docs/he.md):

* one token: *replicated* packing in two rounds. x is tiled into blocks of d slots; the service returns
  masked products whose block sums are the blinded rank projections Q A x + rho; this client (the key
  holder) sums the blocks, re-encrypts the sums tiled in blocks of r slots, and the service returns
  masked products whose block sums are the delta.
* several tokens: *column* packing. One ciphertext per input dimension holds that dimension across up
  to N/2 tokens; the service multiplies by A then by s * B as scalars (depth 2) and returns one
  ciphertext per output dimension.

No ciphertext is ever rotated, and the service never holds a secret key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

from ..errors import ValidationError
from .keys import HEKeyBundle
from .remote import HEAdapterInfo, HeClient, HELayerInfo

# Bytes of ciphertexts per AppendInput call: well under the 64 MiB message limit.
_CHUNK_BYTES = 8 << 20
_COUNT_FIELDS = ("plaintext_multiplies", "additions", "rotations", "rescales", "encryptions",
                 "prepared_encryptions")
_TIMING_FIELDS = ("deserialize_ms", "compute_ms", "serialize_ms", "total_ms", "load_ms")
# ComputeTokens: tokens per call (the he service's limits: 64 tokens, 256 tokens x layers).
MAX_TOKENS_PER_CALL = 16
MAX_TOKEN_LAYERS = 256


@dataclass
class CallStats:
    """What the he service reported for one ``process`` (summed over its RPCs), and the bytes moved."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNT_FIELDS, 0)
                                   | {"multiplicative_depth": 0})
    server_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_TIMING_FIELDS, 0.0))
    rpcs: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    wall_ms: float = 0.0
    rpc_ms: float = 0.0          # waiting for the he service (its server_ms["total_ms"] and the transport)
    encrypt_ms: float = 0.0      # here, by the key holder
    decrypt_ms: float = 0.0

    def merge(self, other: CallStats) -> None:
        """Add ``other`` (another call's stats) to these."""
        for name in _COUNT_FIELDS:
            self.counts[name] += other.counts[name]
        self.counts["multiplicative_depth"] = max(self.counts["multiplicative_depth"],
                                                  other.counts["multiplicative_depth"])
        for name in _TIMING_FIELDS:
            self.server_ms[name] += other.server_ms[name]
        self.rpcs += other.rpcs
        self.request_bytes += other.request_bytes
        self.response_bytes += other.response_bytes
        self.wall_ms += other.wall_ms
        self.rpc_ms += other.rpc_ms
        self.encrypt_ms += other.encrypt_ms
        self.decrypt_ms += other.decrypt_ms

    def add(self, counts: Any, timings: Any, request: Any, response: Any) -> None:
        for name in _COUNT_FIELDS:
            self.counts[name] += getattr(counts, name)
        self.counts["multiplicative_depth"] = max(self.counts["multiplicative_depth"], counts.multiplicative_depth)
        for name in _TIMING_FIELDS:
            self.server_ms[name] += getattr(timings, name)
        self.rpcs += 1
        self.request_bytes += request.ByteSize()
        self.response_bytes += response.ByteSize()


class ColumnCiphertexts(Sequence[bytes]):
    """The serialised column ciphertexts of one token group, encrypted in order by a background thread.

    Reading ciphertext j waits until it is ready, so :meth:`PrivateInference.process` sends the first
    chunks while later columns are still being encrypted: this machine encrypts while the he service
    folds what it has received (on a 2-core machine about a third of the column path's time).
    """

    def __init__(self, bundle: HEKeyBundle, columns: NDArray[np.float64]) -> None:
        self._items: list[bytes] = []
        self._error: BaseException | None = None
        self._ready = threading.Condition()
        self._total = int(columns.shape[0])
        self._thread = threading.Thread(target=self._encrypt, args=(bundle, columns), daemon=True,
                                        name="he-encrypt")
        self._thread.start()

    def _encrypt(self, bundle: HEKeyBundle, columns: NDArray[np.float64]) -> None:
        try:
            for column in columns:
                data = bundle.encrypt_column(column)
                with self._ready:
                    self._items.append(data)
                    self._ready.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            with self._ready:
                self._error = exc
                self._ready.notify_all()

    def __len__(self) -> int:
        return self._total

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._total))]
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError(index)
        with self._ready:
            while len(self._items) <= index and self._error is None:
                self._ready.wait()
            if len(self._items) > index:
                return self._items[index]
            raise self._error or IndexError(index)  # the encryption failed before reaching it


@dataclass
class EncryptedInput:
    """Ciphertexts of hidden states, ready for :meth:`PrivateInference.process`. ``groups`` holds, per
    group of at most N/2 tokens, the serialised ciphertexts (column: one per input dimension;
    replicated: one)."""

    packing: str
    shape: tuple[int, ...]
    groups: list[tuple[int, Sequence[bytes]]]

    @property
    def size_bytes(self) -> int:
        return sum(len(c) for _, cts in self.groups for c in cts)


@dataclass
class EncryptedOutput:
    """The encrypted deltas returned by the he service; only the key holder can decrypt them."""

    packing: str
    shape: tuple[int, ...]
    # layer -> per token group: (tokens, ciphertexts, block size)
    layers: dict[str, list[tuple[int, list[bytes], int]]]
    out_features: dict[str, int]
    stats: CallStats


def as_matrix(hidden_states: Any) -> tuple[NDArray[np.float64], tuple[int, ...]]:
    if hasattr(hidden_states, "detach"):
        hidden_states = hidden_states.detach().to("cpu").double().numpy()
    x = np.asarray(hidden_states, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim not in (2, 3):
        raise ValidationError(f"hidden_states must be [d], [tokens, d] or [batch, tokens, d], got shape {x.shape}",
                              field="hidden_states", code="INVALID_ARGUMENT")
    if not np.all(np.isfinite(x)):
        raise ValidationError("hidden_states holds NaN or infinity", field="hidden_states", code="INVALID_ARGUMENT")
    return x.reshape(-1, x.shape[-1]), x.shape



class PrivateInference:
    """Encrypt hidden states (:meth:`encrypt_input`), have the he service compute the LoRA delta of an
    adapter on them (:meth:`process`), decrypt the result (:meth:`decrypt_output`). Built by
    :func:`create_private_inference_mode`. The key bundle stays in this object, in this process."""

    def __init__(self, bundle: HEKeyBundle, he: HeClient, adapter: HEAdapterInfo) -> None:
        self.bundle = bundle
        self.he = he
        self.adapter = adapter
        self.last_stats: CallStats | None = None
        self.total_stats = CallStats()      # every call's, summed (bench/bench_inference.py reads them)

    @property
    def layers(self) -> tuple[HELayerInfo, ...]:
        return self.adapter.layers

    def layers_named(self, names: Sequence[str]) -> list[HELayerInfo]:
        return [self.adapter.layer(n) for n in names]

    def _layers(self, layers: list[str] | None) -> list[HELayerInfo]:
        chosen = [self.adapter.layer(n) for n in layers] if layers else list(self.adapter.layers)
        dims = {ly.in_features for ly in chosen}
        if len(dims) != 1:
            raise ValidationError(f"one input x serves layers with one input size; these take {sorted(dims)}: "
                                  "name the layers (layers=[...])", field="layers", code="INVALID_ARGUMENT")
        return chosen

    # -- tenant side ---------------------------------------------------------------------------------------
    def encrypt_input(self, hidden_states: Any, packing: str = "auto") -> EncryptedInput:
        """Encrypt hidden states of shape [d], [tokens, d] or [batch, tokens, d] under the tenant's public
        key. ``packing``: "auto" (replicated for one token, column otherwise), "replicated" or "column"."""
        x, shape = as_matrix(hidden_states)
        tokens, d = x.shape
        slots = self.bundle.slot_count
        if packing == "auto":
            packing = "replicated" if tokens == 1 else "column"
        if packing == "replicated":
            if tokens != 1:
                raise ValidationError("replicated packing takes one token", field="packing", code="INVALID_ARGUMENT")
            if d > slots:
                raise ValidationError(f"d = {d} exceeds the {slots} slots of the context; use column packing or "
                                      "a larger poly_modulus_degree", field="hidden_states",
                                      code="INVALID_ARGUMENT")
            tiled = np.tile(x[0], slots // d)
            return EncryptedInput("replicated", shape, [(1, [self.bundle.encrypt_token(tiled)])])
        if packing != "column":
            raise ValidationError("packing must be 'auto', 'replicated' or 'column'", field="packing",
                                  code="INVALID_ARGUMENT")
        groups: list[tuple[int, Sequence[bytes]]] = []
        for start in range(0, tokens, slots):
            part = x[start:start + slots]
            groups.append((part.shape[0], ColumnCiphertexts(self.bundle, np.ascontiguousarray(part.T))))
        return EncryptedInput("column", shape, groups)

    def decrypt_output(self, output: EncryptedOutput) -> dict[str, NDArray[np.float64]]:
        """The decrypted delta of each layer: layer name -> array of shape [tokens, d_out] (or
        [batch, tokens, d_out] for a 3-D input), float64."""
        result: dict[str, NDArray[np.float64]] = {}
        for name, groups in output.layers.items():
            d_out = output.out_features[name]
            parts: list[NDArray[np.float64]] = []
            for tokens, cts, block in groups:
                if output.packing == "replicated":
                    values = [v for c in cts for v in self._decrypt_blocks(c, block)]
                    parts.append(np.asarray(values[:d_out], dtype=np.float64)[None, :])
                else:
                    parts.append(np.stack([self.bundle.decrypt_token(c)[:tokens] for c in cts], axis=1))
            delta = np.concatenate(parts, axis=0)
            result[name] = delta.reshape(*output.shape[:-1], d_out) if len(output.shape) > 1 else delta[0]
        return result

    def _decrypt_blocks(self, data: bytes, block: int) -> NDArray[np.float64]:
        values = self.bundle.decrypt_token(data)
        per = len(values) // block
        return values[: per * block].reshape(per, block).sum(axis=1)

    # -- the he service --------------------------------------------------------------------------------------
    def process(self, encrypted: EncryptedInput, layers: list[str] | None = None) -> EncryptedOutput:
        """Have the he service compute the delta of ``layers`` (default: every loaded layer; they must share
        their input size) on ``encrypted``. Sends ciphertexts only. For one token the second round's
        input is made here, by the key holder, from the first round's block sums."""
        chosen = self._layers(layers)
        stats = CallStats()
        t0 = time.perf_counter()
        if encrypted.groups and len(encrypted.groups[0][1]) and encrypted.packing == "column":
            d = len(encrypted.groups[0][1])
        else:
            d = chosen[0].in_features
        if d != chosen[0].in_features:
            raise ValidationError(f"the input has {d} features; the layers take {chosen[0].in_features}",
                                  field="hidden_states", code="INVALID_ARGUMENT")
        out: dict[str, list[tuple[int, list[bytes], int]]] = {ly.name: [] for ly in chosen}
        for tokens, cts in encrypted.groups:
            if encrypted.packing == "replicated":
                for name, (cts_out, block) in self._replicated(chosen, cts, stats).items():
                    out[name].append((1, cts_out, block))
            else:
                for name, cts_out in self._column(chosen, tokens, cts, stats).items():
                    out[name].append((tokens, cts_out, 0))
        stats.wall_ms = (time.perf_counter() - t0) * 1e3
        self.last_stats = stats
        self.total_stats.merge(stats)
        return EncryptedOutput(encrypted.packing, encrypted.shape, out, {ly.name: ly.out_features for ly in chosen},
                               stats)

    def process_tokens(self, hidden_states: Any, layers: list[str] | None = None) -> dict[str, NDArray[np.float64]]:
        """The deltas of ``layers`` (default all; they must share their input size) for each token of
        ``hidden_states`` ([d], [tokens, d] or [batch, tokens, d]): every token and every layer in one
        ComputeTokens call per round (at most MAX_TOKENS_PER_CALL tokens a call). Returns layer name ->
        array [..., d_out], float64. The single-token protocol, batched: encrypted here, blinded
        projections summed and re-encrypted here, deltas decrypted here."""
        chosen = self._layers(layers)
        flat = (hidden_states.dim() if hasattr(hidden_states, "dim") else np.ndim(hidden_states)) == 1
        x, shape = as_matrix(hidden_states)
        d = chosen[0].in_features
        if x.shape[1] != d:
            raise ValidationError(f"the input has {x.shape[1]} features; the layers take {d}", field="hidden_states",
                                  code="INVALID_ARGUMENT")
        if d > self.bundle.slot_count:
            raise ValidationError(f"d = {d} exceeds the {self.bundle.slot_count} slots of the context; use column "
                                  "packing or a larger poly_modulus_degree", field="hidden_states",
                                  code="INVALID_ARGUMENT")
        stats = CallStats()
        t0 = time.perf_counter()
        per_call = max(1, min(MAX_TOKENS_PER_CALL, MAX_TOKEN_LAYERS // len(chosen)))
        parts = [self._tokens(chosen, x[i:i + per_call], stats) for i in range(0, x.shape[0], per_call)]
        stats.wall_ms = (time.perf_counter() - t0) * 1e3
        self.last_stats = stats
        self.total_stats.merge(stats)
        out: dict[str, NDArray[np.float64]] = {}
        for ly in chosen:
            delta = np.concatenate([p[ly.name] for p in parts], axis=0)
            out[ly.name] = delta[0] if flat else delta.reshape(*shape[:-1], ly.out_features)
        return out

    def _rpc(self, method: Any, request: Any, stats: CallStats) -> Any:
        t0 = time.perf_counter()
        response = method(request)
        stats.rpc_ms += (time.perf_counter() - t0) * 1e3
        stats.add(response.counts, response.timings, request, response)
        return response

    def _tokens(self, layers: list[HELayerInfo], x: NDArray[np.float64], stats: CallStats
                ) -> dict[str, NDArray[np.float64]]:
        from tensafe.api.he.v1 import he_pb2

        slots, d = self.bundle.slot_count, x.shape[1]
        t0 = time.perf_counter()
        cts = [self.bundle.encrypt_token(np.tile(row, slots // d)) for row in x]
        stats.encrypt_ms += (time.perf_counter() - t0) * 1e3
        first = self._rpc(self.he.compute_tokens, he_pb2.ComputeTokensRequest(
            adapter_id=self.adapter.adapter_id, layers=[ly.name for ly in layers], ciphertexts=cts), stats)
        if len(first.tokens) != len(cts) or len(first.round_two_spans) != len(layers):
            raise ValidationError("the he service answered for other tokens or layers", field="ciphertexts",
                                  code="INTERNAL")
        block2 = first.round_two_block_size
        per2 = slots // block2
        second = he_pb2.ComputeTokensRequest(computation_id=first.computation_id)
        for token in first.tokens:
            t1 = time.perf_counter()
            sums = np.concatenate([self._decrypt_blocks(c, first.block_size) for c in token.ciphertexts])
            stats.decrypt_ms += (time.perf_counter() - t1) * 1e3
            # The key holder's step: each layer's blinded projections, into its blocks of round 2's input.
            values = np.zeros((per2, block2))
            for span, two in zip(first.spans, first.round_two_spans, strict=True):
                values[two.first_block:two.first_block + two.blocks, :span.blocks] = \
                    sums[span.first_block:span.first_block + span.blocks]
            t1 = time.perf_counter()
            second.ciphertexts.append(self.bundle.encrypt_token(values.ravel()))
            stats.encrypt_ms += (time.perf_counter() - t1) * 1e3
        final = self._rpc(self.he.compute_tokens, second, stats)
        spans = {span.layer: span for span in final.spans}
        if len(final.tokens) != len(cts) or set(spans) != {ly.name for ly in layers}:
            raise ValidationError("the he service answered for other tokens or layers", field="ciphertexts",
                                  code="INTERNAL")
        t0 = time.perf_counter()
        out: dict[str, list[NDArray[np.float64]]] = {ly.name: [] for ly in layers}
        for token in final.tokens:
            sums = np.stack([self._decrypt_blocks(c, final.block_size) for c in token.ciphertexts])  # [P, per2]
            for ly in layers:
                span = spans[ly.name]
                rows = sums[:, span.first_block:span.first_block + span.blocks].reshape(-1)
                out[ly.name].append(rows[:ly.out_features])
        stats.decrypt_ms += (time.perf_counter() - t0) * 1e3
        return {name: np.stack(rows) for name, rows in out.items()}

    def _replicated(self, layers: list[HELayerInfo], cts: Sequence[bytes], stats: CallStats
                    ) -> dict[str, tuple[list[bytes], int]]:
        from tensafe.api.he.v1 import he_pb2

        names = [ly.name for ly in layers]
        req = he_pb2.ComputeDeltaRequest(adapter_id=self.adapter.adapter_id, layers=names,
                                         packing=he_pb2.PACKING_REPLICATED, ciphertexts=cts, num_tokens=1)
        first = self.he.compute_delta(req)
        stats.add(first.counts, first.timings, req, first)
        # The key holder's step: block sums of round 1 are the blinded projections, re-encrypted tiled.
        second = he_pb2.ComputeDeltaRequest(adapter_id=self.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED,
                                            computation_id=first.computation_id, num_tokens=1)
        slots = self.bundle.slot_count
        for delta in first.deltas:
            layer = self.adapter.layer(delta.layer)
            sums = np.concatenate([self._decrypt_blocks(c, delta.block_size) for c in delta.ciphertexts])[:layer.rank]
            tiled = np.tile(sums, slots // layer.rank)
            second.layer_inputs.add(layer=delta.layer, ciphertexts=[self.bundle.encrypt_token(tiled)])
        final = self.he.compute_delta(second)
        stats.add(final.counts, final.timings, second, final)
        return {d.layer: (list(d.ciphertexts), d.block_size) for d in final.deltas}

    def _column(self, layers: list[HELayerInfo], tokens: int, cts: Sequence[bytes], stats: CallStats
                ) -> dict[str, list[bytes]]:
        from tensafe.api.he.v1 import he_pb2

        names = [ly.name for ly in layers]
        computation_id, offset = "", 0
        while offset < len(cts):
            chunk: list[bytes] = []
            size = 0
            while offset + len(chunk) < len(cts):  # one at a time: later ones may still be encrypting
                ct = cts[offset + len(chunk)]
                if chunk and size + len(ct) > _CHUNK_BYTES:
                    break
                chunk.append(ct)
                size += len(ct)
            req = he_pb2.AppendInputRequest(computation_id=computation_id, offset=offset, ciphertexts=chunk)
            if not computation_id:
                req.adapter_id, req.num_tokens = self.adapter.adapter_id, tokens
                req.layers.extend(names)
            resp = self.he.append_input(req)
            stats.add(resp.counts, resp.timings, req, resp)
            computation_id, offset = resp.computation_id, resp.received
        out: dict[str, list[bytes]] = {n: [] for n in names}
        width = max(ly.out_features for ly in layers)
        offset = 0
        while offset < width:
            req = he_pb2.ComputeDeltaRequest(adapter_id=self.adapter.adapter_id, layers=names,
                                             packing=he_pb2.PACKING_COLUMN, computation_id=computation_id,
                                             output_offset=offset)
            resp = self.he.compute_delta(req)
            stats.add(resp.counts, resp.timings, req, resp)
            step = 0
            for delta in resp.deltas:
                out[delta.layer].extend(delta.ciphertexts)
                step = max(step, len(delta.ciphertexts))
            if step == 0:
                raise ValidationError("the he service returned no output ciphertexts", field="output_offset",
                                      code="INTERNAL")
            offset += step
        return out
