"""Tenants' adapters: read from a vault artifact in memory, and what the service remembers of them.

An artifact is served when it is a tar holding a standard PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``): a trainer checkpoint is one
(see ``tensafe.trainer.checkpoint``), and so is a tar of what ``save_pretrained`` writes.
The bytes come decrypted from the vault over gRPC and are never written to disk here
(the vLLM backend is the one exception, see ``vllm_backend``); nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from tensafe.api.inference.v1 import inference_pb2
from tensafe.runtime.errors import InvalidArgument

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_MAX_MEMBER = 1 << 34


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT LoRA adapter held in memory: its config and its safetensors bytes."""

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
        modules = self.config.get("target_modules") or []
        return sorted([modules] if isinstance(modules, str) else modules)

    @property
    def base_model_ref(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")


def read_adapter(data: bytes) -> AdapterFiles:
    """The adapter inside an artifact's plaintext, or InvalidArgument(artifact_id) saying why it is not one."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or "/" in member.name or member.size > _MAX_MEMBER:
                    raise InvalidArgument("artifact_id", f"not an adapter artifact (unexpected entry {member.name!r})")
                if member.name in (CONFIG, WEIGHTS):
                    files[member.name] = tar.extractfile(member).read()
    except tarfile.TarError:
        raise InvalidArgument("artifact_id", "the artifact is not a tar holding a PEFT adapter") from None
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise InvalidArgument("artifact_id", f"the artifact has no {required}")
    try:
        config = json.loads(files[CONFIG])
    except ValueError:
        raise InvalidArgument("artifact_id", f"{CONFIG} is not JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidArgument("artifact_id", f"{CONFIG} does not describe a LoRA adapter")
    adapter = AdapterFiles(config, files[WEIGHTS])
    if adapter.rank <= 0 or not adapter.target_modules:
        raise InvalidArgument("artifact_id", f"{CONFIG} has no rank or no target modules")
    return adapter


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
