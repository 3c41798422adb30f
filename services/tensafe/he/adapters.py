"""A PEFT LoRA adapter, as the trainer saves it in a checkpoint, read into float64 matrices per module."""

from __future__ import annotations

import math
import re

import numpy as np

from tensafe.runtime.adapter_config import check_adapter_weights, lookup, parse_adapter_config, safetensors_header
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from .compute import LoraLayer

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


def module_name(name: str) -> str:
    """The module name a user writes ("model.layers.0.self_attn.q_proj"), from any PEFT spelling."""
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def parse(files: dict[str, bytes]) -> dict[str, LoraLayer]:
    """The LoRA layers of a checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``). The config
    passes the services' allow-list (``tensafe.runtime.adapter_config``; ``adapter_config.<field>`` names
    what is refused) and the weights file is checked from its header before torch reads it."""
    import torch
    from safetensors.torch import load as st_load

    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if required not in files:
            raise InvalidArgument("artifact_id", f"the artifact holds no readable PEFT adapter (no {required})")
    config = parse_adapter_config(files["adapter_config.json"])
    check_adapter_weights(safetensors_header(files["adapter_model.safetensors"]), config)
    try:
        tensors = st_load(files["adapter_model.safetensors"])
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors; the header was checked above
        raise InvalidArgument("artifact_id", f"the artifact holds no readable PEFT adapter ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(module_name(match["name"]), {})[match["which"]] = tensor
    layers: dict[str, LoraLayer] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidArgument("artifact_id", f"module {name} has lora_{''.join(pair)} only")
        A = pair["A"].to(torch.float64).numpy()
        B = pair["B"].to(torch.float64).numpy()
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise FailedPrecondition(f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not "
                                     "the factors of a linear layer's LoRA (convolution or embedding adapter?)")
        r = A.shape[0]
        # rank_pattern / alpha_pattern keys are module names, matched exactly or as a suffix (never as regexes).
        rank = float(lookup(config.get("rank_pattern"), name, config["r"]))
        alpha = float(lookup(config.get("alpha_pattern"), name, config["lora_alpha"]))
        if int(rank) != r:
            raise FailedPrecondition(f"module {name}: the config says rank {int(rank)}, the weights have {r}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layers[name] = LoraLayer(name=name, A=np.ascontiguousarray(A), B=np.ascontiguousarray(B), alpha=alpha,
                                 scaling=scaling)
    if not layers:
        raise InvalidArgument("artifact_id", "the adapter has no LoRA layers")
    return layers


def select(layers: dict[str, LoraLayer], wanted: list[str], field_name: str) -> list[str]:
    """Module names matching ``wanted`` (full names or suffixes such as "q_proj"); all when empty."""
    if not wanted:
        return list(layers)
    chosen: list[str] = []
    for want in wanted:
        want_name = module_name(want)
        hits = [n for n in layers if n == want_name or n.endswith("." + want_name)]
        if not hits:
            raise InvalidArgument(field_name, f"no LoRA layer of the adapter matches {want!r} "
                                              f"(it has {len(layers)} layers, e.g. {next(iter(layers))!r})")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen
