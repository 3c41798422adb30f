"""The caller of the call being served, visible to service logic without passing it around."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from .errors import Unauthenticated
from .identity import Principal


@dataclass(frozen=True)
class CallContext:
    principal: Principal
    request_id: str
    # The caller's own credentials, forwarded on internal calls so that a service
    # acting for tenant T is exactly as privileged as T (no escalation).
    api_key: str
    method: str


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("tensafe_call", default=None)


def current() -> CallContext:
    """The current call's context; raises if called outside an authenticated call."""
    ctx = _current.get()
    if ctx is None:
        raise Unauthenticated("no authenticated caller in this context", reason="API_KEY_MISSING")
    return ctx


def current_tenant() -> str:
    return current().principal.tenant_id


def bind(ctx: CallContext) -> contextvars.Token:
    return _current.set(ctx)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)
