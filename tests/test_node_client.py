"""clients/node: the TypeScript client's own suite (`npm ci && npm test`, node's test runner), and its generated code.

The node suite starts its own `tensafe up` (clients/node/test/stack.ts: a temporary data dir, the tiny model of
tests/tiny_model.py, a tenant key from `tensafe keys create`) with this suite's CLI command, so `make test` stays
the one entry. Without node or npm these tests skip, saying so; with TENSAFE_REQUIRE_NODE=1 (set by .ci/run when
npm is installed) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, base_env, tensafe_cmd

NODE_DIR = REPO / "clients" / "node"
BUF = REPO / "node_modules" / ".bin" / "buf"
# test/unit.test.ts and test/live.test.ts together; fewer would mean a file was not run.
MIN_NODE_TESTS = 29


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("TENSAFE_REQUIRE_NODE"):
            pytest.fail(f"{tool} is required (TENSAFE_REQUIRE_NODE is set) but not installed")
        pytest.skip(f"{tool} is not installed: the TypeScript client is not tested "
                    "(set TENSAFE_REQUIRE_NODE=1 to make this a failure)")
    return path


def _run(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int, str]:
    """Run in its own process group (the stack the node tests start included); kill the group on timeout."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=NODE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return code, log.read_text()


@pytest.fixture(scope="module")
def npm(tmp_path_factory: pytest.TempPathFactory) -> str:
    _require("node")
    npm = _require("npm")
    code, output = _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], dict(os.environ), 200,
                        tmp_path_factory.mktemp("npm") / "ci.log")
    assert code == 0, f"npm ci in clients/node failed:\n{output}"
    return npm


def test_generated_typescript_is_fresh(npm: str, tmp_path: Path) -> None:
    """clients/node/src/gen is what buf generate makes from protos/ now (as gen_protos.py --check for Python)."""
    if not BUF.exists():
        if os.environ.get("TENSAFE_REQUIRE_NODE") or os.environ.get("TENSAFE_REQUIRE_BUF"):
            pytest.fail("buf is required but node_modules/.bin/buf is missing: run `npm ci` at the repository root")
        pytest.skip("node_modules/.bin/buf is missing (run `npm ci` at the repository root)")
    code, output = _run([npm, "run", "--silent", "generate:check"], dict(os.environ), 120, tmp_path / "check.log")
    assert code == 0, output
    assert "Generated TypeScript is up to date" in output


def test_node_client_suite_against_a_live_stack(npm: str, tmp_path: Path) -> None:
    """`npm test`: unit tests, then health, reflection, auth, training, artifacts, DP, inference and ledger live."""
    # No TS_BASE_URL / TS_API_KEY (base_env drops them): the node suite starts its own stack with this CLI and
    # the settings this suite gives its servers.
    server_env = {k: v for k, v in base_env().items() if k.startswith("TENSAFE_")}
    env = base_env(TENSAFE_CLI=json.dumps(tensafe_cmd()), TENSAFE_NODE_SERVER_ENV=json.dumps(server_env))
    # Under pytest-timeout's 300 s, so that on a hang this kills the process group (the stack included) itself.
    code, output = _run([npm, "test"], env, 280, tmp_path / "npm-test.log")
    tail = output[-6000:]
    assert code == 0, f"npm test failed (exit {code}):\n{tail}"
    counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail|skipped|cancelled|todo) (\d+)$", output, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, tail
    assert counts.get("skipped") == 0 and counts.get("todo") == 0, tail
    assert counts.get("pass", 0) >= MIN_NODE_TESTS, f"only {counts.get('pass')} node tests passed:\n{tail}"
