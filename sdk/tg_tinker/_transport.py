"""Channels, credentials, retries and the one translation of gRPC errors into SDK exceptions."""

from __future__ import annotations

import importlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import errors
from .config import SERVICES, ClientConfig, Endpoint
from .services import GRPC_SERVICES as _GRPC_NAMES

_REASON_TO_ERROR: dict[str, type[errors.TGTinkerError]] = {
    "API_KEY_MISSING": errors.AuthenticationError,
    "API_KEY_INVALID": errors.AuthenticationError,
    "API_KEY_REVOKED": errors.AuthenticationError,
    "API_KEY_EXPIRED": errors.AuthenticationError,
    "TENANT_MISMATCH": errors.PermissionDeniedError,
    "PERMISSION_DENIED": errors.PermissionDeniedError,
    "RESOURCE_NOT_FOUND": errors.NotFoundError,
    "INVALID_ARGUMENT": errors.ValidationError,
    "INSECURE_PARAMETERS": errors.ValidationError,
    "SECRET_KEY_REFUSED": errors.ValidationError,
    "ALREADY_EXISTS": errors.ConflictError,
    "FAILED_PRECONDITION": errors.ConflictError,
    "RATE_LIMITED": errors.RateLimitedError,
    "QUOTA_EXCEEDED": errors.QuotaExceededError,
    "DP_BUDGET_EXCEEDED": errors.DPBudgetExceededError,
    "DP_BATCH_IMPLAUSIBLE": errors.ConflictError,
    "INTEGRITY_ERROR": errors.IntegrityError,
    "TENANT_SHREDDED": errors.ConflictError,
    "FUTURE_CANCELLED": errors.FutureCancelledError,
    "DEPENDENCY_UNAVAILABLE": errors.ServiceUnavailableError,
    "DEADLINE_TOO_SHORT": errors.DeadlineTooShortError,
    "NOT_IMPLEMENTED": errors.ServerError,
    "INTERNAL": errors.ServerError,
}

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.TGTinkerError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.ValidationError,
    grpc.StatusCode.OUT_OF_RANGE: errors.ValidationError,
    grpc.StatusCode.ALREADY_EXISTS: errors.ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ConflictError,
    grpc.StatusCode.ABORTED: errors.ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: errors.ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.ServiceUnavailableError,
    grpc.StatusCode.CANCELLED: errors.FutureCancelledError,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
}

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` the server attached to the error (its details), if any."""
    if not isinstance(err, grpc.Call):
        return None
    try:
        # types-grpcio-status leaves from_call's result unannotated: it is a Status or None.
        status = cast("status_pb2.Status | None", rpc_status.from_call(err))  # pyright: ignore[reportUnknownMemberType]
    except (ValueError, AttributeError):
        return None
    return status


def translate_error(err: grpc.RpcError) -> errors.TGTinkerError:
    """The single place where a gRPC error becomes an SDK exception."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() or "") if hasattr(err, "details") else str(err)
    reason: str | None = None
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    field: str | None = None
    status = _rich_status(err)
    if status is not None:
        message = status.message
        for detail in status.details:
            # Unpack is False when the detail is another message type.
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Unpack(bad) and bad.field_violations:
                field = bad.field_violations[0].field
    return make_error(code.name, reason, message, metadata, retry_after=retry_after, field=field)


def make_error(code_name: str, reason: str | None, message: str, metadata: dict[str, str], *,
               retry_after: float | None = None, field: str | None = None) -> errors.TGTinkerError:
    """An SDK exception from a status code name, a reason and its metadata (calls and futures alike)."""
    code = grpc.StatusCode[code_name] if code_name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    cls = _REASON_TO_ERROR.get(reason or "") or _CODE_TO_ERROR.get(code, errors.ServerError)
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        message = f"service unavailable: {message}"
    kwargs: dict[str, Any] = dict(code=reason or code.name, details=metadata,
                                  request_id=metadata.get("request_id"), grpc_code=code.name)
    if cls is errors.RateLimitedError:
        kwargs["retry_after"] = retry_after if retry_after is not None else float(metadata.get("retry_after_s", 1.0))
    if cls is errors.ValidationError:
        kwargs["field"] = field or metadata.get("field")
    return cls(message or code.name, **kwargs)


def is_read_only(service: str, method: str) -> bool:
    """Whether the proto marks the method ``NO_SIDE_EFFECTS`` (safe to retry without a key)."""
    full = f"tensafe.api.{service}.v1.{_GRPC_NAMES[service]}"
    desc = descriptor_pool.Default().FindServiceByName(full).FindMethodByName(method)
    return desc.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS


class Transport:
    """One channel per distinct endpoint; stubs per service; metadata and retries on every call."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._channels: dict[Endpoint, grpc.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self._closed = False

    # -- channels and stubs ----------------------------------------------------------
    def channel(self, service: str) -> grpc.Channel:
        endpoint = self.config.endpoint(service)
        with self._lock:
            if self._closed:
                raise errors.TGTinkerError("this ServiceClient is closed", code="CLIENT_CLOSED")
            if endpoint not in self._channels:
                options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                           ("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 0)]
                if endpoint.tls:
                    self._channels[endpoint] = grpc.secure_channel(endpoint.target, self._credentials(), options)
                else:
                    self._channels[endpoint] = grpc.insecure_channel(endpoint.target, options)
            return self._channels[endpoint]

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as fh:
                return fh.read()

        cfg = self.config
        if bool(cfg.client_cert_file) != bool(cfg.client_key_file):
            raise errors.ValidationError("TS_CLIENT_CERT_FILE and TS_CLIENT_KEY_FILE must be set together",
                                         field="client_cert_file", code="INVALID_ARGUMENT")
        return grpc.ssl_channel_credentials(root_certificates=read(cfg.ca_file),
                                            private_key=read(cfg.client_key_file),
                                            certificate_chain=read(cfg.client_cert_file))

    def stub(self, service: str) -> Any:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}")
        if service not in self._stubs:
            module = importlib.import_module(f"tensafe.api.{service}.v1.{service}_pb2_grpc")
            self._stubs[service] = getattr(module, f"{_GRPC_NAMES[service]}Stub")(self.channel(service))
        return self._stubs[service]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()

    # -- calls -------------------------------------------------------------------------
    def metadata(self, idempotency_key: str | None = None) -> list[tuple[str, str]]:
        md = [("x-request-id", uuid.uuid4().hex)]
        if self.config.api_key:
            md.append(("authorization", f"Bearer {self.config.api_key}"))
        if self.config.tenant_id:
            md.append(("x-tenant-id", self.config.tenant_id))
        if idempotency_key:
            md.append(("x-idempotency-key", idempotency_key))
        return md

    def unary(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call a unary method. Reads are retried; writes are retried with one idempotency key."""
        key = None if is_read_only(service, method) else uuid.uuid4().hex
        rpc = getattr(self.stub(service), method)
        return self._with_retries(lambda: rpc(request, timeout=timeout or self.config.timeout,
                                              metadata=self.metadata(key)))

    def client_stream(self, service: str, method: str, requests: Callable[[], Iterator[Any]], *,
                      timeout: float | None = None, retry: bool = True) -> Any:
        """Call a client-streaming method; ``requests`` is called again for each attempt."""
        key = uuid.uuid4().hex
        rpc = getattr(self.stub(service), method)

        def attempt() -> Any:
            return rpc(requests(), timeout=timeout or self.config.timeout, metadata=self.metadata(key))

        if not retry:
            try:
                return attempt()
            except grpc.RpcError as err:
                raise translate_error(err) from None
        return self._with_retries(attempt)

    def server_stream(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Iterate a server-streaming method; errors surface as SDK exceptions while iterating."""
        rpc = getattr(self.stub(service), method)
        call = rpc(request, timeout=timeout, metadata=self.metadata(None))
        try:
            yield from call
        except grpc.RpcError as err:
            raise translate_error(err) from None
        finally:
            call.cancel()

    def _with_retries(self, attempt: Callable[[], Any]) -> Any:
        retry = self.config.retry
        backoff = retry.initial_backoff
        for n in range(retry.count + 1):
            try:
                return attempt()
            except grpc.RpcError as err:
                error = translate_error(err)
                if err.code() not in _RETRYABLE or n == retry.count or isinstance(error, errors.QuotaExceededError):
                    raise error from None
                delay = backoff * random.uniform(0.5, 1.0)
                if isinstance(error, errors.RateLimitedError):
                    delay = max(delay, error.retry_after)
                time.sleep(min(delay, retry.max_backoff))
                backoff = min(backoff * retry.multiplier, retry.max_backoff)
        raise AssertionError("unreachable")
