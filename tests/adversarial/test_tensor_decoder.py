"""The tensor decoder and batch preparation only ever raise InvalidArgument, whatever a tenant sends
(fuzzed dtypes and shapes; an int64 overflow of the element count included) (issue 13, item 13)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.errors import InvalidArgument
from tensafe.trainer.batches import prepare_batch
from tensafe.trainer.servicer import batch_value
from tg_tinker.errors import ValidationError as SDKValidationError
from tg_tinker.tensors import from_proto

FUZZ = settings(max_examples=int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


DTYPES = list(common_pb2.Dtype.values()) + [99]


@st.composite
def tensors(draw: st.DrawFn) -> common_pb2.Tensor:
    dims = st.one_of(st.integers(-3, 6), st.integers(-2**63, 2**63 - 1),
                     st.sampled_from([0, 2**30, 2**31 - 1, 2**31, 2**32, 2**33, 2**62, 2**63 - 1, -2**63]))
    shape = draw(st.lists(dims, max_size=20))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):  # bytes that fit a small shape exactly (or an overflowing product's wrap)
        data = draw(st.binary(max_size=64))
    else:
        n = draw(st.integers(0, 48))
        data = bytes(n)
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


WRAPS = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[2**32, 2**32])  # 2**64 elements: 0 in int64
EMPTY_BUT_HUGE = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[0, 2**30, 2**30])


@FUZZ
@given(tensors())
@example(WRAPS)
@example(EMPTY_BUT_HUGE)
def test_the_tensor_decoder_only_raises_validation_errors(tensor: common_pb2.Tensor) -> None:
    try:
        arr = from_proto(tensor, "t")
    except SDKValidationError as exc:
        assert exc.code == "INVALID_ARGUMENT" and exc.field.startswith("t.")
        return
    assert arr.shape == tuple(tensor.shape) and arr.nbytes == len(tensor.data)


@FUZZ
@given(tensors(), st.sampled_from(["input_ids", "attention_mask", "labels", "advantages", "extra"]))
@example(WRAPS, "attention_mask")
@example(WRAPS, "extra")
@example(EMPTY_BUT_HUGE, "labels")
def test_prepare_batch_only_raises_invalid_argument(tensor: common_pb2.Tensor, where: str) -> None:
    batch = trainer_pb2.Batch()
    batch.input_ids.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[1, 4],
                                               data=np.array([[1, 2, 3, 4]], "<i8").tobytes()))
    if where == "extra":
        batch.extra["x"].CopyFrom(tensor)
    else:
        getattr(batch, where).CopyFrom(tensor)
    try:
        prepare_batch(batch_value(batch), vocab_size=384, max_length=256)
    except InvalidArgument as exc:
        assert exc.field.startswith("batch.")


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**31, 2**31, 4], [2**62, 4], [-1, 4], [1] * 17, [3, -2**63]])
def test_overflowing_or_negative_shapes_are_invalid_argument(shape: list[int]) -> None:
    """Attack: [2**32, 2**32] has 2**64 elements, 0 in int64: the byte check passed and reshape failed (INTERNAL)."""
    with pytest.raises(SDKValidationError) as err:
        from_proto(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=shape, data=b""), "batch.input_ids")
    assert err.value.field in ("batch.input_ids.shape", "batch.input_ids.data")
