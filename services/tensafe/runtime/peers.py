"""Channels from one service to another, carrying the caller's identity and trace.

A service acting for tenant T calls its peers with T's own API key (no
service-to-service privilege), the same request id, and the W3C trace context
of the current span. With TLS configured, peers are called over mTLS: the
server's certificate and key identify the calling service, and peers'
certificates are checked against the mesh CA (``TENSAFE_TLS_CLIENT_CA_FILE``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from . import context as call_context
from .config import ServerConfig
from .errors import DependencyUnavailable, TensafeError
from .telemetry import traced_channel


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
                options = [("grpc.max_send_message_length", self.config.max_message_mb << 20),
                           ("grpc.max_receive_message_length", self.config.max_message_mb << 20)]
                if self.config.tls_cert_file:
                    ca = Path(self.config.tls_client_ca_file).read_bytes() if self.config.tls_client_ca_file else None
                    creds = grpc.ssl_channel_credentials(
                        root_certificates=ca, private_key=Path(self.config.tls_key_file).read_bytes(),
                        certificate_chain=Path(self.config.tls_cert_file).read_bytes())
                    raw = grpc.secure_channel(endpoint, creds, options)
                else:
                    raw = grpc.insecure_channel(endpoint, options)
                self._channels[endpoint] = traced_channel(raw)
            return self._channels[endpoint]

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


def forward_metadata(idempotency_key: str | None = None) -> list[tuple[str, str]]:
    """Metadata for a call made on behalf of the current caller."""
    return metadata_for(call_context.current(), idempotency_key)


def metadata_for(ctx: call_context.CallContext, idempotency_key: str | None = None) -> list[tuple[str, str]]:
    """Metadata for a call made on behalf of ``ctx``'s caller (also later, from a worker thread)."""
    md = [("authorization", f"Bearer {ctx.api_key}"), ("x-request-id", ctx.request_id)]
    if idempotency_key:
        md.append(("x-idempotency-key", idempotency_key))
    return md


def peer_error(err: grpc.RpcError, service: str, what: str) -> TensafeError:
    """A peer's error, passed on to our caller with the same code, reason and metadata.

    UNAVAILABLE and DEADLINE_EXCEEDED become DependencyUnavailable naming the peer.
    """
    from grpc_status import rpc_status

    from .errors import reason_metadata

    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return DependencyUnavailable(f"the {service} is unavailable ({what}): {err.details()}")
    status = rpc_status.from_call(err)
    reason, metadata = reason_metadata(status) if status is not None else (None, {})
    exc = TensafeError(err.details() or what, reason=reason or "INTERNAL", **metadata)
    exc.code = err.code()
    return exc
