"""The one check of a tenant's PEFT LoRA adapter (``adapter_config.json`` + the safetensors header) before PEFT.

An adapter is loaded onto a base model other tenants share (inference, the trainer's shared
bases) or read into matrices (he). PEFT's ``LoraConfig`` has options that rewrite the base
weights in place when an adapter is added (``init_lora_weights`` = ``pissa``/``olora``/
``loftq``/``eva``/``corda``..., ``loftq_config``), change the base model's structure
(``layer_replication``, ``task_type`` other than causal LM, ``modules_to_save``,
``trainable_token_indices``, ``target_parameters``) or hand strings to ``re`` (a ``str``
``target_modules``/``exclude_modules``, ``rank_pattern``/``alpha_pattern`` keys,
``layers_pattern``). So the config is not given to PEFT as written: it is checked against an
allow-list and what comes out is a plain dict of the fields and values below, which each
service turns into its ``LoraConfig`` (this module imports neither torch nor PEFT):

=====================  ==================================================================
field                  accepted
=====================  ==================================================================
``peft_type``          ``"LORA"`` (or absent)
``r``                  an int in 1..MAX_RANK
``lora_alpha``         a finite number in (0, MAX_ALPHA]
``lora_dropout``       a number in [0, 1)
``target_modules``     a list of 1..MAX_TARGETS module names (never a string: PEFT treats a
                       string as a regular expression); matched by name or name suffix
``exclude_modules``    null or a list of module names
``bias``               ``"none"`` (``"all"``/``"lora_only"`` only where the caller allows
                       base biases: a trainer session with its own model copy)
``fan_in_fan_out``     a bool;  ``use_rslora``: a bool
``init_lora_weights``  ``true``, ``false`` or ``"gaussian"`` (they initialise the LoRA
                       factors only; the loaded weights replace them)
``layers_to_transform``  null, an int or a list of ints in 0..MAX_LAYER
``layers_pattern``     null, or one or a list of identifiers (letters, digits, ``_``)
``rank_pattern``       a map of module name -> int in 1..MAX_RANK (at most MAX_PATTERNS)
``alpha_pattern``      a map of module name -> number in (0, MAX_ALPHA]
=====================  ==================================================================

Informational fields are accepted and dropped: ``base_model_name_or_path`` (kept, bounded),
``revision``, ``peft_version``, ``inference_mode``, ``task_type`` (null or ``"CAUSAL_LM"``).
Fields whose only accepted value is PEFT's default (``null``, ``false``, ``{}``, ``[]``):
``use_dora``, ``lora_bias``, ``use_qalora``, ``ensure_weight_tying``, ``modules_to_save``,
``layer_replication``, ``trainable_token_indices``, ``target_parameters``, ``loftq_config``,
``megatron_config``, ``eva_config``, ``corda_config``, ``lora_ga_config``, ``velora_config``,
``monteclora_config``, ``arrow_config``, ``kasa_config``, ``alora_invocation_tokens``,
``use_bdlora``, ``auto_mapping``, ``runtime_config``; ``megatron_core`` may only be
``"megatron.core"``; ``qalora_group_size`` an int. Any other field, or another value, is
``InvalidArgument("adapter_config.<field>")``.

Module names are ``[A-Za-z0-9_]`` segments joined by ``.`` (at most MAX_NAME characters) and
are compared for equality, or as a suffix after a ``.``, the way PEFT matches a list of
``target_modules``: no tenant string is ever a regular expression. For PEFT, which does match
``rank_pattern``/``alpha_pattern`` keys with ``re``, :func:`lora_kwargs` hands it the keys
escaped, so its match is this same exact one.

The weights file is checked from its safetensors header before torch reads it
(:func:`safetensors_header`, :func:`check_adapter_weights`): every tensor must be a LoRA factor
(``<module>.lora_A.weight``/``lora_B.weight``, ``lora_embedding_A``/``_B``) of a targeted
module with the config's rank, of bounded size; base-model weights (``base_layer``, other
modules) are refused, so loading an accepted adapter cannot write into the base either.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any, TypeGuard

from .errors import InvalidArgument
from .safetar import is_buffer

MAX_CONFIG_BYTES = 64 << 10
MAX_RANK = 1024
MAX_ALPHA = 1 << 16
MAX_TARGETS = 64
MAX_NAME = 200
MAX_PATTERNS = 256
MAX_LAYER = 1 << 14
MAX_LAYERS_LISTED = 4096
MAX_DIM = 1 << 18
MAX_TENSORS = 1 << 14
MAX_HEADER_BYTES = 16 << 20
MAX_INFO_CHARS = 512

MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TASK_TYPES = (None, "CAUSAL_LM")
INIT_WEIGHTS = (True, False, "gaussian")
BIASES = ("none", "all", "lora_only")
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>[A-Za-z0-9_.]+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                     r"lora_embedding_B)")
_DTYPES = {"F64", "F32", "F16", "BF16"}

# Field -> the values accepted (PEFT's harmless defaults); compared with == after JSON decoding.
_ONLY_DEFAULT: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "lora_bias": (False, None), "use_qalora": (False, None),
    "ensure_weight_tying": (False, None), "modules_to_save": (None, []), "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}), "target_parameters": (None, []), "loftq_config": (None, {}),
    "megatron_config": (None,), "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,), "arrow_config": (None,), "kasa_config": (None,),
    "alora_invocation_tokens": (None, []), "use_bdlora": (None, False), "auto_mapping": (None,),
    "runtime_config": (None, {}, {"ephemeral_gpu_offload": False}), "megatron_core": (None, "megatron.core"),
}
_INFO = ("peft_version", "revision")

# The fields of the validated dict that are LoraConfig arguments.
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "fan_in_fan_out",
               "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
               "alpha_pattern")


def _fail(field: str, name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}.{name}" if name else field, message)


# Decoded JSON is Any; these say which container it is (its items stay Any until checked).
def _is_list(value: Any) -> TypeGuard[list[Any]]:
    return isinstance(value, list)


def _is_sequence(value: Any) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    return isinstance(value, (list, tuple))


def _is_dict(value: Any) -> TypeGuard[dict[Any, Any]]:
    return isinstance(value, dict)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def check_module_name(name: Any, field: str) -> str:
    """A module name as PEFT matches it in a list (exact or ``.``-suffix), or InvalidArgument(field)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not MODULE_NAME.fullmatch(name):
        raise InvalidArgument(field, f"{_shown(name)} is not a module name: segments of letters, digits and '_' "
                                     f"joined by '.', at most {MAX_NAME} characters (names are matched exactly, "
                                     "never as regular expressions)")
    return name


def check_module_names(names: Any, field: str, *, min_count: int = 0) -> list[str]:
    """A list of distinct module names, bounded; a string is refused (PEFT would read it as a regex)."""
    if isinstance(names, str):
        raise InvalidArgument(field, "must be a list of module names: a single string would be a regular "
                                     "expression, which is not accepted")
    if not _is_sequence(names):
        raise InvalidArgument(field, "must be a list of module names")
    if not min_count <= len(names) <= MAX_TARGETS:
        raise InvalidArgument(field, f"must list {min_count} to {MAX_TARGETS} module names (has {len(names)})")
    out = [check_module_name(n, f"{field}[{i}]") for i, n in enumerate(names)]
    if len(set(out)) != len(out):
        raise InvalidArgument(field, "lists a module name twice")
    return sorted(out)


def matches(module: str, name: str) -> bool:
    """PEFT's list matching: ``module`` is ``name`` or ends with ``.name``."""
    return module == name or module.endswith("." + name)


def _pattern(value: Any, field: str, name: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not _is_dict(value):
        raise _fail(field, name, "must be a map of module name to value")
    if len(value) > MAX_PATTERNS:
        raise _fail(field, name, f"has {len(value)} entries; at most {MAX_PATTERNS}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        check_module_name(key, f"{field}.{name}")
        out[key] = check(item, f"{field}.{name}[{key}]")
    return out


def _rank(value: Any, field: str) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_RANK:
        raise InvalidArgument(field, f"must be an integer in 1..{MAX_RANK} (got {_shown(value)})")
    return value


def _alpha(value: Any, field: str) -> float:
    if not _is_number(value) or not 0 < value <= MAX_ALPHA:
        raise InvalidArgument(field, f"must be a number in (0, {MAX_ALPHA}] (got {_shown(value)})")
    return value


def parse_adapter_config(raw: object, *, field: str = "adapter_config", allow_base_bias: bool = False
                         ) -> dict[str, Any]:
    """``adapter_config.json``'s bytes, decoded (bounded) and validated by :func:`validate_adapter_config`."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_CONFIG_BYTES:
        raise InvalidArgument(field, f"adapter_config.json must be at most {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument(field, "adapter_config.json is not JSON") from None
    return validate_adapter_config(config, field=field, allow_base_bias=allow_base_bias)


def validate_adapter_config(config: Any, *, field: str = "adapter_config", allow_base_bias: bool = False
                            ) -> dict[str, Any]:
    """The allow-listed content of a decoded ``adapter_config.json`` (see the module docstring), or
    ``InvalidArgument("<field>.<name>")`` naming the first field refused."""
    if not _is_dict(config):
        raise InvalidArgument(field, "adapter_config.json must be a JSON object")
    out: dict[str, Any] = {"peft_type": "LORA"}
    for name, value in config.items():
        if not isinstance(name, str):
            raise InvalidArgument(field, "has a non-string key")
        if name == "peft_type":
            if value != "LORA":
                raise _fail(field, name, f"must be \"LORA\" (got {_shown(value)}): only LoRA adapters are served")
        elif name == "r":
            out["r"] = _rank(value, f"{field}.r")
        elif name == "lora_alpha":
            out["lora_alpha"] = _alpha(value, f"{field}.lora_alpha")
        elif name == "lora_dropout":
            if not _is_number(value) or not 0 <= value < 1:
                raise _fail(field, name, f"must be a number in [0, 1) (got {_shown(value)})")
            out[name] = value
        elif name == "target_modules":
            out[name] = check_module_names(value, f"{field}.{name}", min_count=1)
        elif name == "exclude_modules":
            out[name] = None if value is None else check_module_names(value, f"{field}.{name}") or None
        elif name == "bias":
            allowed = BIASES if allow_base_bias else ("none",)
            if value not in allowed:
                raise _fail(field, name, f"must be one of {list(allowed)} (got {_shown(value)}): an adapter that "
                                         "carries base-model biases would change a model other adapters share")
            out[name] = value
        elif name in ("fan_in_fan_out", "use_rslora", "inference_mode"):
            if not isinstance(value, bool):
                raise _fail(field, name, f"must be true or false (got {_shown(value)})")
            if name != "inference_mode":
                out[name] = value
        elif name == "init_lora_weights":
            if not any(value is v if isinstance(v, bool) else value == v for v in INIT_WEIGHTS):
                raise _fail(field, name, f"must be true, false or \"gaussian\" (got {_shown(value)}): other "
                                         "initialisations (pissa, olora, loftq, eva, corda...) rewrite the base "
                                         "model's weights")
            out[name] = value
        elif name == "layers_to_transform":
            items = [value] if _is_int(value) else value
            if items is None:
                out[name] = None
                continue
            if not _is_list(items) or len(items) > MAX_LAYERS_LISTED \
                    or not all(_is_int(i) and 0 <= i <= MAX_LAYER for i in items):
                raise _fail(field, name, f"must be null, or layer indices in 0..{MAX_LAYER} (at most "
                                         f"{MAX_LAYERS_LISTED})")
            out[name] = sorted(set(items)) or None
        elif name == "layers_pattern":
            items = [value] if isinstance(value, str) else value
            if items is None:
                out[name] = None
                continue
            if not _is_list(items) or len(items) > 16 \
                    or not all(isinstance(i, str) and _IDENTIFIER.fullmatch(i) for i in items):
                raise _fail(field, name, "must be null, or names of letters, digits and '_' (at most 16)")
            out[name] = list(items) or None
        elif name == "rank_pattern":
            out[name] = _pattern(value, field, name, _rank)
        elif name == "alpha_pattern":
            out[name] = _pattern(value, field, name, _alpha)
        elif name == "task_type":
            if value not in TASK_TYPES:
                raise _fail(field, name, f"must be null or \"CAUSAL_LM\" (got {_shown(value)}): other tasks add "
                                         "whole-module copies to the shared model")
        elif name == "base_model_name_or_path":
            if value is not None and (not isinstance(value, str) or len(value) > MAX_INFO_CHARS):
                raise _fail(field, name, f"must be a string of at most {MAX_INFO_CHARS} characters")
            if value:
                out[name] = value
        elif name in _INFO:
            if value is not None and (not isinstance(value, str) or len(value) > MAX_INFO_CHARS):
                raise _fail(field, name, f"must be null or a string of at most {MAX_INFO_CHARS} characters")
        elif name == "qalora_group_size":
            if not _is_int(value) or not 1 <= value <= 1 << 16:
                raise _fail(field, name, "must be an integer")
        elif name in _ONLY_DEFAULT:
            accepted = _ONLY_DEFAULT[name]
            if not any(value is a if isinstance(a, bool) or a is None else
                       (type(value) is type(a) and value == a) for a in accepted):
                raise _fail(field, name, f"must be {' or '.join(json.dumps(a) for a in accepted)} (got "
                                         f"{_shown(value)}): this option can change the shared base model or its "
                                         "structure, and is not accepted")
        else:
            raise _fail(field, name[:64], "is not an accepted LoRA adapter option (only plain LoRA factors on "
                                          "named modules are loaded)")
    if "r" not in out:
        raise _fail(field, "r", "is required")
    if "target_modules" not in out:
        raise _fail(field, "target_modules", "is required (a list of module names)")
    out.setdefault("lora_alpha", 8)
    out.setdefault("bias", "none")
    return out


def lora_kwargs(validated: dict[str, Any]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` keyword arguments for a validated config. PEFT matches ``rank_pattern`` and
    ``alpha_pattern`` keys with ``re.match(r"(.*\\.)?(key)$")``: the keys go to it escaped, so that
    match is the exact name-or-suffix one (module names have no other regex characters than ``.``)."""
    kwargs = {k: validated[k] for k in LORA_FIELDS if k in validated}
    for name in ("rank_pattern", "alpha_pattern"):
        if name in kwargs:
            kwargs[name] = {re.escape(k): v for k, v in kwargs[name].items()}
    return kwargs


def lookup(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """The value of a ``rank_pattern``/``alpha_pattern`` for ``module`` (exact or suffix match, first key
    in the map that matches, as PEFT takes it)."""
    for key, value in (pattern or {}).items():
        if matches(module, key):
            return value
    return default


def targeted(validated: dict[str, Any], module: str) -> bool:
    """Whether the validated config puts a LoRA layer on ``module`` (by name; layer indices not applied)."""
    if any(matches(module, x) for x in validated.get("exclude_modules") or ()):
        return False
    return any(matches(module, t) for t in validated["target_modules"])


def safetensors_header(data: object, *, field: str = "adapter_model") -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares (name -> (dtype, shape)), checked for bounds and that their
    bytes lie inside ``data``; read without torch."""
    if not is_buffer(data) or len(data) < 8:
        raise InvalidArgument(field, "adapter_model.safetensors is not a safetensors file")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise InvalidArgument(field, "adapter_model.safetensors has a header larger than the file or the limit")
    try:
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument(field, "adapter_model.safetensors has an unreadable header") from None
    if not _is_dict(header):
        raise InvalidArgument(field, "adapter_model.safetensors has an unreadable header")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise InvalidArgument(field, f"adapter_model.safetensors holds more than {MAX_TENSORS} tensors")
    body = len(data) - 8 - size
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        shown = _shown(name)
        if len(name) > 2 * MAX_NAME:
            raise InvalidArgument(field, f"tensor {shown}: the name is longer than {2 * MAX_NAME} characters")
        if not _is_dict(info) or info.get("dtype") not in _DTYPES:
            raise InvalidArgument(field, f"tensor {shown}: not a floating-point tensor ({sorted(_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _is_list(shape) or len(shape) > 4 or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise InvalidArgument(field, f"tensor {shown}: bad shape (at most 4 dimensions of at most {MAX_DIM})")
        if not (_is_list(offsets) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):
            raise InvalidArgument(field, f"tensor {shown}: its bytes are not inside the file")
        width = 8 if info["dtype"] == "F64" else 4 if info["dtype"] == "F32" else 2
        if math.prod(shape) * width != offsets[1] - offsets[0]:
            raise InvalidArgument(field, f"tensor {shown}: its shape does not match its bytes")
        out[name] = (info["dtype"], tuple(shape))
    return out


def check_adapter_weights(header: dict[str, tuple[str, tuple[int, ...]]], validated: dict[str, Any], *,
                          field: str = "adapter_model", allow_base_bias: bool = False
                          ) -> dict[str, dict[str, tuple[int, ...]]]:
    """Check that every tensor of the weights file is a LoRA factor of a module the validated config targets,
    with that module's rank; returns module -> {"A": shape, "B": shape}. Base-model weights
    (``base_layer``, whole modules) are refused: they would be written into the base on load. Biases
    (``*.bias``) only with ``allow_base_bias`` (a trainer session training them on its own model copy)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, (_, shape) in header.items():
        key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        if allow_base_bias and validated.get("bias", "none") != "none" and key.endswith(".bias") \
                and MODULE_NAME.fullmatch(key) and "lora_" not in key:
            continue
        match = _FACTOR.fullmatch(key)
        if not match or not MODULE_NAME.fullmatch(match["module"]) or ".base_layer" in "." + key:
            raise InvalidArgument(field, f"tensor {_shown(name)} is not a LoRA factor (lora_A/lora_B of a module): "
                                         "an adapter may hold its own weights only, never base-model weights")
        module, which = match["module"], "A" if match["which"].startswith(("lora_A", "lora_embedding_A")) else "B"
        if not targeted(validated, module):
            raise InvalidArgument(field, f"tensor {_shown(name)}: module {_shown(module)} is not in target_modules")
        if len(shape) != 2:
            raise InvalidArgument(field, f"tensor {_shown(name)}: a LoRA factor is a matrix (shape {list(shape)})")
        rank = lookup(validated.get("rank_pattern"), module, validated["r"])
        # lora_A (r, in), lora_B (out, r); embeddings: lora_embedding_A (r, vocab), lora_embedding_B (dim, r).
        got = shape[0] if which == "A" else shape[1]
        if got != rank:
            raise InvalidArgument(field, f"tensor {_shown(name)}: rank {got}, the config says {rank}")
        entry = modules.setdefault(module, {})
        if which in entry:
            raise InvalidArgument(field, f"module {_shown(module)} has two lora_{which} tensors")
        entry[which] = shape
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise InvalidArgument(field, f"module {_shown(module)} has lora_{'A' if 'A' in entry else 'B'} only")
    if not modules:
        raise InvalidArgument(field, "adapter_model.safetensors holds no LoRA factors")
    return modules
