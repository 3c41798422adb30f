"""The Tinker-compatible API: the ``tinker`` client (and Tinker Cookbook recipes) run unmodified on TenSafe.

An HTTP edge (``tensafe serve tinker``, and part of ``tensafe up`` on ``TENSAFE_TINKER_PORT``) that speaks the
client's protocol and does its work by calling the TenSafe services over gRPC as the caller's tenant, through
``tg_tinker``. See docs/tinker.md.
"""

from __future__ import annotations

import signal
import threading

from tensafe.runtime.config import ServerConfig
from tensafe.runtime.http_edge import AsgiServer, HttpEdge
from tg_tinker.services import SERVICE_NAMES


class TinkerServer:
    """The gateway on its own thread: ``start()``, ``url``, ``stop()``. ``local_endpoint``: the gRPC server of
    the same process (``tensafe up``); otherwise each service's ``TENSAFE_<SERVICE>_ENDPOINT``."""

    def __init__(self, config: ServerConfig, local_endpoint: str | None = None, port: int | None = None) -> None:
        from .app import build_app
        from .service import Gateway

        local = frozenset(SERVICE_NAMES) if local_endpoint else frozenset[str]()
        self.edge = HttpEdge(config, "tinker", local_endpoint, local)
        self.gateway = Gateway(config, {s: self.edge.peers.endpoint(s) for s in SERVICE_NAMES})
        self.http = AsgiServer(build_app(self.edge, self.gateway), config,
                               config.tinker_port if port is None else port, "tinker")

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> None:
        self.edge.start()
        self.http.start()

    def stop(self) -> None:
        """Requests in flight finish, the models of open sessions are closed, then the audit outbox is delivered."""
        self.http.stop()
        self.gateway.close()
        self.edge.stop()

    def serve_until_signal(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT (``tensafe serve tinker``)."""
        done = threading.Event()
        previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
