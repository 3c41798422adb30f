"""The docker-compose stack for real, with podman-compose: six split services, PostgreSQL, the one-shot init;
the SDK end to end through it (a key, a DP training session on the tiny model, save_state, sampling from the
inference service, the audit log verified); one service restarted without losing anything; then torn down.
The same with the TLS overlay (mTLS between services and for the SDK).

Skips only when podman or podman-compose is missing and TENSAFE_REQUIRE_CONTAINERS is unset.
Prints the wall time of each step (image builds, compose up, restart).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.deploy._e2e import PROMPTS, audit_entries, tiny_model_dir, train_save_sample
from tests.deploy._podman import (
    ROOT,
    TAG,
    ensure_images,
    env,
    free_port,
    podman,
    tool,
    wait_serving,
)
from tg_tinker.services import SERVICE_NAMES, full_name

pytestmark = pytest.mark.timeout(1800)



class Compose:
    """One compose project: its files, its environment (ports, model dir), and the commands around it."""

    def __init__(self, project: str, files: list[Path], environ: dict[str, str], ports: dict[str, int]):
        self.project, self.files, self.env, self.ports = project, files, environ, ports
        self.tls = False

    def cmd(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        base = [tool("podman-compose"), "-p", self.project, *(a for f in self.files for a in ("-f", str(f)))]
        done = subprocess.run([*base, *args], env=self.env, cwd=ROOT, text=True, capture_output=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)}: {done.returncode}\n{done.stdout[-4000:]}\n"
                                 f"{done.stderr[-4000:]}")
        return done

    def up(self) -> float:
        start = time.monotonic()
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compose_up.py"), "-p", self.project,
                               *(a for f in self.files for a in ("-f", str(f))), "--timeout", "600"],
                              env=self.env, cwd=ROOT, text=True, capture_output=True, timeout=900)
        print(done.stdout)
        assert done.returncode == 0, f"compose_up failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n" + \
            self.logs()
        return time.monotonic() - start

    def tensafe(self, *args: str) -> str:
        """A `tensafe` command in a one-off container of the init service (its volumes and environment)."""
        return self.cmd("run", "--rm", "--no-deps", "init", *args, timeout=120).stdout

    def container(self, service: str) -> str:
        names = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}", "--filter",
                       f"label=com.docker.compose.service={service}", "--format", "{{.Names}}").stdout.split()
        assert names, f"no container for {service}"
        return names[0]

    def logs(self) -> str:
        out = []
        for s in ("postgres", "init", *SERVICE_NAMES):
            try:
                done = podman("logs", "--tail", "30", self.container(s), check=False)
                out.append(f"--- {s}\n{done.stdout}{done.stderr}")
            except AssertionError:
                pass
        return "\n".join(out)

    def down(self) -> None:
        # --profile: the profile's services too (Prometheus, when a test started it).
        self.cmd("--profile", "observability", "down", "-v", "-t", "10", timeout=300, check=False)


def _stack(tmp_path_factory, overlays: list[Path]) -> Compose:
    tool("podman")
    tool("podman-compose")
    times = ensure_images("light", "ml", "postgres", "prometheus", "otel-collector")
    ports = {s: free_port() for s in SERVICE_NAMES}
    environ = env()
    environ.update({f"TENSAFE_{s.upper()}_PORT": str(p) for s, p in ports.items()})
    environ["TENSAFE_PROMETHEUS_PORT"] = str(free_port())
    environ["TENSAFE_OTLP_PORT"] = str(free_port())
    # Spans go to the observability profile's collector (started by one test; until then exports fail quietly).
    environ["TENSAFE_TRACE_EXPORTER"] = "otlp"
    environ.update(TENSAFE_MODELS_DIR=str(tiny_model_dir(tmp_path_factory)), TENSAFE_TAG=TAG,
                   TENSAFE_CERTS_DIR=str(tmp_path_factory.mktemp("certs")))
    project = f"tensafe-test-{uuid.uuid4().hex[:6]}"
    stack = Compose(project, [ROOT / "docker-compose.yml", *overlays], environ, ports)
    took = stack.up()
    print(f"compose up: {took:.1f} s (image steps: {times})")
    return stack


@pytest.fixture(scope="module", params=["plain", "tls"])
def stack(request, tmp_path_factory):
    # The observability overlay's services are in a profile: compose_up.py leaves them off; one test starts
    # Prometheus.
    overlays = [ROOT / "deploy" / "compose" / "observability.yml"]
    if request.param == "tls":
        overlays.append(ROOT / "deploy" / "compose" / "tls.yml")
    s = _stack(tmp_path_factory, overlays)
    s.tls = request.param == "tls"
    try:
        yield s
    finally:
        s.down()
        left = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={s.project}", "-q").stdout
        assert not left.strip(), f"containers left after down: {left}"


def _credentials(stack):
    import grpc

    certs = Path(stack.env["TENSAFE_CERTS_DIR"])
    return grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (certs / "client.key").read_bytes(),
                                        (certs / "client.pem").read_bytes())


def _client(stack, api_key: str, monkeypatch):
    from tg_tinker import ServiceClient

    scheme = "grpcs://localhost" if stack.tls else "127.0.0.1"
    certs = Path(stack.env["TENSAFE_CERTS_DIR"])
    for var, name in (("TS_CA_FILE", "ca.pem"), ("TS_CLIENT_CERT_FILE", "client.pem"),
                      ("TS_CLIENT_KEY_FILE", "client.key")):
        if stack.tls:
            monkeypatch.setenv(var, str(certs / name))
        else:
            monkeypatch.delenv(var, raising=False)
    # base_url points nowhere: each service is reached on its own published port.
    return ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{free_port()}", retry_count=3,
                         endpoints={s: f"{scheme}:{p}" for s, p in stack.ports.items()})


def _wait_all(stack, deadline_s: float = 180) -> dict[str, float]:
    kw = {"credentials": _credentials(stack), "name": "localhost"} if stack.tls else {}
    return {s: wait_serving(f"127.0.0.1:{p}", full_name(s), deadline_s=deadline_s, **kw)
            for s, p in stack.ports.items()}


def test_compose_stack_end_to_end_and_restart(stack, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the working directory
    _wait_all(stack)
    if stack.tls:
        # mTLS: a client without a certificate is refused.
        import grpc

        from tests.deploy._podman import health

        no_cert = grpc.ssl_channel_credentials(Path(stack.env["TENSAFE_CERTS_DIR"], "ca.pem").read_bytes())
        assert health(f"127.0.0.1:{stack.ports['vault']}", credentials=no_cert, name="localhost") == "UNAVAILABLE"
        assert health(f"127.0.0.1:{stack.ports['vault']}") == "UNAVAILABLE"  # nor a plaintext one
    api_key = stack.tensafe("keys", "create", "--tenant", "compose-e2e").strip().splitlines()[-1]
    vkey = stack.tensafe("ledger", "vkey").strip().splitlines()[-1]
    with _client(stack, api_key, monkeypatch) as client:
        assert client.check_health() == {s: "SERVING" for s in SERVICE_NAMES}
        ckpt, expected = train_save_sample(client)
        entries = audit_entries(client, vkey)
    verified = stack.tensafe("ledger", "verify")
    assert verified.startswith("ok:"), verified

    # Restart the vault: the artifact (blob on its volume, keys in PostgreSQL) and the audit log survive.
    start = time.monotonic()
    podman("restart", "-t", "10", stack.container("vault"), timeout=120)
    _wait_all(stack)
    print(f"vault restart to SERVING: {time.monotonic() - start:.1f} s")
    with _client(stack, api_key, monkeypatch) as client:
        again = client.create_sampling_client(artifact_id=ckpt.artifact_id).sample(PROMPTS, max_tokens=8,
                                                                                   temperature=0)
        assert [s.token_ids for s in again.samples] == [s.token_ids for s in expected.samples]
        after = client.get_audit_logs(vkey=vkey)
        assert len(after) >= len(entries)
        assert [e.index for e in after[:len(entries)]] == [e.index for e in entries]
    assert stack.tensafe("ledger", "verify").startswith("ok:")


# ------------------------------------------------------------------------------ observability profile

def test_prometheus_scrapes_all_six_services(stack) -> None:
    import json
    import urllib.parse
    import urllib.request

    _wait_all(stack)
    start = time.monotonic()
    stack.cmd("--profile", "observability", "up", "-d", "--no-deps", "prometheus")
    url = f"http://127.0.0.1:{stack.env['TENSAFE_PROMETHEUS_PORT']}/api/v1/targets"
    health: dict[str, str] = {}
    while time.monotonic() - start < 90:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                targets = json.load(reply)["data"]["activeTargets"]
            health = {t["labels"].get("service", t["labels"]["job"]): t["health"] for t in targets}
            if all(health.get(s) == "up" for s in SERVICE_NAMES):
                break
        except OSError:
            pass
        time.sleep(1)
    print(f"prometheus: six targets up {time.monotonic() - start:.1f} s after start")
    assert {s: health.get(s) for s in SERVICE_NAMES} == {s: "up" for s in SERVICE_NAMES}, health
    # The series come from each service's Prometheus client (its python_info), one per service.
    query = (f"http://127.0.0.1:{stack.env['TENSAFE_PROMETHEUS_PORT']}/api/v1/query?"
             + urllib.parse.urlencode({"query": 'python_info{job="tensafe"}'}))
    with urllib.request.urlopen(query, timeout=5) as reply:
        series = json.load(reply)["data"]["result"]
    assert sorted(r["metric"]["service"] for r in series) == sorted(SERVICE_NAMES), series


def test_prometheus_scrapes_every_services_metrics_port() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tensafe"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{s}:9090" for s in SERVICE_NAMES}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-tensafe-env"]["TENSAFE_METRICS_PORT"] == "9090"


def test_prometheus_config_passes_promtool() -> None:
    ensure_images("prometheus")
    config = ROOT / "deploy" / "compose" / "prometheus.yml"
    done = podman("run", "--rm", "--read-only", "-v", f"{config}:/p.yml:ro", "--entrypoint", "promtool",
                  f"localhost/tensafe-prometheus:{TAG}", "check", "config", "/p.yml", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_otel_collector_receives_every_services_spans(stack) -> None:
    """The profile's collector (Rotel) receives OTLP spans from all six services (their gRPC server spans), with
    and without TLS between the services."""
    from tests.deploy._podman import health

    _wait_all(stack)
    start = time.monotonic()
    stack.cmd("--profile", "observability", "up", "-d", "--no-deps", "otel-collector")
    seen: set[str] = set()
    text = ""
    while time.monotonic() - start < 90:
        for s, p in stack.ports.items():  # one traced Health/Check per service and round
            health(f"127.0.0.1:{p}", full_name(s))
        logs = podman("logs", stack.container("otel-collector"), check=False)
        text = logs.stdout + logs.stderr
        seen = {s for s in SERVICE_NAMES if f"service.name: Str(tensafe-{s})" in text}
        if seen == set(SERVICE_NAMES):
            break
        time.sleep(2)
    print(f"otel collector: spans of {sorted(seen)} {time.monotonic() - start:.1f} s after its start")
    assert seen == set(SERVICE_NAMES), text[-3000:]
    assert "/grpc.health.v1.Health/Check" in text


def test_otel_collector_pipeline_names_only_defined_components() -> None:
    # The reference collector's configuration (its image is registry-only): check the pipeline's wiring.
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "compose" / "otel-collector.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind) or {}), (kind, pipeline)
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
