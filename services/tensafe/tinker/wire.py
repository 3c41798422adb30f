"""The ``tinker`` client's bodies and TenSafe's batches, both ways (plain values; no I/O).

A Tinker datum is ``model_input`` (tokens x[0..N-1]) and ``loss_fn_inputs`` aligned with it:
``target_tokens`` y (the logits at position i predict y[i]), optional ``weights``, and for the RL losses
``logprobs`` (the sampler's) and ``advantages``. TenSafe's batches follow the Hugging Face convention (the
logits at t-1 predict ``labels[t]``), so a datum becomes one row of N+1 positions: ``input_ids`` = x and one
pad, ``labels`` = [ignored] + y, and every per-token input shifted the same way. Position N's logits are
computed but predict nothing; positions 0..N-1 see exactly x (causal attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensafe.runtime.errors import InvalidArgument

from . import wire_schema as pb

IGNORE = -100
MAX_DATUMS = 1024
MAX_TOKENS = 32_768
MAX_BATCH_TOKENS = 1_048_576
# Tinker's loss_fn -> (TenSafe loss, its fixed kwargs, the loss_fn_config keys accepted with their defaults).
LOSSES: dict[str, tuple[str, dict[str, Any], dict[str, float | None]]] = {
    "cross_entropy": ("cross_entropy", {}, {}),
    "importance_sampling": ("importance_sampling", {"reduction": "sum"}, {}),
    "ppo": ("ppo", {"reduction": "sum"}, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": ("cispo", {}, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "dro": ("dro", {}, {"beta": None}),
}
RL_INPUTS = ("logprobs", "advantages")
_INPUTS = {"cross_entropy": ("target_tokens", "weights"), **{k: ("target_tokens", *RL_INPUTS) for k in
                                                             ("importance_sampling", "ppo", "cispo", "dro")}}


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [N]
    inputs: dict[str, np.ndarray] = field(default_factory=dict[str, np.ndarray])  # each [N]


@dataclass
class FwdBwdCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool
    data: list[Datum]


def _tensor(msg: Any, where: str) -> np.ndarray:
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    dtype = dtypes.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(where, f"unsupported dtype {msg.dtype}: use float32 or int64")
    shape = [int(s) for s in msg.shape]
    if msg.WhichOneof("encoding") == "sparse_csr":
        csr = msg.sparse_csr
        if len(shape) != 2:
            raise InvalidArgument(where, "a sparse CSR tensor needs a 2-D shape")
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        rows, cols = shape
        if (len(crow) != rows + 1 or len(col) != len(values) or rows * cols > MAX_TOKENS * 64
                or (len(col) and (col.min() < 0 or col.max() >= cols)) or crow[0] != 0 or crow[-1] != len(values)
                or (np.diff(crow) < 0).any()):
            raise InvalidArgument(where, "malformed sparse CSR tensor")
        dense = np.zeros((rows, cols), dtype=dtype)
        for r in range(rows):
            dense[r, col[crow[r]:crow[r + 1]]] = values[crow[r]:crow[r + 1]]
        return dense
    arr = np.frombuffer(msg.dense, dtype=dtype)
    if shape and math.prod(shape) != arr.size:
        raise InvalidArgument(where, f"has {arr.size} values for shape {shape}")
    return arr.reshape(shape) if shape else arr


def decode_forward_backward(body: bytes) -> FwdBwdCall:
    """A ``/api/v1/forward_backward`` protobuf body, checked: sizes, chunk kinds, the loss and its inputs."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed body
        raise InvalidArgument("body", "not a ForwardBackwardRequest protobuf") from None
    loss_fn = msg.loss_fn
    if loss_fn not in LOSSES:
        raise InvalidArgument("loss_fn", f"unsupported loss {loss_fn!r}; supported: {', '.join(LOSSES)}")
    config: dict[str, float] = {}
    if msg.loss_fn_config_v2:
        for k, v in msg.loss_fn_config_v2.items():
            if v.WhichOneof("value") != "number":
                raise InvalidArgument(f"loss_fn_config.{k}", "must be a number")
            config[k] = float(v.number)
    else:
        config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    if not 0 < len(msg.data) <= MAX_DATUMS:
        raise InvalidArgument("data", f"must hold 1 to {MAX_DATUMS} datums, got {len(msg.data)}")
    data: list[Datum] = []
    total = 0
    for i, d in enumerate(msg.data):
        parts = []
        for j, chunk in enumerate(d.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidArgument(f"data[{i}].model_input.chunks[{j}]", "only encoded_text chunks are supported")
            parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
        tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if not 0 < len(tokens) <= MAX_TOKENS:
            raise InvalidArgument(f"data[{i}].model_input", f"must hold 1 to {MAX_TOKENS} tokens")
        total += len(tokens)
        inputs: dict[str, np.ndarray] = {}
        for name, t in d.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs.{name}"
            if name not in _INPUTS[loss_fn]:
                raise InvalidArgument(where, f"not an input of loss {loss_fn!r} (takes {', '.join(_INPUTS[loss_fn])})")
            arr = _tensor(t, where).reshape(-1)
            if arr.shape != tokens.shape:
                raise InvalidArgument(where, f"must have {len(tokens)} values (one per model_input token), "
                                             f"got {arr.size}")
            if name != "target_tokens" and not np.isfinite(arr.astype(np.float64)).all():
                raise InvalidArgument(where, "must be finite")
            inputs[name] = arr
        for need in ("target_tokens", *(RL_INPUTS if loss_fn != "cross_entropy" else ())):
            if need not in inputs:
                raise InvalidArgument(f"data[{i}].loss_fn_inputs.{need}", f"required by loss {loss_fn!r}")
        data.append(Datum(tokens, inputs))
    if total > MAX_BATCH_TOKENS:
        raise InvalidArgument("data", f"holds {total} tokens, more than {MAX_BATCH_TOKENS}")
    return FwdBwdCall(msg.model_id, int(msg.seq_id), loss_fn, config, bool(msg.forward_only), data)


def loss_spec(loss_fn: str, config: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """The TenSafe loss name and kwargs for a Tinker ``loss_fn`` and its ``loss_fn_config``."""
    name, fixed, accepted = LOSSES[loss_fn]
    for key in config:
        if key not in accepted:
            raise InvalidArgument(f"loss_fn_config.{key}",
                                  f"not accepted by {loss_fn!r} (accepted: {', '.join(accepted) or 'none'})")
    kwargs = dict(fixed)
    for key, default in accepted.items():
        value = config.get(key, default)
        if value is None:
            raise InvalidArgument(f"loss_fn_config.{key}", f"required by loss {loss_fn!r}")
        kwargs[key] = value
    return name, kwargs


def to_batch(data: list[Datum]) -> dict[str, np.ndarray]:
    """The TenSafe batch of these datums (see the module docstring for the alignment)."""
    rows = len(data)
    width = max(len(d.tokens) for d in data) + 1
    input_ids = np.zeros((rows, width), np.int64)
    mask = np.zeros((rows, width), np.int64)
    labels = np.full((rows, width), IGNORE, np.int64)
    shifted: dict[str, np.ndarray] = {}
    for r, d in enumerate(data):
        n = len(d.tokens)
        input_ids[r, :n] = d.tokens
        mask[r, :n] = 1
        labels[r, 1:n + 1] = d.inputs["target_tokens"]
        for name in ("weights", *RL_INPUTS):
            if name in d.inputs:
                shifted.setdefault(name, np.zeros((rows, width), np.float32))[r, 1:n + 1] = d.inputs[name]
    batch: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if "weights" in shifted:
        if not all("weights" in d.inputs for d in data):
            raise InvalidArgument("data", "give loss_fn_inputs.weights for every datum or for none")
        batch["weights"] = shifted["weights"]
    if "logprobs" in shifted:
        batch["old_logprobs"] = shifted["logprobs"]
    if "advantages" in shifted:
        batch["advantages"] = shifted["advantages"]
    return batch


def per_datum_logprobs(data: list[Datum], logprobs: np.ndarray) -> list[np.ndarray]:
    """Each datum's log p(target_tokens), [N] float32, from the batch's [B, N+1] token log-probabilities."""
    return [np.asarray(logprobs[r, 1:len(d.tokens) + 1], np.float32) for r, d in enumerate(data)]


def _batched(arrays: list[np.ndarray]) -> Any:
    bt = pb.BatchedTensor()
    sizes = np.array([0] + [a.nbytes for a in arrays], np.int64)
    bt.offsets = np.cumsum(sizes).astype(np.int64).tobytes()
    bt.data = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in arrays)
    bt.dtype = pb.DTYPE_FLOAT32
    return bt


def forward_backward_output(fields: dict[str, list[np.ndarray]], metrics: dict[str, float], rows: int) -> bytes:
    """The ``ForwardBackwardOutput`` protobuf: one ArrayRecord with a float32 field per name, one entry a datum."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    rec = out.loss_fn_outputs.add()
    rec.type_tag = "ArrayRecord"
    rec.num_datums = rows
    for name, arrays in fields.items():
        rec.fields[name].CopyFrom(_batched(arrays))
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    return out.SerializeToString()


@dataclass
class SampledSeq:
    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: str  # "stop" or "length"


def sample_response(seqs: list[SampledSeq], prompt_logprobs: list[float] | None) -> bytes:
    """The ``SampleResponse`` protobuf; ``prompt_logprobs[0]`` is NaN (the first token has no context)."""
    out = pb.SampleResponse()
    for s in seqs:
        m = out.sequences.add()
        m.stop_reason = pb.STOP_REASON_LENGTH if s.stop_reason == "length" else pb.STOP_REASON_STOP
        m.tokens = np.asarray(s.tokens, np.int32).tobytes()
        if s.logprobs is not None:
            m.logprobs = np.asarray(s.logprobs, np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, np.float32).tobytes()
    return out.SerializeToString()


def metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics the client reads: those named ``name:reduction`` (it folds chunks by the reduction)."""
    return {k: float(v) for k, v in metrics.items() if k.count(":") == 1}


def model_input_tokens(value: object, where: str) -> list[int]:
    """A ModelInput JSON (``{"chunks": [{"type": "encoded_text", "tokens": [...]}]}``) as token ids."""
    if not isinstance(value, dict) or not isinstance(value.get("chunks"), list):
        raise InvalidArgument(where, "must be a ModelInput with chunks")
    tokens: list[int] = []
    for i, chunk in enumerate(value["chunks"]):  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidArgument(f"{where}.chunks[{i}]", "only encoded_text chunks are supported")
        toks = chunk.get("tokens")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in toks):  # pyright: ignore[reportUnknownVariableType]
            raise InvalidArgument(f"{where}.chunks[{i}].tokens", "must be a list of token ids")
        tokens.extend(toks)  # pyright: ignore[reportUnknownArgumentType]
    if not 0 < len(tokens) <= MAX_TOKENS:
        raise InvalidArgument(where, f"must hold 1 to {MAX_TOKENS} tokens")
    return tokens


def sampling_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Tinker's SamplingParams as ``tg_tinker`` sampling arguments (the inference service checks the values)."""
    max_tokens = params.get("max_tokens") or 16
    stop = params.get("stop")
    if isinstance(stop, list) and stop and not all(isinstance(x, str) for x in stop):  # pyright: ignore[reportUnknownVariableType]
        raise InvalidArgument("sampling_params.stop", "stop token ids are not supported; give stop strings")
    out: dict[str, Any] = {"max_tokens": int(max_tokens), "temperature": float(params.get("temperature", 1.0)),
                           "top_p": float(params.get("top_p", 1.0)),
                           "top_k": max(int(params.get("top_k", -1)), 0)}
    if stop:
        out["stop"] = [stop] if isinstance(stop, str) else list(stop)  # pyright: ignore[reportUnknownArgumentType]
    if params.get("seed") is not None:
        out["seed"] = int(params["seed"])
    return out
