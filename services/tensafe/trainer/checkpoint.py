"""Checkpoints: a tar of safetensors and JSON files. Nothing is ever unpickled.

    adapter_config.json          PEFT adapter config   } together a standard PEFT adapter:
    adapter_model.safetensors    PEFT adapter weights  } PeftModel.from_pretrained / vLLM load them
    session.json                 step, counters, the session's TrainingConfig, user metadata; its "dp" and
                                 "lineage" are informational: a tenant can edit them, so the trainer trusts
                                 the lineage the vault recorded for the artifact instead (see lineage.py)
    rng.safetensors              the session's torch RNG state
    optimizer.safetensors        optimizer tensors (with include_optimizer)
    optimizer.json               optimizer scalars and param groups (with include_optimizer)
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from google.protobuf import json_format
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tensafe.api.common.v1 import common_pb2
from tensafe.api.vault.v1 import vault_pb2
from tensafe.runtime import lineage as lineage_codec
from tensafe.runtime.adapter_artifact import adapter_from_files, read_files
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument
from tensafe.runtime.safetar import DEFAULT_MAX_ARTIFACT_BYTES

from .messages import config_proto

CHECKPOINT_FORMAT = 1
CONTENT_TYPE = "application/x-tar"
ARTIFACT_KIND = vault_pb2.ARTIFACT_KIND_CHECKPOINT  # what the vault stores a checkpoint as


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"type": type(optimizer).__name__, "scalars": scalars, "param_groups": state["param_groups"]}


def build(session: Any, include_optimizer: bool, metadata: dict[str, Any],
          lineage: common_pb2.Lineage | None = None) -> bytes:
    """The session's checkpoint as tar bytes (called on the session's worker, its adapter active)."""
    peft = session.base.peft
    sid = session.session_id
    with tempfile.TemporaryDirectory() as tmp:
        peft.peft_config[sid].save_pretrained(tmp)
        adapter_config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = session.settings.config.model_ref
    # Adapter weights only: never a base layer (PEFT adds the base embedding when embed_tokens is targeted).
    weights = {k: v.detach().contiguous().clone()
               for k, v in get_peft_model_state_dict(peft, adapter_name=sid, save_embedding_layers=False).items()}
    record = {
        "format": CHECKPOINT_FORMAT, "session_id": sid, "step": session.step,
        "micro_steps": session.micro_steps, "optim_calls": session.optim_calls,
        "tokens_since_update": session.tokens_since_update, "tokens_processed": session.tokens_processed,
        "seed": session.settings.seed,
        "config": json_format.MessageToDict(config_proto(session.settings.config)),  # the TrainingConfig as sent
        "metadata": metadata, "include_optimizer": include_optimizer, "saved_at": time.time(),
    }
    dp = getattr(session, "dp", None)
    if dp is not None:
        record["dp"] = {"budget_id": dp.budget_id, "noise_multiplier": dp.noise_multiplier,
                        "max_grad_norm": dp.max_grad_norm, "sample_rate": dp.sample_rate,
                        "spent_epsilon": dp.total_epsilon, "delta": dp.target_delta,
                        "accounted_steps": dp.accounted_steps, "spent_without_update": dp.spent_without_update,
                        "sampling": dp.sampling}
        if dp.dataset is not None:
            record["dp"].update(dataset_artifact_id=dp.dataset.artifact_id, dataset_sha256=dp.dataset.sha256,
                                dataset_size=len(dp.dataset))
    if lineage is not None:
        record["lineage"] = json.loads(lineage_codec.to_json(lineage))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "adapter_config.json", json.dumps(adapter_config, indent=2, sort_keys=True).encode())
        _add(tar, "adapter_model.safetensors", st_save(weights))
        _add(tar, "session.json", json.dumps(record, indent=2, sort_keys=True).encode())
        # The live RNG state: during an op the session's state is the global one.
        _add(tar, "rng.safetensors", st_save({"cpu": torch.get_rng_state()}))
        if include_optimizer:
            tensors, scalars = _optimizer_parts(session.optimizer)
            _add(tar, "optimizer.safetensors", st_save(tensors))
            _add(tar, "optimizer.json", json.dumps(scalars, sort_keys=True).encode())
    return buf.getvalue()


MEMBERS = ("adapter_config.json", "adapter_model.safetensors", "session.json", "rng.safetensors",
           "optimizer.safetensors", "optimizer.json")
_REQUIRED = MEMBERS[:4]
MAX_JSON_BYTES = 16 << 20  # session.json, optimizer.json (adapter_config.json has its own, smaller bound)


def read(data: bytes, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> dict[str, bytes]:
    """A checkpoint's files, read by the one adapter-artifact reader (``tensafe.runtime.adapter_artifact``:
    the strict tar reader, regular files only, sizes checked against the data and ``max_bytes`` before
    anything is copied); InvalidArgument(artifact_id) otherwise. The adapter itself is checked by
    :func:`check_adapter`, whose rules depend on the session (base biases)."""
    files = read_files(data, max_bytes, members=MEMBERS, required=_REQUIRED, what="checkpoint")
    for name in ("session.json", "optimizer.json"):
        if len(files.get(name, b"")) > MAX_JSON_BYTES:
            raise InvalidArgument("artifact_id", f"the checkpoint's {name} is larger than {MAX_JSON_BYTES} bytes")
    return files


def check_adapter(session: Any, files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter weights, once it passed the one adapter reader's rules
    (``tensafe.runtime.adapter_artifact``: config allow-list, LoRA factors of the targeted modules only),
    its config matches the session's LoRA, and every tensor is exactly one of the session adapter's own
    (same key, same shape): the base model (shared with other sessions) and other sessions' adapters are
    never written by a load."""
    mine = session.settings.config.lora_or_default
    own_bias = session.base.peft.peft_config[session.session_id].bias
    adapter = adapter_from_files(files, what="checkpoint", allow_base_bias=own_bias != "none")
    saved = adapter.config
    if saved["r"] != mine.rank or saved["target_modules"] != sorted(mine.target_modules) \
            or saved["bias"] != own_bias or saved.get("rank_pattern") or saved.get("alpha_pattern"):
        raise FailedPrecondition(
            f"checkpoint adapter (rank {saved['r']}, modules {saved['target_modules']}, bias {saved['bias']}) does "
            f"not match this session (rank {mine.rank}, modules {list(mine.target_modules)}, bias {own_bias}): "
            "create the session with the same lora_config")
    header = adapter.header
    expected = get_peft_model_state_dict(session.base.peft, adapter_name=session.session_id,
                                         save_embedding_layers=False)
    for key, (_, shape) in header.items():
        if key not in expected:
            raise InvalidArgument("adapter_model", f"tensor {key[:120]!r} is not a weight of this session's adapter")
        if tuple(expected[key].shape) != shape:
            raise FailedPrecondition(f"checkpoint weights do not fit this adapter: {key} has shape {list(shape)}, "
                                     f"the session's {list(expected[key].shape)}")
    missing = [k for k in expected if k not in header]
    if missing:
        raise FailedPrecondition(f"checkpoint weights do not fit this adapter: missing {missing[:3]}")
    try:
        return st_load(files["adapter_model.safetensors"])
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors; the header was checked above
        raise InvalidArgument("adapter_model", f"unreadable safetensors ({str(exc).splitlines()[0][:200]})") from None


_FIELD = "artifact_id"
_OPTIMIZER_STATE_NAMES = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_SCALAR_TYPES = (bool, int, float, str, type(None))


def _json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    try:
        value = json.loads(files[name])
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument(_FIELD, f"the checkpoint's {name} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(_FIELD, f"the checkpoint's {name} is not a JSON object")
    return value


def _count(record: dict[str, Any], key: str) -> int:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise InvalidArgument(_FIELD, f"the checkpoint's session.json has a bad {key!r}")
    return value


def _safetensors(files: dict[str, bytes], name: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(files[name])
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors for malformed bytes
        raise InvalidArgument(_FIELD, f"the checkpoint's {name} is unreadable ({str(exc).splitlines()[0][:200]})") \
            from None


def _optimizer_state(session: Any, files: dict[str, bytes]) -> dict[str, Any] | None:
    """The checkpoint's optimizer state, checked against the session's own optimizer (same type, same
    parameter groups and hyper-parameter kinds, state tensors of its parameters' shapes), or None."""
    if "optimizer.safetensors" not in files or "optimizer.json" not in files:
        return None
    meta = _json(files, "optimizer.json")
    mine = session.optimizer.state_dict()
    if meta.get("type") != type(session.optimizer).__name__:
        raise FailedPrecondition(f"checkpoint optimizer {str(meta.get('type'))[:40]!r} differs from this session's "
                                 f"{type(session.optimizer).__name__}")
    groups, scalars = meta.get("param_groups"), meta.get("scalars")
    if not isinstance(groups, list) or len(groups) != len(mine["param_groups"]) or not isinstance(scalars, dict):
        raise InvalidArgument(_FIELD, "the checkpoint's optimizer.json does not fit this session's optimizer")
    merged = []
    for saved, own in zip(groups, mine["param_groups"], strict=True):
        if not isinstance(saved, dict) or not set(saved) <= set(own) or saved.get("params") != own["params"]:
            raise InvalidArgument(_FIELD, "the checkpoint's optimizer parameter groups differ from this session's")
        for key, value in saved.items():
            if key != "params" and not isinstance(value, (list, *_SCALAR_TYPES)):
                raise InvalidArgument(_FIELD, f"the checkpoint's optimizer setting {key[:40]!r} is not a value")
        merged.append({**own, **saved})  # settings a newer torch added keep the session's values
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in _safetensors(files, "optimizer.safetensors").items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or name not in _OPTIMIZER_STATE_NAMES:
            raise InvalidArgument(_FIELD, f"the checkpoint's optimizer tensor {key[:60]!r} is not one of this "
                                          "session's optimizer state")
        want = () if name == "step" else tuple(params[int(index)].shape)
        if tuple(value.shape) != want or not value.is_floating_point():
            raise InvalidArgument(_FIELD, f"the checkpoint's optimizer tensor {key} has shape {list(value.shape)}, "
                                          f"this session's parameter needs {list(want)}")
        state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        if not str(index).isdigit() or int(index) >= len(params) or not isinstance(values, dict) \
                or not all(k in _OPTIMIZER_STATE_NAMES and isinstance(v, (int, float)) for k, v in values.items()):
            raise InvalidArgument(_FIELD, "the checkpoint's optimizer scalars do not fit this session's optimizer")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": merged}


def restore(session: Any, files: dict[str, bytes], lineage: common_pb2.Lineage | None = None,
            artifact_id: str = "") -> tuple[dict[str, Any], bool]:
    """Load a checkpoint into the session (its adapter active); returns (session.json, optimizer restored).

    ``lineage`` is the vault's record of the artifact (None or unattested: a tenant's upload). Its DP
    budgets decide what a DP session may load; once the checks pass it joins the session's lineage.
    Every part of the checkpoint is read and checked before anything of the session changes, so a
    malformed or tampered checkpoint is refused (INVALID_ARGUMENT / FAILED_PRECONDITION) and leaves the
    session as it was.
    """
    record = _json(files, "session.json")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise FailedPrecondition(f"checkpoint format {str(record.get('format'))[:20]} is not supported by this "
                                 "trainer")
    step, tokens_processed = _count(record, "step"), _count(record, "tokens_processed")
    saved_dp, dp = record.get("dp"), getattr(session, "dp", None)
    if saved_dp is not None and not (isinstance(saved_dp, dict) and isinstance(saved_dp.get("budget_id"), str)):
        raise InvalidArgument(_FIELD, "the checkpoint's session.json has a malformed 'dp' record")
    vault_lineage = lineage if lineage is not None else common_pb2.Lineage(attested=False)
    session.lineage.check_load(vault_lineage, dp.budget_id if dp is not None else None)
    if saved_dp and dp is not None and saved_dp["budget_id"] != dp.budget_id:
        raise FailedPrecondition(
            f"this checkpoint was trained with DP under budget {saved_dp['budget_id'][:128]}: loading it does not "
            f"give spent budget back. Continue that budget: create the session with "
            f"dp_config.budget_id={saved_dp['budget_id'][:128]!r} and noise_multiplier="
            f"{saved_dp.get('noise_multiplier')!r}", budget_id=saved_dp["budget_id"][:128])
    weights = check_adapter(session, files)
    optimizer_state = _optimizer_state(session, files)
    rng = _safetensors(files, "rng.safetensors").get("cpu")
    own_rng = torch.get_rng_state()
    if rng is None or rng.dtype != own_rng.dtype or rng.shape != own_rng.shape:
        raise InvalidArgument(_FIELD, "the checkpoint's rng.safetensors is not a CPU generator state")
    # Past every check: from here the weights change, so the lineage is merged first (conservative).
    session.lineage.absorb(vault_lineage, artifact_id)
    result = set_peft_model_state_dict(session.base.peft, weights, adapter_name=session.session_id)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise FailedPrecondition(f"checkpoint weights do not fit this adapter: {unexpected[:3]}")
    if optimizer_state is not None:
        session.optimizer.load_state_dict(optimizer_state)
    session.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)  # kept by the op when it ends
    session.step = step
    session.micro_steps = session.optim_calls = session.tokens_since_update = 0
    session.tokens_processed = tokens_processed
    return record, optimizer_state is not None
