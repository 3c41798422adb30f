"""Tracing (OpenTelemetry) and metrics (Prometheus) for every server."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import cast

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext, server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger("tensafe.telemetry")

REQUESTS = Counter("tensafe_grpc_requests_total", "Calls served, by method and status code",
                   ["service", "method", "code"])
ERRORS = Counter("tensafe_grpc_errors_total", "Calls that ended in an error, by method, code and reason",
                 ["service", "method", "code", "reason"])
LATENCY = Histogram("tensafe_grpc_latency_seconds", "Call latency from first byte in to last byte out",
                    ["service", "method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

DEADLINES = Histogram("tensafe_grpc_deadline_seconds", "Time left of the caller's deadline when a call is admitted "
                      "(calls without a deadline are not counted)", ["service", "method"],
                      buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))

_configured = False


def setup_tracing(exporter: str, service_name: str) -> None:
    """Install a tracer provider once per process. ``exporter`` is none, console or otlp."""
    global _configured
    if _configured or isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:  # the [otlp] extra: imported by name, so that the type checker does not need it installed
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        except ImportError as exc:
            raise RuntimeError(
                "TENSAFE_TRACE_EXPORTER=otlp needs the opentelemetry-exporter-otlp package"
            ) from exc
        otlp_exporter: Callable[[], SpanExporter] = otlp.OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def tracing_server_interceptor() -> grpc.ServerInterceptor:
    """Opens a server span per call, continuing the caller's trace (W3C traceparent metadata)."""
    return server_interceptor()


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """Wrap a channel used for service-to-service calls so that trace context travels with them."""
    # opentelemetry-instrumentation-grpc is untyped; its intercepted channel is a grpc.Channel.
    return cast("grpc.Channel", grpcext.intercept_channel(channel, client_interceptor()))


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=host)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
