"""DP bookkeeping under attack: shared bases, spent-without-update, budget laundering, implausible batches.

- Several tenants' DP and non-DP sessions on one shared base: every DP step is applied and its epsilon
  is exactly what an independent dp-accounting PLD says (PEFT freezes inactive adapters; the clipper
  knows its session's parameters by identity).
- A DP step that fails after the accountant recorded it: weights and optimizer state untouched, the
  step reported as spent without update (session, step result, ledger entry).
- A DP checkpoint laundered through a non-DP session, or with its "dp" record edited out and uploaded
  again: the lineage the vault recorded (which tenants cannot write) keeps the budget and reports the
  non-private steps / the unattested upload.
- A logical batch far larger than Poisson sampling at the declared rate allows: refused before it is
  accounted, weights unchanged, the batch dropped, the refusal in the ledger.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator

import dp_accounting
import grpc
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import Stack, eventually, start_stack
from tensafe.api.common.v1 import common_pb2
from tensafe.api.vault.v1 import vault_pb2, vault_pb2_grpc
from tg_tinker import ConflictError, DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig

ROWS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42],
        [0, 17, 18, 19, 20, 21, 22, 2], [0, 300, 301, 9, 8, 7, 6, 5]]
BATCH = {"input_ids": ROWS, "attention_mask": [[1] * 8] * 4, "labels": ROWS}
LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def rows(n: int) -> dict:
    ids = [ROWS[i % 4] for i in range(n)]
    return {"input_ids": ids, "attention_mask": [[1] * 8] * n, "labels": ids}


def pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """An independent dp-accounting computation of what the accountant should report."""
    acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acct.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return acct.get_epsilon(delta)


def config(dp: dict | None = None, batch_size: int = 4, seed: int = 5) -> TrainingConfig:
    dp_cfg = None
    if dp is not None:
        values = {"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "target_epsilon": 20.0,
                  "target_delta": 1e-5, "dataset_size": 400}
        values.update(dp)
        dp_cfg = DPConfig(**values)
    return TrainingConfig(model_ref="tiny", batch_size=batch_size, lora_config=LORA, seed=seed,
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.5), dp_config=dp_cfg)


def logprobs(tc) -> np.ndarray:
    return tc.forward(BATCH, return_logprobs=True).result(timeout=120).logprobs


def audit_entries(client, stack: Stack, *, resource_id: str, action: str, want: int,
                  service: str = "trainer") -> list:
    """The entries an op wrote when it ran (beside its call's own entry), once delivered to the ledger."""
    vkey = stack.cli("ledger", "vkey").stdout.strip()

    def found() -> list:
        got = [e for e in client.get_audit_logs(service=service, resource_id=resource_id, limit=1000, vkey=vkey)
               if e.action == action and e.details.get("phase") == "run"]
        return got if len(got) >= want else []

    return eventually(found, 30, interval=0.3, message=f"{want} run-phase {action} entries for {resource_id}")


@pytest.fixture(scope="module")
def dp_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model, module_db_env) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("dpbook"), {**module_db_env, "TENSAFE_MODEL_DIR": str(tiny_model.parent)})
    yield s
    assert s.process.stop() == 0, s.process.output()


def tenant_client(stack: Stack, name: str):
    out = stack.cli("keys", "create", "--tenant", name)
    assert out.returncode == 0, out.stderr
    return stack.client(api_key=out.stdout.strip().splitlines()[-1], retry_count=2)


# --------------------------------------------------------------------------------- in process


def test_clipper_knows_its_parameters_while_peft_has_them_frozen(tiny_model) -> None:
    """PEFT's add_adapter freezes the new (inactive) adapter: the clipper built then must still hold it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tensafe.trainer.dp import PerSampleClipper, SecureGaussian, lora_layers

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    base.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora, adapter_name="ses_a")
    model.add_adapter("ses_b", lora)
    mine = [p for n, p in model.named_parameters() if ".ses_b." in n]
    assert mine and not any(p.requires_grad for p in mine)  # what PEFT does: the cause of the break
    clipper = PerSampleClipper(lora_layers(model, "ses_b"), 1.0, mine)
    assert {id(p) for p in clipper.params} == {id(p) for p in mine}
    update = clipper.noised_mean(1.0, 4, SecureGaussian())  # main: SecureGaussian.sample(0) fails here
    assert set(update) == set(mine) and all(torch.count_nonzero(g) > 0 for g in update.values())


class _Accountant:
    """Records steps as the accountant service answers them (the trainer's side is under test here)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def create_budget(self, caller, session_id, target_epsilon, target_delta, accountant_type,
                      sample_rate):
        from tensafe.api.accountant.v1 import accountant_pb2
        return accountant_pb2.Budget(budget_id="bud_test", target_epsilon=target_epsilon, target_delta=target_delta)

    def record_step(self, caller, budget_id, step_id, noise_multiplier, sample_rate):
        from tensafe.api.accountant.v1 import accountant_pb2
        self.steps.append(step_id)
        return accountant_pb2.RecordStepResponse(budget=accountant_pb2.Budget(
            budget_id=budget_id, spent_epsilon=0.1 * len(self.steps), num_steps=len(self.steps)))


def test_a_step_that_fails_after_its_record_is_spent_without_update(tiny_model, tmp_path) -> None:
    import sqlalchemy as sa

    from tensafe.api.ledger.v1 import ledger_pb2
    from tensafe.api.trainer.v1 import trainer_pb2
    from tensafe.runtime import context as call_context
    from tensafe.runtime.audit import outbox
    from tensafe.runtime.context import CallContext
    from tensafe.runtime.db import RUNTIME_VERSIONS, create_engine, migrate
    from tensafe.runtime.errors import TensafeError
    from tensafe.runtime.identity import Principal
    from tensafe.trainer.audit_trail import OpAudit
    from tensafe.trainer.service import Trainer
    from tensafe.trainer.servicer import batch_value, config_value
    from tg_tinker.training import batch_to_proto

    engine = create_engine(f"sqlite:///{tmp_path / 'trainer.db'}")
    migrate(engine, [RUNTIME_VERSIONS], version_table="alembic_version_trainer")
    accountant = _Accountant()
    trainer = Trainer(tiny_model.parent, accountant=accountant)
    trainer.audit = OpAudit(engine)
    caller = CallContext(Principal("t1", "key_1"), "req-1", "", "/tensafe.api.trainer.v1.TrainerService/OptimStep")
    token = call_context.bind(caller)
    try:
        other = trainer.create_session("t2", config_value(config().to_proto()))  # another session on the same base
        s = trainer.create_session("t1", config_value(config({}).to_proto()))
    finally:
        call_context.unbind(token)
    loss = s.settings.default_loss
    batch = trainer._batch(s, batch_value(batch_to_proto(BATCH)), loss)

    def op(fn):  # run as the worker runs an op
        with s.base.lock:
            s.base.activate(s.session_id)
            for p in s.params:
                p.requires_grad_(True)
            return fn()

    op(lambda: s.forward_backward(batch, loss, False))
    before = [p.detach().clone() for p in s.params]
    real_step = s.optimizer.step

    def fails_half_way() -> None:  # the update lands, then the device fails: it must be rolled back
        real_step()
        raise RuntimeError("device lost")

    s.optimizer.step = fails_half_way
    with pytest.raises(TensafeError) as info:
        op(lambda: s.optim_step(caller))
    s.optimizer.step = real_step
    assert info.value.metadata["spent_without_update"] == "1" and len(accountant.steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, s.params, strict=True))  # nothing applied
    assert not s.optimizer.state  # the optimizer state is put back too (SGD without momentum: none)
    assert s.step == 0 and s.dp.clipper.rows == 0  # the logical batch is gone with the failed step
    info_msg = op(s.info)[1]
    assert info_msg.spent_without_update == 1 and info_msg.lineage.private_steps == 0
    with engine.connect() as conn:
        entries = [ledger_pb2.AuditEntry.FromString(r.payload) for r in conn.execute(sa.select(outbox.c.payload))]
    failed = [e for e in entries if e.action == "trainer.OptimStep"]
    assert len(failed) == 1 and failed[0].outcome == ledger_pb2.AUDIT_OUTCOME_FAILED
    assert failed[0].details["dp_step"] == "spent_without_update" and failed[0].request_id == "req-1"
    assert failed[0].details["step_id"] == accountant.steps[0] and failed[0].tenant_id == "t1"
    # The next step is applied, under a new step id.
    op(lambda: s.forward_backward(batch, loss, False))
    _, res = op(lambda: s.optim_step(caller))
    assert res.step == 1 and res.dp_metrics.spent_without_update == 1 and len(set(accountant.steps)) == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, s.params, strict=True))
    assert isinstance(res, trainer_pb2.OptimStepResult)
    trainer.shutdown()
    del other


@pytest.mark.parametrize(("n", "q"), [(400, 0.005), (400, 0.01), (50_000, 8 / 50_000), (1000, 0.5), (10**7, 1e-5)])
def test_batch_limit_refuses_only_sizes_rarer_than_one_in_a_billion(n: int, q: float) -> None:
    from tensafe.trainer.dp import poisson_batch_limit

    limit = poisson_batch_limit(q, n, round(n * q))
    assert stats.binom.sf(limit, n, q) < 1e-9  # P[size >= limit + 1]: every refused size is rarer than 1e-9
    assert limit < n * q + 12 * math.sqrt(n * q * (1 - q)) + 40  # and the bound is not vacuous
    no_n = poisson_batch_limit(q, None, round(n * q))  # sample_rate alone: Poisson, the heavier tail
    assert no_n >= limit - 1 and stats.poisson.sf(no_n, n * q) < 1e-9


# ----------------------------------------------------------------------------- through the stack


def test_dp_and_non_dp_sessions_of_three_tenants_share_one_base(dp_stack) -> None:
    """Every step of every session applied; each DP epsilon equals an independent PLD within 0.5%."""
    clients = [tenant_client(dp_stack, f"acme{i}") for i in range(3)]
    plans = [  # (tenant, dp) in creation order: DP sessions created while others are open
        (0, None), (1, {"noise_multiplier": 1.1}), (2, None), (0, {"noise_multiplier": 0.9, "dataset_size": 800}),
        (2, {"noise_multiplier": 1.3, "dataset_size": 200})]
    sessions = [clients[t].create_training_client(config(dp, seed=3 + i)) for i, (t, dp) in enumerate(plans)]
    try:
        start = [logprobs(tc) for tc in sessions]
        for round_ in range(1, 4):
            pending = []
            for tc in sessions:  # queued together: the ops of all sessions interleave on the base's worker
                tc.forward_backward(BATCH)
                pending.append(tc.optim_step())
            for (_, dp), fut in zip(plans, pending, strict=True):
                res = fut.result(timeout=300)
                assert res.step == round_ and res.applied
                if dp is not None:
                    assert res.dp_metrics.noise_applied and res.dp_metrics.accounted_steps == round_
                    assert res.dp_metrics.spent_without_update == 0
        for tc, before, (_, dp) in zip(sessions, start, plans, strict=True):
            assert not np.allclose(logprobs(tc), before)  # the weights moved, in every session
            info = tc.get_info()
            assert info.step == 3
            if dp is not None:
                rate = 4 / dp.get("dataset_size", 400)
                assert info.total_epsilon == pytest.approx(pld_epsilon(dp["noise_multiplier"], rate, 3, 1e-5),
                                                           rel=5e-3)
                assert info.spent_without_update == 0 and info.lineage.private_steps == 3
                assert info.lineage.dp_covered
            else:
                assert info.lineage.non_private_steps == 3
    finally:
        for tc in sessions:
            tc.close()
        for c in clients:
            c.close()


def test_implausible_dp_batch_is_refused_before_it_is_accounted(dp_stack) -> None:
    client = tenant_client(dp_stack, "bigbatch")
    # batch_size 2 of 400: q = 0.005, q x N = 2; Poisson sampling gives more than 16 rows with p < 1e-9.
    with client, client.create_training_client(config({}, batch_size=2)) as tc:
        before = logprobs(tc)
        for n in (2000, 17):
            tc.forward_backward(rows(n))
            with pytest.raises(ConflictError) as info:
                tc.optim_step().result(timeout=300)
            assert info.value.code == "DP_BATCH_IMPLAUSIBLE", info.value
            assert info.value.details["rows"] == str(n) and info.value.details["limit"] == "16"
            np.testing.assert_array_equal(logprobs(tc), before)  # no weight changed
            got = tc.get_info()
            assert got.total_epsilon == 0.0 and got.step == 0  # nothing was recorded with the accountant
        # The refused batch was dropped, not kept: a plausible one is accounted and applied on its own.
        tc.forward_backward(rows(16))
        ok = tc.optim_step().result(timeout=300)
        assert ok.step == 1 and ok.dp_metrics.accounted_steps == 1 and ok.num_tokens == 16 * 7
        session_id = tc.session_id
        refusals = audit_entries(client, dp_stack, resource_id=session_id, action="trainer.OptimStep", want=2)
        assert [e.outcome for e in refusals] == ["denied", "denied"], refusals
        assert all(e.details["reason"] == "DP_BATCH_IMPLAUSIBLE" and e.details["code"] == "FAILED_PRECONDITION"
                   for e in refusals)
        assert [e.details["rows"] for e in refusals] == ["2000", "17"]


def _edited(data: bytes, drop: tuple[str, ...]) -> bytes:
    """The checkpoint with keys removed from its session.json (what a tenant can do to its own download)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name == "session.json":
                record = json.loads(body)
                for key in drop:
                    record.pop(key, None)
                body = json.dumps(record).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


def test_dp_budget_is_not_laundered_through_a_non_dp_session(dp_stack) -> None:
    client = tenant_client(dp_stack, "launder1")
    with client:
        with client.create_training_client(config({})) as dp_tc:
            for _ in range(2):
                dp_tc.forward_backward(BATCH)
                spent = dp_tc.optim_step().result(timeout=300).dp_metrics
            first = dp_tc.save_state(name="dp")
        budget = spent.budget_id
        art = client.describe_artifact(first.artifact_id)
        assert art.lineage.attested and [b.budget_id for b in art.lineage.budgets] == [budget]
        assert art.lineage.budgets[0].epsilon == pytest.approx(spent.total_epsilon)
        assert art.lineage.private_steps == 2 and art.lineage.non_private_steps == 0
        # Loaded into a non-DP session (allowed), trained without DP, saved again.
        with client.create_training_client(config()) as plain:
            plain.load_state(first.artifact_id)
            for _ in range(3):
                plain.forward_backward(BATCH)
                plain.optim_step().result(timeout=300)
            second = plain.save_state(name="laundered")
        art2 = client.describe_artifact(second.artifact_id)
        assert art2.lineage.attested and art2.lineage.parent_artifact_id == first.artifact_id
        assert [b.budget_id for b in art2.lineage.budgets] == [budget]
        assert art2.lineage.non_private_steps == 3 and art2.lineage.private_steps == 2
        assert second.lineage == art2.lineage
        # A fresh DP session (a new budget, epsilon 0) may not start from it.
        with client.create_training_client(config({})) as fresh:
            with pytest.raises(ConflictError) as info:
                fresh.load_state(second.artifact_id)
            assert budget in str(info.value)
            assert fresh.get_info().lineage.parent_artifact_id == ""
        # Continuing the budget works, and reports the non-private ancestry instead of a clean epsilon.
        with client.create_training_client(config({"budget_id": budget})) as resumed:
            loaded = resumed.load_state(second.artifact_id)
            assert loaded.lineage.non_private_steps == 3
            got = resumed.get_info()
            assert got.total_epsilon == pytest.approx(spent.total_epsilon) and got.total_epsilon > 0
            assert got.lineage.non_private_steps == 3 and not got.lineage.dp_covered
            assert got.lineage.parent_artifact_id == second.artifact_id
        saves = audit_entries(client, dp_stack, resource_id=second.artifact_id, action="trainer.SaveState", want=1)
        assert saves and saves[0].outcome == "success", saves
        assert saves[0].details["parent_artifact_id"] == first.artifact_id
        assert saves[0].details["budgets"].startswith(f"{budget}:") and saves[0].details["non_private_steps"] == "3"


def test_an_edited_upload_is_unattested_and_reported(dp_stack) -> None:
    client = tenant_client(dp_stack, "launder2")
    with client:
        with client.create_training_client(config({})) as dp_tc:
            dp_tc.forward_backward(BATCH)
            dp_tc.optim_step().result(timeout=300)
            saved = dp_tc.save_state(name="dp")
        # The tenant downloads its checkpoint, edits the DP record out and uploads it again.
        edited = _edited(client.get_artifact(saved.artifact_id), ("dp", "lineage"))
        upload = client.artifacts.put(edited, kind="checkpoint", name="clean", content_type="application/x-tar")
        assert not upload.lineage.attested and client.describe_artifact(upload.artifact_id).lineage.budgets == []
        with client.create_training_client(config({})) as fresh:
            loaded = fresh.load_state(upload.artifact_id)
            assert loaded.lineage.external_ancestry
            got = fresh.get_info()
            assert got.total_epsilon == 0.0 and got.lineage.external_ancestry and not got.lineage.dp_covered
            fresh.forward_backward(BATCH)
            fresh.optim_step().result(timeout=300)
            resaved = fresh.save_state(name="from-upload")
        art = client.describe_artifact(resaved.artifact_id)  # the unattested ancestor stays on record
        assert art.lineage.attested and art.lineage.external_ancestry
        assert art.lineage.parent_artifact_id == upload.artifact_id


def test_a_tenant_cannot_write_a_lineage(dp_stack) -> None:
    client = tenant_client(dp_stack, "forger")
    out = dp_stack.cli("keys", "create", "--tenant", "forger")
    key = out.stdout.strip().splitlines()[-1]
    stub = vault_pb2_grpc.VaultServiceStub(grpc.insecure_channel(dp_stack.target))
    forged = common_pb2.Lineage(attested=True, session_id="ses_0123456789abcdef")
    for mac in (b"", b"\0" * 32):
        header = vault_pb2.PutArtifactHeader(kind=vault_pb2.ARTIFACT_KIND_CHECKPOINT, name="forged",
                                             lineage=forged, lineage_mac=mac)
        reqs = iter([vault_pb2.PutArtifactRequest(header=header), vault_pb2.PutArtifactRequest(chunk=b"x" * 100)])
        with pytest.raises(grpc.RpcError) as info:
            stub.PutArtifact(reqs, timeout=30, metadata=(("authorization", f"Bearer {key}"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    assert [a for a in client.list_artifacts() if a.name == "forged"] == []  # nothing was stored
    client.close()
