"""The Tinker-compatible API: the ``tinker`` client (and Tinker Cookbook recipes) run unmodified on TenSafe.

An HTTP edge (``tensafe serve tinker``, and part of ``tensafe up`` on ``TENSAFE_TINKER_PORT``) that speaks the
client's protocol and does its work by calling the TenSafe services over gRPC as the caller's tenant, through
``tg_tinker``. See docs/tinker.md.
"""

from __future__ import annotations

from typing import Any

from tensafe.runtime.config import ServerConfig
from tensafe.runtime.http_edge import EdgeServer, HttpEdge
from tg_tinker.services import SERVICE_NAMES


class TinkerServer(EdgeServer):
    """The gateway and its HTTP server: an :class:`EdgeServer` whose app is the Tinker API over a
    :class:`~tensafe.tinker.service.Gateway`. ``local_endpoint``: the gRPC server of the same process
    (``tensafe up``); otherwise each service's ``TENSAFE_<SERVICE>_ENDPOINT``. ``port``: default
    TENSAFE_TINKER_PORT.

    Stopping it (``EdgeServer.stop``) lets requests in flight finish, then closes the gateway (open sessions'
    models, its clients; one of the edge's closers), then delivers the audit outbox."""

    def __init__(self, config: ServerConfig, local_endpoint: str | None = None, port: int | None = None) -> None:
        from .app import build_app
        from .service import Gateway

        made: list[Gateway] = []

        def make_app(edge: HttpEdge) -> Any:
            gateway = Gateway(config, {s: edge.peers.endpoint(s) for s in SERVICE_NAMES})
            made.append(gateway)
            edge.closers.append(gateway.close)  # also run if the app or the socket fails here
            return build_app(edge, gateway)

        local = frozenset(SERVICE_NAMES) if local_endpoint else frozenset[str]()
        super().__init__(config, "tinker", config.tinker_port if port is None else port, make_app, local_endpoint,
                         local)
        self.gateway = made[0]
