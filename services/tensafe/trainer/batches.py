"""Turn a batch (``values.BatchInput``, as read from a ``Batch`` message) into tensors, refusing anything
malformed before it is queued.

Every check names the request field, so the caller sees exactly what to fix, and
nothing about the session changes when a batch is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from tensafe.runtime.errors import InvalidArgument
from tg_tinker.errors import ValidationError
from tg_tinker.tensors import from_proto

from .values import BatchInput, TensorData

MAX_EXTRA = 16
EXTRA_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor            # [B, T] int64
    attention_mask: torch.Tensor       # [B, T] int64 (0/1)
    labels: torch.Tensor               # [B, T] int64
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> PreparedBatch:
        """The batch on ``device`` (the base model's: TENSAFE_DEVICE); itself when it is there already."""
        if self.input_ids.device == device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PreparedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                             move(self.advantages), move(self.old_logprobs),
                             {k: v.to(device) for k, v in self.extra.items()})

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {f"extra.{k}": tuple(v.shape) for k, v in self.extra.items()}
        if self.advantages is not None:
            out["advantages"] = tuple(self.advantages.shape)
        if self.old_logprobs is not None:
            out["old_logprobs"] = tuple(self.old_logprobs.shape)
        return out


def _decode(tensor: TensorData, name: str) -> np.ndarray:
    try:
        # The SDK's decoder, so that both ends read a tensor by the same rules; it reads only
        # dtype, shape and data, which TensorData has as the message does.
        return from_proto(tensor, name)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise InvalidArgument(exc.field or name, exc.message.split(": ", 1)[-1]) from None


def _int_matrix(tensor: TensorData, name: str, shape: tuple[int, int] | None) -> np.ndarray:
    arr = _decode(tensor, name)
    if arr.dtype.kind not in "iub":
        raise InvalidArgument(name, f"must be an integer tensor, got {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidArgument(name, f"must have shape [batch, seq], got {list(arr.shape)}")
    if shape is not None and arr.shape != shape:
        raise InvalidArgument(name, f"shape {list(arr.shape)} differs from batch.input_ids {list(shape)}")
    return arr.astype(np.int64)


def float_matrix(tensor: TensorData, name: str, shape: tuple[int, int]) -> torch.Tensor:
    arr = _decode(tensor, name)
    if arr.dtype.kind != "f":
        raise InvalidArgument(name, f"must be a float tensor, got {arr.dtype}")
    if arr.shape != shape:
        raise InvalidArgument(name, f"shape {list(arr.shape)} differs from batch.input_ids {list(shape)}")
    if not np.isfinite(arr).all():
        raise InvalidArgument(name, "contains NaN or infinity")
    return torch.from_numpy(arr.astype(np.float32))


def prepare_batch(batch: BatchInput, *, vocab_size: int, max_length: int,
                  ignore_index: int = -100, field_prefix: str = "batch") -> PreparedBatch:
    p = field_prefix
    if batch.input_ids is None:
        raise InvalidArgument(f"{p}.input_ids", "is required")
    ids = _int_matrix(batch.input_ids, f"{p}.input_ids", None)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InvalidArgument(f"{p}.input_ids", f"is empty (shape {list(ids.shape)})")
    if ids.shape[1] > max_length:
        raise InvalidArgument(f"{p}.input_ids", f"sequence length {ids.shape[1]} exceeds the maximum {max_length}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise InvalidArgument(f"{p}.input_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    shape = (int(ids.shape[0]), int(ids.shape[1]))
    if batch.attention_mask is not None:
        mask = _int_matrix(batch.attention_mask, f"{p}.attention_mask", shape)
        if not np.isin(mask, (0, 1)).all():
            raise InvalidArgument(f"{p}.attention_mask", "values must be 0 or 1")
        if (mask.sum(axis=1) == 0).any():
            raise InvalidArgument(f"{p}.attention_mask", "a sequence has no attended token")
    else:
        mask = np.ones(shape, dtype=np.int64)
    if batch.labels is not None:
        labels = _int_matrix(batch.labels, f"{p}.labels", shape)
        valid = labels != ignore_index
        if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= vocab_size):
            raise InvalidArgument(f"{p}.labels",
                                  f"label ids must be in [0, {vocab_size}) or the ignore index {ignore_index}")
    else:
        # Language modelling on the batch itself: every attended token is a target.
        labels = np.where(mask == 1, ids, ignore_index)
    out = PreparedBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels.astype(np.int64)))
    if batch.advantages is not None:
        out.advantages = float_matrix(batch.advantages, f"{p}.advantages", shape)
    if batch.old_logprobs is not None:
        out.old_logprobs = float_matrix(batch.old_logprobs, f"{p}.old_logprobs", shape)
    if len(batch.extra) > MAX_EXTRA:
        raise InvalidArgument(f"{p}.extra", f"{len(batch.extra)} tensors, at most {MAX_EXTRA} are accepted")
    for name, tensor in batch.extra.items():
        if not EXTRA_NAME.fullmatch(name):
            raise InvalidArgument(f"{p}.extra", "names are 1-64 letters, digits, '_', '.' or '-'")
        arr = _decode(tensor, f"{p}.extra.{name}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidArgument(f"{p}.extra.{name}", "contains NaN or infinity")
        out.extra[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out
