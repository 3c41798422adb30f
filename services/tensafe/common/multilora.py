"""Several LoRA adapters in one forward pass of a shared PEFT model: each row through its own adapter.

Multi-LoRA batching (as punica and S-LoRA do it, with one segmented matmul per adapter): the rows
of a batch are grouped into :class:`Segment` s, contiguous runs of rows that use one adapter (or
none). While :func:`routed` is open, every PEFT LoRA ``Linear`` layer of the model computes its
frozen base layer once for the whole batch, then, for each segment whose adapter the layer holds,
``lora_B(lora_A(dropout(x[rows, :length]))) * scaling`` on that segment's rows alone, and adds it
to those rows (zero elsewhere). That is, row for row, what PEFT's own forward computes with that
adapter active, and one row's output depends on no other row's adapter. Segments whose LoRA
factors carry no hook (and no bias) are computed together, punica-style: their factors stacked into
``[S, r, d]`` and ``[S, out, r]`` tensors and all their products in two ``torch.bmm`` (one group per
rank and segment shape); a segment whose factors carry hooks (a DP session's per-sample capture)
has its modules called on its own rows alone, so the hooks see exactly its rows. Positions at and
after a segment's ``length`` are padding: the adapter is not run on them, so a row's dropout mask
is drawn for the same shape as when it runs alone.

LoRA dropout in training draws from the segment's own RNG state (``rng``: any object with an
``rng_state`` attribute, a ``torch.get_rng_state()`` value): one CPU generator per segment, set to
that state when the pass opens, every mask drawn from it (``bernoulli_``, as ATen's dropout draws),
and its state saved back when the pass closes, so that a session draws the same masks as when it
runs alone, whatever else shares the pass. (On another device the masks come from that device's
generator, as PEFT's own forward draws them there.)

Only plain LoRA on ``Linear`` layers is routed (:func:`routable`); an adapter with LoRA on other
layer types (embeddings, convolutions) or a LoRA variant (DoRA) must run alone.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
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


def _dropout(drop: nn.Module, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """``drop(x)``, its mask drawn from ``gen`` (None: the global generator): the same mask, the same
    draws, as ``F.dropout`` makes from a global generator in ``gen``'s state."""
    if gen is None or x.device != gen.device or not (drop.training and isinstance(drop, nn.Dropout) and drop.p > 0):
        return drop(x)
    keep = 1.0 - drop.p
    noise = torch.empty_like(x).bernoulli_(keep, generator=gen)
    return x * noise.div_(keep)  # as ATen's dropout: mask / keep, then times the input


def _plain(module: nn.Module) -> bool:
    """No hook and no bias on this LoRA factor: its product may be computed from its weight alone."""
    return (not module._forward_hooks and not module._forward_pre_hooks  # pyright: ignore[reportPrivateUsage] - nn.Module's own hook registries
            and getattr(module, "bias", None) is None and type(module) is nn.Linear)


@dataclass
class _Pass:
    """What one routed pass shares between its layers: the segments and each one's dropout generator."""

    segments: list[Segment]
    generators: list[torch.Generator | None]


def _forward(layer: LoraLinear, plan: _Pass, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    segments = plan.segments
    rows = segments[-1].stop if segments else 0
    if x.dim() < 2 or x.shape[0] != rows:
        raise RuntimeError(f"routed LoRA layer got input {list(x.shape)} for {rows} routed rows")
    dtype = result.dtype
    deltas: list[torch.Tensor | None] = [None] * len(segments)
    # segments whose factors are plain weights, grouped by (rank, input shape): one bmm per group
    groups: dict[tuple[int, tuple[int, ...]], list[tuple[int, torch.Tensor]]] = {}
    for k, seg in enumerate(segments):
        if seg.adapter is None or seg.adapter not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[seg.adapter], layer.lora_B[seg.adapter]
        sub = x[seg.start:seg.stop]
        if x.dim() == 3 and seg.length < x.shape[1]:
            sub = sub[:, :seg.length]
        weight: torch.Tensor = lora_a.weight  # pyright: ignore[reportAssignmentType] - nn.Module attributes are typed Tensor | Module
        sub = layer._cast_input_dtype(sub, weight.dtype)  # pyright: ignore[reportPrivateUsage] - PEFT's own cast, as its forward does
        sub = _dropout(layer.lora_dropout[seg.adapter], sub, plan.generators[k])
        if _plain(lora_a) and _plain(lora_b):
            groups.setdefault((int(weight.shape[0]), tuple(sub.shape)), []).append((k, sub))
        else:  # hooks (a DP session's per-sample capture) see the module calls, on this segment's rows alone
            deltas[k] = lora_b(lora_a(sub)) * layer.scaling[seg.adapter]
    for members in groups.values():
        if len(members) == 1:
            (k, sub), = members
            adapter = segments[k].adapter
            assert adapter is not None
            a_w: torch.Tensor = layer.lora_A[adapter].weight  # pyright: ignore[reportAssignmentType]
            b_w: torch.Tensor = layer.lora_B[adapter].weight  # pyright: ignore[reportAssignmentType]
            deltas[k] = F.linear(F.linear(sub, a_w), b_w) * layer.scaling[adapter]
            continue
        names = [segments[k].adapter for k, _ in members]
        a_ws = torch.stack([layer.lora_A[n].weight for n in names])  # pyright: ignore[reportArgumentType, reportCallIssue] - [S, r, d]
        b_ws = torch.stack([layer.lora_B[n].weight for n in names])  # pyright: ignore[reportArgumentType, reportCallIssue] - [S, out, r]
        shape = members[0][1].shape
        xs = torch.stack([sub.reshape(-1, shape[-1]) for _, sub in members])  # [S, m, d]
        scales = torch.tensor([float(layer.scaling[n]) for n in names], dtype=xs.dtype, device=xs.device)
        out = torch.bmm(torch.bmm(xs, a_ws.transpose(1, 2)), b_ws.transpose(1, 2)) * scales.view(-1, 1, 1)
        for j, (k, _) in enumerate(members):
            deltas[k] = out[j].view(*shape[:-1], out.shape[-1])
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
    return (result + (full[0] if len(full) == 1 else torch.cat(full))).to(dtype)


@dataclass(frozen=True)
class _Walk:
    adapters: tuple[str, ...]
    layers: list[LoraLinear]
    modules: list[nn.Module]
    plain_train: bool  # no module overrides ``nn.Module.train``: setting ``training`` is all it does


_WALKS: weakref.WeakKeyDictionary[nn.Module, _Walk] = weakref.WeakKeyDictionary()


def _walk(model: nn.Module) -> _Walk:
    """The model's modules, walked once per set of adapters (PEFT makes new modules only when an adapter
    is added or deleted, and every adapter is in ``peft_config``)."""
    config = getattr(model, "peft_config", None)
    key = tuple(sorted(config)) if isinstance(config, dict) else None
    cached = _WALKS.get(model)
    if key is not None and cached is not None and cached.adapters == key:
        return cached
    modules = list(model.modules())
    walk = _Walk(key or (), [m for m in modules if type(m) is LoraLinear], modules,
                 all(type(m).train is nn.Module.train for m in modules))
    if key is not None:
        _WALKS[model] = walk
    return walk


def lora_linears(model: nn.Module) -> list[LoraLinear]:
    """The model's LoRA ``Linear`` layers (walked once per set of adapters)."""
    return _walk(model).layers


def set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``, over the cached module list when no module has its own ``train``."""
    walk = _walk(model)
    if not walk.plain_train:
        model.train(mode)
        return
    for m in walk.modules:
        m.training = mode


@contextlib.contextmanager
def routed(model: nn.Module, segments: Sequence[Segment]) -> Iterator[None]:
    """While open, the model's LoRA ``Linear`` layers route each segment's rows through its adapter.

    The caller holds the model for the duration (no other forward may run on it meanwhile). A segment's
    ``rng`` state is read once, its dropout masks all drawn from one generator in that state, and the
    state it ends in written back when the context closes.
    """
    layers = lora_linears(model)
    segs = list(segments)
    generators: list[torch.Generator | None] = []
    for seg in segs:
        if seg.rng is None or seg.rng.rng_state is None:
            generators.append(None)
            continue
        gen = torch.Generator()
        gen.set_state(seg.rng.rng_state)
        generators.append(gen)
    plan = _Pass(segs, generators)
    try:
        for layer in layers:
            vars(layer)["forward"] = functools.partial(_forward, layer, plan)  # an instance attribute, removed below
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
        for seg, gen in zip(segs, generators, strict=True):
            if gen is not None and seg.rng is not None:
                seg.rng.rng_state = gen.get_state()
