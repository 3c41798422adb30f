"""A PEFT LoRA adapter read into float64 matrices per module, from the one adapter-artifact reader
(``tensafe.runtime.adapter_artifact``: strict tar, config allow-list, the adapter's own keys only)."""

from __future__ import annotations

import math

import numpy as np

from tensafe.runtime.adapter_artifact import AdapterArtifact, adapter_from_files, lora_factors, module_name
from tensafe.runtime.adapter_config import lookup
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from .compute import LoraLayer

__all__ = ["layers", "module_name", "parse", "select"]


def parse(files: dict[str, bytes]) -> dict[str, LoraLayer]:
    """The LoRA layers of an artifact's files (``adapter_config.json`` + ``adapter_model.safetensors``), checked
    by the one adapter reader (``adapter_config.<field>`` / ``adapter_model`` name what is refused)."""
    return layers(adapter_from_files(files))


def layers(artifact: AdapterArtifact) -> dict[str, LoraLayer]:
    """The checked adapter's linear LoRA layers as float64 matrices, with their scaling."""
    config = artifact.config
    out: dict[str, LoraLayer] = {}
    for name, pair in sorted(lora_factors(artifact).items()):
        A, B = pair["A"], pair["B"]
        if B.shape[1] != A.shape[0]:
            raise FailedPrecondition(f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not "
                                     "the factors of a linear layer's LoRA (convolution or embedding adapter?)")
        r = A.shape[0]
        # rank_pattern / alpha_pattern keys are module names, matched exactly or as a suffix (never as regexes).
        rank = float(lookup(config.get("rank_pattern"), name, config["r"]))
        alpha = float(lookup(config.get("alpha_pattern"), name, config["lora_alpha"]))
        if int(rank) != r:
            raise FailedPrecondition(f"module {name}: the config says rank {int(rank)}, the weights have {r}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = LoraLayer(name=name, A=np.ascontiguousarray(A), B=np.ascontiguousarray(B), alpha=alpha,
                              scaling=scaling)
    if not out:
        raise InvalidArgument("artifact_id", "the adapter has no LoRA layers")
    return out


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
