"""The caller of the call being served, visible to service logic without passing it around.

Its deadline too: :func:`time_remaining` is what is left of the incoming call's deadline in the thread
serving it (``None`` when the caller set none, and in worker threads, which serve no waiting caller);
``runtime.peers.call_timeout`` gives that, less a margin, to the calls made to other services.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import TypeAlias

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
    # Facts the service logic adds to this call's ledger entry (see :func:`note_audit`).
    audit_details: dict[str, str] = field(default_factory=dict[str, str], compare=False, repr=False)


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("tensafe_call", default=None)


def current() -> CallContext:
    """The current call's context; raises if called outside an authenticated call."""
    ctx = _current.get()
    if ctx is None:
        raise Unauthenticated("no authenticated caller in this context", reason="API_KEY_MISSING")
    return ctx


def current_tenant() -> str:
    return current().principal.tenant_id


def note_audit(**details: object) -> None:
    """Add facts to the ledger entry of the call being served (e.g. the DP settings of a budget, the
    epsilon after a step, the key version of an artifact), so that evidence built from the verified
    ledger alone can state them. Values become strings; the entry bounds them (``runtime.audit.LIMITS``).
    Outside a call (worker threads, tests) it does nothing."""
    ctx = _current.get()
    if ctx is not None:
        ctx.audit_details.update({k: str(v) for k, v in details.items()})


# time.monotonic() by which the call being served must be answered; None: no deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("tensafe_deadline", default=None)


# What :func:`bind` returns and :func:`unbind` takes back.
Binding: TypeAlias = tuple[contextvars.Token[CallContext | None], contextvars.Token[float | None]]


def bind(ctx: CallContext, deadline: float | None = None) -> Binding:
    return _current.set(ctx), _deadline.set(deadline)


def unbind(token: Binding) -> None:
    ctx_token, deadline_token = token
    _deadline.reset(deadline_token)
    _current.reset(ctx_token)


def time_remaining() -> float | None:
    """Seconds left of the current call's deadline (>= 0), or None when there is none."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())
