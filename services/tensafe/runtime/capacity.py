"""Which threads a call runs on, decided before it runs, so that no tenant can starve the others.

gRPC's synchronous server gives every call a thread for as long as the call lasts, and a
streaming call (``WatchFutures``, ``Generate``, the vault's uploads and downloads) may last
for hours. With one shared pool, a tenant holding as many idle streams as the pool has
threads stopped every call of every tenant. So a server has three pools:

- **calls** (``TENSAFE_WORKERS`` threads): unary calls of tenants, at most
  ``TENSAFE_QUOTA_CALLS_PER_TENANT`` at once per tenant. A thread is held from the moment a call
  arrives, before its request is even read (a client may send a unary call's headers and never
  its body), so without this bound one tenant could hold every thread. Past it the call is
  refused with RESOURCE_EXHAUSTED, reason RATE_LIMITED (waiting helps: calls finish), naming
  the setting;
- **streams** (``TENSAFE_MAX_STREAMS`` threads): streaming calls of tenants, each admitted only
  while its tenant has fewer than ``TENSAFE_QUOTA_STREAMS_PER_TENANT`` open and the server
  fewer than ``TENSAFE_MAX_STREAMS``; past either, the call is refused at once with
  RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED, naming that setting. An admitted stream always
  finds a free thread, and its slot is freed when its thread is (see :class:`_SlotPool`);
- **internal** (``TENSAFE_INTERNAL_WORKERS`` threads): calls between TenSafe's own services;
- **refusals** (a few threads): where a call refused here runs, and every call without a valid
  key (the pipeline refuses it as UNAUTHENTICATED). Such a call is handed to gRPC as one that
  streams its request, which gRPC does not read before the handler runs, and the handler ends
  before reading it: a refusal takes microseconds, however slowly its client sends, so neither
  callers without a key nor refused ones can hold a thread.

An internal call still acts as the tenant (it carries the tenant's own API key, which alone
decides what the call may do); it also carries ``x-tensafe-service``, the services' own key
(tenant ``tensafe-system``), which only the services hold. That marker grants no privilege:
it only selects the internal pool, so that a trainer's call to the vault or the accountant on
a tenant's behalf is never queued behind other tenants' calls. Internal calls go one hop deep
(the vault, accountant and ledger call no other service while serving), so a bounded internal
pool cannot deadlock.

The decision is made in gRPC's dispatch thread (:class:`CapacityRouter`, the outermost
interceptor) from the key's signed claims alone, with no database read; the call is then
authenticated in full by the pipeline, which also turns a refusal into the error the caller
sees (logged and audited like any refused call).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Generic, ParamSpec, Protocol, TypeVar

import grpc

from .bootstrap import SYSTEM_TENANT
from .errors import QuotaExceeded, RateLimited
from .identity import KeyVerifier
from .rpc_types import Continuation, Handler, find_method

log = logging.getLogger("tensafe.capacity")

SERVICE_MARKER = "x-tensafe-service"
UNROUTED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REFUSAL_THREADS = 4

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Out = TypeVar("_Out")


@dataclass
class Admission:
    """What the router decided for one call; the pipeline reads it (``handler_call_details.admission``)."""

    pool: str                              # "calls", "streams", "internal" or "refusals"
    refusal: QuotaExceeded | RateLimited | None = None  # raised by the pipeline after authentication
    service_marker: str = ""               # verified in full by the pipeline for internal calls


class StreamSlots:
    """Counts open streams per tenant and in all; ``acquire`` admits or names the quota it would pass."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant = per_tenant
        self.total = total
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    def acquire(self, tenant: str) -> Callable[[], None] | QuotaExceeded:
        """A release function for the slot taken, or the refusal."""
        with self._lock:
            mine = self._open.get(tenant, 0)
            if mine >= self.per_tenant:
                return QuotaExceeded(
                    "TENSAFE_QUOTA_STREAMS_PER_TENANT",
                    f"tenant {tenant!r} already has {mine} streams open (limit {self.per_tenant}); close a "
                    "training client or finish a download first", limit=self.per_tenant, current=mine)
            if self._count >= self.total:
                return QuotaExceeded(
                    "TENSAFE_MAX_STREAMS", f"this server already serves {self._count} streams (limit "
                    f"{self.total}); retry later", limit=self.total, current=self._count)
            self._open[tenant] = mine + 1
            self._count += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._count -= 1
                left = self._open[tenant] - 1
                if left:
                    self._open[tenant] = left
                else:
                    del self._open[tenant]

        return release

    def open_streams(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._count if tenant is None else self._open.get(tenant, 0)


class _Slots(Protocol):
    """:class:`StreamSlots` or :class:`CallSlots`."""

    def acquire(self, tenant: str) -> Callable[[], None] | QuotaExceeded | RateLimited: ...


class CallSlots:
    """Counts unary calls in flight per tenant."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str) -> Callable[[], None] | RateLimited:
        with self._lock:
            mine = self._open.get(tenant, 0)
            if mine >= self.per_tenant:
                return RateLimited(f"TENSAFE_QUOTA_CALLS_PER_TENANT: tenant {tenant!r} has {mine} calls in flight "
                                   f"already (limit {self.per_tenant}); retry when one has finished", retry_after=0.1)
            self._open[tenant] = mine + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open[tenant] - 1
                if left:
                    self._open[tenant] = left
                else:
                    del self._open[tenant]

        return release

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._open.get(tenant, 0)


class _SlotPool(futures.ThreadPoolExecutor):
    """One call's view of the streams pool: runs the call there and frees its slot when its thread is free.

    gRPC takes the pool of a call from its handler's ``experimental_thread_pool`` and submits the whole
    call (request read, handler, every response) as one task, so the task's end is exactly when the
    thread is free again, whether the handler ran, failed, was cancelled or never started (a client that
    hangs up before sending its request). No thread of its own is ever started.
    """

    def __init__(self, pool: futures.ThreadPoolExecutor, release: Callable[[], None]) -> None:
        # Deliberately not calling ThreadPoolExecutor.__init__: this object only forwards to ``pool``.
        self._target = pool
        self._release = release

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> futures.Future[_T]:
        try:
            fut = self._target.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class _Details(grpc.HandlerCallDetails):
    """The call's details as gRPC gave them, plus the router's :class:`Admission`."""

    def __init__(self, details: grpc.HandlerCallDetails, admission: Admission) -> None:
        self.method = details.method
        self.invocation_metadata = details.invocation_metadata
        self.admission = admission


def _api_key(metadata: dict[str, str]) -> str:
    auth = metadata.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else metadata.get("x-api-key", "")


class _RunOn(Generic[_Req, _Resp]):
    """A call's behavior, run on ``pool``: gRPC runs a call on its behavior's ``experimental_thread_pool``."""

    def __init__(self, behavior: Callable[[_Req, grpc.ServicerContext], _Resp],
                 pool: futures.ThreadPoolExecutor) -> None:
        self._behavior = behavior
        self.experimental_thread_pool = pool

    def __call__(self, request: _Req, context: grpc.ServicerContext) -> _Resp:
        return self._behavior(request, context)


def _with_pool(handler: Handler, pool: futures.ThreadPoolExecutor) -> Handler:
    """The same handler, run on ``pool``."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_RunOn(handler.unary_unary, pool), deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_RunOn(handler.unary_stream, pool), deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_RunOn(handler.stream_unary, pool), deserializer, serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_RunOn(handler.stream_stream, pool), deserializer, serializer)
    return handler


def _unread(handler: Handler) -> Handler:
    """The same handler, declared to gRPC as streaming its request, so that gRPC does not wait for the
    request before running it. Only for a call the pipeline refuses before it looks at the request."""
    if handler.unary_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.unary_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.stream_stream_rpc_method_handler(handler.unary_stream, handler.request_deserializer,
                                                     handler.response_serializer)
    return handler


@functools.cache
def _is_streaming(path: str) -> bool | None:
    """Whether the method streams requests or responses; None when its proto is not known here."""
    method = find_method(path)
    if method is None:
        return None
    return bool(method.client_streaming or method.server_streaming)


class CapacityRouter(grpc.ServerInterceptor):
    """The outermost interceptor: assigns each call its pool (and a stream its slot) before it runs."""

    def __init__(self, verifier: KeyVerifier, *, workers: int, max_streams: int, streams_per_tenant: int,
                 internal_workers: int, calls_per_tenant: int | None = None) -> None:
        self.verifier = verifier
        self.slots = StreamSlots(streams_per_tenant, max_streams)
        self.call_slots = CallSlots(calls_per_tenant or workers)
        self.refusals = futures.ThreadPoolExecutor(max_workers=REFUSAL_THREADS, thread_name_prefix="tensafe-refusal")
        self.calls = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tensafe-rpc")
        self.streams = futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="tensafe-stream")
        self.internal = futures.ThreadPoolExecutor(max_workers=internal_workers,
                                                   thread_name_prefix="tensafe-internal")

    def shutdown(self) -> None:
        for pool in (self.streams, self.internal, self.refusals):
            pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        path = handler_call_details.method or ""
        if path.startswith(UNROUTED_PREFIXES):
            return continuation(handler_call_details)
        metadata = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())
                    if isinstance(v, str)}
        marker = metadata.get(SERVICE_MARKER, "")
        if marker:
            service = self.verifier.claims(marker)
            if service is not None and service.tenant_id == SYSTEM_TENANT:
                handler = continuation(_Details(handler_call_details, Admission("internal", service_marker=marker)))
                return None if handler is None else _with_pool(handler, self.internal)
        streaming = _is_streaming(path)
        if streaming is None:  # not in the descriptor pool (a generic handler): ask the handler itself
            probe = continuation(handler_call_details)
            streaming = probe is not None and probe.unary_unary is None
        caller = self.verifier.claims(_api_key(metadata))
        if caller is None:  # the pipeline refuses it (UNAUTHENTICATED) without reading its request
            handler = continuation(_Details(handler_call_details, Admission("refusals")))
            return None if handler is None else _with_pool(_unread(handler), self.refusals)
        if not streaming:
            return self._admit(continuation, handler_call_details, path, self.call_slots, caller.tenant_id,
                               self.calls, "calls")
        return self._admit(continuation, handler_call_details, path, self.slots, caller.tenant_id, self.streams,
                           "streams")

    def _admit(self, continuation: Continuation, details: grpc.HandlerCallDetails, path: str, slots: _Slots,
               tenant: str, pool: futures.ThreadPoolExecutor, name: str) -> Handler | None:
        taken = slots.acquire(tenant)
        if not callable(taken):
            log.info("call %s of tenant %s refused: %s", path, tenant, taken.message)
            handler = continuation(_Details(details, Admission("refusals", refusal=taken)))
            return None if handler is None else _with_pool(_unread(handler), self.refusals)
        try:
            handler = continuation(_Details(details, Admission(name)))
        except BaseException:
            taken()
            raise
        if handler is None:
            taken()
            return None
        return _with_pool(handler, _SlotPool(pool, taken))


class _ServiceMarker(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``x-tensafe-service`` (the services' own key) to every call a service makes to a peer."""

    def __init__(self, service_key: Callable[[], str]) -> None:
        self._service_key = service_key
        self._key = ""

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if not self._key:
            self._key = self._service_key()
        if not self._key:
            return details
        metadata = (*(details.metadata or ()), (SERVICE_MARKER, self._key))
        return _ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                  getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, _Req], _Out],
                              client_call_details: grpc.ClientCallDetails, request: _Req) -> _Out:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[[grpc.ClientCallDetails, _Req], _Out],
                               client_call_details: grpc.ClientCallDetails, request: _Req) -> _Out:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[[grpc.ClientCallDetails, _Req], _Out],
                               client_call_details: grpc.ClientCallDetails, request_iterator: _Req) -> _Out:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[[grpc.ClientCallDetails, _Req], _Out],
                                client_call_details: grpc.ClientCallDetails, request_iterator: _Req) -> _Out:
        return continuation(self._details(client_call_details), request_iterator)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: tuple[tuple[str, str | bytes], ...] | None,
                 credentials: grpc.CallCredentials | None, wait_for_ready: bool | None,
                 compression: grpc.Compression | None) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def marked_channel(channel: grpc.Channel, service_key: Callable[[], str]) -> grpc.Channel:
    """``channel`` with every call marked as a call between services (see the module's docstring)."""
    return grpc.intercept_channel(channel, _ServiceMarker(service_key))
