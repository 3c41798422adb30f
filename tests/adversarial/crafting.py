"""Crafted adapters for the artifact attacks (test_artifacts.py, test_artifact_fuzz.py): what PEFT 0.21
saves for a plain rank-4 LoRA on the tiny Llama's q_proj and v_proj, as a config, weights and a tar."""

from __future__ import annotations

import itertools
import json

import torch
from safetensors.torch import save as st_save
from test_adapter_config import tar_of

# The tiny Llama: hidden 64, 4 heads of 16 (q_proj 64 -> 64), 2 KV heads (v_proj 64 -> 32), 2 layers.
OUT = {"q_proj": 64, "v_proj": 32}
RANK = 4


def config(**changes: object) -> dict:
    """What PEFT 0.21 saves for a plain rank-4 LoRA on q_proj and v_proj, with ``changes``."""
    base = {"alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
            "base_model_name_or_path": "tiny", "bias": "none", "corda_config": None, "ensure_weight_tying": False,
            "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
            "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
            "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2",
            "qalora_group_size": 16, "r": RANK, "rank_pattern": {}, "revision": None,
            "target_modules": ["q_proj", "v_proj"], "target_parameters": None, "task_type": "CAUSAL_LM",
            "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
            "use_rslora": False, "velora_config": None}
    base.update(changes)
    return base


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (module, width) in itertools.product(range(2), OUT.items()):
        key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
        out[f"{key}.lora_A.weight"] = torch.randn(RANK, 64, generator=g) * 0.1
        out[f"{key}.lora_B.weight"] = torch.randn(width, RANK, generator=g) * 0.1
    return out


def adapter_tar(cfg: dict, tensors: dict[str, torch.Tensor] | None = None, **extra: bytes) -> bytes:
    return tar_of({"adapter_config.json": json.dumps(cfg).encode(),
                   "adapter_model.safetensors": st_save(weights() if tensors is None else tensors), **extra})
