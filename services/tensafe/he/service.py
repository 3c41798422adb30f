"""The he service's logic: public contexts, adapters loaded from the vault, and encrypted LoRA deltas.
No gRPC here; every call is for one tenant, and another tenant's context, adapter or computation does
not exist for it.

What the service may hold: public CKKS contexts (public key, relinearisation keys; never a secret key,
no Galois keys: nothing here rotates), the tenant's adapter weights (in memory, loaded from the vault
as the tenant), ciphertexts, and per pending computation the encrypted rank projections (column
packing) or the random rotation and blinding of a single token's first round. It never sees x or the
delta in the clear.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import tenseal as ts

from tensafe.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from tg_tinker.errors import ValidationError
from tg_tinker.he.params import SECURITY_TABLE, HEScheme, HESchemeParams

from . import adapters as adapter_files
from . import compute
from .compute import ColumnProjection, Counts, LoraLayer, SealEngine, Timer, TokenBlinding
from .masks import MaskPool
from .prepare import Activity, Preparer
from .store import AdapterRecord, ContextRecord, HeStore

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONTEXT_BYTES = 32 << 20
COMPUTATION_TTL_S = 600.0
# Response budget as a share of the largest message: headroom for the envelope and the counts.
_RESPONSE_SHARE = 0.75

@dataclass(frozen=True)
class HeLimits:
    """Per-tenant quota and per-call work caps (0: off); the settings named in each error."""

    computations: int = 32     # TENSAFE_QUOTA_HE_COMPUTATIONS: unfinished computations per tenant
    max_rank: int = 64         # TENSAFE_HE_MAX_RANK
    max_dim: int = 16384       # TENSAFE_HE_MAX_DIM: in_features and out_features of a layer
    max_layers: int = 256      # TENSAFE_HE_MAX_LAYERS: layers of one adapter


@dataclass
class LoadedContext:
    record: ContextRecord
    token: SealEngine         # SEAL objects of the public context, for both packings

    @property
    def pool_key(self) -> tuple:
        return (self.record.tenant_id, self.record.key_id, self.record.sha256)

    @property
    def engine_args(self) -> tuple[bytes, bytes, float]:
        """What a mask worker needs: the context's digest, its public bytes, the scale."""
        return (self.record.sha256, self.record.public_context, self.scale)

    @property
    def slots(self) -> int:
        return self.record.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2 ** self.record.scale_bits)


@dataclass
class Computation:
    computation_id: str
    tenant_id: str
    adapter_id: str
    layers: list[str]
    packing: str                                 # "column" or "replicated"
    num_tokens: int
    expires: float
    in_features: int
    key_id: str = ""
    received: int = 0
    ciphertext_bytes: int = 0
    read_to: dict[str, int] = field(default_factory=dict)   # column: output ciphertexts read, per layer
    projections: dict[str, ColumnProjection] = field(default_factory=dict)
    blindings: dict[str, TokenBlinding] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def complete(self) -> bool:
        return self.packing == "replicated" or self.received == self.in_features

    @property
    def finished(self) -> bool:
        """Nothing more to come: a token whose round 2 ran, a column computation whose outputs were all read
        (once at least). Finished computations give way to new ones under the tenant's quota."""
        if self.packing == "replicated":
            return not self.blindings
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


def _params_error(exc: ValidationError) -> InvalidArgument:
    extra = {"reason": "INSECURE_PARAMETERS", "limit": exc.details.get("limit")} if exc.code == "INSECURE_PARAMETERS" \
        else {}
    return InvalidArgument(exc.field or "params", exc.message, **extra)


def check_params(scheme: str, poly_modulus_degree: int, coeff_mod_bit_sizes: list[int], global_scale: float,
                 security_level: int) -> HESchemeParams:
    if scheme != "ckks":
        raise InvalidArgument("params.scheme", "only HE_SCHEME_CKKS is offered")
    bits = 0
    if global_scale > 0:
        import math
        bits = math.log2(global_scale)
        if bits != int(bits):
            raise InvalidArgument("params.global_scale", f"must be a power of two, got {global_scale}")
    try:
        return HESchemeParams(scheme=HEScheme.CKKS, poly_modulus_degree=poly_modulus_degree,
                              coeff_mod_bit_sizes=tuple(coeff_mod_bit_sizes), scale_bits=int(bits),
                              security_level=security_level or 128)
    except ValidationError as exc:
        raise _params_error(exc) from None


def inspect_context(data: bytes, params: HESchemeParams) -> ts.Context:
    """The public context in ``data``, refused if it holds a secret key or Galois keys, or if its actual
    parameters differ from ``params`` or break the security table."""
    if not data:
        raise InvalidArgument("public_context", "is required")
    if len(data) > MAX_CONTEXT_BYTES:
        raise InvalidArgument("public_context", f"is {len(data)} bytes; at most {MAX_CONTEXT_BYTES}")
    try:
        ctx = ts.context_from(data)
    except Exception:  # noqa: BLE001 - any malformed bytes
        raise InvalidArgument("public_context", "is not a serialized TenSEAL context") from None
    if ctx.has_secret_key():
        del ctx
        raise InvalidArgument("public_context", "holds a secret key; it was discarded unread. Send the public "
                                                "context only (the secret key never leaves the tenant)",
                              reason="SECRET_KEY_REFUSED")
    if ctx.has_galois_keys():
        raise InvalidArgument("public_context", "holds Galois keys; the computation uses no rotations, so the "
                                                "service accepts none")
    if not ctx.has_public_key():
        raise InvalidArgument("public_context", "holds no public key")
    data_ = ctx.seal_context().data
    key_level = data_.key_context_data()
    n = key_level.parms().poly_modulus_degree()
    primes = key_level.chain_index() + 1
    total = key_level.total_coeff_modulus_bit_count()
    if n != params.poly_modulus_degree:
        raise InvalidArgument("params.poly_modulus_degree", f"says {params.poly_modulus_degree}, the context has {n}")
    claimed = params.coeff_mod_bit_sizes
    if primes != len(claimed) or not sum(claimed) - len(claimed) < total <= sum(claimed):
        raise InvalidArgument("params.coeff_mod_bit_sizes", f"says {list(claimed)}, the context has {primes} primes "
                                                            f"of {total} bits in all")
    limit = SECURITY_TABLE[n][params.security_level]
    if total > limit:
        raise InvalidArgument("public_context", f"coefficient modulus of {total} bits exceeds {limit} bits, the "
                                                f"HomomorphicEncryption.org limit for N = {n} at "
                                                f"{params.security_level}-bit security", reason="INSECURE_PARAMETERS",
                              limit=f"log2(q) <= {limit} for N={n} at {params.security_level} bits")
    if abs(ctx.global_scale - params.global_scale) > 0:
        raise InvalidArgument("params.global_scale", f"says 2^{params.scale_bits}, the context's scale is "
                                                     f"{ctx.global_scale}")
    return ctx


class HeService:
    def __init__(self, store: HeStore, read_artifact: Callable[[str], dict[str, bytes]],
                 max_message_bytes: int, mask_workers: int | None = None, limits: HeLimits | None = None) -> None:
        self.store = store
        self.limits = limits or HeLimits()
        self.read_artifact = read_artifact          # artifact id -> files, as the calling tenant
        self.response_budget = int(max_message_bytes * _RESPONSE_SHARE)
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, str], LoadedContext] = {}
        self._weights: dict[str, dict[str, LoraLayer]] = {}
        self._pending: OrderedDict[str, Computation] = OrderedDict()
        self.masks = MaskPool(mask_workers)
        self.activity = Activity()
        self.preparer = Preparer(self.masks, self.activity)

    def close(self) -> None:
        self.preparer.close()
        self.masks.close()

    # -- contexts ---------------------------------------------------------------------------------------
    def register_context(self, tenant: str, key_id: str, data: bytes, params: HESchemeParams) -> ContextRecord:
        if not _KEY_ID.match(key_id or ""):
            raise InvalidArgument("key_id", "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                                            "or digit")
        ctx = inspect_context(data, params)
        digest = hashlib.sha256(data).digest()
        existing = self.store.get_context(tenant, key_id)
        if existing is not None:
            if existing.sha256 == digest:
                return existing
            raise AlreadyExists(f"key id {key_id!r} is registered with another context; delete it first or use a "
                                "new key id", key_id=key_id)
        record = ContextRecord(tenant_id=tenant, key_id=key_id, public_context=data, sha256=digest,
                               poly_modulus_degree=params.poly_modulus_degree,
                               coeff_mod_bit_sizes=params.coeff_mod_bit_sizes, scale_bits=params.scale_bits,
                               security_level=params.security_level, has_relin_keys=ctx.has_relin_keys(),
                               created_at=time.time())
        try:
            self.store.insert_context(record)
        except Exception:
            if self.store.get_context(tenant, key_id) is None:
                raise
            return self.register_context(tenant, key_id, data, params)
        return record

    def get_context(self, tenant: str, key_id: str) -> ContextRecord:
        record = self.store.get_context(tenant, key_id) if key_id else None
        if record is None:
            raise NotFound("context", key_id)
        return record

    def list_contexts(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[ContextRecord]:
        return self.store.list_contexts(tenant, after, limit)

    def delete_context(self, tenant: str, key_id: str) -> None:
        self.get_context(tenant, key_id)
        doomed = [a.adapter_id for a in self.store.list_adapters(tenant, None, 1 << 30) if a.key_id == key_id]
        self.store.delete_context(tenant, key_id)
        with self._lock:
            self._contexts.pop((tenant, key_id), None)
            for adapter_id in doomed:
                self._weights.pop(adapter_id, None)
        self.masks.forget(tenant, key_id)
        self.preparer.forget(lambda _adapter, pool_key: pool_key[:2] == (tenant, key_id))

    def _loaded_context(self, tenant: str, key_id: str) -> LoadedContext:
        with self._lock:
            loaded = self._contexts.get((tenant, key_id))
        if loaded is not None:
            return loaded
        record = self.get_context(tenant, key_id)
        loaded = LoadedContext(record, SealEngine(ts.context_from(record.public_context),
                                                  float(2 ** record.scale_bits)))
        with self._lock:
            return self._contexts.setdefault((tenant, key_id), loaded)

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(self, tenant: str, artifact_id: str, key_id: str, layers: list[str]
                     ) -> tuple[AdapterRecord, dict[str, LoraLayer]]:
        if not artifact_id:
            raise InvalidArgument("artifact_id", "is required")
        if not key_id:
            raise InvalidArgument("key_id", "is required")
        self.get_context(tenant, key_id)
        weights = adapter_files.parse(self.read_artifact(artifact_id))
        chosen = adapter_files.select(weights, list(layers), "layers")
        self._check_work(chosen, weights)
        record = AdapterRecord(adapter_id="hea_" + secrets.token_hex(12), tenant_id=tenant, artifact_id=artifact_id,
                               key_id=key_id, layers=tuple(chosen), created_at=time.time())
        self.store.insert_adapter(record)
        with self._lock:
            self._weights[record.adapter_id] = {n: weights[n] for n in chosen}
        self._prepare(record.adapter_id, self._loaded_context(tenant, key_id), [weights[n] for n in chosen])
        return record, self._weights[record.adapter_id]

    def _check_work(self, chosen: list[str], weights: dict[str, LoraLayer]) -> None:
        """The per-call work caps, checked on the adapter's shapes before anything is prepared for it."""
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

    def _prepare(self, adapter_id: str, loaded: LoadedContext, layers: list[LoraLayer]) -> None:
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

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        record = self.store.get_adapter(tenant, adapter_id) if adapter_id else None
        if record is None:
            raise NotFound("adapter", adapter_id)
        return record

    def list_adapters(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[AdapterRecord]:
        return self.store.list_adapters(tenant, after, limit)

    def unload_adapter(self, tenant: str, adapter_id: str) -> None:
        self.get_adapter(tenant, adapter_id)
        self.store.delete_adapter(tenant, adapter_id)
        with self._lock:
            self._weights.pop(adapter_id, None)
            for cid in [c for c, comp in self._pending.items() if comp.adapter_id == adapter_id]:
                del self._pending[cid]
        self.preparer.forget(lambda adapter, _pool_key: adapter == adapter_id)

    def weights(self, tenant: str, adapter_id: str) -> tuple[AdapterRecord, dict[str, LoraLayer], float]:
        """The adapter's layers; after a restart they are read from the vault again, as the caller."""
        record = self.get_adapter(tenant, adapter_id)
        with self._lock:
            layers = self._weights.get(adapter_id)
        if layers is not None:
            return record, layers, 0.0
        t0 = time.perf_counter()
        weights = adapter_files.parse(self.read_artifact(record.artifact_id))
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

    # -- pending computations -------------------------------------------------------------------------------
    def _room(self, tenant: str) -> str | None:
        """Under the lock: make room for one more computation of ``tenant`` (expired ones go, then the
        oldest finished one if the quota is reached); the id to drop, or QuotaExceeded when none can go."""
        now = time.monotonic()
        for cid in [c for c, p in self._pending.items() if p.expires < now]:
            del self._pending[cid]
        limit = self.limits.computations
        mine = [p for p in self._pending.values() if p.tenant_id == tenant]
        if not limit or len(mine) < limit:
            return None
        finished = [p.computation_id for p in mine if p.finished]
        if not finished:
            raise QuotaExceeded("TENSAFE_QUOTA_HE_COMPUTATIONS", f"the tenant has {len(mine)} unfinished HE "
                                "computations, the most allowed: finish them (read a column computation's outputs, "
                                f"run a token's round 2) or let them expire ({COMPUTATION_TTL_S:.0f} s after "
                                "their last use)", limit=limit, current=len(mine))
        return finished[0]

    def _check_room(self, tenant: str) -> None:
        """Refuse a new computation before any work is done for it when the tenant's quota is full."""
        with self._lock:
            self._room(tenant)

    def _open(self, comp: Computation) -> None:
        with self._lock:
            drop = self._room(comp.tenant_id)
            if drop is not None:
                del self._pending[drop]  # the oldest of this tenant's finished computations gives way
            self._pending[comp.computation_id] = comp

    def _pending_for(self, tenant: str, computation_id: str) -> Computation:
        with self._lock:
            comp = self._pending.get(computation_id) if computation_id else None
        if comp is None or comp.tenant_id != tenant or comp.expires < time.monotonic():
            raise NotFound("computation", computation_id)
        return comp

    @staticmethod
    def _choose(record: AdapterRecord, wanted: list[str], field_name: str) -> list[str]:
        if not wanted:
            return list(record.layers)
        chosen = []
        for want in wanted:
            name = adapter_files.module_name(want)
            hits = [n for n in record.layers if n == name or n.endswith("." + name)]
            if not hits:
                raise InvalidArgument(field_name, f"layer {want!r} is not loaded in this adapter")
            chosen.extend(h for h in hits if h not in chosen)
        return chosen

    @staticmethod
    def _same_input(layers: list[LoraLayer], field_name: str) -> int:
        dims = {lay.in_features for lay in layers}
        if len(dims) != 1:
            raise InvalidArgument(field_name, f"layers of one call share their input x; these take {sorted(dims)} "
                                              "input features")
        return dims.pop()

    # -- column packing -----------------------------------------------------------------------------------
    def append_input(self, tenant: str, computation_id: str, adapter_id: str, layers: list[str], num_tokens: int,
                     offset: int, data: list[bytes]) -> tuple[Computation, Counts, dict[str, float]]:
        t_start = time.perf_counter()
        load = 0.0
        if not computation_id:
            self._check_room(tenant)
            record, weights, load = self.weights(tenant, adapter_id)
            chosen = self._choose(record, layers, "layers")
            d = self._same_input([weights[n] for n in chosen], "layers")
            loaded = self._loaded_context(tenant, record.key_id)
            if not 1 <= num_tokens <= loaded.slots:
                raise InvalidArgument("num_tokens", f"must be in [1, {loaded.slots}] (the context's slots)")
            comp = Computation(computation_id="hec_" + secrets.token_hex(12), tenant_id=tenant,
                               adapter_id=adapter_id, layers=chosen, packing="column", num_tokens=num_tokens,
                               expires=time.monotonic() + COMPUTATION_TTL_S, in_features=d,
                               projections={n: ColumnProjection(weights[n]) for n in chosen})
            self._open(comp)
        else:
            comp = self._pending_for(tenant, computation_id)
            if comp.packing != "column":
                raise InvalidArgument("computation_id", "is a single-token computation; it takes no appended input")
            record = self.get_adapter(tenant, comp.adapter_id)
            loaded = self._loaded_context(tenant, record.key_id)
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
        return comp, counts, self._timings(timer, t_start, load)

    def _column_outputs(self, tenant: str, comp: Computation, layers: list[str], output_offset: int,
                        output_count: int) -> ComputeResult:
        t_start = time.perf_counter()
        if not comp.complete:
            raise FailedPrecondition(f"computation {comp.computation_id} has {comp.received} of {comp.in_features} "
                                     "input dimensions; append the rest first")
        record = self.get_adapter(tenant, comp.adapter_id)
        loaded = self._loaded_context(tenant, record.key_id)
        chosen = [n for n in comp.layers if n in self._choose(record, layers, "layers")]
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
        return ComputeResult(deltas, total, self._timings(timer, t_start, 0.0), comp.computation_id)

    # -- replicated packing -------------------------------------------------------------------------------
    def compute_delta(self, tenant: str, adapter_id: str, layers: list[str], packing: str, data: list[bytes],
                      num_tokens: int, computation_id: str, layer_inputs: list[tuple[str, list[bytes]]],
                      output_offset: int, output_count: int) -> ComputeResult:
        if packing == "column":
            comp = self._pending_for(tenant, computation_id)
            if comp.packing != "column" or (adapter_id and adapter_id != comp.adapter_id):
                raise InvalidArgument("computation_id", "is not a column-packed computation of this adapter")
            return self._column_outputs(tenant, comp, layers, output_offset, output_count)
        if packing != "replicated":
            raise InvalidArgument("packing", "must be PACKING_COLUMN or PACKING_REPLICATED")
        with self.activity.request():
            if computation_id:
                return self._expand(tenant, computation_id, layers, layer_inputs)
            return self._project(tenant, adapter_id, layers, data, num_tokens)

    def _project(self, tenant: str, adapter_id: str, layers: list[str], data: list[bytes],
                 num_tokens: int) -> ComputeResult:
        t_start = time.perf_counter()
        if num_tokens not in (0, 1):
            raise InvalidArgument("num_tokens", "PACKING_REPLICATED takes one token; use PACKING_COLUMN for more")
        if len(data) != 1:
            raise InvalidArgument("ciphertexts", f"PACKING_REPLICATED takes one ciphertext of x, got {len(data)}")
        self._check_room(tenant)
        record, weights, load = self.weights(tenant, adapter_id)
        chosen = self._choose(record, layers, "layers")
        d = self._same_input([weights[n] for n in chosen], "layers")
        loaded = self._loaded_context(tenant, record.key_id)
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
            if blinding is not None:
                counts.prepared_encryptions += len(blinding.first_masks)
            else:
                blinding = compute.prepare_token(loaded.token, weights[name], self._mask_source(loaded), counts)
            outs = compute.project_token(loaded.token, blinding, ct, counts)
            timer.compute += time.perf_counter() - t0
            comp.blindings[name] = blinding
            deltas.append(DeltaResult(name, compute.serialize_seal(outs, timer), counts, block_size=d, round=1))
            total.add(counts)
        self._open(comp)
        self.activity.between_rounds(comp.computation_id)
        self._prepare(adapter_id, loaded, [weights[n] for n in chosen])
        return ComputeResult(deltas, total, self._timings(timer, t_start, load), comp.computation_id)

    def _expand(self, tenant: str, computation_id: str, layers: list[str],
                layer_inputs: list[tuple[str, list[bytes]]]) -> ComputeResult:
        t_start = time.perf_counter()
        comp = self._pending_for(tenant, computation_id)
        if comp.packing != "replicated":
            raise InvalidArgument("computation_id", "is a column-packed computation")
        loaded = self._loaded_context(tenant, comp.key_id)
        if not layer_inputs:
            raise InvalidArgument("layer_inputs", "round 2 needs the blinded projections of each layer")
        wanted = {n for w in layers for n in comp.layers
                  if n == adapter_files.module_name(w) or n.endswith("." + adapter_files.module_name(w))}
        timer, total, deltas, inputs = Timer(), Counts(), [], []
        for i, (want, data) in enumerate(layer_inputs):
            name = adapter_files.module_name(want)
            hits = [n for n in comp.layers if n == name or n.endswith("." + name)]
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
        return ComputeResult(deltas, total, self._timings(timer, t_start, 0.0), comp.computation_id)

    @staticmethod
    def _timings(timer: Timer, started: float, load: float) -> dict[str, float]:
        return {**timer.ms(), "total_ms": (time.perf_counter() - started) * 1e3, "load_ms": load * 1e3}


__all__ = ["HeService", "HeLimits", "ComputeResult", "DeltaResult", "check_params", "inspect_context"]
