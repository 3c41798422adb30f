"""What happens around every call, in this order (outermost first):

1. request id    -- taken from ``x-request-id`` or made; returned in trailing metadata and in errors
2. access log    -- one log line and Prometheus metrics per call (method, tenant, code, milliseconds)
3. errors        -- domain errors become ``google.rpc.Status`` + ``ErrorInfo`` (the only place)
4. authentication and tenant context -- the API key is verified locally; ``x-tenant-id``, if sent,
   must match the key's tenant; the caller is bound for the logic (``runtime.context``)
5. rate limit    -- a token bucket per tenant; then what ``runtime.capacity`` decided before the call
   ran: a stream past its quota is refused here, an internal call's service marker is verified
5b. ids          -- every ``*_id`` / ``*_ids`` field of the request is an id (``runtime.ids``), else
   INVALID_ARGUMENT naming it (audited, even on a read)
6. idempotency   -- a state-changing unary call with ``x-idempotency-key`` is applied once
7. audit         -- when the call ends, one ledger entry for every state-changing call, sensitive read
   and refused request, written to the service's durable outbox (``runtime.audit``)

Each stage is a small class below; :class:`CallPipeline` is the one gRPC interceptor
that runs them, so that the same order holds for unary and streaming calls alike.
Health checks and reflection pass without authentication.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from . import context as call_context
from .audit import AUDITED_READS, AuditOutbox, audit_digest, build_entry, outcome_for, resource_id
from .bootstrap import SYSTEM_TENANT
from .capacity import Admission
from .errors import (
    InvalidArgument,
    NotImplementedYet,
    PermissionDenied,
    RateLimited,
    TensafeError,
    Unauthenticated,
    internal_status,
    reason_metadata,
    to_rpc_status,
)
from .idempotency import TRANSIENT_CODES, IdempotencyStore, StoredOutcome, request_digest
from .identity import KeyVerifier
from .ids import EXEMPT_METHODS, check_request_ids, checked_stream
from .ratelimit import TokenBucketLimiter
from .rpc_types import Continuation, Handler, find_method, status_code, time_remaining
from .telemetry import DEADLINES, ERRORS, LATENCY, REQUESTS

log = logging.getLogger("tensafe.access")

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
NO_DEADLINE_S = 1e9


@dataclass(frozen=True)
class MethodInfo:
    path: str            # /tensafe.api.trainer.v1.TrainerService/CreateSession
    service: str         # trainer
    name: str            # CreateSession
    read_only: bool      # idempotency_level = NO_SIDE_EFFECTS in the proto
    output_class: type[Message] | None


@functools.cache
def method_info(path: str) -> MethodInfo:
    full_service, _, name = path.lstrip("/").rpartition("/")
    parts = full_service.split(".")
    short = parts[2] if len(parts) > 3 and parts[:2] == ["tensafe", "api"] else full_service
    desc = find_method(path)
    if desc is None:
        return MethodInfo(path, short, name, False, None)
    read_only = desc.GetOptions().idempotency_level == NO_SIDE_EFFECTS
    return MethodInfo(path, short, name, read_only, message_factory.GetMessageClass(desc.output_type))


@dataclass
class Call:
    info: MethodInfo
    context: grpc.ServicerContext
    metadata: Mapping[str, str]
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    tenant: str = "-"
    key_id: str = ""
    error_reason: str = ""
    admission: Admission | None = None  # when the capacity router saw the call
    edge_refused: bool = False   # refused by the pipeline's own checks (audited even on a read)
    audit_details: dict[str, str] = field(default_factory=dict[str, str])  # context.note_audit, once admitted


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _deadline(call: Call) -> float | None:
    """The incoming call's deadline on the monotonic clock (None: the caller set none), observed per method."""
    remaining = time_remaining(call.context)
    if remaining is None or remaining > NO_DEADLINE_S:  # grpc reports "none" as ~2**63 s
        return None
    DEADLINES.labels(call.info.service, call.info.name).observe(remaining)
    return time.monotonic() + remaining


# -- stages ---------------------------------------------------------------------------


class AccessLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def finish(self, call: Call) -> None:
        code = status_code(call.context) or grpc.StatusCode.OK
        elapsed = time.perf_counter() - call.started
        REQUESTS.labels(call.info.service, call.info.name, code.name).inc()
        LATENCY.labels(call.info.service, call.info.name).observe(elapsed)
        if code != grpc.StatusCode.OK:
            ERRORS.labels(call.info.service, call.info.name, code.name, call.error_reason or "-").inc()
        if self.enabled:
            log.info("%s tenant=%s code=%s ms=%.1f request_id=%s%s", call.info.path, call.tenant, code.name,
                     elapsed * 1000, call.request_id, f" reason={call.error_reason}" if call.error_reason else "")


class ErrorTranslation:
    """Turns whatever the call raised into a status on the wire (and never leaks internals)."""

    def status_for(self, call: Call, exc: BaseException) -> status_pb2.Status | None:
        if status_code(call.context) not in (None, grpc.StatusCode.OK) and not isinstance(exc, NotImplementedError):
            return None  # the handler already aborted with its own status
        if isinstance(exc, NotImplementedError):
            exc = NotImplementedYet(f"{call.info.path.lstrip('/')} is not implemented yet", method=call.info.name)
        if isinstance(exc, TensafeError):
            call.error_reason = exc.reason
            return to_rpc_status(exc, call.request_id)
        call.error_reason = "INTERNAL"
        return internal_status(exc, call.request_id)

    def abort(self, call: Call, exc: BaseException) -> None:
        status = self.status_for(call, exc)
        if status is None:
            raise exc
        call.context.abort_with_status(rpc_status.to_status(status))


class Authentication:
    def __init__(self, verifier: KeyVerifier) -> None:
        self.verifier = verifier

    def admit(self, call: Call) -> call_context.CallContext:
        auth = call.metadata.get("authorization", "")
        api_key = auth[7:].strip() if auth.lower().startswith("bearer ") else call.metadata.get("x-api-key", "")
        principal = self.verifier.verify(api_key)
        claimed = call.metadata.get("x-tenant-id")
        if claimed and claimed != principal.tenant_id:
            raise PermissionDenied(f"this API key belongs to another tenant than {claimed!r}",
                                   reason="TENANT_MISMATCH")
        call.tenant = principal.tenant_id
        call.key_id = principal.key_id
        return call_context.CallContext(principal, call.request_id, api_key, call.info.path)

    def verify_service_marker(self, marker: str) -> None:
        """An internal call's ``x-tensafe-service`` must be a valid key of the services themselves."""
        if self.verifier.verify(marker).tenant_id != SYSTEM_TENANT:
            raise Unauthenticated("x-tensafe-service is not the services' key", reason="API_KEY_INVALID")


class IdFormats:
    """Refuses a request whose ``*_id`` / ``*_ids`` fields are not ids, before any logic runs."""

    def check(self, call: Call, request: Any) -> Any:
        if call.info.path in EXEMPT_METHODS:
            return request
        if not hasattr(request, "DESCRIPTOR"):  # a client stream: each message is checked as it is read
            return self._stream(call, request)
        try:
            check_request_ids(request)
        except InvalidArgument:
            call.edge_refused = True
            raise
        return request

    @staticmethod
    def _stream(call: Call, requests: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from checked_stream(requests)
        except InvalidArgument:
            call.edge_refused = True
            raise


class RateLimit:
    def __init__(self, limiter: TokenBucketLimiter) -> None:
        self.limiter = limiter

    def admit(self, call: Call) -> None:
        wait = self.limiter.acquire(f"{call.tenant}/{call.info.service}")
        if wait > 0:
            raise RateLimited(f"rate limit for tenant {call.tenant!r} reached; retry in {wait:.2f}s", retry_after=wait)


class Idempotency:
    """Applies a state-changing unary call once per (tenant, method, x-idempotency-key)."""

    def __init__(self, stores: Mapping[str, IdempotencyStore]) -> None:
        self.stores = stores

    def run(self, call: Call, request: Any, proceed: Callable[[], Any]) -> Any:
        key = call.metadata.get("x-idempotency-key")
        store = self.stores.get(call.info.service)
        if not key or store is None or call.info.read_only or call.info.output_class is None:
            return proceed()
        if not hasattr(request, "SerializeToString"):  # client-streaming: the service dedupes itself
            return proceed()
        digest = request_digest(request.SerializeToString(deterministic=True))
        stored = store.claim(call.tenant, call.info.path, key, digest)
        if stored is not None:
            return self._replay(call, stored, call.info.output_class)
        try:
            response = proceed()
        except BaseException as exc:
            code = exc.code if isinstance(exc, TensafeError) else None
            if isinstance(exc, TensafeError) and code not in TRANSIENT_CODES:
                status = to_rpc_status(exc)
                store.complete(call.tenant, call.info.path, key, StoredOutcome(status.code, status.SerializeToString()))
            else:
                store.release(call.tenant, call.info.path, key)
            raise
        store.complete(call.tenant, call.info.path, key, StoredOutcome(0, response.SerializeToString()))
        return response

    def _replay(self, call: Call, stored: StoredOutcome, output_class: type[Message]) -> Message:
        call.context.set_trailing_metadata((("x-idempotent-replay", "true"), ("x-request-id", call.request_id)))
        if stored.status_code == 0:
            return output_class.FromString(stored.payload)
        status = status_pb2.Status.FromString(stored.payload)
        reason, _ = reason_metadata(status)
        call.error_reason = reason or ""
        call.context.abort_with_status(rpc_status.to_status(status))


class Auditing:
    """One ledger entry per state-changing call (and per sensitive read), whatever its outcome."""

    def __init__(self, outboxes: Mapping[str, AuditOutbox]) -> None:
        self.outboxes = outboxes

    def record(self, call: Call, request: Any, response: Any) -> None:
        outbox = self.outboxes.get(call.info.service)
        action = f"{call.info.service}.{call.info.name}"
        if outbox is None or call.info.service == "ledger":
            return
        if call.info.read_only and action not in AUDITED_READS and not call.edge_refused:
            return
        code = status_code(call.context) or grpc.StatusCode.OK
        try:
            outbox.record(build_entry(
                service=call.info.service, action=action, tenant_id="" if call.tenant == "-" else call.tenant,
                key_id=call.key_id, outcome=outcome_for(code, call.error_reason), request_id=call.request_id,
                resource=resource_id(response, request), digest=audit_digest(request),
                details={**call.audit_details, "code": code.name,
                         **({"reason": call.error_reason} if call.error_reason else {})}))
        except Exception:  # never fail the user's call because of the audit trail
            log.exception("could not record the audit entry of %s", call.request_id)


# -- the interceptor ---------------------------------------------------------------------


class CallPipeline(grpc.ServerInterceptor):
    def __init__(self, verifier: KeyVerifier, limiter: TokenBucketLimiter,
                 idempotency_stores: Mapping[str, IdempotencyStore], access_log: bool = True,
                 audit_outboxes: Mapping[str, AuditOutbox] | None = None) -> None:
        self.access_log = AccessLog(access_log)
        self.errors = ErrorTranslation()
        self.auth = Authentication(verifier)
        self.rate_limit = RateLimit(limiter)
        self.ids = IdFormats()
        self.idempotency = Idempotency(idempotency_stores)
        self.auditing = Auditing(audit_outboxes if audit_outboxes is not None else {})

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or path.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        info = method_info(path)
        admission: Admission | None = getattr(handler_call_details, "admission", None)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                functools.partial(self._unary, info, handler.unary_unary, admission),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._unary, info, handler.stream_unary, admission),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                functools.partial(self._streaming, info, handler.unary_stream, admission),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is None:  # a handler with no behavior: gRPC refuses it, nothing to wrap
            return handler
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._streaming, info, handler.stream_stream, admission),
            handler.request_deserializer, handler.response_serializer)

    def _begin(self, info: MethodInfo, context: grpc.ServicerContext, admission: Admission | None = None) -> Call:
        md = _metadata(context)
        request_id = md.get("x-request-id") or uuid.uuid4().hex
        if len(request_id) > 128:
            request_id = request_id[:128]
        return Call(info, context, md, request_id, admission=admission)

    def _admit(self, call: Call) -> call_context.Binding:
        ctx = self.auth.admit(call)
        call.audit_details = ctx.audit_details
        self.rate_limit.admit(call)
        if call.admission is not None and call.admission.service_marker:
            self.auth.verify_service_marker(call.admission.service_marker)
        if call.admission is not None and call.admission.refusal is not None:
            raise call.admission.refusal
        return call_context.bind(ctx, _deadline(call))

    def _unary(self, info: MethodInfo, behavior: Callable[[Any, grpc.ServicerContext], Any],
               admission: Admission | None, request: Any, context: grpc.ServicerContext) -> Any:
        call = self._begin(info, context, admission)
        response = None
        try:
            token = self._admit(call)
            try:
                request = self.ids.check(call, request)
                response = self.idempotency.run(call, request, lambda: behavior(request, context))
            finally:
                call_context.unbind(token)
            if not context.trailing_metadata():
                context.set_trailing_metadata((("x-request-id", call.request_id),))
            return response
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            self.errors.abort(call, exc)
        finally:
            self.access_log.finish(call)
            self.auditing.record(call, request, response)

    def _streaming(self, info: MethodInfo, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                   admission: Admission | None, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = self._begin(info, context, admission)
        try:
            token = self._admit(call)
            try:
                request = self.ids.check(call, request)
                # Admitted: the caller learns so at once (the SDK's training client waits for this).
                context.send_initial_metadata((("x-request-id", call.request_id),))
                yield from behavior(request, context)
            finally:
                call_context.unbind(token)
            if not context.trailing_metadata():
                context.set_trailing_metadata((("x-request-id", call.request_id),))
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001
            self.errors.abort(call, exc)
        finally:
            self.access_log.finish(call)
            self.auditing.record(call, request, None)

