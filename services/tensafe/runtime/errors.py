"""Domain errors, and their one translation into ``google.rpc.Status``.

Service logic raises these plain exceptions; only :func:`to_rpc_status` knows
about gRPC. The reason strings are the names of ``tensafe.api.common.v1.ErrorReason``
without the ``ERROR_REASON_`` prefix (a test keeps the two in step), and the
SDK maps them back to its exception classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "tensafe.dev"

log = logging.getLogger("tensafe.errors")


class TensafeError(Exception):
    """Base of every domain error: a gRPC code, a reason and metadata for the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {k: str(v) for k, v in metadata.items() if v is not None}


class InvalidArgument(TensafeError):
    """A request field is wrong; ``field`` names it (dotted path)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(f"{field}: {message}", reason=reason, field=field, **metadata)
        self.field = field


class NotFound(TensafeError):
    """The resource does not exist for this tenant (another tenant's resource looks the same)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "RESOURCE_NOT_FOUND"

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} not found", resource_type=kind, resource_id=resource_id)


class AlreadyExists(TensafeError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(TensafeError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class DPBudgetExceeded(TensafeError):
    """The step would spend more privacy budget than the target epsilon allows (nothing was recorded)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "DP_BUDGET_EXCEEDED"


class IntegrityFailure(TensafeError):
    """Stored bytes or a stored key record failed authentication; the message names the artifact."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "INTEGRITY_ERROR"


class TenantShredded(TensafeError):
    """The tenant's keys were destroyed: its artifacts can no longer be decrypted."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TENANT_SHREDDED"


class Unauthenticated(TensafeError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class PermissionDenied(TensafeError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "TENANT_MISMATCH"


class RateLimited(TensafeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after_s=f"{retry_after:.3f}")
        self.retry_after = retry_after


class QuotaExceeded(TensafeError):
    """A per-tenant quota or a per-call work cap is reached; ``quota`` names its setting.

    RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED, metadata ``quota`` (e.g. ``TENSAFE_QUOTA_SESSIONS``),
    ``limit`` and, when known, ``current``. Unlike RATE_LIMITED, waiting does not help: something
    must be freed first (a session closed, an adapter unloaded) or the request made smaller.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, quota: str, message: str, *, limit: object = None, current: object = None,
                 reason: str | None = None, **metadata: object) -> None:
        super().__init__(f"{quota}: {message}", reason=reason, quota=quota, limit=limit, current=current,
                         **metadata)
        self.quota = quota


class DeadlineTooShort(TensafeError):
    """The call's deadline cannot fit its work, or ran out while a peer worked for it.

    DEADLINE_EXCEEDED, reason DEADLINE_TOO_SHORT, metadata ``hint`` (what to do) and, when known,
    ``needed_s`` and ``remaining_s``. Work already started goes on (an identical retry joins it).
    """

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_TOO_SHORT"

    def __init__(self, message: str, *, hint: str, needed_s: float | None = None,
                 remaining_s: float | None = None, reason: str | None = None, **metadata: object) -> None:
        super().__init__(f"{message}; {hint}", reason=reason, hint=hint,
                         needed_s=None if needed_s is None else f"{needed_s:.1f}",
                         remaining_s=None if remaining_s is None else f"{remaining_s:.1f}", **metadata)


class DependencyUnavailable(TensafeError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"


class NotImplementedYet(TensafeError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


def to_rpc_status(err: TensafeError, request_id: str | None = None) -> status_pb2.Status:
    """The single place where a domain error becomes a ``google.rpc.Status``."""
    metadata: dict[str, str] = dict(err.metadata)
    if request_id:
        metadata["request_id"] = request_id
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if isinstance(err, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(err, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)]
        )
        details.append(_pack(bad))
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=details)


def internal_status(exc: BaseException, request_id: str | None) -> status_pb2.Status:
    """An unexpected exception: logged with its traceback, answered without internals."""
    log.error("unhandled error (request %s)", request_id, exc_info=exc)
    metadata = {"request_id": request_id} if request_id else {}
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata=metadata)
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (request id {request_id})",
        details=[_pack(info)],
    )


def _pack(msg: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def call_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries; None when it carries none (or an inconsistent one)."""
    from grpc_status import rpc_status

    try:
        # types-grpcio-status leaves from_call() unannotated; what a call raises is also its grpc.Call.
        return cast("status_pb2.Status | None", rpc_status.from_call(cast("grpc.Call", err)))
    except ValueError:
        return None


def reason_metadata(status: status_pb2.Status) -> tuple[str | None, Mapping[str, str]]:
    """The ErrorInfo reason and metadata carried by a status, if any."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):  # False, and nothing read, for a detail of another type
            return info.reason, dict(info.metadata)
    return None, {}
