"""Several LoRA adapters in one forward pass of a shared PEFT model: each row through its own adapter.

Multi-LoRA batching (as punica and S-LoRA do it, with one segmented matmul per adapter): the rows
of a batch are grouped into :class:`Segment` s, contiguous runs of rows that use one adapter (or
none). While :func:`routed` is open, every PEFT LoRA ``Linear`` layer of the model computes its
frozen base layer once for the whole batch, then, for each segment whose adapter the layer holds,
``lora_B(lora_A(dropout(x[rows, :length]))) * scaling`` on that segment's rows alone, and adds it
to those rows (zero elsewhere). That is, row for row, what PEFT's own forward computes with that
adapter active: the same modules are called on the same inputs (so hooks on them, such as the
DP per-sample hooks, see exactly the rows of their own adapter), and one row's output depends on
no other row's adapter. Positions at and after a segment's ``length`` are padding: the adapter is
not run on them, so a row's dropout mask is drawn for the same shape as when it runs alone.

LoRA dropout in training draws from the segment's own RNG state (``rng``: any object with an
``rng_state`` attribute, a ``torch.get_rng_state()`` value), put in place around each of its
dropout calls and saved back after, so that a session draws the same masks as when it runs alone,
whatever else shares the pass.

Only plain LoRA on ``Linear`` layers is routed (:func:`routable`); an adapter with LoRA on other
layer types (embeddings, convolutions) or a LoRA variant (DoRA) must run alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn


class RngHolder(Protocol):
    rng_state: torch.Tensor | None


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of the batch, through ``adapter`` (None: the base model alone); only
    positions ``[0, length)`` are theirs, the rest padding. ``rng`` holds the RNG state their LoRA
    dropout draws from (None: the global generator)."""

    adapter: str | None
    start: int
    stop: int
    length: int
    rng: RngHolder | None = None


def routable(model: nn.Module, adapter: str) -> bool:
    """True when every LoRA layer holding ``adapter`` is a plain (unmerged, no variant) LoRA ``Linear``."""
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        holds = adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {})
        if not holds:
            continue
        if type(module) is not LoraLinear or adapter in module.lora_variant or module.merged:
            return False
    return True


def segments_for(adapters: Sequence[str | None], rows: Sequence[int], lengths: Sequence[int],
                 rngs: Sequence[RngHolder | None] | None = None) -> list[Segment]:
    """Consecutive segments, one per entry: ``rows[i]`` rows through ``adapters[i]``."""
    out, start = [], 0
    for i, (adapter, n, length) in enumerate(zip(adapters, rows, lengths, strict=True)):
        out.append(Segment(adapter, start, start + n, length, rngs[i] if rngs is not None else None))
        start += n
    return out


def _dropout(drop: nn.Module, x: torch.Tensor, rng: RngHolder | None) -> torch.Tensor:
    active = drop.training and isinstance(drop, nn.Dropout) and drop.p > 0
    if not active or rng is None or rng.rng_state is None:
        return drop(x)
    saved = torch.get_rng_state()
    torch.set_rng_state(rng.rng_state)
    try:
        return drop(x)
    finally:
        rng.rng_state = torch.get_rng_state()
        torch.set_rng_state(saved)


def _forward(layer: LoraLinear, segments: Sequence[Segment], x: torch.Tensor, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    rows = segments[-1].stop if segments else 0
    if x.dim() < 2 or x.shape[0] != rows:
        raise RuntimeError(f"routed LoRA layer got input {list(x.shape)} for {rows} routed rows")
    dtype = result.dtype
    deltas: list[torch.Tensor | None] = []
    for seg in segments:
        if seg.adapter is None or seg.adapter not in layer.lora_A:
            deltas.append(None)
            continue
        lora_a, lora_b = layer.lora_A[seg.adapter], layer.lora_B[seg.adapter]
        sub = x[seg.start:seg.stop]
        if x.dim() == 3 and seg.length < x.shape[1]:
            sub = sub[:, :seg.length].contiguous()
        weight: torch.Tensor = lora_a.weight  # pyright: ignore[reportAssignmentType] - nn.Module attributes are typed Tensor | Module
        sub = layer._cast_input_dtype(sub, weight.dtype)  # pyright: ignore[reportPrivateUsage] - PEFT's own cast, as its forward does
        drop = layer.lora_dropout[seg.adapter]
        deltas.append(lora_b(lora_a(_dropout(drop, sub, seg.rng))) * layer.scaling[seg.adapter])
    present = [d for d in deltas if d is not None]
    if not present:
        return result
    like = present[0]
    full = []
    for seg, delta in zip(segments, deltas, strict=True):
        shape = (seg.stop - seg.start, *result.shape[1:])
        if delta is None:
            full.append(like.new_zeros(shape))
        elif tuple(delta.shape) != shape:  # padding positions after the segment's length
            full.append(F.pad(delta, (0, 0, 0, shape[1] - delta.shape[1])))
        else:
            full.append(delta)
    return (result + torch.cat(full)).to(dtype)


@contextlib.contextmanager
def routed(model: nn.Module, segments: Sequence[Segment]) -> Iterator[None]:
    """While open, the model's LoRA ``Linear`` layers route each segment's rows through its adapter.

    The caller holds the model for the duration (no other forward may run on it meanwhile).
    """
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    segs = list(segments)
    try:
        for layer in layers:
            vars(layer)["forward"] = functools.partial(_forward, layer, segs)  # an instance attribute, removed below
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
