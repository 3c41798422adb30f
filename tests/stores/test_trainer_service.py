"""The trainer's logic (service.Trainer) in-process, called with plain values, on the tiny model.

Its peers are real: the vault, accountant and ledger are built by their own servicer factories
(``TensafeServer``, in this process, over loopback) on SQLite and PostgreSQL (``conftest.BACKENDS``),
and the trainer reaches them through its clients as it does in a stack, with the caller's API key.
No ``tensafe up``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime import context as call_context
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.bootstrap import DEFAULT_TENANT, initialise_data_dir
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.context import CallContext
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.runtime.identity import KeyIssuer, KeyRegistry, load_public_key, parse_api_key
from tensafe.runtime.peers import PeerChannels
from tensafe.runtime.server import TensafeServer
from tensafe.runtime.vault_client import VaultClient
from tensafe.trainer.futures import Op
from tensafe.trainer.service import Trainer
from tensafe.trainer.servicer import batch_value
from tensafe.trainer.store import TrainerStore
from tensafe.trainer.values import (
    DPSpec,
    LoraSpec,
    LossSpec,
    OptimizerSpec,
    SamplingSpec,
    SessionConfig,
)
from tg_tinker.training import batch_to_proto

SUCCEEDED = trainer_pb2.FUTURE_STATE_SUCCEEDED
FAILED = trainer_pb2.FUTURE_STATE_FAILED
CANCELLED = trainer_pb2.FUTURE_STATE_CANCELLED
TERMINAL = {SUCCEEDED, FAILED, CANCELLED}
OTHER = "other-tenant"
BATCH = batch_value(batch_to_proto({"input_ids": [[1, 20, 30, 40, 50, 60, 70, 80], [1, 21, 31, 41, 51, 61, 71, 81]]}))
PROMPT = [5, 6, 7, 8]


def config(**kw) -> SessionConfig:
    kw.setdefault("lora", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    kw.setdefault("optimizer", OptimizerSpec(name="adamw", learning_rate=5e-3))
    return SessionConfig(model_ref="tiny", batch_size=2, seed=1, **kw)


@dataclass
class Peers:
    trainer: Trainer
    callers: dict[str, CallContext]  # tenant -> its caller (a real API key of that tenant)

    @contextmanager
    def as_tenant(self, tenant: str) -> Iterator[str]:
        token = call_context.bind(self.callers[tenant])
        try:
            yield tenant
        finally:
            call_context.unbind(token)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory, module_db_env: dict[str, str], tiny_model: Path) -> Iterator[Peers]:
    tmp = tmp_path_factory.mktemp("trainer-service")
    env = {**module_db_env, "TENSAFE_LOG_LEVEL": "WARNING"}
    cfg = ServerConfig.load(env, env_file=tmp / "no.env", data_dir=tmp / "data", port=0, metrics_port=0)
    api_key, _ = initialise_data_dir(cfg)
    registry = KeyRegistry.from_config(cfg)
    _, other_key = registry.create_key(KeyIssuer.load_or_create(cfg.signing_key_path(), cfg.public_key_path()),
                                       OTHER, "the other tenant")
    registry.engine.dispose()
    public = load_public_key(cfg.public_key_path())
    callers = {}
    for key in (api_key, other_key):
        principal = parse_api_key(key, public)
        callers[principal.tenant_id] = CallContext(principal, f"req-{uuid.uuid4().hex[:8]}", key,
                                                   "/tensafe.api.trainer.v1.TrainerService/Test")
    assert set(callers) == {DEFAULT_TENANT, OTHER}
    server = TensafeServer(cfg, ["vault", "accountant", "ledger"])
    server.start()
    channels = PeerChannels(cfg, "trainer", f"127.0.0.1:{server.port}", frozenset(server.service_names))
    trainer = Trainer(tiny_model.parent, VaultClient(channels, cfg.max_artifact_mb << 20), AccountantClient(channels))
    trainer.service_key = cfg.service_key
    try:
        yield Peers(trainer, callers)
    finally:
        trainer.shutdown()
        channels.close()
        server.stop(0)


def done(op: Op, timeout: float = 120.0) -> Op:
    deadline = time.monotonic() + timeout
    while op.state not in TERMINAL:
        assert time.monotonic() < deadline, f"op {op.future_id} still in state {op.state}"
        time.sleep(0.005)
    return op


def ok(op: Op):
    done(op)
    assert op.state == SUCCEEDED, op.error
    return op.result


class TestTrainerService:
    def test_loss_goes_down_on_a_repeated_batch(self, peers: Peers) -> None:
        t = peers.trainer
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config())
            try:
                losses = []
                for _ in range(8):
                    losses.append(ok(t.forward_backward(tenant, s.session_id, BATCH)).loss)
                    ok(t.optim_step(tenant, s.session_id))
                after = ok(t.forward(tenant, s.session_id, BATCH)).loss
                assert after < losses[0] * 0.9, losses
                assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
                assert ok(t.get_info(tenant, s.session_id)).step == 8
            finally:
                t.close(tenant, s.session_id)

    def test_a_seeded_sample_is_deterministic(self, peers: Peers) -> None:
        t = peers.trainer
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config())
            try:
                spec = SamplingSpec(max_tokens=12, temperature=1.0, seed=7, num_samples=2)
                first = ok(t.sample(tenant, s.session_id, spec, prompt_token_ids=[PROMPT]))
                again = ok(t.sample(tenant, s.session_id, spec, prompt_token_ids=[PROMPT]))
                tokens = [list(x.token_ids) for x in first.samples]
                assert len(tokens) == 2 and all(tokens)
                assert tokens == [list(x.token_ids) for x in again.samples]
                greedy = SamplingSpec(max_tokens=12, temperature=0.0)
                g1 = ok(t.sample(tenant, s.session_id, greedy, prompt_token_ids=[PROMPT])).samples[0]
                g2 = ok(t.sample(tenant, s.session_id, greedy, prompt_token_ids=[PROMPT])).samples[0]
                assert list(g1.token_ids) == list(g2.token_ids) and g1.token_ids
                with pytest.raises(InvalidArgument) as err:
                    t.sample(tenant, s.session_id, spec, prompts=["hi"], prompt_token_ids=[PROMPT])
                assert err.value.field == "prompts"
            finally:
                t.close(tenant, s.session_id)

    def test_cancel_stops_a_queued_op_and_a_running_sample(self, peers: Peers) -> None:
        t = peers.trainer
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config())
            try:
                with s.base.lock:  # the worker is held: ops stay queued
                    queued = t.forward_backward(tenant, s.session_id, BATCH)
                    cancelled, op = t.cancel(tenant, s.session_id, queued.future_id)
                    assert cancelled and op is queued
                assert done(queued).state == CANCELLED
                long = t.sample(tenant, s.session_id, SamplingSpec(max_tokens=200, temperature=1.0, num_samples=8),
                                prompt_token_ids=[PROMPT])
                deadline = time.monotonic() + 60
                while long.state == trainer_pb2.FUTURE_STATE_PENDING:
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
                assert t.cancel(tenant, s.session_id, long.future_id)[0]
                assert done(long).state == CANCELLED and long.error.reason == "FUTURE_CANCELLED"
                # Nothing of the cancelled forward_backward was applied: an optimizer step has no gradient.
                step = done(t.optim_step(tenant, s.session_id))
                assert step.state == FAILED and "without gradients" in step.error.message
            finally:
                t.close(tenant, s.session_id)
            with pytest.raises(FailedPrecondition):
                t.get_info(tenant, s.session_id)  # closed

    def test_another_tenant_gets_not_found(self, peers: Peers) -> None:
        t = peers.trainer
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config())
            op = t.get_info(tenant, s.session_id)
        try:
            for call in (lambda: t.get(OTHER, s.session_id), lambda: t.close(OTHER, s.session_id),
                         lambda: t.forward_backward(OTHER, s.session_id, BATCH),
                         lambda: t.optim_step(OTHER, s.session_id),
                         lambda: t.sample(OTHER, s.session_id, SamplingSpec(max_tokens=4), prompt_token_ids=[PROMPT]),
                         lambda: t.future(OTHER, s.session_id, op.future_id),
                         lambda: t.cancel(OTHER, s.session_id, op.future_id)):
                with pytest.raises(NotFound):
                    call()
            assert t.list(OTHER, include_closed=True) == []
            assert [x.session_id for x in t.list(DEFAULT_TENANT, include_closed=False)] == [s.session_id]
            assert ok(op).session_id == s.session_id and not s.closed
        finally:
            t.close(DEFAULT_TENANT, s.session_id)

    def test_save_and_load_through_the_vault(self, peers: Peers) -> None:
        t = peers.trainer
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config())
            try:
                for _ in range(3):
                    ok(t.forward_backward(tenant, s.session_id, BATCH))
                    ok(t.optim_step(tenant, s.session_id))
                at_save = ok(t.forward(tenant, s.session_id, BATCH)).loss
                saved = ok(t.save_state(tenant, s.session_id, "three-steps", True, {"epoch": 1}))
                assert saved.step == 3 and saved.artifact_id and saved.size_bytes > 0
                for _ in range(3):  # move on, then come back
                    ok(t.forward_backward(tenant, s.session_id, BATCH))
                    ok(t.optim_step(tenant, s.session_id))
                assert ok(t.forward(tenant, s.session_id, BATCH)).loss != pytest.approx(at_save, abs=1e-6)
                loaded = ok(t.load_state(tenant, s.session_id, saved.artifact_id))
                assert loaded.step == 3 and loaded.optimizer_restored
                assert dict(loaded.metadata) == {"epoch": 1}
                assert ok(t.forward(tenant, s.session_id, BATCH)).loss == pytest.approx(at_save, abs=1e-5)
            finally:
                t.close(tenant, s.session_id)
        with peers.as_tenant(OTHER) as other:  # the vault answers another tenant NOT_FOUND
            theirs = t.create_session(other, config())
            try:
                refused = done(t.load_state(other, theirs.session_id, saved.artifact_id))
                assert refused.state == FAILED and refused.error.reason == "RESOURCE_NOT_FOUND", refused.error
                assert refused.error.code == 5  # grpc NOT_FOUND
                assert theirs.step == 0
            finally:
                t.close(other, theirs.session_id)

    def test_a_dp_step_is_accounted_by_the_accountant(self, peers: Peers) -> None:
        t = peers.trainer
        dp = DPSpec(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=8.0, target_delta=1e-5,
                    dataset_size=100)
        with peers.as_tenant(DEFAULT_TENANT) as tenant:
            s = t.create_session(tenant, config(dp=dp, optimizer=OptimizerSpec(name="sgd", learning_rate=0.1)))
            try:
                assert s.dp is not None and s.dp.budget_id
                with pytest.raises(InvalidArgument) as err:  # a loss coupling rows is refused in DP
                    t.forward_backward(tenant, s.session_id, BATCH, LossSpec("margin_ranking"))
                assert err.value.field == "loss.name"
                with pytest.raises(InvalidArgument) as err:
                    t.optim_step(tenant, s.session_id, apply_dp_noise=False)
                assert err.value.field == "apply_dp_noise"
                ok(t.forward_backward(tenant, s.session_id, BATCH))
                first = ok(t.optim_step(tenant, s.session_id)).dp_metrics
                ok(t.forward_backward(tenant, s.session_id, BATCH))
                second = ok(t.optim_step(tenant, s.session_id)).dp_metrics
                assert first.noise_applied and first.budget_id == s.dp.budget_id
                assert 0 < first.total_epsilon < second.total_epsilon and second.accounted_steps == 2
                budget = t.accountant.get_budget(call_context.current(), s.dp.budget_id)
                assert budget.num_steps == 2 and budget.spent_epsilon == pytest.approx(second.total_epsilon)
            finally:
                t.close(tenant, s.session_id)

    def test_a_bad_config_is_refused_before_anything_loads(self, peers: Peers) -> None:
        t = peers.trainer
        open_before = len(t.list(DEFAULT_TENANT, include_closed=False))
        with pytest.raises(InvalidArgument) as err:
            t.create_session(DEFAULT_TENANT, config(lora=LoraSpec(rank=0, alpha=8.0, target_modules=("q_proj",))))
        assert err.value.field == "config.lora_config.rank"
        with pytest.raises(InvalidArgument) as err:
            t.create_session(DEFAULT_TENANT, config(loss=LossSpec("no-such-loss")))
        assert err.value.field == "loss.name"
        assert len(t.list(DEFAULT_TENANT, include_closed=False)) == open_before and t._reserved == {}


def test_tensor_values_decode_by_the_sdk_rules() -> None:
    """A batch's tensors reach the logic as they were sent; the trainer decodes them by the SDK's rules."""
    from tensafe.trainer.batches import prepare_batch

    prepared = prepare_batch(BATCH, vocab_size=384, max_length=64)
    assert prepared.input_ids.tolist()[1] == [1, 21, 31, 41, 51, 61, 71, 81]
    bad = batch_value(trainer_pb2.Batch(input_ids=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[2, 8],
                                                                      data=b"\0" * 8)))
    with pytest.raises(InvalidArgument) as err:
        prepare_batch(bad, vocab_size=384, max_length=64)
    assert err.value.field == "batch.input_ids.data"


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> TrainerStore:
    return TrainerStore(service_engine(request, "trainer", tmp_path))


class TestTrainerStore:
    def test_an_op_entry_lands_in_the_outbox(self, store: TrainerStore) -> None:
        import sqlalchemy as sa

        from tensafe.api.ledger.v1 import ledger_pb2
        from tensafe.runtime.audit import outbox
        from tensafe.runtime.identity import Principal
        from tensafe.trainer.audit_trail import DENIED, OpAudit

        audit = OpAudit(store.engine)
        caller = CallContext(Principal("t1", "key_1"), "req-9", "", "/tensafe.api.trainer.v1.TrainerService/OptimStep")
        audit.record(caller, "t1", "trainer.OptimStep", DENIED, "ses_1", {"rows": 9, "reason": "DP_BATCH_IMPLAUSIBLE"})
        OpAudit(None).record(caller, "t1", "trainer.OptimStep", DENIED, "ses_2", {})  # no database: nothing kept
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.c.entry_id, outbox.c.payload)).all()
        assert len(rows) == 1
        entry = ledger_pb2.AuditEntry.FromString(rows[0].payload)
        assert entry.entry_id == rows[0].entry_id and entry.resource_id == "ses_1"
        assert (entry.tenant_id, entry.key_id, entry.request_id) == ("t1", "key_1", "req-9")
        assert entry.outcome == ledger_pb2.AUDIT_OUTCOME_DENIED
        assert dict(entry.details) == {"phase": "run", "rows": "9", "reason": "DP_BATCH_IMPLAUSIBLE"}
        with pytest.raises(sa.exc.IntegrityError):  # an entry id is queued once
            store.queue_audit_entry(entry.entry_id, rows[0].payload)
