"""The one function that builds every gRPC server, and its lifecycle."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .audit import AuditOutbox
from .capacity import CapacityRouter
from .config import ServerConfig
from .idempotency import IdempotencyStore
from .identity import KeyRegistry, KeyVerifier, load_public_key
from .interceptors import CallPipeline
from .ratelimit import TokenBucketLimiter
from .registry import ServiceUnit, build_unit
from .telemetry import setup_tracing, start_metrics_server, tracing_server_interceptor

log = logging.getLogger("tensafe.server")


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    max_bytes = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    key = Path(config.tls_key_file).read_bytes()
    cert = Path(config.tls_cert_file).read_bytes()
    ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class Edge(Protocol):
    """What the server needs of an HTTP edge it runs (``runtime.http_edge.EdgeServer``)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class TensafeServer:
    """A gRPC server hosting one or more services, with health, reflection and a clean stop."""

    def __init__(self, config: ServerConfig, service_names: Sequence[str]) -> None:
        self.config = config
        self.service_names = list(service_names)
        setup_tracing(config.trace_exporter, "tensafe-" + "+".join(self.service_names))
        registry = KeyRegistry.from_config(config)
        self.registry = registry
        self.verifier = KeyVerifier(load_public_key(config.public_key_path()), registry,
                                    config.auth_refresh_seconds)
        # Filled once the services exist (they need the bound port to find their peers).
        self._idempotency_stores: dict[str, IdempotencyStore] = {}
        self._audit_outboxes: dict[str, AuditOutbox] = {}
        pipeline = CallPipeline(
            self.verifier,
            TokenBucketLimiter(config.rate_limit_rps, config.rate_limit_burst),
            self._idempotency_stores,
            access_log=config.access_log,
            audit_outboxes=self._audit_outboxes,
        )
        # Outermost: each call gets its threads (unary calls, tenants' streams, calls between services)
        # before it runs, so that no tenant's streams can starve anyone's calls (runtime.capacity).
        self.capacity = CapacityRouter(self.verifier, workers=config.workers, max_streams=config.max_streams,
                                       streams_per_tenant=config.quota_streams_per_tenant,
                                       internal_workers=config.internal_workers,
                                       calls_per_tenant=config.quota_calls_per_tenant)
        self._server = grpc.server(
            self.capacity.calls,
            options=server_options(config),
            interceptors=[self.capacity, tracing_server_interceptor(), pipeline],
        )
        credentials = server_credentials(config)
        address = f"{config.host}:{config.port}"
        self.port = (self._server.add_secure_port(address, credentials) if credentials
                     else self._server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"cannot bind {address}")
        local = f"{'127.0.0.1' if config.host in ('0.0.0.0', '::', '') else config.host}:{self.port}"
        self.local_endpoint = local
        # HTTP edges served beside the services (runtime.http_edge): started after them, stopped before them.
        self.edges: list[Edge] = []
        self.units: list[ServiceUnit] = [
            build_unit(n, config, local_endpoint=local, local_services=frozenset(self.service_names))
            for n in self.service_names]
        self._idempotency_stores.update({u.spec.name: u.idempotency for u in self.units})
        # Key creations and revocations are queued in the identity database; the server that hosts the
        # ledger delivers them.
        self.identity_audit = None
        if "ledger" in self.service_names:
            ledger_unit = next(u for u in self.units if u.spec.name == "ledger")
            self.identity_audit = AuditOutbox(registry.engine, lambda: ledger_unit.env.peers.channel("ledger"),
                                              config.service_key)
        self._audit_outboxes.update({u.spec.name: u.audit for u in self.units})
        for unit in self.units:
            unit.register(self._server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [u.spec.full_name for u in self.units]
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        self._stopped = threading.Event()

    def add_edge(self, edge: Edge) -> None:
        """Serve ``edge`` (an HTTP front on the services) with this server: it starts once the services
        serve, and stops first, while they still answer (its audit entries reach the ledger)."""
        self.edges.append(edge)

    @property
    def grpc_server(self) -> grpc.Server:
        """The underlying server, for adding handlers before :meth:`start`."""
        return self._server

    @property
    def full_names(self) -> list[str]:
        return [u.spec.full_name for u in self.units]

    def start(self) -> None:
        self._server.start()
        for name in ("", *self.full_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for unit in self.units:
            unit.audit.start()
            unit.idempotency.start()
        if self.identity_audit is not None:
            self.identity_audit.start()
        start_metrics_server(self.config.metrics_port, self.config.host)
        for edge in self.edges:
            edge.start()
        log.info("serving %s on %s:%d", ", ".join(self.service_names), self.config.host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish for up to ``grace`` seconds, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        for edge in self.edges:
            try:
                edge.stop()
            except Exception:  # the services still stop
                log.exception("could not stop the %s edge", type(edge).__name__)
        outboxes = [u.audit for u in self.units] + ([self.identity_audit] if self.identity_audit else [])
        for outbox in outboxes:  # background delivery ends first, so only this thread delivers from here on
            outbox.stop()
        for outbox in outboxes:  # while the ledger still answers; what is left waits for the next start
            outbox.flush()
        grace = self.config.grace_seconds if grace is None else grace
        log.info("stopping: draining calls in flight for up to %.0fs", grace)
        self._server.stop(grace).wait()
        self.capacity.shutdown()
        for unit in self.units:
            unit.close()
        log.info("stopped")

    def wait(self) -> None:
        self._server.wait_for_termination()

    def serve_until_signal(self) -> None:
        """Run in the foreground; SIGTERM or SIGINT (Ctrl-C) stops gracefully."""
        done = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            def stop_then_exit() -> None:
                try:
                    self.stop()
                except Exception:  # a failed clean-up must not keep the process alive
                    log.exception("error while stopping")
                finally:
                    done.set()

            threading.Thread(target=stop_then_exit, daemon=True).start()

        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not done.wait(0.5):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
