"""The one reader of adapter artifacts: a vault artifact's plaintext (a tar) to a checked PEFT LoRA adapter.

Inference and the he service read adapters with :func:`read_adapter_artifact`; the trainer's ``LoadState`` with
its two halves (:func:`read_files`, then :func:`adapter_from_files` once it knows whether the session trains base
biases). One set of rules:

* the tar is read by the services' strict reader (``tensafe.runtime.safetar``): regular files with flat names,
  at most :data:`MAX_MEMBERS`, the artifact and its members within ``max_bytes`` (``TENSAFE_MAX_ARTIFACT_MB``);
* ``adapter_config.json`` and ``adapter_model.safetensors`` are required;
* the config passes the allow-list (``tensafe.runtime.adapter_config``; ``adapter_config.<field>`` names what
  is refused) and comes out as a plain dict;
* the weights file is checked from its header: only LoRA factors of the targeted modules, with the config's
  rank (``adapter_model`` names what is refused) — an adapter holds its own keys only, never base weights.

Every refusal is ``InvalidArgument``. Nothing here imports torch: the weights stay bytes for PEFT/vLLM
(:attr:`AdapterArtifact.weights`), or are decoded to numpy by :func:`lora_factors` (the he service).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapter_config import check_adapter_weights, parse_adapter_config, safetensors_header
from .errors import InvalidArgument
from .safetar import DEFAULT_MAX_ARTIFACT_BYTES, read_tar

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FIELD = "artifact_id"
MAX_MEMBERS = 16
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterArtifact:
    """A checked PEFT LoRA adapter held in memory: its allow-listed config (a plain dict), its safetensors
    bytes and their checked header (name -> (dtype, shape)), and every member read (``files``: the two
    adapter files and the ``members`` the caller asked for)."""

    config: dict[str, Any]
    weights: bytes
    header: dict[str, tuple[str, tuple[int, ...]]]
    files: dict[str, bytes]

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


def adapter_from_files(files: dict[str, bytes], *, what: str = "artifact", allow_base_bias: bool = False
                       ) -> AdapterArtifact:
    """The adapter in files already read by the strict tar reader, checked (see the module docstring)."""
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise InvalidArgument(FIELD, f"the {what} has no {required}")
    config = parse_adapter_config(files[CONFIG], allow_base_bias=allow_base_bias)
    header = safetensors_header(files[WEIGHTS])
    check_adapter_weights(header, config, allow_base_bias=allow_base_bias)
    return AdapterArtifact(config, files[WEIGHTS], header, files)


def read_files(data: bytes, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES, *, members: Collection[str] = (),
               required: Collection[str] = (), what: str = "artifact") -> dict[str, bytes]:
    """The first half of :func:`read_adapter_artifact`: the artifact's files by the strict tar reader, the two
    adapter files and ``required`` present; for a caller whose config rules depend on what it loads into
    (the trainer: base biases), which then calls :func:`adapter_from_files`."""
    files = read_tar(data, field=FIELD, max_bytes=max_bytes, max_members=MAX_MEMBERS,
                     wanted=(CONFIG, WEIGHTS, *members))
    for name in (CONFIG, WEIGHTS, *required):
        if name not in files:
            raise InvalidArgument(FIELD, f"the {what} has no {name}")
    return files


def read_adapter_artifact(data: bytes, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES, *,
                          members: Collection[str] = (), required: Collection[str] = (), what: str = "artifact",
                          allow_base_bias: bool = False) -> AdapterArtifact:
    """The adapter inside an artifact's plaintext, or InvalidArgument saying why it is not one.

    ``members``: other files to keep (a trainer checkpoint's ``session.json``...), ``required`` those of them
    that must be there; ``what`` names the artifact in errors ("checkpoint"). ``allow_base_bias``: base-model
    biases are accepted (a trainer session that trains them on its own model copy), never elsewhere."""
    files = read_files(data, max_bytes, members=members, required=required, what=what)
    return adapter_from_files(files, what=what, allow_base_bias=allow_base_bias)


_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def tensor_arrays(artifact: AdapterArtifact) -> dict[str, np.ndarray]:
    """Every tensor of the checked weights file as a float64 array (no torch; BF16 widened exactly)."""
    data = artifact.weights
    (size,) = struct.unpack("<Q", data[:8])
    raw = json.loads(data[8:8 + size])  # checked by safetensors_header already
    raw.pop("__metadata__", None)
    body = 8 + size
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in artifact.header.items():
        start, stop = raw[name]["data_offsets"]
        chunk = data[body + start:body + stop]
        if dtype == "BF16":
            values = (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(chunk, dtype=_NUMPY[dtype])
        out[name] = values.astype(np.float64).reshape(shape)
    return out


def module_name(name: str) -> str:
    """The module name a user writes ("model.layers.0.self_attn.q_proj"), from any PEFT spelling."""
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def lora_factors(artifact: AdapterArtifact) -> dict[str, dict[str, np.ndarray]]:
    """Module name (without PEFT's ``base_model.model.`` prefix) -> {"A": lora_A, "B": lora_B} as float64,
    for the linear-layer factors (``<module>.lora_A.weight``/``lora_B.weight``)."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensor_arrays(artifact).items():
        stem, dot, tail = key.rpartition(".")
        if tail != "weight" or not dot:
            continue
        module, _, which = stem.rpartition(".")
        if which in ("lora_A", "lora_B"):
            pairs.setdefault(module_name(module), {})[which[-1]] = array
    return pairs


__all__ = ["CONFIG", "WEIGHTS", "MAX_MEMBERS", "AdapterArtifact", "adapter_from_files", "lora_factors",
           "module_name", "read_adapter_artifact", "read_files", "tensor_arrays"]
