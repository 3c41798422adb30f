"""Exceptions raised by the SDK. Every one derives from :class:`TGTinkerError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TGTinkerError(Exception):
    """Base of every SDK error.

    ``code`` is the server's reason (for example ``DP_BUDGET_EXCEEDED``) or, when the
    server gave none, the gRPC status name; ``details`` carries the reason's metadata;
    ``request_id`` identifies the call in the server's logs and audit ledger.
    """

    def __init__(self, message: str, *, code: str = "UNKNOWN", details: Mapping[str, Any] | None = None,
                 request_id: str | None = None, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = dict(details or {})
        self.request_id = request_id
        self.grpc_code = grpc_code or code

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"[{self.code}] {self.message}{suffix}"


class AuthenticationError(TGTinkerError):
    """The API key is missing, malformed, unknown or revoked."""


class PermissionDeniedError(TGTinkerError):
    """The key is valid but may not do this (for example ``TS_TENANT_ID`` names another tenant)."""


class NotFoundError(TGTinkerError):
    """The resource does not exist for your tenant."""


class ValidationError(TGTinkerError):
    """A value is invalid; ``field`` names it. Raised by the SDK before a call or by the server."""

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field or self.details.get("field")


class ConflictError(TGTinkerError):
    """The request conflicts with the resource's state (already exists, or a precondition failed)."""


class RateLimitedError(TGTinkerError):
    """Too many requests for your tenant; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class QuotaExceededError(TGTinkerError):
    """A per-tenant quota or a per-call work cap is reached; ``quota`` names it (e.g.
    ``TENSAFE_QUOTA_SESSIONS``). Not retried: free something (close a session, unload an
    adapter) or make the request smaller."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.quota = self.details.get("quota")
        self.limit = self.details.get("limit")


class DPBudgetExceededError(TGTinkerError):
    """The next step would spend more privacy budget than ``target_epsilon`` allows."""


class FutureTimeoutError(TGTinkerError):
    """``FutureHandle.result(timeout)`` ran out of time; the operation may still complete."""


class FutureCancelledError(TGTinkerError):
    """The operation was cancelled before it ran."""


class IntegrityError(TGTinkerError):
    """Stored or transferred data failed an integrity check (tampering or corruption)."""


class ServiceUnavailableError(TGTinkerError):
    """The service could not be reached or timed out; safe calls were retried first."""


class DeadlineTooShortError(ServiceUnavailableError):
    """The call's timeout cannot fit the work it asks for (the server said so at once, or a service it
    called ran out of the time left). ``hint`` says what to do (e.g. raise the timeout, or pass
    ``noise_multiplier``); ``needed_s``, when known, is the server's estimate. Work already started goes
    on: the same request again joins it or reads its result."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.hint = self.details.get("hint")
        needed = self.details.get("needed_s")
        self.needed_s = float(needed) if needed else None


class ServerError(TGTinkerError):
    """The server failed, or does not implement the call."""
