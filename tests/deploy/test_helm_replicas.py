"""The Helm chart's replica rules: one replica each by default, autoscaling only for the stateless service,
sticky routing for in-memory services that run several replicas, and the values schema and templates that refuse
anything else (the STATE table in _helm.py, checked against the code in test_helm.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.deploy._helm import CHART, RELEASE, STATE, by_component, objects
from tg_tinker.services import SERVICE_NAMES


def test_defaults_one_replica_each_and_no_autoscaler(rendered: Any) -> None:
    for name, dep in by_component(rendered, "defaults", "Deployment").items():
        assert dep["spec"]["replicas"] == 1, name
        strategy = dep["spec"]["strategy"]["type"]
        assert strategy == ("Recreate" if STATE[name] == "singleton" else "RollingUpdate"), name
    assert not objects(rendered, "defaults", "HorizontalPodAutoscaler")
    for name, svc in by_component(rendered, "defaults", "Service").items():
        assert "sessionAffinity" not in svc["spec"], name
    pdbs = by_component(rendered, "defaults", "PodDisruptionBudget")
    assert set(pdbs) == set(SERVICE_NAMES)
    assert all(p["spec"]["maxUnavailable"] == 1 for p in pdbs.values())


def test_autoscaling_only_for_the_stateless_accountant(rendered: Any, helm: Any) -> None:
    hpas = by_component(rendered, "hpa", "HorizontalPodAutoscaler")
    assert set(hpas) == {n for n, s in STATE.items() if s == "stateless"} == {"accountant"}
    hpa = hpas["accountant"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": f"{RELEASE}-tensafe-accountant"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    deployments = by_component(rendered, "hpa", "Deployment")
    assert "replicas" not in deployments["accountant"]["spec"], "the HPA owns the replica count"
    for name in ("trainer", "he", "inference", "vault", "ledger"):
        res = helm("template", "--set", f"services.{name}.autoscaling.enabled=true")
        assert res.returncode != 0 and "autoscaling" in res.stderr, name


def test_sticky_routing_pins_clients(rendered: Any) -> None:
    deployments = by_component(rendered, "hpa", "Deployment")
    services = by_component(rendered, "hpa", "Service")
    assert deployments["inference"]["spec"]["replicas"] == 3
    assert services["inference"]["spec"]["sessionAffinity"] == "ClientIP"
    assert services["inference"]["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 3600}}
    assert services["inference"]["metadata"]["annotations"]["tensafe.io/routing"] == "sticky"
    for name in ("trainer", "he"):
        assert "sessionAffinity" not in services[name]["spec"]


@pytest.mark.parametrize("name", ["trainer", "he", "inference"])
def test_schema_refuses_in_memory_replicas_without_sticky_routing(helm: Any, name: str) -> None:
    res = helm("template", "--set", f"services.{name}.replicas=2")
    assert res.returncode != 0
    assert f"services.{name}.replicas: Must be less than or equal to 1" in res.stderr
    ok = helm("template", "--set", f"services.{name}.replicas=2", "--set", f"services.{name}.routing=sticky")
    assert ok.returncode == 0, ok.stderr
    res = helm("template", "--set", f"services.{name}.routing=roundrobin")
    assert res.returncode != 0 and f"services.{name}.routing" in res.stderr


@pytest.mark.parametrize("name", ["vault", "ledger"])
def test_schema_refuses_singleton_replicas(helm: Any, name: str) -> None:
    res = helm("template", "--set", f"services.{name}.replicas=2", "--set", f"services.{name}.routing=sticky")
    assert res.returncode != 0
    assert f"services.{name}.replicas: Must be less than or equal to 1" in res.stderr


def test_templates_refuse_unsafe_replicas_without_the_schema(helm: Any, tmp_path: Path) -> None:
    """The templates `fail` on their own (a schema can be bypassed, e.g. by a parent chart)."""
    chart = tmp_path / "tensafe"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    res = helm("template", "--set", "services.trainer.replicas=2", chart=chart)
    assert res.returncode != 0
    assert "services.trainer.replicas=2" in res.stderr and "routing=sticky" in res.stderr
    res = helm("template", "--set", "services.ledger.replicas=3", chart=chart)
    assert res.returncode != 0 and "cannot run more than 1 replica" in res.stderr
    res = helm("template", "--set", "services.inference.autoscaling.enabled=true", chart=chart)
    assert res.returncode != 0 and "only stateless services (accountant) may autoscale" in res.stderr
    res = helm("template", "--set", "services.he.replicas=2", "--set", "services.he.routing=sticky", chart=chart)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("setting", ["bogus=1", "services.vault.bogus=1", "services.extra.replicas=1",
                                     "tls.bogus=1", "networkPolicy.clients[0].bogus=1", "image.gpu.repository=x",
                                     "env.NOT_TENSAFE=1", "services.trainer.resources.limits=null",
                                     "port=70000", "services.vault.replicas=-1"])
def test_schema_refuses_unknown_or_bad_values(helm: Any, setting: str) -> None:
    res = helm("template", "--set", setting)
    assert res.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in res.stderr
