"""The inference service's logic: tenants' adapters on shared base models, and generation. No gRPC here.

A base model is loaded once per backend and serves every tenant's adapters (PEFT named
adapters on transformers, LoRA requests on vLLM). An adapter belongs to the tenant whose
call loaded it: the vault is asked for the artifact as that caller, so another tenant's
artifact is NOT_FOUND before anything is read, and every adapter lookup is by tenant, so
another tenant's adapter id is NOT_FOUND too.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tensafe.common.models import ModelLocation, available_models, resolve_model_ref
from tensafe.runtime.context import CallContext
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from tensafe.runtime.pagination import after_key
from tensafe.runtime.sample_work import check_sample_work
from tensafe.runtime.vault_client import VaultClient

from .adapter import LoadedAdapter, read_adapter
from .backend import Backend, ChunkQueue, ServedBase
from .generation import Chunk, Sampling, validate

ADAPTERS_QUOTA = "TENSAFE_QUOTA_ADAPTERS"


@dataclass(frozen=True)
class Generation:
    """A started generation: its increments as they come, and each prompt's length in tokens."""

    chunks: Iterator[Chunk]
    prompt_tokens: list[int]


class Inference:
    def __init__(self, model_dir: Path | None, vault: VaultClient | None, default_backend: str,
                 backends: dict[str, Callable[[], Backend]], *, models: Mapping[str, Path] | None = None,
                 quota_adapters: int = 8, max_sample_tokens: int = 8192) -> None:
        self.model_dir = model_dir
        self.models = dict(models or {})  # operator-registered names (TENSAFE_MODELS)
        self.quota_adapters = quota_adapters  # loaded adapters per tenant; 0: no quota
        self.max_sample_tokens = max_sample_tokens  # prompts x samples x max_tokens per Generate; 0: no cap
        self._adapter_loads: dict[str, int] = {}  # tenant -> LoadAdapter calls in progress (quota places)
        self.vault = vault
        self.default_backend = default_backend
        self._backend_factories = backends
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._bases: dict[tuple[str, str], ServedBase] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._adapters: dict[str, LoadedAdapter] = {}

    # -- backends and base models -------------------------------------------------------------
    def _backend(self, name: str) -> Backend:
        """The backend named ``name`` ("hf", "vllm"; "" for the server's default)."""
        if name and name not in self._backend_factories:
            raise InvalidArgument("backend", f"unknown backend {name}")
        name = name or self.default_backend
        with self._lock:
            if name not in self._backends:
                self._backends[name] = self._backend_factories[name]()
            return self._backends[name]

    def _location(self, model_ref: str, field: str) -> ModelLocation:
        """A model name (never a path: see tensafe.common.models), or InvalidArgument naming ``field``
        / the same NotFound for every name that is not a model."""
        return resolve_model_ref(model_ref, self.model_dir, self.models, field_name=field)

    def _base(self, backend: Backend, location: ModelLocation) -> tuple[tuple[str, str], ServedBase]:
        key = (backend.name, location.cache_key)
        with self._lock:
            if key in self._bases:
                return key, self._bases[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per model even when several calls arrive at once
            with self._lock:
                if key in self._bases:
                    return key, self._bases[key]
            base = backend.open(location)
            with self._lock:
                self._bases[key] = base
                self._loading.pop(key, None)
            return key, base

    # -- adapters -------------------------------------------------------------------------------
    def load_adapter(self, caller: CallContext, artifact_id: str, backend_name: str = "",
                     base_model_ref: str = "") -> LoadedAdapter:
        """The caller's adapter from ``artifact_id`` on ``backend_name`` ("" for the default), on
        ``base_model_ref`` ("" for the one the adapter names); loading the same thing again returns it."""
        tenant = caller.principal.tenant_id
        if not artifact_id:
            raise InvalidArgument("artifact_id", "is required")
        backend = self._backend(backend_name)
        with self._lock:
            wanted = (tenant, artifact_id, backend.name)
            for adapter in self._adapters.values():  # loading the same thing again returns the loaded adapter
                if (adapter.tenant_id, adapter.artifact_id, adapter.backend) == wanted \
                        and base_model_ref in ("", adapter.base_model_ref):
                    return adapter
        if self.vault is None:
            raise FailedPrecondition("this inference service has no vault configured: set TENSAFE_VAULT_ENDPOINT")
        self._take_adapter_place(tenant)
        try:
            return self._load_adapter(caller, artifact_id, base_model_ref, tenant, backend)
        finally:
            with self._lock:
                self._adapter_loads[tenant] -= 1
                if not self._adapter_loads[tenant]:
                    del self._adapter_loads[tenant]

    def _take_adapter_place(self, tenant: str) -> None:
        """A place in the tenant's TENSAFE_QUOTA_ADAPTERS (loaded adapters plus loads in progress)."""
        with self._lock:
            used = sum(1 for a in self._adapters.values() if a.tenant_id == tenant) + self._adapter_loads.get(tenant, 0)
            if self.quota_adapters and used >= self.quota_adapters:
                raise QuotaExceeded(ADAPTERS_QUOTA, f"the tenant has {used} adapters loaded, the most allowed; "
                                                    "unload one first", limit=self.quota_adapters, current=used)
            self._adapter_loads[tenant] = self._adapter_loads.get(tenant, 0) + 1

    def _load_adapter(self, caller: CallContext, artifact_id: str, base_model_ref: str, tenant: str,
                      backend: Backend) -> LoadedAdapter:
        vault = self.vault
        assert vault is not None, "load_adapter refuses the load when no vault is configured"
        _, data = vault.get(caller, artifact_id)
        files = read_adapter(data, vault.max_artifact_bytes)
        del data
        model_ref = base_model_ref or files.base_model_ref
        if not model_ref:
            raise InvalidArgument("base_model_ref", "the adapter names no base model: give base_model_ref")
        try:
            location = self._location(model_ref, "base_model_ref")
        except InvalidArgument as exc:
            if base_model_ref:
                raise
            raise InvalidArgument("base_model_ref", "the adapter's base_model_name_or_path "
                                                    f"({exc.message.split(': ', 1)[-1]}): give base_model_ref, the "
                                                    "name of its base model on this server") from None
        key, base = self._base(backend, location)
        adapter_id = "adp_" + uuid.uuid4().hex[:16]
        base.add_adapter(adapter_id, files)
        adapter = LoadedAdapter(adapter_id, tenant, artifact_id, model_ref, key, backend.name, files.rank,
                                files.alpha, files.target_modules)
        with self._lock:
            self._adapters[adapter_id] = adapter
        return adapter

    def get(self, tenant: str, adapter_id: str) -> LoadedAdapter:
        adapter = self._adapters.get(adapter_id)
        if adapter is None or adapter.tenant_id != tenant:
            raise NotFound("adapter", adapter_id)
        return adapter

    def list(self, tenant: str, after: tuple[float, str] | None = None, limit: int | None = None
             ) -> list[LoadedAdapter]:
        """The tenant's adapters ordered by (load_time, adapter_id): the first ``limit`` after ``after``."""
        with self._lock:
            found = [a for a in self._adapters.values() if a.tenant_id == tenant]
        key = lambda a: (a.load_time, a.adapter_id)  # noqa: E731
        return after_key(sorted(found, key=key), key, after)[:limit]

    def unload(self, tenant: str, adapter_id: str) -> None:
        adapter = self.get(tenant, adapter_id)
        with self._lock:
            if self._adapters.pop(adapter_id, None) is None:
                return
            base = self._bases.get(adapter.base_key)
        if base is not None:
            base.remove_adapter(adapter_id)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, tenant: str, adapter_id: str, model_ref: str, backend_name: str, prompts: list[str],
                 prompt_token_ids: list[list[int]], sampling: Sampling, cancelled: threading.Event,
                 chats: list[list[tuple[str, str]]] | None = None) -> Generation:
        """Validate the prompts (text, token ids or conversations), start generating (with the tenant's
        adapter, or the base model ``model_ref`` alone), and return the increments as they come."""
        if adapter_id:
            adapter = self.get(tenant, adapter_id)
            base = self._bases[adapter.base_key]
            name: str | None = adapter.adapter_id
        else:
            if not model_ref:
                raise InvalidArgument("adapter_id", "give adapter_id, or model_ref to use the base model alone")
            _, base = self._base(self._backend(backend_name), self._location(model_ref, "model_ref"))
            name = None
        check_sample_work(len(prompts) or len(prompt_token_ids) or len(chats or ()), sampling, self.max_sample_tokens)
        job = validate(base.tokenizer, prompts, prompt_token_ids, sampling, base.vocab_size, base.max_length, chats)
        out = ChunkQueue(cancelled)
        base.start(name, job, out)
        return Generation(iter(out), [len(p) for p in job.prompts])

    def base_models(self) -> list[str]:
        """The base models this service can serve, by name (the same for every tenant)."""
        return available_models(self.model_dir, self.models)

    def shutdown(self) -> None:
        with self._lock:
            bases = list(self._bases.values())
            self._bases.clear()
            self._adapters.clear()
            backends = list(self._backends.values())
        for base in bases:
            base.close()
        for backend in backends:
            backend.close()
