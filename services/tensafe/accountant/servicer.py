"""gRPC adapter of the accountant: messages in and out, the logic in service.py, the maths in accounting.py."""

from __future__ import annotations

import grpc

from tensafe.api.accountant.v1 import accountant_pb2, accountant_pb2_grpc
from tensafe.api.common.v1 import common_pb2
from tensafe.runtime import context
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.messages import timestamp
from tensafe.runtime.pagination import page_request
from tensafe.runtime.registry import ServiceEnvironment

from .calibration import Calibrations
from .service import Budgets, calibrate_noise, remaining
from .store import ACTIVE, CLOSED, EXHAUSTED, AccountantStore, BudgetRecord, StepRecord

_TYPES = {"pld": common_pb2.ACCOUNTANT_TYPE_PLD, "rdp": common_pb2.ACCOUNTANT_TYPE_RDP}
_STATES = {ACTIVE: accountant_pb2.BUDGET_STATE_ACTIVE, EXHAUSTED: accountant_pb2.BUDGET_STATE_EXHAUSTED,
           CLOSED: accountant_pb2.BUDGET_STATE_CLOSED}


def accountant_name(value: int, field: str = "accountant_type") -> str:
    """The accountant an AccountantType asks for; UNSPECIFIED is PLD. PRV is refused, never replaced."""
    if value == common_pb2.ACCOUNTANT_TYPE_UNSPECIFIED:
        return "pld"
    if value == common_pb2.ACCOUNTANT_TYPE_PRV:
        raise InvalidArgument(field, "ACCOUNTANT_TYPE_PRV is not available: dp-accounting 0.6.0 has no PRV "
                                     "accountant; use ACCOUNTANT_TYPE_PLD (the default, as tight) or "
                                     "ACCOUNTANT_TYPE_RDP")
    for name, enum in _TYPES.items():
        if value == enum:
            return name
    raise InvalidArgument(field, f"unknown accountant type {value}; use ACCOUNTANT_TYPE_PLD or ACCOUNTANT_TYPE_RDP")


def budget_proto(b: BudgetRecord) -> accountant_pb2.Budget:
    return accountant_pb2.Budget(
        budget_id=b.budget_id, tenant_id=b.tenant_id, session_id=b.session_id, target_epsilon=b.target_epsilon,
        target_delta=b.target_delta, accountant_type=_TYPES[b.accountant], sample_rate=b.sample_rate,
        spent_epsilon=b.spent_epsilon, remaining_epsilon=remaining(b), num_steps=b.num_steps,
        state=_STATES[b.state], create_time=timestamp(b.created_at), update_time=timestamp(b.updated_at))


def step_proto(s: StepRecord) -> accountant_pb2.StepRecord:
    return accountant_pb2.StepRecord(budget_id=s.budget_id, step_id=s.step_id, noise_multiplier=s.noise_multiplier,
                                     sample_rate=s.sample_rate, num_steps=s.num_steps, epsilon_after=s.epsilon_after,
                                     record_time=timestamp(s.recorded_at))


class AccountantServicer(accountant_pb2_grpc.AccountantServiceServicer):
    def __init__(self, budgets: Budgets, calibrations: Calibrations) -> None:
        self.budgets = budgets
        self.calibrations = calibrations

    def CreateBudget(self, request: accountant_pb2.CreateBudgetRequest,
                     ctx: grpc.ServicerContext) -> accountant_pb2.CreateBudgetResponse:
        record = self.budgets.create(context.current_tenant(), request.session_id, request.target_epsilon,
                                     request.target_delta, accountant_name(request.accountant_type),
                                     request.sample_rate)
        return accountant_pb2.CreateBudgetResponse(budget=budget_proto(record))

    def GetBudget(self, request: accountant_pb2.GetBudgetRequest,
                  ctx: grpc.ServicerContext) -> accountant_pb2.GetBudgetResponse:
        return accountant_pb2.GetBudgetResponse(budget=budget_proto(
            self.budgets.get(context.current_tenant(), request.budget_id)))

    def ListBudgets(self, request: accountant_pb2.ListBudgetsRequest,
                    ctx: grpc.ServicerContext) -> accountant_pb2.ListBudgetsResponse:
        req = page_request("accountant.ListBudgets", request.page_size, request.page_token, (float, str),
                           session_id=request.session_id)
        records, token = req.page(self.budgets.list(context.current_tenant(), request.session_id, req.after,
                                                    req.limit), key=lambda r: (r.created_at, r.budget_id))
        return accountant_pb2.ListBudgetsResponse(budgets=[budget_proto(r) for r in records], next_page_token=token)

    def RecordStep(self, request: accountant_pb2.RecordStepRequest,
                   ctx: grpc.ServicerContext) -> accountant_pb2.RecordStepResponse:
        step, budget, duplicate = self.budgets.record_step(
            context.current_tenant(), request.budget_id, request.step_id, request.noise_multiplier,
            request.sample_rate if request.HasField("sample_rate") else None,
            request.num_steps if request.HasField("num_steps") else None)
        return accountant_pb2.RecordStepResponse(step=step_proto(step), budget=budget_proto(budget),
                                                 duplicate=duplicate)

    def ListSteps(self, request: accountant_pb2.ListStepsRequest,
                  ctx: grpc.ServicerContext) -> accountant_pb2.ListStepsResponse:
        req = page_request("accountant.ListSteps", request.page_size, request.page_token, (int,),
                           budget_id=request.budget_id)
        after = req.after[0] if req.after else 0
        records, token = req.page(self.budgets.list_steps(context.current_tenant(), request.budget_id, after,
                                                          req.limit), key=lambda s: (s.seq,))
        return accountant_pb2.ListStepsResponse(steps=[step_proto(s) for s in records], next_page_token=token)

    def GetEpsilon(self, request: accountant_pb2.GetEpsilonRequest,
                   ctx: grpc.ServicerContext) -> accountant_pb2.GetEpsilonResponse:
        report = self.budgets.epsilon(context.current_tenant(), request.budget_id,
                                      request.delta if request.HasField("delta") else None)
        return accountant_pb2.GetEpsilonResponse(epsilon=report.epsilon, delta=report.delta,
                                                 num_steps=report.num_steps,
                                                 accountant_type=_TYPES[report.accountant])

    def CalibrateNoise(self, request: accountant_pb2.CalibrateNoiseRequest,
                       ctx: grpc.ServicerContext) -> accountant_pb2.CalibrateNoiseResponse:
        noise, epsilon = calibrate_noise(self.calibrations, context.current_tenant(), request.target_epsilon,
                                         request.target_delta, request.sample_rate, request.num_steps,
                                         accountant_name(request.accountant_type), context.time_remaining())
        return accountant_pb2.CalibrateNoiseResponse(noise_multiplier=noise, epsilon=epsilon)

    def CloseBudget(self, request: accountant_pb2.CloseBudgetRequest,
                    ctx: grpc.ServicerContext) -> accountant_pb2.CloseBudgetResponse:
        return accountant_pb2.CloseBudgetResponse(budget=budget_proto(
            self.budgets.close(context.current_tenant(), request.budget_id)))


def create(env: ServiceEnvironment) -> AccountantServicer:
    return AccountantServicer(Budgets(AccountantStore(env.db)), Calibrations(env.config.quota_calibrations))
