"""Tensors on the wire: dtype + shape + raw little-endian bytes (``tensafe.api.common.v1.Tensor``).

Used by the SDK and by the services alike, so that both sides agree byte for byte.
Accepts numpy arrays, torch tensors (without importing torch) and nested lists.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from tensafe.api.common.v1 import common_pb2

from .errors import ValidationError

_TO_NUMPY = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT8: np.dtype("i1"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
    common_pb2.DTYPE_BOOL: np.dtype("?"),
}
_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in _TO_NUMPY.items()}
# Bounds of a decoded shape: dimensions, the size of any one dimension, and the product of the
# dimensions counting a 0 as 1 (numpy refuses to make even an empty array whose other dimensions
# overflow). The element count is computed exactly (Python integers, no int64 wrap-around) and
# must match the bytes sent.
MAX_DIMS = 16
MAX_DIM = 2**31 - 1
MAX_EXTENT = 2**40


def as_numpy(value: Any, field: str = "tensor") -> NDArray[Any]:
    """A numpy view of a numpy array, a torch tensor (moved to CPU) or nested lists."""
    if isinstance(value, np.ndarray):
        return cast("NDArray[Any]", value)  # isinstance cannot recover the array's shape and dtype types
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise ValidationError(f"{field}: rows have different lengths ({exc})", field=field,
                              code="INVALID_ARGUMENT") from None
    if arr.dtype == object:
        raise ValidationError(f"{field}: rows have different lengths or mixed types", field=field,
                              code="INVALID_ARGUMENT")
    return arr


def to_proto(value: Any, field: str = "tensor", dtype: str | None = None) -> common_pb2.Tensor:
    """Encode ``value``; ``dtype`` ("int64", "float32", ...) converts first."""
    arr = as_numpy(value, field)
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype.kind in "iu" and (arr.dtype.kind, arr.dtype.itemsize) not in _BY_KIND:
        arr = arr.astype(np.int64)  # int16, uint16, uint32, uint64: widen to int64
    code = _BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValidationError(f"{field}: dtype {arr.dtype} is not supported on the wire", field=field,
                              code="INVALID_ARGUMENT")
    data = np.ascontiguousarray(arr, dtype=_TO_NUMPY[code]).tobytes()
    return common_pb2.Tensor(dtype=code, shape=list(arr.shape), data=data)


def from_proto(tensor: common_pb2.Tensor, field: str = "tensor") -> NDArray[Any]:
    """Decode, checking that the byte length matches dtype and shape; raises ValidationError naming ``field``."""
    if tensor.dtype not in _TO_NUMPY:
        raise ValidationError(f"{field}.dtype: unsupported or unset dtype {tensor.dtype}", field=f"{field}.dtype",
                              code="INVALID_ARGUMENT")
    np_dtype = _TO_NUMPY[tensor.dtype]
    if len(tensor.shape) > MAX_DIMS:
        raise ValidationError(f"{field}.shape: {len(tensor.shape)} dimensions, at most {MAX_DIMS} are accepted",
                              field=f"{field}.shape", code="INVALID_ARGUMENT")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValidationError(f"{field}.shape: negative dimension in {list(shape)}", field=f"{field}.shape",
                              code="INVALID_ARGUMENT")
    if any(d > MAX_DIM for d in shape):
        raise ValidationError(f"{field}.shape: a dimension exceeds {MAX_DIM}", field=f"{field}.shape",
                              code="INVALID_ARGUMENT")
    count, extent = 1, 1
    for d in shape:  # exact: no int64 wrap-around that could make a huge shape look like the bytes sent
        count *= d
        extent *= max(d, 1)
    if extent > MAX_EXTENT:
        raise ValidationError(f"{field}.shape: the dimensions {list(shape)} multiply to more than {MAX_EXTENT}",
                              field=f"{field}.shape", code="INVALID_ARGUMENT")
    expected = count * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise ValidationError(
            f"{field}.data: {len(tensor.data)} bytes, but shape {list(shape)} of {np_dtype.name} needs {expected}",
            field=f"{field}.data", code="INVALID_ARGUMENT")
    return np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="))
