"""The loss registry: ``resolve_loss("ppo", clip_epsilon=0.1)`` finds a loss by name and checks its kwargs.

Every loss is a function ``fn(inputs: LossInputs, **kwargs) -> LossOutput`` registered with
:func:`register_loss`. Token positions follow the Hugging Face convention: ``labels`` are aligned
with ``input_ids`` and the logits at position ``t-1`` predict ``labels[:, t]``; positions whose label
is ``ignore_index`` contribute nothing. Operators add losses without touching this module through
the entry point group ``tensafe.losses`` (loaded on the first request for an unknown name); an
entry point can never replace a built-in loss. Client-defined losses never run here.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tensafe.runtime.errors import InvalidArgument

log = logging.getLogger("tensafe.trainer.losses")  # one logger for the whole package

ENTRY_POINT_GROUP = "tensafe.losses"
DEFAULT_LOSS = "token_ce"


@dataclass
class LossInputs:
    logits: torch.Tensor  # [B, T, V], the model output for input_ids (not shifted)
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] 0/1
    labels: torch.Tensor  # [B, T] int64, aligned with input_ids; ignored positions hold ignore_index
    advantages: torch.Tensor | None = None  # [B, T] float, aligned like token_logprobs
    old_logprobs: torch.Tensor | None = None  # [B, T] float, aligned like token_logprobs
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    num_tokens: int  # label tokens that contributed
    metrics: dict[str, float]  # always has "loss" and "num_tokens"
    token_logprobs: torch.Tensor  # [B, T] float32, detached; 0 at t=0 and ignored positions


class Loss(Protocol):
    name: str
    kwargs: dict[str, Any]

    def __call__(self, inputs: LossInputs) -> LossOutput: ...

    @property
    def per_example(self) -> bool: ...

    def check_batch(self, shapes: dict[str, tuple[int, ...]], batch_size: int, seq_len: int) -> None: ...


BatchCheck = Callable[[dict[str, tuple[int, ...]], int, int], None]


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., LossOutput]
    requires: tuple[tuple[str, str | None], ...]  # (field, "BT" | "B" | None = leading dim B)
    check: BatchCheck | None
    per_example: bool = False


_TOKEN_FIELDS = ("advantages", "old_logprobs")  # per-token batch inputs, [B, T]
_REGISTRY: dict[str, _Spec] = {}
_BUILTINS: frozenset[str] = frozenset()
_lock = threading.Lock()
_entry_points_loaded = False

# Value rules for kwarg names shared by the built-ins (and by any plugin that uses the same names).
_KWARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "label_smoothing": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "margin": (lambda v: v >= 0, "must be >= 0"),
    "temperature": (lambda v: v > 0, "must be > 0"),
    "clip_epsilon": (lambda v: v > 0, "must be > 0"),
    "reduction": (lambda v: v in ("mean", "sum"), "must be 'mean' or 'sum'"),
    "beta": (lambda v: isinstance(v, int | float) and v > 0, "must be a number > 0"),
    "clip_low_threshold": (lambda v: v >= 0, "must be >= 0"),
    "clip_high_threshold": (lambda v: v >= 0, "must be >= 0"),
    "entropy_coef": (lambda v: v >= 0, "must be >= 0"),
    "kl_coef": (lambda v: v >= 0, "must be >= 0"),
    "scale": (lambda v: v > 0, "must be > 0"),
}


def register_loss(name: str, *, requires: tuple[str, ...] = (), check: BatchCheck | None = None,
                  per_example: bool = False) -> Callable:
    """Decorator registering ``fn(inputs, **kwargs) -> LossOutput`` under ``name``.

    ``requires`` names batch inputs the loss needs: ``"advantages"``, ``"old_logprobs"`` (shape [B, T])
    or ``"extra.<key>"`` (leading dimension B), optionally with an exact shape after a colon:
    ``"extra.targets:B"``, ``"extra.mask:BT"``. ``check(shapes, batch_size, seq_len)`` may add checks.
    ``per_example=True`` declares that the loss of a batch is built from each row on its own (no row's
    term depends on another row), so the loss of one row alone is meaningful: only such losses are
    accepted in DP sessions, which clip each row's gradient. A name that is a built-in cannot be
    registered again (a warning is logged, the built-in stays).
    """

    def decorator(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _BUILTINS:
            log.warning("loss %r from %s ignored: %r is a built-in loss", name, _describe(fn), name)
            return fn
        parsed = tuple((r.partition(":")[0], r.partition(":")[2] or None) for r in requires)
        if any(set(d or "") - {"B", "T"} or not (f in _TOKEN_FIELDS or f.startswith("extra.")) for f, d in parsed):
            raise ValueError(f"loss {name!r}: bad requires {requires!r}; see register_loss")
        _REGISTRY[name] = _Spec(fn, parsed, check, per_example)
        try:
            fn._tensafe_requires = tuple(requires)  # type: ignore[attr-defined]  # kept when loaded as a plugin
            fn._tensafe_per_example = per_example  # type: ignore[attr-defined]
        except AttributeError:
            pass
        return fn

    return decorator


@dataclass
class ResolvedLoss:
    """A loss with validated kwargs (defaults filled in): what :func:`resolve_loss` returns."""

    name: str
    kwargs: dict[str, Any]
    _spec: _Spec = field(repr=False)

    @property
    def per_example(self) -> bool:
        """True when each row's loss stands alone (required by DP sessions)."""
        return self._spec.per_example

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self._spec.requires)

    def check_batch(self, shapes: dict[str, tuple[int, ...]], batch_size: int, seq_len: int) -> None:
        for fld, dims in self._spec.requires:
            if fld not in shapes:
                raise InvalidArgument(f"batch.{fld}", f"required by loss '{self.name}'")
            shape = tuple(shapes[fld])
            if dims is None and fld in _TOKEN_FIELDS:
                dims = "BT"
            want = tuple({"B": batch_size, "T": seq_len}[d] for d in dims) if dims else None
            if (want is not None and shape != want) or (want is None and shape[:1] != (batch_size,)):
                expected = (f"[{', '.join(dims)}] = {list(want)}" if want and dims
                            else f"a leading dimension of {batch_size}")
                raise InvalidArgument(f"batch.{fld}", f"loss '{self.name}' expects shape {expected}, got {list(shape)}")
        if self._spec.check is not None:
            self._spec.check(shapes, batch_size, seq_len)

    def __call__(self, inputs: LossInputs) -> LossOutput:
        shapes = {k: tuple(v.shape) for k in _TOKEN_FIELDS if (v := getattr(inputs, k)) is not None}
        shapes.update({f"extra.{k}": tuple(v.shape) for k, v in inputs.extra.items()})
        self.check_batch(shapes, *inputs.input_ids.shape[:2])
        out = self._spec.fn(inputs, **self.kwargs)
        if not isinstance(out, LossOutput) or out.loss.dim() != 0:
            raise TypeError(f"loss '{self.name}' must return a LossOutput with a scalar loss, got {type(out)!r}")
        out.metrics.setdefault("loss", float(out.loss.detach()))
        out.metrics.setdefault("num_tokens", float(out.num_tokens))
        return out


def available_losses() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def resolve_loss(name: str | None = None, /, **kwargs: Any) -> ResolvedLoss:
    """The loss ``name`` (``None`` or ``""`` -> ``token_ce``) bound to ``kwargs``, validated now."""
    name = name or DEFAULT_LOSS
    if not isinstance(name, str):
        raise InvalidArgument("loss.name", f"must be a string, got {type(name).__name__}")
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise InvalidArgument("loss.name", f"unknown loss {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    spec = _REGISTRY[name]
    return ResolvedLoss(name, _bind_kwargs(spec.fn, kwargs), spec)


def _bind_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # the first one takes LossInputs
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    bound: dict[str, Any] = {}
    for key, value in kwargs.items():
        p = named.get(key)
        if p is None and not open_ended:
            raise InvalidArgument(f"loss.kwargs.{key}", f"unknown argument; accepted: {', '.join(named) or 'none'}")
        bound[key] = _check_value(key, value, p.default if p is not None else None)
    for p in named.values():
        if p.name not in bound:
            if p.default is p.empty:
                raise InvalidArgument(f"loss.kwargs.{p.name}", "required")
            bound[p.name] = p.default
    return bound


def _check_value(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = True
    if not ok:
        kind = "a finite float" if isinstance(default, float) else f"of type {type(default).__name__}"
        raise InvalidArgument(f"loss.kwargs.{key}", f"must be {kind}, got {value!r}")
    rule = _KWARG_RULES.get(key)
    if rule is not None and not rule[0](value):
        raise InvalidArgument(f"loss.kwargs.{key}", f"{rule[1]}, got {value!r}")
    return value


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _load_entry_points() -> None:
    """Import the ``tensafe.losses`` entry points once; each loads a loss function (or registers one)."""
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _BUILTINS:
                log.warning("loss entry point %r (%s) ignored: %r is a built-in loss", ep.name, ep.value, ep.name)
                continue
            try:
                obj = ep.load()
            except Exception:  # one broken plugin must not take the others down
                log.exception("could not load loss entry point %r (%s)", ep.name, ep.value)
                continue
            if ep.name in _REGISTRY and _REGISTRY[ep.name].fn is obj:
                continue  # registered itself with @register_loss(ep.name)
            if not callable(obj):
                log.warning("loss entry point %r (%s) is not callable; ignored", ep.name, ep.value)
                continue
            register_loss(ep.name, requires=getattr(obj, "_tensafe_requires", ()),
                          per_example=getattr(obj, "_tensafe_per_example", False))(obj)


def seal_builtins() -> None:
    """Mark every loss registered so far as built-in: no plugin or later registration can replace it.
    Called once by the package, after importing :mod:`.builtin`."""
    global _BUILTINS
    _BUILTINS = frozenset(_REGISTRY)
