"""Tenants' adapters: read from a vault artifact in memory, and what the service remembers of them.

An artifact is served when it is a tar holding a standard PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``): a trainer checkpoint is one
(see ``tensafe.trainer.checkpoint``), and so is a tar of what ``save_pretrained`` writes.
The bytes come decrypted from the vault over gRPC and are never written to disk here
(the vLLM backend is the one exception, see ``vllm_backend``); nothing is unpickled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tensafe.runtime.adapter_artifact import CONFIG, WEIGHTS, AdapterArtifact, read_adapter_artifact
from tensafe.runtime.safetar import DEFAULT_MAX_ARTIFACT_BYTES

# A PEFT LoRA adapter held in memory: its validated config (a plain dict of allow-listed fields) and its
# safetensors bytes, as the one adapter-artifact reader returns it.
AdapterFiles = AdapterArtifact

__all__ = ["CONFIG", "WEIGHTS", "AdapterFiles", "LoadedAdapter", "read_adapter"]


def read_adapter(data: bytes, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> AdapterFiles:
    """The adapter inside an artifact's plaintext, or InvalidArgument saying why it is not one
    (``tensafe.runtime.adapter_artifact``: the strict tar reader, the config allow-list, LoRA factors of
    the targeted modules only)."""
    return read_adapter_artifact(data, max_bytes)


@dataclass
class LoadedAdapter:
    """An adapter being served: whose it is, where it came from, and on which base and backend."""

    adapter_id: str
    tenant_id: str
    artifact_id: str
    base_model_ref: str
    base_key: tuple[str, str]         # (backend, the base model's cache key)
    backend: str
    rank: int
    alpha: float
    target_modules: list[str]
    load_time: float = field(default_factory=time.time)

