"""The privacy accountant. The maths in-process against an independent dp-accounting computation
written here; the service against a real `tensafe up` (SQLite and PostgreSQL): exhaustion at exactly
the right step, idempotent and durable records, restarts, tenant isolation, refused inputs."""

from __future__ import annotations

import threading
import uuid

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from conftest import start_stack
from tensafe.accountant import accounting
from tensafe.api.accountant.v1 import accountant_pb2 as pb
from tensafe.api.common.v1 import common_pb2
from tg_tinker import ConflictError, DPBudgetExceededError, NotFoundError, ValidationError

PLD, RDP, PRV = common_pb2.ACCOUNTANT_TYPE_PLD, common_pb2.ACCOUNTANT_TYPE_RDP, common_pb2.ACCOUNTANT_TYPE_PRV
PLD_RTOL, RDP_RTOL = 0.005, 0.001


def independent_epsilon(kind: str, steps: list[tuple[float, float, int]], delta: float) -> float:
    """Plain dp-accounting, composing each (noise, rate, count) as its documentation shows."""
    acct = (pld_privacy_accountant.PLDAccountant() if kind == "pld" else rdp_privacy_accountant.RdpAccountant())
    for noise, rate, count in steps:
        acct.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), count)
    return acct.get_epsilon(delta)


def largest_k(kind: str, noise: float, rate: float, target: float, delta: float) -> int:
    k = 0
    while independent_epsilon(kind, [(noise, rate, k + 1)], delta) <= target:
        k += 1
    return k


def call(client, method: str, request):
    return client._call("accountant", method, request)


def new_tenant(stack, name: str):
    out = stack.cli("keys", "create", "--tenant", f"{name}-{uuid.uuid4().hex[:6]}")
    assert out.returncode == 0, out.stderr
    return stack.client(api_key=out.stdout.strip().splitlines()[-1], retry_count=0)


def create_budget(client, *, epsilon: float = 8.0, delta: float = 1e-5, kind: int = PLD,
                  rate: float = 0.01, session: str | None = None) -> pb.Budget:
    return call(client, "CreateBudget", pb.CreateBudgetRequest(
        session_id=session or "sess_" + uuid.uuid4().hex, target_epsilon=epsilon, target_delta=delta,
        accountant_type=kind, sample_rate=rate)).budget


def record(client, budget_id: str, step_id: str, noise: float, rate: float | None = None,
           steps: int | None = None) -> pb.RecordStepResponse:
    req = pb.RecordStepRequest(budget_id=budget_id, step_id=step_id, noise_multiplier=noise)
    if rate is not None:
        req.sample_rate = rate
    if steps is not None:
        req.num_steps = steps
    return call(client, "RecordStep", req)


def all_steps(client, budget_id: str, page_size: int = 2) -> list[pb.StepRecord]:
    out, token = [], ""
    while True:
        page = call(client, "ListSteps", pb.ListStepsRequest(budget_id=budget_id, page_size=page_size,
                                                             page_token=token))
        out.extend(page.steps)
        token = page.next_page_token
        if not token:
            return out


# -- the maths, in-process ---------------------------------------------------------------------

CASES = [  # (noise, rate, steps), each composed as one run of identical steps
    [(1.0, 0.01, 1000)],
    [(0.8, 0.004, 2500)],
    [(1.5, 0.05, 200)],
    [(2.0, 0.1, 30)],
    [(1.1, 0.01, 400), (0.9, 0.02, 150), (1.1, 0.01, 1)],  # a run whose rate and noise changed
]


@pytest.mark.parametrize("steps", CASES, ids=lambda s: "+".join(f"{z}x{q}x{n}" for z, q, n in s))
@pytest.mark.parametrize("kind,rtol", [("pld", PLD_RTOL), ("rdp", RDP_RTOL)])
def test_epsilon_matches_independent_dp_accounting(kind: str, rtol: float, steps) -> None:
    acct = accounting.create(kind)
    for noise, rate, count in steps:
        acct.compose(noise, rate, count)
    assert acct.num_steps == sum(n for _, _, n in steps)
    for delta in (1e-5, 1e-6):
        expected = independent_epsilon(kind, steps, delta)
        assert acct.epsilon(delta) == pytest.approx(expected, rel=rtol)


def test_identical_steps_compose_once_and_answers_are_cached() -> None:
    acct = accounting.create("pld", [(1.0, 0.01, 6000)])
    for _ in range(4000):  # one by one: the state stays one (noise, rate) with a count
        acct.compose(1.0, 0.01, 1)
    assert acct.state == ((1.0, 0.01, 10_000),)
    first = acct.epsilon(1e-5)
    again = accounting.create("pld", acct.state)
    assert again.epsilon(1e-5) == first  # the same state is answered from the cache, bit for bit
    assert first == pytest.approx(independent_epsilon("pld", [(1.0, 0.01, 10_000)], 1e-5), rel=PLD_RTOL)


def test_unknown_accountants_are_refused() -> None:
    for name in ("prv", "gdp", ""):
        with pytest.raises(ValueError, match="unknown accountant"):
            accounting.create(name)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_calibrated_noise_is_the_smallest_reaching_the_target(kind: str) -> None:
    target, delta, rate, steps = 3.0, 1e-5, 0.01, 1000
    noise, eps = accounting.calibrate_noise(kind, target, delta, rate, steps)
    assert eps <= target
    assert eps == pytest.approx(independent_epsilon(kind, [(noise, rate, steps)], delta), rel=1e-9)
    # Any noise below the tolerance band overshoots the target.
    lower = noise * (1 - 2 * accounting.CALIBRATION_RTOL)
    assert independent_epsilon(kind, [(lower, rate, steps)], delta) > target


# -- the service, through real servers ---------------------------------------------------------


def test_recorded_steps_give_the_independent_epsilon(stack) -> None:
    steps = [(1.1, 0.01, 400), (0.9, 0.02, 150), (1.1, 0.01, 1)]
    with new_tenant(stack, "eps") as client:
        for kind, name, rtol in ((PLD, "pld", PLD_RTOL), (RDP, "rdp", RDP_RTOL)):
            budget = create_budget(client, epsilon=50.0, kind=kind, rate=0.01)
            assert budget.state == pb.BUDGET_STATE_ACTIVE and budget.accountant_type == kind
            record(client, budget.budget_id, "a", 1.1, steps=400)              # the budget's sample rate
            record(client, budget.budget_id, "b", 0.9, rate=0.02, steps=150)  # a step's own rate
            last = record(client, budget.budget_id, "c", 1.1)
            expected = independent_epsilon(name, steps, 1e-5)
            assert last.budget.spent_epsilon == pytest.approx(expected, rel=rtol)
            assert last.step.epsilon_after == last.budget.spent_epsilon
            assert last.budget.remaining_epsilon == pytest.approx(50.0 - last.budget.spent_epsilon)
            assert last.budget.num_steps == 551 and not last.duplicate
            got = call(client, "GetEpsilon", pb.GetEpsilonRequest(budget_id=budget.budget_id))
            assert (got.epsilon, got.delta, got.num_steps, got.accountant_type) == (
                last.budget.spent_epsilon, 1e-5, 551, kind)
            other = call(client, "GetEpsilon", pb.GetEpsilonRequest(budget_id=budget.budget_id, delta=1e-7))
            assert other.delta == 1e-7 and other.epsilon > got.epsilon
            assert other.epsilon == pytest.approx(independent_epsilon(name, steps, 1e-7), rel=rtol)
            listed = all_steps(client, budget.budget_id)
            assert [(s.step_id, s.noise_multiplier, s.sample_rate, s.num_steps) for s in listed] == [
                ("a", 1.1, 0.01, 400), ("b", 0.9, 0.02, 150), ("c", 1.1, 0.01, 1)]
            assert listed[0].epsilon_after < listed[1].epsilon_after < listed[2].epsilon_after


@pytest.mark.parametrize("kind,name,noise,rate,target", [(PLD, "pld", 1.0, 0.1, 2.5), (RDP, "rdp", 1.0, 0.1, 3.0)],
                         ids=["pld", "rdp"])
def test_budget_exhausts_at_exactly_the_right_step(stack, kind: int, name: str, noise: float, rate: float,
                                                   target: float) -> None:
    k = largest_k(name, noise, rate, target, 1e-5)
    assert 3 <= k <= 10  # the case is meaningful and quick
    with new_tenant(stack, "exhaust") as client:
        budget = create_budget(client, epsilon=target, kind=kind, rate=rate)
        for i in range(k):
            resp = record(client, budget.budget_id, f"s{i}", noise)
            assert resp.budget.num_steps == i + 1
            last_state = pb.BUDGET_STATE_EXHAUSTED if i == k - 1 else pb.BUDGET_STATE_ACTIVE
            assert resp.budget.state == last_state
        with pytest.raises(DPBudgetExceededError) as refused:
            record(client, budget.budget_id, f"s{k}", noise)
        assert refused.value.code == "DP_BUDGET_EXCEEDED" and refused.value.grpc_code == "FAILED_PRECONDITION"
        assert float(refused.value.details["epsilon_with_step"]) > target
        after = call(client, "GetBudget", pb.GetBudgetRequest(budget_id=budget.budget_id)).budget
        assert after.num_steps == k and after.spent_epsilon <= target
        assert after.spent_epsilon == pytest.approx(independent_epsilon(name, [(noise, rate, k)], 1e-5),
                                                    rel=PLD_RTOL if name == "pld" else RDP_RTOL)
        assert [s.step_id for s in all_steps(client, budget.budget_id, page_size=100)] == [f"s{i}" for i in range(k)]
        # The refused step was not recorded: retrying it is refused again, not answered as a duplicate.
        with pytest.raises(DPBudgetExceededError):
            record(client, budget.budget_id, f"s{k}", noise)
        # A step with far more noise may still fit: the target, not the state, decides.
        quiet = record(client, budget.budget_id, "quiet", 50.0)
        assert quiet.budget.num_steps == k + 1 and quiet.budget.spent_epsilon <= target


def test_retried_step_counts_once(stack) -> None:
    with new_tenant(stack, "retry") as client:
        budget = create_budget(client, rate=0.02)
        first = record(client, budget.budget_id, "step-1", 1.2)
        again = record(client, budget.budget_id, "step-1", 1.2)
        assert again.duplicate and not first.duplicate
        assert again.step == first.step and again.budget.num_steps == 1
        assert again.budget.spent_epsilon == first.budget.spent_epsilon
        with pytest.raises(ConflictError):  # the same id with other parameters is not a retry
            record(client, budget.budget_id, "step-1", 0.7)
        # Concurrent retries of one new step: exactly one records it.
        results: list[pb.RecordStepResponse] = []
        threads = [threading.Thread(target=lambda: results.append(record(client, budget.budget_id, "step-2", 1.2)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 6 and sum(not r.duplicate for r in results) == 1
        assert {r.step.epsilon_after for r in results} == {results[0].step.epsilon_after}
        final = call(client, "GetBudget", pb.GetBudgetRequest(budget_id=budget.budget_id)).budget
        assert final.num_steps == 2
        assert final.spent_epsilon == pytest.approx(independent_epsilon("pld", [(1.2, 0.02, 2)], 1e-5), rel=PLD_RTOL)


def test_closed_budget_takes_no_steps_and_is_never_replaced(stack) -> None:
    with new_tenant(stack, "close") as client:
        budget = create_budget(client, session="sess-close")
        record(client, budget.budget_id, "s0", 1.0)
        closed = call(client, "CloseBudget", pb.CloseBudgetRequest(budget_id=budget.budget_id)).budget
        assert closed.state == pb.BUDGET_STATE_CLOSED and closed.num_steps == 1
        with pytest.raises(ConflictError):
            record(client, budget.budget_id, "s1", 1.0)
        assert record(client, budget.budget_id, "s0", 1.0).duplicate  # a late retry is still answered
        with pytest.raises(ConflictError) as again:  # no fresh budget for the same session
            create_budget(client, session="sess-close")
        assert again.value.details["budget_id"] == budget.budget_id
        listed = call(client, "ListBudgets", pb.ListBudgetsRequest(session_id="sess-close")).budgets
        assert [b.budget_id for b in listed] == [budget.budget_id]
        assert [s.step_id for s in all_steps(client, budget.budget_id)] == ["s0"]


def test_other_tenants_see_no_budget(stack) -> None:
    with new_tenant(stack, "owner") as owner, new_tenant(stack, "stranger") as stranger:
        budget = create_budget(owner, session="shared-name")
        record(owner, budget.budget_id, "s0", 1.0)
        bid = budget.budget_id
        for method, req in (("GetBudget", pb.GetBudgetRequest(budget_id=bid)),
                            ("RecordStep", pb.RecordStepRequest(budget_id=bid, step_id="x", noise_multiplier=1.0)),
                            ("ListSteps", pb.ListStepsRequest(budget_id=bid)),
                            ("GetEpsilon", pb.GetEpsilonRequest(budget_id=bid)),
                            ("CloseBudget", pb.CloseBudgetRequest(budget_id=bid))):
            with pytest.raises(NotFoundError):
                call(stranger, method, req)
        assert list(call(stranger, "ListBudgets", pb.ListBudgetsRequest()).budgets) == []
        # Session ids are per tenant: the stranger may use the same one.
        assert create_budget(stranger, session="shared-name").budget_id != bid
        owned = call(owner, "GetBudget", pb.GetBudgetRequest(budget_id=bid)).budget
        assert owned.num_steps == 1 and owned.state == pb.BUDGET_STATE_ACTIVE


def _bad_requests(budget_id: str) -> list[tuple[str, object, str]]:
    ok = dict(session_id="s-" + uuid.uuid4().hex, target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01)

    def create(**kw) -> pb.CreateBudgetRequest:
        return pb.CreateBudgetRequest(**{**ok, **kw})

    def step(**kw) -> pb.RecordStepRequest:
        return pb.RecordStepRequest(**{"budget_id": budget_id, "step_id": "bad", "noise_multiplier": 1.0, **kw})

    return [
        ("CreateBudget", create(target_epsilon=0.0), "target_epsilon"),
        ("CreateBudget", create(target_delta=0.0), "target_delta"),
        ("CreateBudget", create(target_delta=1.0), "target_delta"),
        ("CreateBudget", create(sample_rate=0.0), "sample_rate"),
        ("CreateBudget", create(sample_rate=1.5), "sample_rate"),
        ("CreateBudget", create(accountant_type=PRV), "accountant_type"),
        ("CreateBudget", create(accountant_type=42), "accountant_type"),
        ("CreateBudget", create(session_id=""), "session_id"),
        ("RecordStep", step(noise_multiplier=0.0), "noise_multiplier"),
        ("RecordStep", step(noise_multiplier=-1.0), "noise_multiplier"),
        ("RecordStep", step(sample_rate=0.0), "sample_rate"),
        ("RecordStep", step(sample_rate=1.01), "sample_rate"),
        ("RecordStep", step(num_steps=0), "num_steps"),
        ("RecordStep", step(step_id=""), "step_id"),
        ("GetEpsilon", pb.GetEpsilonRequest(budget_id=budget_id, delta=0.0), "delta"),
        ("GetEpsilon", pb.GetEpsilonRequest(budget_id=budget_id, delta=1.0), "delta"),
        ("CalibrateNoise", pb.CalibrateNoiseRequest(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01,
                                                    num_steps=10, accountant_type=PRV), "accountant_type"),
        ("CalibrateNoise", pb.CalibrateNoiseRequest(target_epsilon=1.0, target_delta=2.0, sample_rate=0.01,
                                                    num_steps=10), "target_delta"),
        ("CalibrateNoise", pb.CalibrateNoiseRequest(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01,
                                                    num_steps=0), "num_steps"),
    ]


def test_bad_inputs_name_the_field(stack) -> None:
    with new_tenant(stack, "bad") as client:
        budget = create_budget(client)
        for method, request, field in _bad_requests(budget.budget_id):
            with pytest.raises(ValidationError) as info:
                call(client, method, request)
            assert info.value.details.get("field") == field, (method, request, info.value)
            if getattr(request, "accountant_type", 0) == PRV:
                assert "PRV is not available" in info.value.message
        assert call(client, "GetBudget", pb.GetBudgetRequest(budget_id=budget.budget_id)).budget.num_steps == 0


def test_unspecified_accountant_is_pld_and_calibration_reaches_the_target(stack) -> None:
    with new_tenant(stack, "calib") as client:
        budget = create_budget(client, kind=common_pb2.ACCOUNTANT_TYPE_UNSPECIFIED)
        assert budget.accountant_type == PLD
        got = call(client, "CalibrateNoise", pb.CalibrateNoiseRequest(
            target_epsilon=2.0, target_delta=1e-5, sample_rate=0.02, num_steps=300, accountant_type=RDP))
        assert got.epsilon <= 2.0
        assert got.epsilon == pytest.approx(independent_epsilon("rdp", [(got.noise_multiplier, 0.02, 300)], 1e-5),
                                            rel=RDP_RTOL)
        # The calibrated plan is exactly spendable: all its steps are accepted by an RDP budget at the target.
        plan = create_budget(client, epsilon=2.0, kind=RDP, rate=0.02)
        done = record(client, plan.budget_id, "all", got.noise_multiplier, steps=300)
        assert done.budget.spent_epsilon <= 2.0 and done.budget.num_steps == 300


def test_restart_keeps_the_spend(tmp_path, db_env) -> None:
    first = start_stack(tmp_path, db_env)
    try:
        with first.client() as client:
            budget = create_budget(client, epsilon=10.0, rate=0.05)
            spent = record(client, budget.budget_id, "s0", 1.0, steps=20).budget
    finally:
        assert first.process.stop() == 0, first.process.output()
    second = start_stack(tmp_path, db_env, data_dir=first.data_dir)
    try:
        with second.client() as client:
            again = call(client, "GetBudget", pb.GetBudgetRequest(budget_id=budget.budget_id)).budget
            assert (again.spent_epsilon, again.num_steps) == (spent.spent_epsilon, 20)
            assert record(client, budget.budget_id, "s0", 1.0, steps=20).duplicate
            more = record(client, budget.budget_id, "s1", 1.0).budget
            assert more.num_steps == 21 and more.spent_epsilon > spent.spent_epsilon
            assert more.spent_epsilon == pytest.approx(independent_epsilon("pld", [(1.0, 0.05, 21)], 1e-5),
                                                       rel=PLD_RTOL)
    finally:
        assert second.process.stop() == 0, second.process.output()
