"""Small conversions between Python values and protobuf well-known types, shared by the services."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp from seconds since the epoch (``time.time()``)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
