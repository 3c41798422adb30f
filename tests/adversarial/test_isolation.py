"""Tenant isolation on EVERY RPC of every service: another tenant's ids, no key, a forged tenant header.

Tenant A (the stack's default tenant) creates one of everything: a training session with a future, a
checkpoint, a DP budget, an HE context and HE adapter, an inference adapter, ledger entries. Tenant B then
calls every RPC the protos declare with A's ids, over raw gRPC (no SDK help), and must get NOT_FOUND (or a
listing that holds none of A's ids, or an action on B's own tenant only). ``CASES`` must name every RPC: a
new RPC without an isolation case fails ``test_every_rpc_has_an_isolation_case``.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tensafe.api.accountant.v1 import accountant_pb2 as acc
from tensafe.api.common.v1 import common_pb2 as common
from tensafe.api.he.v1 import he_pb2 as he
from tensafe.api.inference.v1 import inference_pb2 as inf
from tensafe.api.ledger.v1 import ledger_pb2 as led
from tensafe.api.trainer.v1 import trainer_pb2 as tr
from tensafe.api.vault.v1 import vault_pb2 as va
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig
from tg_tinker._transport import _GRPC_NAMES

IDS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]


def all_rpcs() -> set[tuple[str, str]]:
    out = set()
    for service, grpc_name in _GRPC_NAMES.items():
        module = importlib.import_module(f"tensafe.api.{service}.v1.{service}_pb2")
        out |= {(service, m.name) for m in module.DESCRIPTOR.services_by_name[grpc_name].methods}
    return out


@dataclass
class Owned:
    """What tenant A created; B is handed these ids."""

    session_id: str
    future_id: str
    artifact_id: str
    budget_id: str
    he_key_id: str
    he_adapter_id: str
    inference_adapter_id: str
    ledger_index: int


class Raw:
    """Raw gRPC calls as one API key; returns the response or the grpc.RpcError."""

    def __init__(self, target: str, api_key: str | None, extra: list[tuple[str, str]] | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.api_key, self.extra = api_key, extra or []

    def metadata(self) -> list[tuple[str, str]]:
        md = [("x-idempotency-key", uuid.uuid4().hex), *self.extra]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return md

    def call(self, service: str, method: str, request: Any) -> Any:
        module = importlib.import_module(f"tensafe.api.{service}.v1.{service}_pb2_grpc")
        stub = getattr(module, f"{_GRPC_NAMES[service]}Stub")(self.channel)
        rpc = getattr(stub, method)
        try:
            if service == "vault" and method == "PutArtifact":
                return rpc(iter([request]), timeout=30, metadata=self.metadata())
            result = rpc(request, timeout=30, metadata=self.metadata())
            if isinstance(result, Iterator) or hasattr(result, "__next__"):
                return list(result)
            return result
        except grpc.RpcError as err:
            return err


def _code(result: Any) -> grpc.StatusCode | None:
    return result.code() if isinstance(result, grpc.RpcError) else None


NOT_FOUND = "not_found"      # must answer NOT_FOUND
NONE_OF_A = "none_of_a"      # must succeed with nothing of A's in the answer
OWN = "own"                  # acts on the caller's own tenant only (checked after the loop: A is intact)
DENIED = "denied"            # tenants may not call it at all
PUBLIC = "public"            # public data by design (signed ledger checkpoints, proofs of the whole log)
INVALID = "invalid"          # refused as INVALID_ARGUMENT (naming another tenant is not a way in)

# (service, method) -> (request factory given A's ids, expected)
CASES: dict[tuple[str, str], tuple[Callable[[Owned], Any], str]] = {
    ("trainer", "CreateSession"): (lambda o: tr.CreateSessionRequest(), OWN),
    ("trainer", "GetSession"): (lambda o: tr.GetSessionRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "ListSessions"): (lambda o: tr.ListSessionsRequest(include_closed=True), NONE_OF_A),
    ("trainer", "CloseSession"): (lambda o: tr.CloseSessionRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "ForwardBackward"): (lambda o: tr.ForwardBackwardRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "Forward"): (lambda o: tr.ForwardRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "OptimStep"): (lambda o: tr.OptimStepRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "Sample"): (lambda o: tr.SampleRequest(session_id=o.session_id, prompts=["x"],
                                                             sampling=common.SamplingParams(max_tokens=2)), NOT_FOUND),
    ("trainer", "SaveState"): (lambda o: tr.SaveStateRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "LoadState"): (lambda o: tr.LoadStateRequest(session_id=o.session_id, artifact_id=o.artifact_id),
                               NOT_FOUND),
    ("trainer", "GetInfo"): (lambda o: tr.GetInfoRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "ForwardCustom"): (lambda o: tr.ForwardCustomRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "BackwardCustom"): (lambda o: tr.BackwardCustomRequest(session_id=o.session_id,
                                                                       forward_future_id=o.future_id), NOT_FOUND),
    ("trainer", "WatchFutures"): (lambda o: tr.WatchFuturesRequest(session_id=o.session_id), NOT_FOUND),
    ("trainer", "GetFuture"): (lambda o: tr.GetFutureRequest(session_id=o.session_id, future_id=o.future_id),
                               NOT_FOUND),
    ("trainer", "CancelFuture"): (lambda o: tr.CancelFutureRequest(session_id=o.session_id, future_id=o.future_id),
                                  NOT_FOUND),
    ("accountant", "CreateBudget"): (lambda o: acc.CreateBudgetRequest(), OWN),
    ("accountant", "GetBudget"): (lambda o: acc.GetBudgetRequest(budget_id=o.budget_id), NOT_FOUND),
    ("accountant", "ListBudgets"): (lambda o: acc.ListBudgetsRequest(), NONE_OF_A),
    ("accountant", "RecordStep"): (lambda o: acc.RecordStepRequest(budget_id=o.budget_id, step_id="evil:1",
                                                                   noise_multiplier=1.0, sample_rate=0.01,
                                                                   num_steps=1), NOT_FOUND),
    ("accountant", "ListSteps"): (lambda o: acc.ListStepsRequest(budget_id=o.budget_id), NOT_FOUND),
    ("accountant", "GetEpsilon"): (lambda o: acc.GetEpsilonRequest(budget_id=o.budget_id), NOT_FOUND),
    ("accountant", "CalibrateNoise"): (lambda o: acc.CalibrateNoiseRequest(), OWN),  # pure maths, no state
    ("accountant", "CloseBudget"): (lambda o: acc.CloseBudgetRequest(budget_id=o.budget_id), NOT_FOUND),
    ("he", "RegisterContext"): (lambda o: he.RegisterContextRequest(), OWN),
    ("he", "GetContext"): (lambda o: he.GetContextRequest(key_id=o.he_key_id), NOT_FOUND),
    ("he", "ListContexts"): (lambda o: he.ListContextsRequest(), NONE_OF_A),
    ("he", "DeleteContext"): (lambda o: he.DeleteContextRequest(key_id=o.he_key_id), NOT_FOUND),
    ("he", "LoadAdapter"): (lambda o: he.LoadAdapterRequest(artifact_id=o.artifact_id, key_id=o.he_key_id),
                            NOT_FOUND),
    ("he", "GetAdapter"): (lambda o: he.GetAdapterRequest(adapter_id=o.he_adapter_id), NOT_FOUND),
    ("he", "ListAdapters"): (lambda o: he.ListAdaptersRequest(), NONE_OF_A),
    ("he", "UnloadAdapter"): (lambda o: he.UnloadAdapterRequest(adapter_id=o.he_adapter_id), NOT_FOUND),
    ("he", "AppendInput"): (lambda o: he.AppendInputRequest(adapter_id=o.he_adapter_id, num_tokens=1,
                                                            layers=["model.layers.0.self_attn.q_proj"],
                                                            ciphertexts=[b"x"]), NOT_FOUND),
    ("he", "ComputeDelta"): (lambda o: he.ComputeDeltaRequest(adapter_id=o.he_adapter_id,
                                                              packing=he.PACKING_REPLICATED, num_tokens=1,
                                                              ciphertexts=[b"x"]), NOT_FOUND),
    ("he", "ComputeTokens"): (lambda o: he.ComputeTokensRequest(adapter_id=o.he_adapter_id, ciphertexts=[b"x"]),
                              NOT_FOUND),
    ("vault", "PutArtifact"): (lambda o: va.PutArtifactRequest(), OWN),
    ("vault", "GetArtifact"): (lambda o: va.GetArtifactRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("vault", "PullArtifact"): (lambda o: va.PullArtifactRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("vault", "DescribeArtifact"): (lambda o: va.DescribeArtifactRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("vault", "ListArtifacts"): (lambda o: va.ListArtifactsRequest(), NONE_OF_A),
    ("vault", "DeleteArtifact"): (lambda o: va.DeleteArtifactRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("vault", "UnwrapDataKey"): (lambda o: va.UnwrapDataKeyRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("vault", "RotateTenantKey"): (lambda o: va.RotateTenantKeyRequest(), OWN),
    ("vault", "ShredTenant"): (lambda o: va.ShredTenantRequest(confirm_tenant_id="default"), INVALID),
    ("vault", "GetTenantKeyInfo"): (lambda o: va.GetTenantKeyInfoRequest(), OWN),
    ("ledger", "AppendEntries"): (lambda o: led.AppendEntriesRequest(entries=[led.AuditEntry(
        entry_id=uuid.uuid4().hex, tenant_id="default", action="forged")]), DENIED),
    ("ledger", "ListEntries"): (lambda o: led.ListEntriesRequest(page_size=500), NONE_OF_A),
    ("ledger", "GetLatestCheckpoint"): (lambda o: led.GetLatestCheckpointRequest(), PUBLIC),
    ("ledger", "GetCheckpoint"): (lambda o: led.GetCheckpointRequest(tree_size=1), PUBLIC),
    ("ledger", "ListCheckpoints"): (lambda o: led.ListCheckpointsRequest(), PUBLIC),
    ("ledger", "GetInclusionProof"): (lambda o: led.GetInclusionProofRequest(leaf_index=o.ledger_index,
                                                                             tree_size=o.ledger_index + 1), NOT_FOUND),
    ("ledger", "GetConsistencyProof"): (lambda o: led.GetConsistencyProofRequest(first_tree_size=1,
                                                                                 second_tree_size=2), PUBLIC),
    ("inference", "LoadAdapter"): (lambda o: inf.LoadAdapterRequest(artifact_id=o.artifact_id), NOT_FOUND),
    ("inference", "GetAdapter"): (lambda o: inf.GetAdapterRequest(adapter_id=o.inference_adapter_id), NOT_FOUND),
    ("inference", "ListAdapters"): (lambda o: inf.ListAdaptersRequest(), NONE_OF_A),
    # The base models by name: shared by design, nothing of a tenant's in it.
    ("inference", "GetCapabilities"): (lambda o: inf.GetCapabilitiesRequest(), NONE_OF_A),
    ("inference", "UnloadAdapter"): (lambda o: inf.UnloadAdapterRequest(adapter_id=o.inference_adapter_id),
                                     NOT_FOUND),
    ("inference", "Generate"): (lambda o: inf.GenerateRequest(adapter_id=o.inference_adapter_id, prompts=["x"],
                                                              sampling=common.SamplingParams(max_tokens=2)), NOT_FOUND),
}


def test_every_rpc_has_an_isolation_case() -> None:
    assert set(CASES) == all_rpcs(), "add the new RPC's cross-tenant case to CASES"


@pytest.fixture(scope="module")
def owned(trainer_stack) -> Iterator[Owned]:
    from tg_tinker.he import HEKeyManager, HESchemeParams

    config = TrainingConfig(model_ref="tiny", seed=3, batch_size=2,
                            lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
                            optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
    with trainer_stack.client(retry_count=2) as a:
        tc = a.create_training_client(config)
        future = tc.forward_backward({"input_ids": IDS})
        future.result(timeout=60)
        artifact = tc.save_state().artifact_id
        budget = a._call("accountant", "CreateBudget", acc.CreateBudgetRequest(
            session_id=tc.session_id, target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01)).budget.budget_id
        bundle = HEKeyManager(tenant_id="default").generate_key_bundle(HESchemeParams(), key_id="a-key")
        a.he.register_context("a-key", bundle.public_context(), bundle.params)
        he_adapter = a.he.load_adapter(artifact, "a-key").adapter_id
        sc = a.create_sampling_client(artifact_id=artifact)
        entries = a._call("ledger", "ListEntries", led.ListEntriesRequest(page_size=5)).entries
        assert entries, "tenant A has ledger entries"
        yield Owned(tc.session_id, future.future_id, artifact, budget, "a-key", he_adapter, sc.adapter_id,
                    entries[0].index)
        tc.close()


@pytest.fixture(scope="module")
def tenant_b(trainer_stack) -> str:
    created = trainer_stack.cli("keys", "create", "--tenant", "tenant-b")
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


def _a_ids(owned: Owned) -> set[str]:
    return {owned.session_id, owned.future_id, owned.artifact_id, owned.budget_id, owned.he_adapter_id,
            owned.inference_adapter_id}


def _mentions_a(response: Any, owned: Owned) -> list[str]:
    if isinstance(response, led.ListEntriesResponse):
        # B's own entries name the ids B itself sent (its refused calls): what must hold is that B sees
        # only entries of its own tenant.
        return [f"entry of tenant {e.entry.tenant_id!r}" for e in response.entries if e.entry.tenant_id != "tenant-b"]
    blob = response.SerializeToString()
    found = [i for i in _a_ids(owned) if i.encode() in blob]
    if b"a-key" in blob:
        found.append("a-key")
    return found


def test_another_tenant_gets_nothing_of_a_on_any_rpc(trainer_stack, owned, tenant_b) -> None:
    b = Raw(trainer_stack.target, tenant_b)
    failures = []
    for (service, method), (make, expected) in sorted(CASES.items()):
        result = b.call(service, method, make(owned))
        code = _code(result)
        if expected == NOT_FOUND and code != grpc.StatusCode.NOT_FOUND:
            failures.append(f"{service}.{method}: {code} instead of NOT_FOUND")
        elif expected == DENIED and code != grpc.StatusCode.PERMISSION_DENIED:
            failures.append(f"{service}.{method}: {code} instead of PERMISSION_DENIED")
        elif expected == INVALID and code != grpc.StatusCode.INVALID_ARGUMENT:
            failures.append(f"{service}.{method}: {code} instead of INVALID_ARGUMENT")
        elif expected == NONE_OF_A:
            if code is not None:
                failures.append(f"{service}.{method}: {code}")
            elif mentioned := _mentions_a(result, owned):
                failures.append(f"{service}.{method} shows A's {mentioned}")
        elif expected in (OWN, PUBLIC) and code is None:
            responses = result if isinstance(result, list) else [result]
            for response in responses:
                if mentioned := _mentions_a(response, owned):
                    failures.append(f"{service}.{method} shows A's {mentioned}")
        if code == grpc.StatusCode.INTERNAL or code == grpc.StatusCode.UNKNOWN:
            failures.append(f"{service}.{method}: {code} {result.details()}")
    assert not failures, "\n".join(failures)


def test_a_is_intact_after_b_tried_everything(trainer_stack, owned, tenant_b) -> None:
    """Runs after the loop above (same module order): B's rotations, deletes and closes touched nothing of A."""
    a = Raw(trainer_stack.target, trainer_stack.api_key)
    assert _code(a.call("trainer", "GetSession", tr.GetSessionRequest(session_id=owned.session_id))) is None
    assert _code(a.call("accountant", "GetBudget", acc.GetBudgetRequest(budget_id=owned.budget_id))) is None
    assert _code(a.call("he", "GetAdapter", he.GetAdapterRequest(adapter_id=owned.he_adapter_id))) is None
    assert _code(a.call("inference", "GetAdapter",
                        inf.GetAdapterRequest(adapter_id=owned.inference_adapter_id))) is None
    chunks = a.call("vault", "GetArtifact", va.GetArtifactRequest(artifact_id=owned.artifact_id))
    assert not isinstance(chunks, grpc.RpcError) and sum(len(c.chunk) for c in chunks) > 0
    steps = a.call("accountant", "ListSteps", acc.ListStepsRequest(budget_id=owned.budget_id))
    assert not isinstance(steps, grpc.RpcError) and list(steps.steps) == []  # B's RecordStep spent nothing


@pytest.mark.parametrize("key", [None, "ts-garbage"], ids=["no-key", "bad-key"])
def test_every_rpc_refuses_a_caller_without_a_valid_key(trainer_stack, owned, key) -> None:
    anon = Raw(trainer_stack.target, key)
    wrong = [f"{s}.{m}: {_code(r)}" for (s, m), (make, _) in sorted(CASES.items())
             if _code(r := anon.call(s, m, make(owned))) != grpc.StatusCode.UNAUTHENTICATED]
    assert not wrong, "\n".join(wrong)


def test_a_tenant_header_naming_another_tenant_is_refused_everywhere(trainer_stack, owned, tenant_b) -> None:
    """B's key with ``x-tenant-id: default`` (A) must never act as A."""
    spoof = Raw(trainer_stack.target, tenant_b, extra=[("x-tenant-id", "default")])
    wrong = [f"{s}.{m}: {_code(r)}" for (s, m), (make, _) in sorted(CASES.items())
             if _code(r := spoof.call(s, m, make(owned))) != grpc.StatusCode.PERMISSION_DENIED]
    assert not wrong, "\n".join(wrong)
