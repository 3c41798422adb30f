"""Attacks on what every service shares: threads, the audit trail, idempotency keys and API keys.

- streams: one tenant holding streams cannot stop another tenant's calls, nor the calls the services
  make to each other for it (capacity pools, per-tenant and global stream quotas);
- audit: an oversize id is refused at the edge, its refusal audited with bounded fields, and an entry
  the ledger refuses is replaced by a bounded stand-in so that delivery goes on;
- idempotency after a crash: test_idempotency_restart.py;
- API keys: a key created with --expires-in is refused after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import uuid

import grpc
import pytest

from conftest import Stack, start_stack
from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.api.vault.v1 import vault_pb2
from tg_tinker import (
    AuthenticationError,
    LoRAConfig,
    OptimizerConfig,
    QuotaExceededError,
    RateLimitedError,
    TrainingConfig,
    ValidationError,
)

PER_TENANT = 3
MAX_STREAMS = 4
CALLS_PER_TENANT = 2  # unary calls in flight per tenant


def tiny_config(**kw) -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", batch_size=2, seed=1,
                          lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.1), **kw)


@pytest.fixture(scope="module")
def rt_stack(tmp_path_factory, tiny_model, module_db_env):
    # As few threads for unary calls as a server allows: on main, PER_TENANT + 1 idle streams took them all.
    s = start_stack(tmp_path_factory.mktemp("runtime"), {
        **module_db_env, "TENSAFE_MODEL_DIR": str(tiny_model.parent), "TENSAFE_AUTH_REFRESH_SECONDS": "0.2",
        "TENSAFE_WORKERS": str(PER_TENANT + 1), "TENSAFE_MAX_STREAMS": str(MAX_STREAMS),
        "TENSAFE_QUOTA_STREAMS_PER_TENANT": str(PER_TENANT), "TENSAFE_QUOTA_CALLS_PER_TENANT": str(CALLS_PER_TENANT)})
    yield s
    assert s.process.stop() == 0, s.process.output()


def tenant_key(stack: Stack, tenant: str, *extra: str) -> str:
    out = stack.cli("keys", "create", "--tenant", tenant, *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# -- streams ---------------------------------------------------------------------------------------------


def test_one_tenants_streams_cannot_starve_other_tenants_or_internal_calls(rt_stack) -> None:
    acme = rt_stack.client(api_key=tenant_key(rt_stack, "acme"), timeout=20)
    globex = rt_stack.client(api_key=tenant_key(rt_stack, "globex"), timeout=20)
    initech = rt_stack.client(api_key=tenant_key(rt_stack, "initech"), timeout=20)
    held, refused = [], []
    try:
        # acme opens one stream more than its quota: a training client each (one result stream each).
        for _ in range(PER_TENANT + 1):
            try:
                held.append(acme.create_training_client(tiny_config()))
            except QuotaExceededError as exc:
                refused.append(exc)
        # Another tenant's unary calls, and a call that needs internal hops (save_state: trainer -> vault
        # upload stream -> ledger), answer at once although acme holds its streams.
        with globex.create_training_client(tiny_config()) as tc:
            _, took = timed(lambda: globex._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest(),
                                                 timeout=5))
            assert took < 1.0, f"another tenant's unary call took {took:.2f} s"
            saved, took = timed(tc.save_state)
            assert took < 1.0 and saved.artifact_id.startswith("art_"), f"save_state took {took:.2f} s"
            # The server is now at TENSAFE_MAX_STREAMS (acme's 3 + globex's 1): a third tenant is refused.
            with pytest.raises(QuotaExceededError) as full:
                initech.create_training_client(tiny_config())
            assert full.value.details["quota"] == "TENSAFE_MAX_STREAMS"
            assert not [s for s in initech.list_training_clients() if s["state"] == "active"]
        assert len(held) == PER_TENANT, "acme's stream past its quota was admitted"
        assert len(refused) == 1 and refused[0].details["quota"] == "TENSAFE_QUOTA_STREAMS_PER_TENANT"
        assert refused[0].code == "QUOTA_EXCEEDED" and refused[0].grpc_code == "RESOURCE_EXHAUSTED"
        # The refused client's session was closed by the SDK: only the admitted ones stay open.
        assert len([s for s in acme.list_training_clients() if s["state"] == "active"]) == PER_TENANT
        # Closing a client gives its stream place back.
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                held.append(acme.create_training_client(tiny_config()))
                break
            except QuotaExceededError:
                assert time.monotonic() < deadline, "a closed client's stream place was not freed"
                time.sleep(0.2)
    finally:
        for tc in held:
            with contextlib.suppress(Exception):  # the failure above is the one to see
                tc.close()
        for c in (acme, globex, initech):
            c.close()


def test_raw_streams_count_and_hang_ups_give_places_back(rt_stack) -> None:
    """Streams opened and abandoned by hand (no SDK) free their places when the caller hangs up."""
    key = tenant_key(rt_stack, "hangup")
    md = (("authorization", f"Bearer {key}"),)
    with rt_stack.client(api_key=key) as client:
        tc = client.create_training_client(tiny_config())
        with grpc.insecure_channel(rt_stack.target) as channel:
            watch = channel.unary_stream("/tensafe.api.trainer.v1.TrainerService/WatchFutures",
                                         request_serializer=trainer_pb2.WatchFuturesRequest.SerializeToString,
                                         response_deserializer=trainer_pb2.WatchFuturesResponse.FromString)
            req = trainer_pb2.WatchFuturesRequest(session_id=tc.session_id)

            def admitted():  # a stream, once the server admits it (places free within ~1 s)
                deadline = time.monotonic() + 10
                while True:
                    call = watch(req, metadata=md)
                    if "x-request-id" in dict(call.initial_metadata() or ()):  # sent once admitted
                        return call
                    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                    assert time.monotonic() < deadline, "a hung-up stream's place was not given back"
                    time.sleep(0.2)

            for _round in range(3):  # more streams in all than the quota: each round's are given back
                calls = [admitted() for _ in range(PER_TENANT - 1)]
                extra = watch(req, metadata=md)
                with pytest.raises(grpc.RpcError) as refused:
                    next(extra)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "TENSAFE_QUOTA_STREAMS_PER_TENANT" in refused.value.details()
                for call in calls:
                    call.cancel()
        tc.close()


def test_unary_calls_that_never_send_their_request_cannot_hold_every_thread(rt_stack) -> None:
    """A unary call's thread is taken when its headers arrive: send headers, never the body (with a key,
    and without one). On main, TENSAFE_WORKERS such calls stopped every unary call of every tenant."""
    key = tenant_key(rt_stack, "mallory")
    hold = threading.Event()

    def never():  # a request stream that never yields: the body never comes
        hold.wait()
        return
        yield

    with grpc.insecure_channel(rt_stack.target) as channel:
        half_sent = channel.stream_unary("/tensafe.api.vault.v1.VaultService/ListArtifacts",
                                         request_serializer=lambda b: b, response_deserializer=lambda b: b)
        pending = [half_sent.future(never(), metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                   for _ in range(PER_TENANT + 1)]
        pending += [half_sent.future(never(), timeout=60) for _ in range(PER_TENANT + 1)]  # no key at all
        try:
            time.sleep(1.0)
            with rt_stack.client(api_key=tenant_key(rt_stack, "victim"), timeout=5) as victim:
                _, took = timed(lambda: victim._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest()))
                assert took < 1.0, f"another tenant's unary call took {took:.2f} s"
            with rt_stack.client(api_key=key, timeout=5) as mallory, pytest.raises(RateLimitedError) as info:
                mallory._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest())
            assert "TENSAFE_QUOTA_CALLS_PER_TENANT" in str(info.value) and info.value.retry_after > 0
        finally:
            hold.set()
            for fut in pending:
                fut.cancel()


# -- ids and the audit trail ------------------------------------------------------------------------------

HUGE_ID = "art_" + "x" * (8 << 20)


def test_oversize_ids_are_refused_at_the_edge_and_audited_bounded(rt_stack) -> None:
    vkey = rt_stack.cli("ledger", "vkey").stdout.strip()
    with rt_stack.client(api_key=tenant_key(rt_stack, "hugeid"), timeout=30) as client:
        with pytest.raises(ValidationError) as read:
            list(client._transport.server_stream("vault", "GetArtifact",
                                                 vault_pb2.GetArtifactRequest(artifact_id=HUGE_ID)))
        assert read.value.field == "artifact_id"
        with pytest.raises(ValidationError) as describe:
            client._call("vault", "DescribeArtifact", vault_pb2.DescribeArtifactRequest(artifact_id=HUGE_ID))
        assert describe.value.field == "artifact_id" and len(str(describe.value)) < 1000
        # The same rule in every service, at any depth, for lists too.
        with pytest.raises(ValidationError) as nested:
            client._call("trainer", "GetFuture", trainer_pb2.GetFutureRequest(session_id="ses_1",
                                                                             future_id="fut_1; drop table"))
        assert nested.value.field == "future_id"
        with pytest.raises(ValidationError) as listed:
            list(client._transport.server_stream("trainer", "WatchFutures", trainer_pb2.WatchFuturesRequest(
                session_id="ses_1", future_ids=["fut_ok", "../etc"])))
        assert listed.value.field == "future_ids[1]"
        # Delivery goes on: a later call's entry arrives after the refusals' entries.
        with pytest.raises(Exception):  # noqa: B017 - NOT_FOUND: only its audit entry matters
            list(client._transport.server_stream("vault", "GetArtifact",
                                                 vault_pb2.GetArtifactRequest(artifact_id="art_later")))
        shown = HUGE_ID[:104] + "…sha256:" + hashlib.sha256(HUGE_ID.encode()).hexdigest()[:16]
        deadline = time.monotonic() + 20
        while True:
            entries = client.get_audit_logs(service="vault", vkey=vkey)
            later = [e for e in entries if e.resource_id == "art_later"]
            if later:
                break
            assert time.monotonic() < deadline, "audit entries stopped arriving"
            time.sleep(0.3)
        huge = [e for e in entries if e.resource_id.endswith("…sha256:" + shown[-16:])]
        assert {e.action for e in huge} == {"vault.GetArtifact", "vault.DescribeArtifact"}
        assert all(e.resource_id == shown and len(e.resource_id) == 128 for e in huge)
        assert all(e.outcome == "failed" and e.details["code"] == "INVALID_ARGUMENT" for e in huge)
        assert huge[-1].index < later[0].index


def test_an_entry_the_ledger_refuses_is_replaced_and_delivery_goes_on(tmp_path, monkeypatch) -> None:
    """A real ledger; an outbox holding entries as an older server wrote them (nothing bounded)."""
    from tensafe.runtime import audit
    from tensafe.runtime.bootstrap import initialise_data_dir
    from tensafe.runtime.config import ServerConfig
    from tensafe.runtime.db import RUNTIME_VERSIONS, create_engine, migrate
    from tensafe.runtime.server import TensafeServer
    from tg_tinker.transparency import leaf_hash  # noqa: F401 - the ledger's own hashing, imported as it uses it

    config = ServerConfig.load(environ={}, env_file=tmp_path / "none.env", data_dir=tmp_path / "data", port=0,
                               metrics_port=0)
    initialise_data_dir(config)
    server = TensafeServer(config, ["ledger"])
    server.start()
    engine = create_engine(f"sqlite:///{tmp_path / 'emitter.db'}")
    migrate(engine, [RUNTIME_VERSIONS], version_table="alembic_version_emitter")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
        ("grpc.max_send_message_length", 64 << 20)])
    try:
        outbox = audit.AuditOutbox(engine, lambda: channel, config.service_key)

        def entry(action: str, resource: str) -> ledger_pb2.AuditEntry:
            e = ledger_pb2.AuditEntry(entry_id=uuid.uuid4().hex, tenant_id="acme", service="vault", action=action,
                                      resource_id=resource, outcome=audit.FAILED, request_id="r-" + action)
            e.time.FromNanoseconds(time.time_ns())
            return e

        bad = entry("vault.GetArtifact", "art_" + "y" * (1 << 20))
        rows = [entry("vault.DescribeArtifact", "art_before"), bad, entry("vault.DeleteArtifact", "art_after")]
        with engine.begin() as conn:
            for e in rows:
                conn.execute(audit.outbox.insert().values(entry_id=e.entry_id, payload=e.SerializeToString(),
                                                          created_at=time.time()))
        # Send everything as it is, so that the refusal comes from the ledger itself (its own check).
        monkeypatch.setattr(audit, "entry_problem", lambda _e: None, raising=False)
        assert outbox.deliver_once() == 3
        assert outbox.pending() == 0
        log = next(u for u in server.units if u.spec.name == "ledger").servicer.log
        got = [ledger_pb2.AuditEntry.FromString(data) for _, data, _ in log.entries("acme")]
        assert [e.action for e in got] == ["vault.DescribeArtifact", audit.REFUSED_ACTION, "vault.DeleteArtifact"]
        stand_in = got[1]
        assert stand_in.entry_id == bad.entry_id and stand_in.service == "vault" and stand_in.tenant_id == "acme"
        assert stand_in.details["original_action"] == "vault.GetArtifact"
        assert stand_in.details["original_sha256"] == hashlib.sha256(bad.SerializeToString()).hexdigest()
        assert stand_in.details["refused_code"] == "INVALID_ARGUMENT"
        assert "resource_id" in stand_in.details["refused_message"]
        assert len(stand_in.resource_id) == 128 and stand_in.ByteSize() < audit.MAX_ENTRY_BYTES
        # And with the local check on (the default), an oversize legacy entry never even goes out as is.
        monkeypatch.undo()
        legacy = entry("vault.PullArtifact", "art_" + "z" * 5000)
        with engine.begin() as conn:
            conn.execute(audit.outbox.insert().values(entry_id=legacy.entry_id, payload=legacy.SerializeToString(),
                                                      created_at=time.time()))
        assert outbox.deliver_once() == 1 and outbox.pending() == 0
        last = ledger_pb2.AuditEntry.FromString(log.entries("acme")[-1][1])
        assert last.action == audit.REFUSED_ACTION and last.details["original_action"] == "vault.PullArtifact"
    finally:
        channel.close()
        server.stop(0)
        engine.dispose()


def test_the_ledger_refuses_oversize_entries_clearly(tmp_path) -> None:
    from tensafe.runtime.audit import LIMITS, build_entry
    from tensafe.runtime.errors import InvalidArgument

    # What the services build is always within bounds, whatever the request carried.
    e = build_entry(service="vault", action="vault.GetArtifact", tenant_id="acme", key_id="k" * 10_000,
                    outcome=1, request_id="r" * 10_000, resource="a" * 10_000,
                    details={"reason": "x" * 10_000, **{f"k{i}": "v" for i in range(100)}})
    assert all(len(getattr(e, f)) <= limit for f, limit in LIMITS.items()) and len(e.details) <= 32
    assert e.resource_id.startswith("a" * 100) and "…sha256:" in e.resource_id
    from tensafe.ledger.service import MerkleLog

    log = MerkleLog.__new__(MerkleLog)  # only the validation runs (before anything is queued)
    bad = ledger_pb2.AuditEntry(entry_id="e1", service="vault", action="vault.X", resource_id="a" * 129)
    with pytest.raises(InvalidArgument) as err:
        MerkleLog.append(log, [bad])
    assert err.value.field == "entries[0].resource_id"


# -- API keys with an expiry --------------------------------------------------------------------------------


def test_a_key_created_with_an_expiry_is_refused_after_it(rt_stack) -> None:
    before = time.time()
    api_key = tenant_key(rt_stack, "shortlived", "--expires-in", "10")
    with rt_stack.client(api_key=api_key) as client:
        client._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest())  # admitted before its expiry
        listed = rt_stack.cli("keys", "list", "--tenant", "shortlived")
        assert "EXPIRES (UTC)" in listed.stdout
        shown = next(ln for ln in listed.stdout.splitlines() if "shortlived" in ln).split()
        assert shown[4:6] != ["-"] and time.strftime("%Y-", time.gmtime()) in shown[4]  # an expiry is listed
        deadline = time.monotonic() + 30
        while True:
            try:
                client._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest())
            except AuthenticationError as exc:
                info = exc
                break
            assert time.monotonic() < deadline, "an expired key is still admitted"
            time.sleep(0.25)
    assert time.time() >= before + 9  # not before its time (whole seconds)
    assert info.code == "API_KEY_EXPIRED" and info.grpc_code == "UNAUTHENTICATED"
    assert "(expired)" in rt_stack.cli("keys", "list", "--tenant", "shortlived").stdout
    for bad in ("0", "1w", "soon"):
        out = rt_stack.cli("keys", "create", "--tenant", "shortlived", "--expires-in", bad)
        assert out.returncode != 0 and "--expires-in" in out.stderr


def test_expiry_is_in_the_signed_claims_too(tmp_path) -> None:
    """A key past the expiry in its claims is refused even where the registry says nothing of it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tensafe.runtime.errors import Unauthenticated
    from tensafe.runtime.identity import KeyIssuer, parse_api_key

    private = Ed25519PrivateKey.generate()
    expired = KeyIssuer(private).issue("key_0000000000000001", "acme", expires_at=time.time() - 1)
    with pytest.raises(Unauthenticated) as info:
        parse_api_key(expired, private.public_key())
    assert info.value.reason == "API_KEY_EXPIRED"
    fresh = KeyIssuer(private).issue("key_0000000000000002", "acme", expires_at=time.time() + 60)
    assert parse_api_key(fresh, private.public_key()).expires_at is not None

