"""tensafe.rlvr rewards: each built-in against hand-written cases, the registry, bounds, and errors reported per
trajectory rather than failing the batch."""

from __future__ import annotations

import math

import pytest

from tensafe.rlvr import (
    Trajectory,
    TrajectoryBatch,
    available_rewards,
    combine,
    final_number,
    register_reward,
    resolve_reward,
)
from tensafe.rlvr import rewards as rw
from tg_tinker import ValidationError


def test_builtins_are_registered() -> None:
    assert {"keyword_contains", "exact_match", "regex_match", "numeric_answer", "json_schema_valid",
            "length_penalty"} <= set(available_rewards())


def test_keyword_contains() -> None:
    any_kw = resolve_reward("keyword_contains", keywords=["solution", "answer"])
    assert any_kw("p", "The ANSWER is 4") == 1.0 and any_kw("p", "no idea") == 0.0
    cs = resolve_reward("keyword_contains", keywords="Answer", case_sensitive=True)
    assert cs("p", "answer") == 0.0 and cs("p", "Answer") == 1.0
    every = resolve_reward("keyword_contains", keywords=["a1", "b2"], mode="all")
    assert every("p", "a1 b2") == 1.0 and every("p", "a1 only") == 0.0
    with pytest.raises(ValidationError) as e:
        resolve_reward("keyword_contains", keywords=[])
    assert e.value.field == "reward.kwargs.keywords"


def test_exact_match_from_kwargs_or_context() -> None:
    fixed = resolve_reward("exact_match", answer="Paris")
    assert fixed("q", "  Paris\n") == 1.0 and fixed("q", "paris") == 0.0
    from_ctx = resolve_reward("exact_match", case_sensitive=False)
    assert from_ctx("q", "PARIS", answer="paris") == 1.0
    with pytest.raises(ValueError, match="needs an answer"):
        from_ctx("q", "x")


def test_numeric_answer_takes_the_final_number() -> None:
    assert final_number("x = 3, so 2x = 6.") == 6.0
    assert final_number("total: 1,234.5 dollars") == 1234.5
    assert final_number("-2e-3") == -0.002 and final_number("none here") is None
    r = resolve_reward("numeric_answer", tolerance=0.01)
    assert r("q", "first 5 then 3.004", answer=3) == 1.0
    assert r("q", "3 then 5", answer=3) == 0.0           # the LAST number counts
    assert r("q", "no number", answer=3) == 0.0
    assert r("q", "42", answer="The answer is 42") == 1.0  # a context answer may be text
    rel = resolve_reward("numeric_answer", answer=1000.0, tolerance=0.01, relative=True)
    assert rel("q", "1009") == 1.0 and rel("q", "1011") == 0.0
    with pytest.raises(ValidationError) as e:
        resolve_reward("numeric_answer", tolerance=-1.0)
    assert e.value.field == "reward.kwargs.tolerance"


def test_regex_match_is_re2_bounded_and_linear() -> None:
    r = resolve_reward("regex_match", pattern=r"answer:\s*\d+")
    assert r("q", "so the answer: 42.") == 1.0 and r("q", "answer: none") == 0.0
    full = resolve_reward("regex_match", pattern=r"\d+", full_match=True)
    assert full("q", "123") == 1.0 and full("q", "123 apples") == 0.0
    assert resolve_reward("regex_match", pattern="yes", ignore_case=True)("q", "YES") == 1.0
    # The classic catastrophic pattern: a backtracking engine takes 2^n steps here; RE2 answers at once.
    evil = resolve_reward("regex_match", pattern=r"^(a+)+$")
    assert evil("q", "a" * 50_000 + "b") == 0.0
    for bad in (r"(a)\1", r"(?=x)y", "(", "x" * (rw.MAX_PATTERN_CHARS + 1), ""):
        with pytest.raises(ValidationError) as e:
            resolve_reward("regex_match", pattern=bad)
        assert e.value.field == "reward.kwargs.pattern"
    with pytest.raises(ValueError, match="more than"):
        r("q", "x" * (rw.MAX_INPUT_CHARS + 1))


def test_json_schema_valid() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = resolve_reward("json_schema_valid", schema=schema)
    assert r("q", 'Here: {"n": 3} done') == 1.0
    assert r("q", '{"n": "three"}') == 0.0 and r("q", "{not json}") == 0.0 and r("q", "no json") == 0.0
    strict = resolve_reward("json_schema_valid", schema=schema, extract=False)
    assert strict("q", 'Here: {"n": 3}') == 0.0 and strict("q", ' {"n": 3} ') == 1.0
    with pytest.raises(ValidationError) as e:
        resolve_reward("json_schema_valid", schema={"type": 12})
    assert e.value.field == "reward.kwargs.schema"


def test_length_penalty_and_combine() -> None:
    pen = resolve_reward("length_penalty", max_chars=10, coef=0.5)
    assert pen("q", "x" * 10) == 0.0 and pen("q", "x" * 20) == pytest.approx(-0.5)
    both = combine(resolve_reward("keyword_contains", keywords=["ok"]), (pen, 2.0))
    assert both("q", "ok") == 1.0 and both("q", "ok" + "x" * 18) == pytest.approx(1.0 - 1.0)


def test_registry_names_kwargs_and_custom_rewards() -> None:
    with pytest.raises(ValidationError) as e:
        resolve_reward("nope")
    assert e.value.field == "reward.name" and "keyword_contains" in str(e.value)
    with pytest.raises(ValidationError) as e:
        resolve_reward("keyword_contains", keywords=["a"], typo=1)
    assert e.value.field == "reward.kwargs.typo"
    with pytest.raises(ValidationError) as e:
        resolve_reward("length_penalty")
    assert e.value.field == "reward.kwargs"

    @register_reward("test_short_answer")
    def short(limit: int = 5):
        return lambda prompt, completion, **ctx: float(len(completion) <= limit)

    try:
        assert resolve_reward("test_short_answer", limit=3)("q", "abc") == 1.0
        with pytest.raises(ValidationError):
            register_reward("test_short_answer", short)  # taken
        with pytest.raises(ValidationError):
            register_reward("exact_match", short, replace=True)  # a built-in is never replaced
        with pytest.raises(ValidationError) as e:
            register_reward("Bad Name", short)
        assert e.value.field == "name"
    finally:
        rw._REWARDS.pop("test_short_answer", None)


def _traj(response: str, **ctx) -> Trajectory:
    return Trajectory(prompt="q", response=response, prompt_tokens=[1], response_tokens=[2], logprobs=[-1.0],
                      context=ctx)


def test_reward_errors_are_reported_per_trajectory() -> None:
    numeric = resolve_reward("numeric_answer")
    batch = TrajectoryBatch([_traj("7", answer=7), _traj("7"), _traj("8", answer="eight")])
    batch.score(numeric)
    assert [t.reward for t in batch] == [1.0, 0.0, 0.0]
    errors = dict(batch.reward_errors)
    assert set(errors) == {1, 2}
    assert "needs an answer" in errors[1] and "not a number" in errors[2]
    assert batch.mean_reward == pytest.approx(1 / 3)

    def bad(prompt, completion, **ctx):
        return {"nan": math.nan, "str": "1"}.get(completion, 1)

    b2 = TrajectoryBatch([_traj("nan"), _traj("str"), _traj("ok")]).score(bad, error_reward=-1.0)
    assert [t.reward for t in b2] == [-1.0, -1.0, 1.0]
    assert "not finite" in b2[0].reward_error and "must be a number" in b2[1].reward_error
    with pytest.raises(ValidationError) as e:
        TrajectoryBatch([_traj("x")]).rewards()
    assert e.value.field == "batch[0].reward"
