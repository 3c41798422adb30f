"""Small conversions between Python values and protobuf well-known types, shared by the services."""

from __future__ import annotations

from typing import TypeVar, cast

from google.protobuf import timestamp_pb2

E = TypeVar("E", bound=int)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp from seconds since the epoch (``time.time()``)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def enum_value(enum: type[E], value: int) -> E:
    """``value``, an int kept in a database or a plain-value field, as a value of the proto enum ``enum``
    (e.g. ``enum_value(common_pb2.AccountantType, row.accountant_type)``).

    Nothing is checked: proto3 enums are open (a value this code does not name is kept, never refused).
    This only tells the type checker which enum the int belongs to.
    """
    return cast(E, value)
