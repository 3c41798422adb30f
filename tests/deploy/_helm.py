"""What the Helm chart tests share: the chart's place, the topology table, the value sets and readers of the
rendered objects. The fixtures that run helm are in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "tensafe"
VALUES = Path(__file__).resolve().parent / "helm_values"
SERVICES_SRC = ROOT / "services" / "tensafe"
RELEASE = "ts"
NAMESPACE = "tensafe-test"

# The one statement of the topology. CALLS: the peers each service calls (every service writes audit
# entries to the ledger; the ledger's own go over loopback). STATE: stateless (all in PostgreSQL),
# singleton (one process per deployment), in-memory (tenants' live state in the process).
CALLS: dict[str, frozenset[str]] = {
    "trainer": frozenset({"vault", "accountant", "ledger"}),
    "accountant": frozenset({"ledger"}),
    "he": frozenset({"vault", "ledger"}),
    "vault": frozenset({"ledger"}),
    "ledger": frozenset(),
    "inference": frozenset({"vault", "ledger"}),
}
EDGES = frozenset((caller, callee) for caller, callees in CALLS.items() for callee in callees)
STATE = {"trainer": "in-memory", "he": "in-memory", "inference": "in-memory",
         "vault": "singleton", "ledger": "singleton", "accountant": "stateless"}
ML_IMAGE = {"trainer", "he", "inference"}

VALUE_SETS = {
    "defaults": [],
    "tls": ["-f", str(VALUES / "tls.yaml")],
    "hpa": ["-f", str(VALUES / "hpa.yaml")],
    "external": ["-f", str(VALUES / "external.yaml")],
}
Rendered = dict[str, tuple[str, list[dict[str, Any]]]]  # value set -> (rendered text, its objects)


def missing(what: str) -> None:
    if os.environ.get("TENSAFE_REQUIRE_HELM"):
        pytest.fail(f"{what} is required (TENSAFE_REQUIRE_HELM is set) but not installed")
    pytest.skip(f"{what} is not installed (set TENSAFE_REQUIRE_HELM=1 to make this a failure)")


def objects(rendered: Rendered, name: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered[name][1] if d["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def by_component(rendered: Rendered, name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {component(d): d for d in objects(rendered, name, kind) if "app.kubernetes.io/component" in
            d["metadata"]["labels"]}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(deployment)["env"]}

