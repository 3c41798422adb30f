"""Verifiable rewards: plain functions ``(prompt, completion, **context) -> float``, found by name.

>>> reward = resolve_reward("keyword_contains", keywords=["answer"])
>>> reward("Q?", "the answer is 4")
1.0

Built-ins: ``keyword_contains``, ``exact_match``, ``regex_match`` (RE2: linear time, bounded pattern and
input), ``numeric_answer`` (the completion's last number against an answer, within a tolerance),
``json_schema_valid`` (needs ``jsonschema``), ``length_penalty``; :func:`combine` adds several with
weights. :func:`register_reward` adds your own: a factory that takes keyword arguments and returns the
reward function. Values a reward needs per prompt (the reference answer) come as context:
``sampler.generate_trajectories(prompts, contexts=[{"answer": "4"}, ...])`` passes each prompt's dict
to the reward of its trajectories.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from tg_tinker.errors import TGTinkerError, ValidationError

from .trajectory import RewardFn

RewardFactory = Callable[..., RewardFn]

MAX_PATTERN_CHARS = 512      # regex_match: the longest pattern accepted
MAX_INPUT_CHARS = 100_000    # every built-in: a longer completion is an error for that trajectory
MAX_KEYWORDS = 256
MAX_SCHEMA_CHARS = 65_536

_REWARDS: dict[str, RewardFactory] = {}
_lock = threading.Lock()
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, field=field, code="INVALID_ARGUMENT")


def register_reward(name: str, factory: RewardFactory | None = None, *, replace: bool = False) -> Any:
    """Register ``factory(**kwargs) -> reward_fn`` under ``name`` (lower-case letters, digits, ``_``).

    Use as ``register_reward("mine", factory)`` or as a decorator ``@register_reward("mine")``. A name
    already registered (a built-in included) is refused unless ``replace=True``; built-ins are never replaced.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("name", f"a reward name is 1-64 lower-case letters, digits or '_', starting with a "
                               f"letter; got {name!r}")

    def add(f: RewardFactory) -> RewardFactory:
        if not callable(f):
            raise _invalid("factory", "must be callable")
        with _lock:
            if name in _REWARDS and (not replace or name in _BUILTINS):
                raise _invalid("name", f"reward {name!r} is already registered"
                                       + (" (a built-in)" if name in _BUILTINS else "; pass replace=True"))
            _REWARDS[name] = f
        return f

    return add(factory) if factory is not None else add


def available_rewards() -> list[str]:
    return sorted(_REWARDS)


def resolve_reward(name: str, **kwargs: Any) -> RewardFn:
    """The reward ``name`` built with ``kwargs`` (checked now: ValidationError naming ``reward.kwargs.<k>``)."""
    factory = _REWARDS.get(name) if isinstance(name, str) else None  # pyright: ignore[reportUnnecessaryIsInstance]
    if factory is None:
        raise _invalid("reward.name", f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                raise _invalid(f"reward.kwargs.{key}", f"unknown argument of reward {name!r}; accepted: "
                                                       f"{', '.join(params) or 'none'}")
    try:
        return factory(**kwargs)
    except TypeError as exc:  # a missing required argument
        raise _invalid("reward.kwargs", f"reward {name!r}: {exc}") from None


def combine(*parts: RewardFn | tuple[RewardFn, float]) -> RewardFn:
    """A reward that is the weighted sum of others: ``combine(correct, (resolve_reward("length_penalty",
    max_chars=200), 0.5))``. A bare function has weight 1."""
    if not parts:
        raise _invalid("parts", "combine needs at least one reward")
    weighted: list[tuple[RewardFn, float]] = []
    for i, part in enumerate(parts):
        pair = cast(tuple[Any, Any], part) if isinstance(part, tuple) else (part, 1.0)
        fn, weight = pair
        if not callable(fn) or isinstance(weight, bool) or not isinstance(weight, int | float) \
                or not math.isfinite(weight):
            raise _invalid(f"parts[{i}]", "a reward function, or (function, finite weight)")
        weighted.append((cast(RewardFn, fn), float(weight)))

    def combined(prompt: str, completion: str, **context: Any) -> float:
        return sum(w * float(fn(prompt, completion, **context)) for fn, w in weighted)

    return combined


def _check_input(completion: str) -> str:
    if not isinstance(completion, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"the completion must be a str, got {type(completion).__name__}")
    if len(completion) > MAX_INPUT_CHARS:
        raise ValueError(f"the completion has {len(completion)} characters, more than {MAX_INPUT_CHARS}")
    return completion


def _strings(value: Any, field: str, limit: int) -> list[str]:
    items: list[Any] = ([value] if isinstance(value, str)
                        else list(cast(Sequence[Any], value)) if isinstance(value, Sequence) else [])
    if not items or len(items) > limit or not all(isinstance(k, str) and k for k in items):
        raise _invalid(field, f"1 to {limit} non-empty strings")
    return [str(k) for k in items]


def _finite(value: Any, field: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(field, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise _invalid(field, f"must be >= {minimum}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------- built-ins


def keyword_contains(keywords: Sequence[str] | str, case_sensitive: bool = False, mode: str = "any") -> RewardFn:
    """1.0 when the completion contains any keyword (``mode="all"``: every keyword), else 0.0."""
    words = _strings(keywords, "reward.kwargs.keywords", MAX_KEYWORDS)
    if mode not in ("any", "all"):
        raise _invalid("reward.kwargs.mode", f"must be 'any' or 'all', got {mode!r}")
    if not case_sensitive:
        words = [w.casefold() for w in words]
    test = any if mode == "any" else all

    def reward(prompt: str, completion: str, **context: Any) -> float:
        text = _check_input(completion)
        text = text if case_sensitive else text.casefold()
        return 1.0 if test(w in text for w in words) else 0.0

    return reward


def exact_match(answer: str | None = None, strip: bool = True, case_sensitive: bool = True) -> RewardFn:
    """1.0 when the completion equals ``answer`` (or the trajectory's context ``answer``), else 0.0;
    surrounding whitespace is ignored with ``strip``."""
    if answer is not None and not isinstance(answer, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("reward.kwargs.answer", "must be a string")

    def norm(s: str) -> str:
        s = s.strip() if strip else s
        return s if case_sensitive else s.casefold()

    def reward(prompt: str, completion: str, **context: Any) -> float:
        expected = context.get("answer", answer)
        if not isinstance(expected, str):
            raise ValueError("exact_match needs an answer: reward kwarg `answer` or context 'answer' (a str)")
        return 1.0 if norm(_check_input(completion)) == norm(expected) else 0.0

    return reward


def regex_match(pattern: str, full_match: bool = False, ignore_case: bool = False) -> RewardFn:
    """1.0 when ``pattern`` matches the completion (anywhere; ``full_match``: all of it), else 0.0.

    The pattern runs on RE2 (``pip install google-re2``, the ``tg-tinker[rlvr]`` extra), whose matching time
    is linear in the input: no backreferences or lookaround, and no pattern can backtrack exponentially.
    At most MAX_PATTERN_CHARS characters of pattern; a completion over MAX_INPUT_CHARS is an error."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("reward.kwargs.pattern", f"a non-empty string of at most {MAX_PATTERN_CHARS} characters")
    try:
        import re2
    except ImportError:
        raise TGTinkerError("regex_match needs RE2 (linear-time matching): pip install 'tg-tinker[rlvr]' "
                            "(or google-re2)", code="CLIENT_ERROR") from None
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    options.max_mem = 8 << 20  # RE2's memory bound for the compiled program and its DFA cache
    try:
        compiled: Any = re2.compile(pattern, options)
    except Exception as exc:  # noqa: BLE001 - re2.error: the pattern is refused, naming why
        raise _invalid("reward.kwargs.pattern", f"not a pattern RE2 accepts: {exc}") from None
    match: Callable[[str], object] = compiled.fullmatch if full_match else compiled.search

    def reward(prompt: str, completion: str, **context: Any) -> float:
        return 1.0 if match(_check_input(completion)) is not None else 0.0

    return reward


# Fixed pattern (no tenant regex): runs of digits with optional sign, thousands commas, decimals, exponent.
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,234.5``, ``-3``, ``2e-3``), or None."""
    last = None
    for m in _NUMBER.finditer(text):
        last = m.group(0)
    if last is None:
        return None
    try:
        return float(last.replace(",", ""))
    except ValueError:
        return None


def numeric_answer(answer: float | None = None, tolerance: float = 1e-6, relative: bool = False) -> RewardFn:
    """1.0 when the completion's last number is within ``tolerance`` of ``answer`` (or of the context's
    ``answer``, a number or a numeric string), else 0.0 (also when it has no number). ``relative``: the
    tolerance is a fraction of |answer|."""
    if answer is not None:
        _finite(answer, "reward.kwargs.answer")
    tol = _finite(tolerance, "reward.kwargs.tolerance", minimum=0.0)

    def reward(prompt: str, completion: str, **context: Any) -> float:
        expected = context.get("answer", answer)
        if isinstance(expected, str):
            parsed = final_number(expected)
            if parsed is None:
                raise ValueError(f"the context answer {expected!r} is not a number")
            expected = parsed
        if isinstance(expected, bool) or not isinstance(expected, int | float):
            raise ValueError("numeric_answer needs an answer: reward kwarg `answer` or context 'answer'")
        got = final_number(_check_input(completion))
        if got is None:
            return 0.0
        bound = tol * abs(float(expected)) if relative else tol
        return 1.0 if abs(got - float(expected)) <= bound else 0.0

    return reward


def json_schema_valid(schema: dict[str, Any], extract: bool = True) -> RewardFn:
    """1.0 when the completion is JSON that ``schema`` (JSON Schema, checked now) accepts, else 0.0.

    ``extract``: the JSON is the completion from its first ``{`` or ``[`` to its last ``}`` or ``]``
    (models like to talk around it); otherwise the whole completion, stripped. Needs ``jsonschema``."""
    try:
        import jsonschema
        import jsonschema.validators
    except ImportError:
        raise TGTinkerError("json_schema_valid needs jsonschema: pip install 'tg-tinker[rlvr]' (or jsonschema)",
                            code="CLIENT_ERROR") from None
    if not isinstance(schema, dict) or len(json.dumps(schema)) > MAX_SCHEMA_CHARS:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("reward.kwargs.schema", f"a JSON Schema object of at most {MAX_SCHEMA_CHARS} characters")
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _invalid("reward.kwargs.schema", f"not a valid JSON Schema: {exc.message}") from None
    validator = cls(schema)

    def reward(prompt: str, completion: str, **context: Any) -> float:
        text = _check_input(completion).strip()
        if extract:
            starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
            end = max(text.rfind("}"), text.rfind("]"))
            if not starts or end < min(starts):
                return 0.0
            text = text[min(starts):end + 1]
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return 0.0
        return 1.0 if validator.is_valid(value) else 0.0

    return reward


def length_penalty(max_chars: int, coef: float = 1.0) -> RewardFn:
    """-coef x (characters beyond ``max_chars``) / ``max_chars``; 0 for a completion within the limit.
    Meant to be added to another reward with :func:`combine`."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("reward.kwargs.max_chars", f"must be a positive int, got {max_chars!r}")
    c = _finite(coef, "reward.kwargs.coef", minimum=0.0)

    def reward(prompt: str, completion: str, **context: Any) -> float:
        over = len(_check_input(completion)) - max_chars
        return -c * over / max_chars if over > 0 else 0.0

    return reward


for _name, _factory in (("keyword_contains", keyword_contains), ("exact_match", exact_match),
                        ("regex_match", regex_match), ("numeric_answer", numeric_answer),
                        ("json_schema_valid", json_schema_valid), ("length_penalty", length_penalty)):
    _REWARDS[_name] = _factory
_BUILTINS = frozenset(_REWARDS)
