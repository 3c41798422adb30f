"""Type names for the gRPC plumbing of ``runtime`` (interceptors see every method, whatever its messages)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor

# A method handler of any method: request and response messages differ per method, and the interceptors
# only pass them through. (Quoted: grpc's classes are generic in types-grpcio only, not at run time.)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What a server interceptor is given to reach the next interceptor (or the servicer).
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


class _ReportsCode(Protocol):
    def code(self) -> grpc.StatusCode | None: ...


def status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status the handler set on ``context`` so far (None: none yet).

    ``ServicerContext.code()`` exists since grpcio 1.38 but is missing from types-grpcio.
    """
    return cast("_ReportsCode", context).code()


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the caller set none (grpc's documented
    ``RpcContext.time_remaining()``; types-grpcio types it as float)."""
    remaining: float | None = context.time_remaining()
    return remaining


def find_method(path: str) -> MethodDescriptor | None:
    """The descriptor of ``/package.Service/Method`` in the default pool; None when it is not there."""
    full_service, _, name = path.lstrip("/").rpartition("/")
    try:  # the upb backend raises KeyError, the pure-Python one returns None
        return descriptor_pool.Default().FindServiceByName(full_service).FindMethodByName(name)
    except KeyError:
        return None
