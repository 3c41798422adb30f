"""Shared fixtures: database backends and real servers started as users start them."""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from tg_tinker.services import SERVICE_NAMES

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("TENSAFE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
T = TypeVar("T")
SERVICES = SERVICE_NAMES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.1, message: str = "",
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call `check` until it returns a truthy value, and return that value.

    For what arrives later (audit entries through an outbox, a freed quota place). An exception of a type in
    `ignore` counts as "not yet"; any other propagates at once. On timeout: AssertionError naming `message`,
    the last value and the last ignored exception, so a test that waits can never pass by timing out.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        value: T | None = None
        try:
            value = check()
            last_exc = None
        except ignore as exc:
            last_exc = exc
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"last value {value!r}" + (f", last error {last_exc!r}" if last_exc is not None else "")
            raise AssertionError(f"{message or 'condition'} not met within {timeout}s ({detail})") from last_exc
        time.sleep(interval)


def _pg_available() -> str | None:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return str(exc).splitlines()[0]


@pytest.fixture(scope="session")
def pg_url() -> str:
    problem = _pg_available()
    if problem:
        if os.environ.get("TENSAFE_REQUIRE_PG"):
            pytest.fail(f"PostgreSQL is required (TENSAFE_REQUIRE_PG) but unreachable at {PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {problem}")
    return PG_URL


def drop_schemas(prefix: str) -> None:
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        names = conn.execute(sa.text(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p"), {"p": prefix + "%"})
        for (name,) in list(names):
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    engine.dispose()


def _backend_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
        return
    url = request.getfixturevalue("pg_url")
    prefix = f"t{secrets.token_hex(4)}_"
    yield {"TENSAFE_DB_URL": url, "TENSAFE_IDENTITY_DB_URL": url, "TENSAFE_DB_SCHEMA_PREFIX": prefix}
    drop_schemas(prefix)


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment selecting the database backend for a server under test."""
    yield from _backend_env(request)


@pytest.fixture(scope="module", params=BACKENDS)
def module_db_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield from _backend_env(request)


def tensafe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensafe.cli", *args]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSAFE_", "TS_"))}
    env["TENSAFE_TINKER_PORT"] = "0"  # the Tinker-compatible API is off unless a test gives it a free port
    # No HTTP edges unless a test asks for one (on a free port): stacks in parallel would share 8001.
    env.update({"TENSAFE_METRICS_PORT": "0", "TENSAFE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
                "TENSAFE_GRACE_SECONDS": "10", "TENSAFE_OPENAI_PORT": "0"})
    env.update(extra)
    return env


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"process did not stop on SIGTERM; log:\n{self.output()}") from None


def spawn(args: list[str], env: dict[str, str], log: Path) -> Process:
    fh = open(log, "w")
    return Process(subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO), log)


def wait_serving(target: str, services: tuple[str, ...], proc: Process, timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tg_tinker._transport import _GRPC_NAMES

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        pending = list(services)
        while pending:
            if proc.proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.proc.returncode}:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pending} not serving after {timeout}s:\n{proc.output()}")
            name = f"tensafe.api.{pending[0]}.v1.{_GRPC_NAMES[pending[0]]}"
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.pop(0)
                    continue
            except grpc.RpcError:
                pass
            time.sleep(0.2)


@dataclass
class Stack:
    """A `tensafe up` process and what a user gets from it."""

    process: Process
    port: int
    data_dir: Path
    env: dict[str, str]
    api_key: str = field(default="")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs):
        from tg_tinker import ServiceClient

        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("base_url", self.target)
        kwargs.setdefault("retry_count", 0)
        return ServiceClient(**kwargs)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(tensafe_cmd(*args, "--data-dir", str(self.data_dir)), env=self.env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)


def start_stack(tmp: Path, env_extra: dict[str, str] | None = None, data_dir: Path | None = None) -> Stack:
    port = free_port()
    data_dir = data_dir or tmp / "data"
    env = base_env(**(env_extra or {}))
    proc = spawn(tensafe_cmd("up", "--data-dir", str(data_dir), "--port", str(port)), env,
                 tmp / f"up-{port}.log")
    wait_serving(f"127.0.0.1:{port}", SERVICES, proc)
    return Stack(proc, port, data_dir, env, (data_dir / "api_key").read_text().strip())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, module_db_env: dict[str, str]) -> Iterator[Stack]:
    """One `tensafe up` per test module and backend (keys revoke within 0.2 s)."""
    s = start_stack(tmp_path_factory.mktemp("stack"), {**module_db_env, "TENSAFE_AUTH_REFRESH_SECONDS": "0.2"})
    yield s
    assert s.process.stop() == 0, s.process.output()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model + tokenizer saved the way users save models; its parent is a model dir."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def trainer_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("trainer"), {"TENSAFE_MODEL_DIR": str(tiny_model.parent)})
    yield s
    assert s.process.stop() == 0, s.process.output()


# Test kinds, for `make test-unit` / `test-integration` / `test-e2e` (`pytest -m unit` ...). Each test gets exactly
# one marker, derived from what it runs rather than written by hand:
#   e2e:         tests/test_examples.py (the user-guide scripts against a real stack);
#   integration: starts a TenSafe server: requests a stack fixture, or its code (the test, its fixtures, and the
#                test-suite functions they call, followed transitively) uses one of SERVER_STARTERS (a `tensafe`
#                process, or a TensafeServer in the test's own process);
#   unit:        the rest: no TenSafe server (an SDK test may still answer itself from a stub gRPC server).
STACK_FIXTURES = frozenset({"stack", "trainer_stack"})
# tests/deploy: building and running containers (tests/deploy/_podman.py) counts as starting servers.
SERVER_STARTERS = frozenset({"start_stack", "spawn", "tensafe_cmd", "TensafeServer", "ensure_images", "podman"})
TESTS = Path(__file__).resolve().parent


@functools.cache
def _in_suite(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(TESTS)


@functools.cache
def _code_names(code: types.CodeType) -> frozenset[str]:
    """Global names one code object uses, its nested functions' included."""
    names: set[str] = set()
    pending = [code]
    while pending:
        c = pending.pop()
        names.update(c.co_names)
        pending.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(names)


def _suite_names(func: Callable[..., object], seen: set[types.CodeType]) -> set[str]:
    """Global names `func` and the test-suite functions it refers to use, followed transitively."""
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen or not _in_suite(code.co_filename):
        return set()
    seen.add(code)
    names = set(_code_names(code))
    scope = getattr(func, "__globals__", {})
    for name in list(names):
        if inspect.isfunction(target := scope.get(name)):
            names |= _suite_names(target, seen)
    return names


def _test_kind(item: pytest.Item) -> str:
    path = item.path.resolve()
    if path == TESTS / "test_examples.py":
        return "e2e"
    if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    funcs = [getattr(item, "function", None)]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if fixtureinfo is not None:
        funcs += [d.func for defs in fixtureinfo.name2fixturedefs.values() for d in defs]
    seen: set[types.CodeType] = set()
    if any(SERVER_STARTERS & _suite_names(f, seen) for f in funcs if f is not None):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(_test_kind(item))
