"""What TenSafe's HTTP edges share (the OpenAI-compatible front, ``tensafe.openai``; the Tinker-compatible one).

An HTTP edge holds no tenant data: it checks the caller's API key (the bearer token) the way the gRPC
pipeline does, calls the services over gRPC *as that caller* (the caller's own key and request id, on an
ordinary tenant channel: never the services' internal threads), and records one audit entry per HTTP
call in its own durable outbox, delivered to the ledger like every service's (``runtime.audit``).

* :class:`HttpEdge`: key checks (:meth:`HttpEdge.authenticate`), the audit trail (:meth:`HttpEdge.record`),
  channels to the services (:meth:`HttpEdge.channel`), and its lifecycle.
* :func:`http_status` / :func:`grpc_failure`: a gRPC failure as an HTTP status and the fields an edge
  shows (code, reason, field named, message).
* :class:`AsgiServer`: an ASGI app served by uvicorn on its own thread, on a socket bound at once (so a
  busy port fails at start, and port 0 gives a free port that :attr:`AsgiServer.port` tells).
* :class:`EdgeServer`: the two together, what ``tensafe up`` and ``tensafe serve <edge>`` run.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from sqlalchemy.engine import Engine

from .audit import AuditOutbox, build_entry, outcome_for
from .config import ServerConfig
from .db import RUNTIME_VERSIONS, create_engine, migrate
from .errors import TensafeError, Unauthenticated, call_status, reason_metadata
from .identity import KeyRegistry, KeyVerifier, load_public_key
from .peers import PeerChannels, open_channel

log = logging.getLogger("tensafe.http_edge")

MAX_REQUEST_ID = 128
# The HTTP status of each gRPC code, as an HTTP edge answers it.
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


@dataclass(frozen=True)
class Failure:
    """A failed call as an edge shows it: gRPC code, reason, the field it names (if any), the message."""

    code: grpc.StatusCode
    reason: str
    message: str
    field: str | None = None

    @property
    def status(self) -> int:
        return http_status(self.code)


def grpc_failure(err: grpc.RpcError) -> Failure:
    """What a failed gRPC call said: its code, the ErrorInfo reason and the field named (InvalidArgument)."""
    status = call_status(err)
    reason, metadata = reason_metadata(status) if status is not None else (None, dict[str, str]())
    return Failure(err.code(), reason or err.code().name, err.details() or err.code().name, metadata.get("field"))


def domain_failure(exc: TensafeError) -> Failure:
    """A domain error raised at the edge itself (a bad key, a bad field) as a :class:`Failure`."""
    return Failure(exc.code, exc.reason, exc.message, exc.metadata.get("field"))


@dataclass(frozen=True)
class EdgeCaller:
    """The verified caller of one HTTP request."""

    tenant_id: str
    key_id: str
    api_key: str
    request_id: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata of a call made as this caller (its own key, the same request id)."""
        return (("authorization", f"Bearer {self.api_key}"), ("x-request-id", self.request_id))


def request_id(header: str | None) -> str:
    """The request's ``x-request-id`` (at most 128 printable characters kept), or a new one."""
    text = "".join(ch for ch in (header or "") if ch.isprintable())[:MAX_REQUEST_ID]
    return text or uuid.uuid4().hex


def bearer_key(authorization: str | None) -> str:
    """The API key of an ``Authorization: Bearer <key>`` header ("" when there is none)."""
    auth = (authorization or "").strip()
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


class HttpEdge:
    """One HTTP edge (``name``: ``openai``, ``tinker``): key checks, audit outbox, channels to the services.

    ``local_endpoint``: the gRPC server of the same process (``tensafe up``), used for the services in
    ``local_services``; any service may instead be elsewhere (``TENSAFE_<SERVICE>_ENDPOINT``)."""

    def __init__(self, config: ServerConfig, name: str, local_endpoint: str | None = None,
                 local_services: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.name = name
        registry = KeyRegistry.from_config(config)
        self._registry_engine = registry.engine
        self.verifier = KeyVerifier(load_public_key(config.public_key_path()), registry, config.auth_refresh_seconds)
        self.engine = self._open_db()
        # Audit delivery is the services' own call (marked, as every service's outbox); tenants' calls are not.
        self.peers = PeerChannels(config, name, local_endpoint, local_services)
        self.audit = AuditOutbox(self.engine, lambda: self.peers.channel("ledger"), config.service_key)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        # What the edge's app holds and must release when the edge stops (run first, newest first).
        self.closers: list[Callable[[], None]] = []

    def _open_db(self) -> Engine:
        engine = create_engine(self.config.service_db_url(self.name),
                               schema=f"{self.config.db_schema_prefix}{self.name}")
        migrate(engine, [RUNTIME_VERSIONS], version_table=f"alembic_version_{self.name}")
        return engine

    # -- callers ---------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, request: str) -> EdgeCaller:
        """The caller of a request with this ``Authorization`` header, or Unauthenticated (as on gRPC)."""
        api_key = bearer_key(authorization)
        if not api_key:
            raise Unauthenticated("missing API key: send it as 'Authorization: Bearer <key>'",
                                  reason="API_KEY_MISSING")
        principal = self.verifier.verify(api_key)
        return EdgeCaller(principal.tenant_id, principal.key_id, api_key, request)

    def channel(self, service: str) -> grpc.Channel:
        """A tenant channel to ``service`` (TLS as the services use it, when configured). Not wrapped by the
        tracing interceptor: its streams would lose ``cancel()``, and a client that leaves a streamed
        response must cancel the generation behind it."""
        endpoint = self.peers.endpoint(service)
        with self._lock:
            if endpoint not in self._channels:
                self._channels[endpoint] = open_channel(self.config, endpoint)
            return self._channels[endpoint]

    # -- the audit trail -------------------------------------------------------------------
    def record(self, action: str, caller: EdgeCaller | None, request: str, failure: Failure | None = None,
               resource: str = "", body: bytes = b"", details: Mapping[str, str] | None = None) -> None:
        """One ledger entry for an HTTP call (``action``: ``openai.CreateCompletion``), whatever its outcome;
        ``body``: the request's bytes, kept as their SHA-256. Never fails the call."""
        code = failure.code if failure is not None else grpc.StatusCode.OK
        reason = failure.reason if failure is not None else ""
        info = {"code": code.name, "http_status": str(http_status(code)), **(details or {})}
        if reason:
            info["reason"] = reason
        try:
            self.audit.record(build_entry(
                service=self.name, action=action, tenant_id=caller.tenant_id if caller else "",
                key_id=caller.key_id if caller else "", outcome=outcome_for(code, reason), request_id=request,
                resource=resource, digest=hashlib.sha256(body).digest() if body else b"", details=info))
        except Exception:  # never fail the user's call because of the audit trail
            log.exception("could not record the audit entry of %s", request)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.audit.start()

    def stop(self) -> None:
        """Run the closers, stop delivery, deliver what waits while the ledger still answers, close (idempotent)."""
        while self.closers:
            close = self.closers.pop()
            try:
                close()
            except Exception:  # the edge still stops
                log.exception("could not close %r of the %s edge", close, self.name)
        self.audit.stop()
        self.audit.flush()
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
        self.peers.close()
        self.engine.dispose()
        self._registry_engine.dispose()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class AsgiServer:
    """``app`` served by uvicorn on a thread of this process, on ``host:port`` (bound now; 0: a free port).

    With the server's TLS settings it serves HTTPS (and, with a client CA, requires client certificates)."""

    def __init__(self, app: Any, config: ServerConfig, port: int, name: str) -> None:
        import uvicorn

        self.name = name
        self.host = config.host
        self._socket = _bind(config.host, port)
        self.port: int = self._socket.getsockname()[1]
        tls: dict[str, Any] = {}
        if config.tls_cert_file:
            tls = {"ssl_certfile": config.tls_cert_file, "ssl_keyfile": config.tls_key_file}
            if config.tls_client_ca_file:
                tls |= {"ssl_ca_certs": config.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.scheme = "https" if tls else "http"
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=int(config.grace_seconds), **tls))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"{self.name}-http", daemon=True)
        self._thread.start()
        log.info("serving %s on %s", self.name, self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close (idempotent)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self._server.config.timeout_graceful_shutdown or 30)
        self._socket.close()


class EdgeServer:
    """An HTTP edge and the server of its app: ``make_app(edge)`` on ``port`` (``tensafe up`` runs each edge
    beside the gRPC server; ``tensafe serve <edge>`` alone, finding the services by their endpoints)."""

    def __init__(self, config: ServerConfig, name: str, port: int, make_app: Callable[[HttpEdge], Any],
                 local_endpoint: str | None = None, local_services: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.edge = HttpEdge(config, name, local_endpoint, local_services)
        try:
            self.http = AsgiServer(make_app(self.edge), config, port, name)
        except BaseException:
            self.edge.stop()
            raise

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> None:
        self.edge.start()
        self.http.start()

    def stop(self) -> None:
        """Requests in flight finish first, then the audit outbox is delivered and closed."""
        self.http.stop()
        self.edge.stop()

    def serve_until_signal(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT (``tensafe serve <edge>``)."""
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
