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
from typing import Any

from tensafe.api.inference.v1 import inference_pb2
from tensafe.runtime.adapter_config import check_adapter_weights, parse_adapter_config, safetensors_header
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.safetar import DEFAULT_MAX_ARTIFACT_BYTES, read_tar

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT LoRA adapter held in memory: its validated config (``tensafe.runtime.adapter_config``: a plain
    dict of allow-listed fields) and its safetensors bytes."""

    config: dict[str, Any]
    weights: bytes

    @property
    def rank(self) -> int:
        return int(self.config.get("r") or 0)

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0)

    @property
    def target_modules(self) -> list[str]:
        return list(self.config["target_modules"])

    @property
    def base_model_ref(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")


def read_adapter(data: bytes, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> AdapterFiles:
    """The adapter inside an artifact's plaintext, or InvalidArgument saying why it is not one: the tar is
    read by the services' strict reader, the config passes the shared allow-list (``adapter_config.<field>``
    names what is refused) and the weights file holds LoRA factors of the targeted modules only."""
    files = read_tar(data, field="artifact_id", max_bytes=max_bytes, wanted=(CONFIG, WEIGHTS))
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise InvalidArgument("artifact_id", f"the artifact has no {required}")
    config = parse_adapter_config(files[CONFIG])
    check_adapter_weights(safetensors_header(files[WEIGHTS]), config)
    return AdapterFiles(config, files[WEIGHTS])


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

    def proto(self) -> inference_pb2.Adapter:
        msg = inference_pb2.Adapter(
            adapter_id=self.adapter_id, tenant_id=self.tenant_id, artifact_id=self.artifact_id,
            base_model_ref=self.base_model_ref, backend=BACKEND_ENUM[self.backend], rank=self.rank,
            alpha=self.alpha, target_modules=self.target_modules)
        msg.load_time.FromNanoseconds(int(self.load_time * 1e9))
        return msg


BACKEND_ENUM = {"hf": inference_pb2.BACKEND_HF, "vllm": inference_pb2.BACKEND_VLLM}
BACKEND_NAME = {v: k for k, v in BACKEND_ENUM.items()}
