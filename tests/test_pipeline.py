"""The request pipeline in process: errors, tenant context, rate limit, idempotency, shutdown, telemetry.

A small LedgerService servicer written here stands in for service logic, so that each
stage can be driven on purpose; everything around it (interceptors, identity, idempotency
store on a real database, the SDK) is the product's own code.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from conftest import free_port
from tensafe.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tensafe.api.vault.v1 import vault_pb2, vault_pb2_grpc
from tensafe.runtime import context as call_context
from tensafe.runtime.bootstrap import initialise_data_dir
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.errors import DependencyUnavailable, FailedPrecondition, InvalidArgument, TensafeError
from tensafe.runtime.idempotency import IdempotencyStore
from tensafe.runtime.identity import KeyIssuer, KeyRegistry, KeyVerifier, load_public_key
from tensafe.runtime.interceptors import CallPipeline
from tensafe.runtime.ratelimit import TokenBucketLimiter
from tensafe.runtime.registry import SPECS, open_service_db
from tensafe.runtime.server import TensafeServer
from tg_tinker import (
    ConflictError,
    DPBudgetExceededError,
    RateLimitedError,
    ServerError,
    ServiceClient,
    ServiceUnavailableError,
    ValidationError,
)


class ScriptedLedger(ledger_pb2_grpc.LedgerServiceServicer):
    """Does what the first entry's action says, and counts how often it really ran."""

    def __init__(self) -> None:
        self.runs = 0
        self.by_action: dict[str, int] = {}
        self.lock = threading.Lock()
        self.release = threading.Event()

    def AppendEntries(self, request, context):
        action = request.entries[0].action if request.entries else ""
        with self.lock:
            self.runs += 1
            self.by_action[action] = self.by_action.get(action, 0) + 1
        if action == "invalid":
            raise InvalidArgument("entries[0].action", "is not a known action")
        if action == "budget":
            raise TensafeError("privacy budget exhausted", reason="DP_BUDGET_EXCEEDED")
        if action == "unavailable-once" and self.by_action[action] == 1:
            raise DependencyUnavailable("the accountant is down")
        if action == "crash":
            raise RuntimeError("secret internal detail /etc/tensafe")
        if action == "conflict":
            raise FailedPrecondition("session is closed")
        if action == "wait":
            self.release.wait(10)
        # The caller's tenant, as service logic sees it, goes back in the response.
        return ledger_pb2.AppendEntriesResponse(
            entries=[ledger_pb2.AppendedEntry(entry_id=call_context.current_tenant(), index=self.runs)],
            tree_size=self.runs)


@dataclasses.dataclass
class Harness:
    port: int
    servicer: ScriptedLedger
    api_key: str
    other_key: str
    server: grpc.Server

    def client(self, **kw) -> ServiceClient:
        kw.setdefault("api_key", self.api_key)
        kw.setdefault("retry_count", 0)
        return ServiceClient(base_url=f"127.0.0.1:{self.port}", **kw)


def make_config(tmp: Path, env: dict[str, str]) -> ServerConfig:
    return ServerConfig.load(environ=env, env_file=tmp / "none.env", data_dir=tmp / "data", port=0, metrics_port=0)


@pytest.fixture
def harness(tmp_path, db_env, request):
    rps, burst = getattr(request, "param", (0.0, 1))
    config = make_config(tmp_path, db_env)
    api_key, _ = initialise_data_dir(config)
    registry = KeyRegistry.from_config(config)
    issuer = KeyIssuer.load_or_create(config.signing_key_path(), config.public_key_path())
    _, other_key = registry.create_key(issuer, "globex")
    engine = open_service_db(config, SPECS["ledger"])
    pipeline = CallPipeline(KeyVerifier(load_public_key(config.public_key_path()), registry, 5.0),
                            TokenBucketLimiter(rps, burst), {"ledger": IdempotencyStore(engine, wait_seconds=5)})
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[pipeline])
    servicer = ScriptedLedger()
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Harness(port, servicer, api_key, other_key, server)
    servicer.release.set()
    server.stop(0).wait()
    engine.dispose()
    registry.engine.dispose()


def append(client: ServiceClient, action: str = "ok") -> ledger_pb2.AppendEntriesResponse:
    req = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(entry_id="e1", action=action)])
    return client._call("ledger", "AppendEntries", req)


def test_tenant_context_comes_from_the_key(harness) -> None:
    with harness.client() as a, harness.client(api_key=harness.other_key) as b:
        assert append(a).entries[0].entry_id == "default"
        assert append(b).entries[0].entry_id == "globex"


def test_domain_errors_become_sdk_exceptions(harness) -> None:
    with harness.client() as client:
        with pytest.raises(ValidationError) as invalid:
            append(client, "invalid")
        assert invalid.value.field == "entries[0].action"
        assert invalid.value.grpc_code == "INVALID_ARGUMENT"
        with pytest.raises(DPBudgetExceededError):
            append(client, "budget")
        with pytest.raises(ConflictError):
            append(client, "conflict")
        with pytest.raises(ServerError) as crash:
            append(client, "crash")
        assert crash.value.code == "INTERNAL"
        assert "secret" not in str(crash.value) and crash.value.request_id in str(crash.value)


def test_idempotent_retry_is_applied_once(harness) -> None:
    with harness.client() as client:
        transport = client._transport
        stub = transport.stub("ledger")
        req = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(entry_id="e1", action="ok")])
        md = transport.metadata(idempotency_key="k-1")
        first = stub.AppendEntries(req, metadata=md)
        second, call = stub.AppendEntries.with_call(req, metadata=transport.metadata(idempotency_key="k-1"))
        assert second == first
        assert harness.servicer.runs == 1
        assert ("x-idempotent-replay", "true") in call.trailing_metadata()
        # Same key, different request: refused, nothing runs.
        other = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(entry_id="e2", action="ok")])
        with pytest.raises(grpc.RpcError) as err:
            stub.AppendEntries(other, metadata=transport.metadata(idempotency_key="k-1"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert harness.servicer.runs == 1
    # Another tenant using the same key is a different call (records are tenant-scoped).
    with harness.client(api_key=harness.other_key) as other_client:
        t = other_client._transport
        resp = t.stub("ledger").AppendEntries(req, metadata=t.metadata(idempotency_key="k-1"))
        assert resp.entries[0].entry_id == "globex"
        assert harness.servicer.runs == 2


def test_final_errors_are_replayed_but_transient_ones_run_again(harness) -> None:
    with harness.client() as client:
        t = client._transport
        stub = t.stub("ledger")
        bad = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(action="invalid")])
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.AppendEntries(bad, metadata=t.metadata(idempotency_key="k-bad"))
        assert harness.servicer.runs == 1
        flaky = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(action="unavailable-once")])
        with pytest.raises(grpc.RpcError) as err:
            stub.AppendEntries(flaky, metadata=t.metadata(idempotency_key="k-flaky"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.AppendEntries(flaky, metadata=t.metadata(idempotency_key="k-flaky"))
        assert harness.servicer.runs == 3


def test_sdk_retries_transient_failure_with_one_key(harness) -> None:
    with harness.client(retry_count=2) as client:
        resp = append(client, "unavailable-once")
    assert resp.tree_size == 2 and harness.servicer.runs == 2


def test_sdk_raises_unavailable_when_retries_run_out(harness) -> None:
    with harness.client(retry_count=0) as client, pytest.raises(ServiceUnavailableError):
        append(client, "unavailable-once")


def test_concurrent_duplicate_waits_for_the_first(harness) -> None:
    with harness.client() as client:
        t = client._transport
        stub = t.stub("ledger")
        req = ledger_pb2.AppendEntriesRequest(entries=[ledger_pb2.AuditEntry(action="wait")])
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            stub.AppendEntries(req, metadata=t.metadata(idempotency_key="k-wait")))) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        harness.servicer.release.set()
        for th in threads:
            th.join(10)
        assert len(results) == 2 and results[0] == results[1]
        assert harness.servicer.runs == 1


@pytest.mark.parametrize("harness", [(1.0, 3)], indirect=True)
def test_rate_limit_per_tenant(harness) -> None:
    with harness.client() as client:
        for _ in range(3):
            append(client)
        with pytest.raises(RateLimitedError) as info:
            append(client)
        assert 0 < info.value.retry_after <= 1.0
        assert info.value.code == "RATE_LIMITED"
    # Another tenant has its own bucket.
    with harness.client(api_key=harness.other_key) as other:
        append(other)
    # The SDK waits retry_after and tries again when allowed to retry.
    with harness.client(retry_count=3) as patient:
        append(patient)


def test_graceful_shutdown_finishes_call_in_flight(tmp_path) -> None:
    config = make_config(tmp_path, {})
    api_key, _ = initialise_data_dir(config)
    server = TensafeServer(config, [])
    started, finished = threading.Event(), threading.Event()

    def slow(request: bytes, context) -> bytes:
        started.set()
        time.sleep(1.5)
        finished.set()
        return b"done:" + call_context.current_tenant().encode()

    handler = grpc.method_handlers_generic_handler(
        "tensafe.test.Slow", {"Run": grpc.unary_unary_rpc_method_handler(slow)})
    server.grpc_server.add_generic_rpc_handlers((handler,))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    run = channel.unary_unary("/tensafe.test.Slow/Run")
    md = (("authorization", f"Bearer {api_key}"),)
    in_flight = run.future(b"", metadata=md, timeout=10)
    assert started.wait(5)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as refused:  # new calls are refused while draining
        run(b"", metadata=md, timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert in_flight.result(timeout=10) == b"done:default"
    stopper.join(10)
    assert finished.is_set() and not stopper.is_alive()
    channel.close()


def test_metrics_and_trace_context(tmp_path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    metrics_port = free_port()
    config = dataclasses.replace(make_config(tmp_path, {}), metrics_port=metrics_port)
    api_key, _ = initialise_data_dir(config)
    server = TensafeServer(config, ["vault"])
    server.start()
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = vault_pb2_grpc.VaultServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.DescribeArtifact(vault_pb2.DescribeArtifactRequest(artifact_id="art_missing"), metadata=(
                    ("authorization", f"Bearer {api_key}"), ("traceparent", traceparent)))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        spans = [s for s in exporter.get_finished_spans() if "DescribeArtifact" in s.name]
        assert spans and format(spans[0].context.trace_id, "032x") == trace_id
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'tensafe_grpc_requests_total{code="NOT_FOUND",method="DescribeArtifact",service="vault"}' in body
        assert "tensafe_grpc_latency_seconds_bucket" in body
    finally:
        server.stop(0)
