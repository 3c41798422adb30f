"""Calls to the he service (``service.he``): contexts, adapters, and the encrypted compute RPCs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import HESchemeParams


@dataclass(frozen=True)
class HELayerInfo:
    """One LoRA layer of a loaded adapter: module name, shapes, rank, alpha and ``scaling`` = alpha / r."""

    name: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class HEContextInfo:
    """A public context registered with the he service (its size and SHA-256; never a secret key)."""

    key_id: str
    tenant_id: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    security_level: int
    size_bytes: int
    sha256: bytes
    slot_count: int
    has_relin_keys: bool
    has_galois_keys: bool


@dataclass(frozen=True)
class HEAdapterInfo:
    """An adapter the he service loaded from the vault for encrypted compute under ``key_id``."""

    adapter_id: str
    artifact_id: str
    key_id: str
    layers: tuple[HELayerInfo, ...] = field(default=())

    def layer(self, name: str) -> HELayerInfo:
        """The layer called ``name``: its full module name, or a suffix matching exactly one layer."""
        short = name.removeprefix("base_model.model.")
        hits = [ly for ly in self.layers if ly.name == short or ly.name.endswith("." + short)]
        if len(hits) != 1:
            from ..errors import ValidationError

            names = ", ".join(ly.name for ly in self.layers[:4]) + (", ..." if len(self.layers) > 4 else "")
            raise ValidationError(f"layer {name!r} matches {len(hits)} of the adapter's encrypted layers ({names})",
                                  field="layer", code="INVALID_ARGUMENT")
        return hits[0]


def _context_info(c: Any) -> HEContextInfo:
    return HEContextInfo(key_id=c.key_id, tenant_id=c.tenant_id, poly_modulus_degree=c.params.poly_modulus_degree,
                         coeff_mod_bit_sizes=tuple(c.params.coeff_mod_bit_sizes),
                         security_level=c.params.security_level, size_bytes=c.size_bytes, sha256=c.sha256,
                         slot_count=c.slot_count, has_relin_keys=c.has_relin_keys, has_galois_keys=c.has_galois_keys)


def _adapter_info(a: Any) -> HEAdapterInfo:
    return HEAdapterInfo(adapter_id=a.adapter_id, artifact_id=a.artifact_id, key_id=a.key_id,
                         layers=tuple(HELayerInfo(ly.name, ly.in_features, ly.out_features, ly.rank, ly.alpha,
                                                  ly.scaling) for ly in a.layers))


class HeClient:
    """The he service's RPCs. Obtain it as ``service.he`` from a :class:`~tg_tinker.ServiceClient`."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self._transport.unary("he", method, request, timeout=timeout)

    # -- contexts ---------------------------------------------------------------------------------------
    def register_context(self, key_id: str, public_context: bytes, params: HESchemeParams) -> HEContextInfo:
        """Register a serialised *public* context (see :meth:`HEKeyBundle.public_context`)."""
        from tensafe.api.he.v1 import he_pb2

        msg = he_pb2.HeSchemeParams(scheme=he_pb2.HE_SCHEME_CKKS, poly_modulus_degree=params.poly_modulus_degree,
                                    coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                                    global_scale=params.global_scale, security_level=params.security_level)
        resp = self._call("RegisterContext", he_pb2.RegisterContextRequest(key_id=key_id, public_context=public_context,
                                                                           params=msg))
        return _context_info(resp.context)

    def get_context(self, key_id: str) -> HEContextInfo:
        from tensafe.api.he.v1 import he_pb2

        return _context_info(self._call("GetContext", he_pb2.GetContextRequest(key_id=key_id)).context)

    def list_contexts(self) -> list[HEContextInfo]:
        from tensafe.api.he.v1 import he_pb2

        out: list[HEContextInfo] = []
        token = ""
        while True:
            resp = self._call("ListContexts", he_pb2.ListContextsRequest(page_token=token))
            out.extend(_context_info(c) for c in resp.contexts)
            token = resp.next_page_token
            if not token:
                return out

    def delete_context(self, key_id: str) -> None:
        """Forget a registered context and the adapters loaded under it."""
        from tensafe.api.he.v1 import he_pb2

        self._call("DeleteContext", he_pb2.DeleteContextRequest(key_id=key_id))

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(self, artifact_id: str, key_id: str, layers: list[str] | None = None) -> HEAdapterInfo:
        """Have the he service load a PEFT adapter checkpoint from the vault (as your tenant) for
        encrypted compute under ``key_id``; ``layers``: module names or suffixes ("q_proj"), default all."""
        from tensafe.api.he.v1 import he_pb2

        resp = self._call("LoadAdapter", he_pb2.LoadAdapterRequest(artifact_id=artifact_id, key_id=key_id,
                                                                   layers=list(layers or [])), timeout=600)
        return _adapter_info(resp.adapter)

    def get_adapter(self, adapter_id: str) -> HEAdapterInfo:
        from tensafe.api.he.v1 import he_pb2

        return _adapter_info(self._call("GetAdapter", he_pb2.GetAdapterRequest(adapter_id=adapter_id)).adapter)

    def list_adapters(self) -> list[HEAdapterInfo]:
        from tensafe.api.he.v1 import he_pb2

        out: list[HEAdapterInfo] = []
        token = ""
        while True:
            resp = self._call("ListAdapters", he_pb2.ListAdaptersRequest(page_token=token))
            out.extend(_adapter_info(a) for a in resp.adapters)
            token = resp.next_page_token
            if not token:
                return out

    def unload_adapter(self, adapter_id: str) -> None:
        from tensafe.api.he.v1 import he_pb2

        self._call("UnloadAdapter", he_pb2.UnloadAdapterRequest(adapter_id=adapter_id))

    # -- compute (used by PrivateInference; ciphertexts only) ---------------------------------------------
    def append_input(self, request: Any) -> Any:
        return self._call("AppendInput", request, timeout=600)

    def compute_delta(self, request: Any) -> Any:
        return self._call("ComputeDelta", request, timeout=600)

    def compute_tokens(self, request: Any) -> Any:
        return self._call("ComputeTokens", request, timeout=600)
