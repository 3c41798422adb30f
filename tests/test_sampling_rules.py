"""The one set of sampling-parameter rules (tg_tinker.sampling_rules) used by the SDK and the services."""

from __future__ import annotations

import doctest

import pytest

import tg_tinker.sampling_rules as rules
from tensafe.api.common.v1 import common_pb2
from tg_tinker.sampling_rules import SamplingParamError, check_sampling


def sp(**kw) -> common_pb2.SamplingParams:
    kw.setdefault("max_tokens", 8)
    return common_pb2.SamplingParams(**kw)


@pytest.mark.parametrize("params", [
    sp(), sp(temperature=0.0), sp(temperature=2.5), sp(top_p=1.0), sp(top_p=1e-6), sp(top_k=0), sp(top_k=50),
    sp(num_samples=0), sp(num_samples=64), sp(stop=[""] * 16), sp(stop=["x" * 256]), sp(seed=-5),
])
def test_in_range_passes(params: common_pb2.SamplingParams) -> None:
    check_sampling(params)


@pytest.mark.parametrize(("params", "field"), [
    (sp(max_tokens=0), "sampling.max_tokens"),
    (sp(max_tokens=-1), "sampling.max_tokens"),
    (sp(temperature=-0.1), "sampling.temperature"),
    (sp(temperature=float("nan")), "sampling.temperature"),
    (sp(temperature=float("inf")), "sampling.temperature"),
    (sp(top_p=0.0), "sampling.top_p"),
    (sp(top_p=1.0001), "sampling.top_p"),
    (sp(top_p=float("nan")), "sampling.top_p"),
    (sp(top_k=-1), "sampling.top_k"),
    (sp(num_samples=-1), "sampling.num_samples"),
    (sp(num_samples=65), "sampling.num_samples"),
    (sp(stop=["a"] * 17), "sampling.stop"),
    (sp(stop=["ok", "y" * 257]), "sampling.stop[1]"),
])
def test_out_of_range_names_the_field(params: common_pb2.SamplingParams, field: str) -> None:
    with pytest.raises(SamplingParamError) as err:
        check_sampling(params)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")
    assert isinstance(err.value, ValueError)


def test_field_prefix_follows_the_request() -> None:
    with pytest.raises(SamplingParamError) as err:
        check_sampling(sp(top_k=-3), field="params")
    assert err.value.field == "params.top_k"


def test_module_example_holds() -> None:
    failed, attempted = doctest.testmod(rules)
    assert attempted >= 3 and failed == 0
