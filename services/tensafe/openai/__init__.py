"""``tensafe.openai``: an OpenAI-compatible HTTP API in front of the inference service (docs/openai.md).

``/v1/models`` (the caller's adapters and the base models), ``/v1/completions`` and ``/v1/chat/completions``
(whole or streamed as server-sent events), the API key as the bearer token. It is an edge like the SDK: it
keeps no tenant data, calls the inference service over gRPC as the caller (tenant isolation is the inference
service's, as over gRPC), and audits every call in the ledger (``runtime.http_edge``).

This package is ``tensafe.openai``; the official client is the top-level ``openai``. Import ours by its full
name, never with ``services/tensafe`` on ``sys.path``.
"""

from __future__ import annotations

from tensafe.runtime.config import ServerConfig
from tensafe.runtime.http_edge import EdgeServer

NAME = "openai"


def openai_server(config: ServerConfig, port: int | None = None, local_endpoint: str | None = None,
                  local_services: frozenset[str] = frozenset()) -> EdgeServer:
    """The OpenAI-compatible front on ``port`` (default TENSAFE_OPENAI_PORT), bound now, not yet started."""
    from .app import create_app

    return EdgeServer(config, NAME, config.openai_port if port is None else port, create_app, local_endpoint,
                      local_services)
