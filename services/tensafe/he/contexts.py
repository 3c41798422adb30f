"""Tenants' public CKKS contexts: the checks a context passes before it is registered, and the SEAL objects
of the registered ones (loaded once per process).

A context may hold the public key and relinearisation keys; never a secret key, no Galois keys (nothing
here rotates). Its actual parameters must be the ones it claims and pass the HomomorphicEncryption.org
security table. Every lookup is by tenant: another tenant's key id does not exist for it.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass

import tenseal as ts

from tensafe.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from tg_tinker.errors import ValidationError
from tg_tinker.he.params import SECURITY_TABLE, HEScheme, HESchemeParams

from .compute import SealEngine
from .store import ContextRecord, HeStore

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONTEXT_BYTES = 32 << 20


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


class Contexts:
    """The registered contexts of every tenant (rows in the store) and their SEAL objects (in memory)."""

    def __init__(self, store: HeStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], LoadedContext] = {}

    def register(self, tenant: str, key_id: str, data: bytes, params: HESchemeParams) -> ContextRecord:
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
            return self.register(tenant, key_id, data, params)
        return record

    def get(self, tenant: str, key_id: str) -> ContextRecord:
        record = self.store.get_context(tenant, key_id) if key_id else None
        if record is None:
            raise NotFound("context", key_id)
        return record

    def list(self, tenant: str, after: tuple[float, str] | None, limit: int) -> list[ContextRecord]:
        return self.store.list_contexts(tenant, after, limit)

    def delete(self, tenant: str, key_id: str) -> None:
        """The context's row (and its adapters' rows, with it) and its SEAL objects."""
        self.store.delete_context(tenant, key_id)
        with self._lock:
            self._loaded.pop((tenant, key_id), None)

    def loaded(self, tenant: str, key_id: str) -> LoadedContext:
        with self._lock:
            loaded = self._loaded.get((tenant, key_id))
        if loaded is not None:
            return loaded
        record = self.get(tenant, key_id)
        loaded = LoadedContext(record, SealEngine(ts.context_from(record.public_context),
                                                  float(2 ** record.scale_bits)))
        with self._lock:
            return self._loaded.setdefault((tenant, key_id), loaded)


__all__ = ["MAX_CONTEXT_BYTES", "Contexts", "LoadedContext", "check_params", "inspect_context"]
