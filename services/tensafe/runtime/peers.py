"""Channels from one service to another, carrying the caller's identity and trace.

A service acting for tenant T calls its peers with T's own API key (no
service-to-service privilege), the same request id, and the W3C trace context
of the current span. Its deadline is what is left of the incoming call's
deadline, less a small margin (:func:`call_timeout`), so that the peer's answer,
or our own clear error, reaches the caller before it gives up; where the
incoming call set none, or the call is made from a worker thread after the
call that asked for the work has been answered, the deadline is the per-RPC
budget the calling client documents. With TLS configured, peers are called over mTLS: the
server's certificate and key identify the calling service, and peers'
certificates are checked against the mesh CA (``TENSAFE_TLS_CLIENT_CA_FILE``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from . import context as call_context
from .capacity import marked_channel
from .config import ServerConfig
from .errors import DeadlineTooShort, DependencyUnavailable, TensafeError
from .telemetry import traced_channel


def open_channel(config: ServerConfig, endpoint: str) -> grpc.Channel:
    """A channel to ``endpoint`` with the server's message limits, over mTLS when TLS is configured (the
    server's certificate identifies the caller; the peer's is checked against the mesh CA)."""
    options = [("grpc.max_send_message_length", config.max_message_mb << 20),
               ("grpc.max_receive_message_length", config.max_message_mb << 20)]
    if not config.tls_cert_file:
        return grpc.insecure_channel(endpoint, options)
    ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=Path(config.tls_key_file).read_bytes(),
                                         certificate_chain=Path(config.tls_cert_file).read_bytes())
    return grpc.secure_channel(endpoint, creds, options)


class PeerChannels:
    def __init__(self, config: ServerConfig, owner: str, local_endpoint: str | None,
                 local_services: frozenset[str]) -> None:
        self.config = config
        self.owner = owner
        self.local_endpoint = local_endpoint
        self.local_services = local_services
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def endpoint(self, service: str) -> str:
        endpoint = self.config.peer_endpoint(service)
        if not endpoint and service in self.local_services:
            endpoint = self.local_endpoint
        if not endpoint:
            raise RuntimeError(
                f"the {self.owner} service needs the {service} service: set TENSAFE_{service.upper()}_ENDPOINT")
        return endpoint

    def channel(self, service: str) -> grpc.Channel:
        endpoint = self.endpoint(service)
        with self._lock:
            if endpoint not in self._channels:
                raw = open_channel(self.config, endpoint)
                # Marked as a call between services: it runs on the peer's internal threads (runtime.capacity).
                self._channels[endpoint] = traced_channel(marked_channel(raw, self.config.service_key))
            return self._channels[endpoint]

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


def forward_metadata(idempotency_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of the current caller."""
    return metadata_for(call_context.current(), idempotency_key)


def metadata_for(ctx: call_context.CallContext, idempotency_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of ``ctx``'s caller (also later, from a worker thread)."""
    md = (("authorization", f"Bearer {ctx.api_key}"), ("x-request-id", ctx.request_id))
    return (*md, ("x-idempotency-key", idempotency_key)) if idempotency_key else md


# A peer call gets the caller's remaining time less this share of it (at least MIN, at most MAX seconds):
# time for the peer's answer, or our own error, to travel back before the caller's deadline.
DEADLINE_MARGIN_SHARE = 0.02
DEADLINE_MARGIN_MIN_S = 0.1
DEADLINE_MARGIN_MAX_S = 1.0
# A peer call with less time than this left is not made: the caller hears DEADLINE_TOO_SHORT at once.
MIN_PEER_TIMEOUT_S = 0.05


def deadline_margin(remaining: float) -> float:
    return min(max(remaining * DEADLINE_MARGIN_SHARE, DEADLINE_MARGIN_MIN_S), DEADLINE_MARGIN_MAX_S)


def call_timeout(budget_s: float, service: str, what: str) -> float:
    """The timeout of a peer call made now: the current call's remaining deadline less a margin, or
    ``budget_s`` (the calling client's documented per-RPC budget) where there is none in this thread.
    Raises DeadlineTooShort at once when too little is left to make the call at all."""
    remaining = call_context.time_remaining()
    if remaining is None:
        return budget_s
    timeout = remaining - deadline_margin(remaining)
    if timeout < MIN_PEER_TIMEOUT_S:
        raise DeadlineTooShort(f"{remaining:.2f} s were left of this call's deadline, too little to call the "
                               f"{service} ({what})", hint="raise the call's timeout", remaining_s=remaining)
    return timeout


def stream_budget(size_bytes: int, base_s: float, min_bytes_per_s: float) -> float:
    """A per-RPC budget for a streamed transfer of ``size_bytes``: ``base_s`` plus the size at the
    slowest transfer rate accepted."""
    return base_s + max(0, size_bytes) / min_bytes_per_s


def peer_error(err: grpc.RpcError, service: str, what: str) -> TensafeError:
    """A peer's error, passed on to our caller with the same code, reason and metadata.

    An error the peer answered itself (it carries a reason) keeps its code and reason, so that a
    peer's DEADLINE_TOO_SHORT or QUOTA_EXCEEDED reaches the tenant as the peer said it. A transport
    UNAVAILABLE becomes DependencyUnavailable naming the peer; a DEADLINE_EXCEEDED of a call that had
    the caller's own deadline becomes DeadlineTooShort (retrying with the same timeout would not
    help), otherwise DependencyUnavailable (the peer did not answer within its budget).
    """
    from .errors import call_status, reason_metadata

    status = call_status(err)
    reason, metadata = reason_metadata(status) if status is not None else (None, dict[str, str]())
    if reason is None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED \
            and call_context.time_remaining() is not None:
        return DeadlineTooShort(f"the {service} did not finish {what} within the time left of this call's "
                                "deadline", hint="raise the call's timeout (the work may still finish: a "
                                "retry of the same request reuses what was done where the service keeps it)")
    if reason is None and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return DependencyUnavailable(f"the {service} is unavailable ({what}): {err.details()}")
    exc = TensafeError(err.details() or what, reason=reason or "INTERNAL", **metadata)
    exc.code = err.code()
    return exc
