"""Every List* RPC pages the same way (services/tensafe/runtime/pagination.py), over raw gRPC.

Through a real `tensafe up`: paging with a small page_size returns every item exactly once, in the
listing's order; a garbage, an over-long, an old-style (offset) and another listing's token are
INVALID_ARGUMENT naming ``page_token`` (never a silent restart from the first page); a token replayed
with other filters is refused; a negative page_size is INVALID_ARGUMENT naming ``page_size``; a
page_size above the cap (1000) is lowered to it, not refused.
"""

from __future__ import annotations

import base64
import importlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tensafe.api.accountant.v1 import accountant_pb2 as acc
from tensafe.api.he.v1 import he_pb2 as he
from tensafe.api.inference.v1 import inference_pb2 as inf
from tensafe.api.ledger.v1 import ledger_pb2 as led
from tensafe.api.trainer.v1 import trainer_pb2 as tr
from tensafe.api.vault.v1 import vault_pb2 as va
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_TOKEN_CHARS, page_request
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig
from tg_tinker._transport import _GRPC_NAMES

N = 3  # items created per listing: more than one page of 2


@dataclass
class Made:
    budget_id: str


@dataclass(frozen=True)
class Listing:
    service: str
    method: str
    request: Callable[..., Any]  # (made, **page fields) -> request
    items: str                   # repeated field of the response
    key: Callable[[Any], Any]    # identity of one item


LISTINGS: dict[str, Listing] = {
    "trainer.ListSessions": Listing("trainer", "ListSessions",
                                    lambda m, **kw: tr.ListSessionsRequest(include_closed=True, **kw), "sessions",
                                    lambda s: s.session_id),
    "vault.ListArtifacts": Listing("vault", "ListArtifacts", lambda m, **kw: va.ListArtifactsRequest(**kw),
                                   "artifacts", lambda a: a.artifact_id),
    "accountant.ListBudgets": Listing("accountant", "ListBudgets", lambda m, **kw: acc.ListBudgetsRequest(**kw),
                                      "budgets", lambda b: b.budget_id),
    "accountant.ListSteps": Listing("accountant", "ListSteps",
                                    lambda m, **kw: acc.ListStepsRequest(budget_id=m.budget_id, **kw), "steps",
                                    lambda s: s.step_id),
    "he.ListContexts": Listing("he", "ListContexts", lambda m, **kw: he.ListContextsRequest(**kw), "contexts",
                               lambda c: c.key_id),
    "he.ListAdapters": Listing("he", "ListAdapters", lambda m, **kw: he.ListAdaptersRequest(**kw), "adapters",
                               lambda a: a.adapter_id),
    "ledger.ListEntries": Listing("ledger", "ListEntries", lambda m, **kw: led.ListEntriesRequest(**kw), "entries",
                                  lambda e: e.index),
    "ledger.ListCheckpoints": Listing("ledger", "ListCheckpoints", lambda m, **kw: led.ListCheckpointsRequest(**kw),
                                      "checkpoints", lambda c: c.tree_size),
    "inference.ListAdapters": Listing("inference", "ListAdapters", lambda m, **kw: inf.ListAdaptersRequest(**kw),
                                      "adapters", lambda a: a.adapter_id),
}


def test_every_list_rpc_is_covered() -> None:
    declared = set()
    for service, grpc_name in _GRPC_NAMES.items():
        module = importlib.import_module(f"tensafe.api.{service}.v1.{service}_pb2")
        declared |= {f"{service}.{m.name}" for m in module.DESCRIPTOR.services_by_name[grpc_name].methods
                     if m.name.startswith("List")}
    assert declared == set(LISTINGS)


class Raw:
    def __init__(self, target: str, api_key: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.api_key = api_key

    def call(self, service: str, method: str, request: Any) -> Any:
        module = importlib.import_module(f"tensafe.api.{service}.v1.{service}_pb2_grpc")
        rpc = getattr(getattr(module, f"{_GRPC_NAMES[service]}Stub")(self.channel), method)
        return rpc(request, timeout=30, metadata=[("authorization", f"Bearer {self.api_key}"),
                                                   ("x-idempotency-key", uuid.uuid4().hex)])

    def list(self, listing: Listing, made: Made, **kw: Any) -> Any:
        return self.call(listing.service, listing.method, listing.request(made, **kw))

    def refused(self, listing: Listing, made: Made, **kw: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.list(listing, made, **kw)
        return err.value


@pytest.fixture(scope="module")
def made(trainer_stack) -> Made:
    """N of everything every listing lists, for the stack's default tenant."""
    from tg_tinker.he import HEKeyManager, HESchemeParams

    config = TrainingConfig(model_ref="tiny", seed=3, batch_size=2,
                            lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
                            optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
    with trainer_stack.client(retry_count=2) as a:
        sessions = [a.create_training_client(config) for _ in range(N)]
        sessions[0].forward_backward({"input_ids": [[0, 45, 120, 77], [0, 99, 14, 230]]}).result(timeout=60)
        artifacts = [sessions[0].save_state().artifact_id for _ in range(N)]  # inference loads each once
        artifact = artifacts[0]
        for i in range(N):
            a.artifacts.put(f"blob {i}".encode(), name=f"page-{i}")
        budgets = [a._call("accountant", "CreateBudget", acc.CreateBudgetRequest(
            session_id=s.session_id, target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01)).budget.budget_id
            for s in sessions]
        for i in range(N):
            a._call("accountant", "RecordStep", acc.RecordStepRequest(
                budget_id=budgets[0], step_id=f"page:{i}", noise_multiplier=1.0, sample_rate=0.01, num_steps=1))
        bundle = HEKeyManager(tenant_id="default").generate_key_bundle(HESchemeParams(), key_id="page-key-0")
        for i in range(N):
            a.he.register_context(f"page-key-{i}", bundle.public_context(), bundle.params)
        for _ in range(N):
            a.he.load_adapter(artifact, "page-key-0")
        for each in artifacts:
            a.create_sampling_client(artifact_id=each)
    return Made(budgets[0])


@pytest.fixture(scope="module")
def raw(trainer_stack) -> Raw:
    return Raw(trainer_stack.target, trainer_stack.api_key)


SQL_LISTINGS = ["vault.ListArtifacts", "accountant.ListBudgets", "accountant.ListSteps", "he.ListContexts",
                "ledger.ListEntries", "ledger.ListCheckpoints"]


@pytest.fixture(scope="module")
def made_sql(stack) -> Made:
    """N of everything the SQL-backed listings list, on SQLite and PostgreSQL (no model needed)."""
    from tg_tinker.he import HEKeyManager, HESchemeParams

    with stack.client(retry_count=2) as a:
        for i in range(N):
            a.artifacts.put(f"blob {i}".encode(), name=f"page-{i}")
        budgets = [a._call("accountant", "CreateBudget", acc.CreateBudgetRequest(
            session_id=f"ses_page{i}", target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01)).budget.budget_id
            for i in range(N)]
        for i in range(N):
            a._call("accountant", "RecordStep", acc.RecordStepRequest(
                budget_id=budgets[0], step_id=f"page:{i}", noise_multiplier=1.0, sample_rate=0.01, num_steps=1))
        bundle = HEKeyManager(tenant_id="default").generate_key_bundle(HESchemeParams(), key_id="page-key-0")
        for i in range(N):
            a.he.register_context(f"page-key-{i}", bundle.public_context(), bundle.params)
    return Made(budgets[0])


@pytest.mark.parametrize("name", SQL_LISTINGS)
def test_sql_listings_page_and_refuse_on_every_backend(stack, made_sql: Made, name: str) -> None:
    raw = Raw(stack.target, stack.api_key)
    test_pages_hold_every_item_once_in_order(raw, made_sql, name)
    err = raw.refused(LISTINGS[name], made_sql, page_size=1, page_token=_foreign_token(raw, made_sql, name))
    assert _names_field(err, "page_token")


def _names_field(err: grpc.RpcError, field: str) -> bool:
    return err.code() == grpc.StatusCode.INVALID_ARGUMENT and (err.details() or "").startswith(f"{field}:")


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_pages_hold_every_item_once_in_order(raw: Raw, made: Made, name: str) -> None:
    listing = LISTINGS[name]
    full = [listing.key(i) for i in getattr(raw.list(listing, made, page_size=MAX_PAGE_SIZE), listing.items)]
    size = max(2, len(full) // 5 + 1)   # the ledger holds many entries: at most ~6 pages
    assert len(full) > size, f"{name}: {len(full)} items, not more than one page of {size}"
    paged, token, pages = [], "", 0
    while True:
        response = raw.list(listing, made, page_size=size, page_token=token)
        items = [listing.key(i) for i in getattr(response, listing.items)]
        assert 0 < len(items) <= size
        paged += items
        pages += 1
        token = response.next_page_token
        if not token:
            break
        assert len(token) <= MAX_TOKEN_CHARS and pages < 100
    assert pages >= 2
    assert len(set(paged)) == len(paged), f"{name}: an item came twice"
    if listing.service == "ledger":   # the log grows while we read it (our own calls are audited)
        assert paged[:len(full)] == full
    else:
        assert paged == full


def _foreign_token(raw: Raw, made: Made, name: str) -> str:
    other = "accountant.ListSteps" if name != "accountant.ListSteps" else "vault.ListArtifacts"
    token = raw.list(LISTINGS[other], made, page_size=1).next_page_token
    assert token
    return token


def _real_token(raw: Raw, made: Made, name: str) -> str:
    return raw.list(LISTINGS[name], made, page_size=1).next_page_token


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_bad_tokens_are_refused_naming_page_token(raw: Raw, made: Made, name: str) -> None:
    listing = LISTINGS[name]
    real = _real_token(raw, made, name)
    tampered = real[:-2] + ("AA" if real[-2:] != "AA" else "BB")
    shape = "p1." + base64.urlsafe_b64encode(json.dumps(["x", ["a", "b", "c"]]).encode()).decode().rstrip("=")
    for bad in ("garbage!", "1", "-1", "p1.%%%", "p1." + "A" * (MAX_TOKEN_CHARS + 10), tampered, shape,
                _foreign_token(raw, made, name)):
        err = raw.refused(listing, made, page_size=1, page_token=bad)
        assert _names_field(err, "page_token"), f"{name} with token {bad[:40]!r}: {err.code()} {err.details()}"


@pytest.mark.parametrize("name", ["vault.ListArtifacts", "accountant.ListBudgets", "ledger.ListEntries",
                                  "trainer.ListSessions"])
def test_a_token_replayed_with_other_filters_is_refused(raw: Raw, made: Made, name: str) -> None:
    listing = LISTINGS[name]
    token = _real_token(raw, made, name)
    other = {"vault.ListArtifacts": lambda m, **kw: va.ListArtifactsRequest(session_id="sess-other", **kw),
             "accountant.ListBudgets": lambda m, **kw: acc.ListBudgetsRequest(session_id="sess-other", **kw),
             "ledger.ListEntries": lambda m, **kw: led.ListEntriesRequest(action="other", **kw),
             "trainer.ListSessions": lambda m, **kw: tr.ListSessionsRequest(include_closed=False, **kw)}[name]
    err = raw.refused(Listing(listing.service, listing.method, other, listing.items, listing.key), made,
                      page_size=1, page_token=token)
    assert _names_field(err, "page_token"), f"{name}: {err.code()} {err.details()}"


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_page_size_negative_refused_above_cap_lowered(raw: Raw, made: Made, name: str) -> None:
    listing = LISTINGS[name]
    err = raw.refused(listing, made, page_size=-1)
    assert _names_field(err, "page_size"), f"{name}: {err.code()} {err.details()}"
    huge = raw.list(listing, made, page_size=2**31 - 1)
    assert 0 < len(getattr(huge, listing.items)) <= MAX_PAGE_SIZE


def test_the_helper_defaults_caps_and_ties_tokens_to_filters() -> None:
    assert page_request("x.List", 0, "", (int,)).size == DEFAULT_PAGE_SIZE == 100
    assert page_request("x.List", 5000, "", (int,)).size == MAX_PAGE_SIZE == 1000
    first = page_request("x.List", 2, "", (float, str), kind=1)
    token = first.token((1.5, "b"))
    assert page_request("x.List", 2, token, (float, str), kind=1).after == (1.5, "b")
    for method, types, filters in (("y.List", (float, str), {"kind": 1}), ("x.List", (float, str), {"kind": 2}),
                                   ("x.List", (int,), {"kind": 1})):
        with pytest.raises(InvalidArgument) as err:
            page_request(method, 2, token, types, **filters)
        assert err.value.field == "page_token"
