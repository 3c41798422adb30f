"""The services' calls to the accountant (the trainer's today), made as the tenant who asked (their own API key).

Recording a step is idempotent by step id on the accountant, so a call that failed in transit
is retried with the same id: the step is counted once whichever attempt got through.

Deadlines (``runtime.peers.call_timeout``): a call made while serving one (CreateSession opening the
budget and calibrating the noise) gets what is left of that call's deadline, so the accountant knows
how long the tenant waits; a call from a worker (RecordStep during an optim_step) gets its budget:
:data:`RPC_BUDGET_S`, and :data:`CALIBRATE_BUDGET_S` for a calibration with no deadline above it.
"""

from __future__ import annotations

import time
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from tensafe.api.accountant.v1 import accountant_pb2, accountant_pb2_grpc
from tensafe.api.common.v1 import common_pb2

from .context import CallContext
from .errors import TensafeError
from .peers import PeerChannels, call_timeout, metadata_for, peer_error

RECORD_ATTEMPTS = 4
RPC_BUDGET_S = 30.0
CALIBRATE_BUDGET_S = 600.0


class AccountantClient:
    def __init__(self, peers: PeerChannels) -> None:
        self.peers = peers

    def _stub(self) -> accountant_pb2_grpc.AccountantServiceStub:
        return accountant_pb2_grpc.AccountantServiceStub(self.peers.channel("accountant"))

    def _call(self, caller: CallContext, method: str, request: Message, what: str,
              budget_s: float = RPC_BUDGET_S) -> Any:
        timeout = call_timeout(budget_s, "accountant", what)
        try:
            return getattr(self._stub(), method)(request, timeout=timeout, metadata=tuple(metadata_for(caller)))
        except grpc.RpcError as err:
            raise peer_error(err, "accountant", what) from None

    def create_budget(self, caller: CallContext, session_id: str, target_epsilon: float, target_delta: float,
                      accountant_type: int, sample_rate: float) -> accountant_pb2.Budget:
        req = accountant_pb2.CreateBudgetRequest(session_id=session_id, target_epsilon=target_epsilon,
                                                 target_delta=target_delta,
                                                 accountant_type=cast("common_pb2.AccountantType", accountant_type),
                                                 sample_rate=sample_rate)
        return self._call(caller, "CreateBudget", req, "creating the session's privacy budget").budget

    def get_budget(self, caller: CallContext, budget_id: str) -> accountant_pb2.Budget:
        return self._call(caller, "GetBudget", accountant_pb2.GetBudgetRequest(budget_id=budget_id),
                          "reading the privacy budget").budget

    def calibrate(self, caller: CallContext, target_epsilon: float, target_delta: float, sample_rate: float,
                  num_steps: int, accountant_type: int) -> accountant_pb2.CalibrateNoiseResponse:
        req = accountant_pb2.CalibrateNoiseRequest(target_epsilon=target_epsilon, target_delta=target_delta,
                                                   sample_rate=sample_rate, num_steps=num_steps,
                                                   accountant_type=cast("common_pb2.AccountantType", accountant_type))
        return self._call(caller, "CalibrateNoise", req, "calibrating the noise multiplier", CALIBRATE_BUDGET_S)

    def record_step(self, caller: CallContext, budget_id: str, step_id: str, noise_multiplier: float,
                    sample_rate: float) -> accountant_pb2.RecordStepResponse:
        """Records one step; transient failures are retried with the same step id."""
        req = accountant_pb2.RecordStepRequest(budget_id=budget_id, step_id=step_id,
                                               noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        delay = 0.2
        for attempt in range(RECORD_ATTEMPTS):
            try:
                timeout = call_timeout(RPC_BUDGET_S, "accountant", f"recording DP step {step_id}")
                return self._stub().RecordStep(req, timeout=timeout, metadata=tuple(metadata_for(caller)))
            except grpc.RpcError as err:
                transient = err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not transient or attempt == RECORD_ATTEMPTS - 1:
                    raise peer_error(err, "accountant", f"recording DP step {step_id}") from None
                time.sleep(delay)
                delay *= 2
        raise TensafeError("unreachable")  # pragma: no cover
