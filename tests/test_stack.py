"""The stack as users start it: `tensafe up` (embedded) and `tensafe serve` (split)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import REPO, SERVICES, base_env, free_port, spawn, start_stack, tensafe_cmd, wait_serving

FULL_NAMES = {
    f"tensafe.api.{s}.v1.{n}"
    for s, n in zip(SERVICES, ("TrainerService", "AccountantService", "HeService", "VaultService",
                               "LedgerService", "InferenceService"), strict=True)
}


def test_embedded_stack_serves_all_six(stack) -> None:
    with stack.client() as client:
        assert client.check_health() == {s: "SERVING" for s in SERVICES}


def test_reflection_lists_all_six(stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        listed = {s.name for s in next(iter(responses)).list_services_response.service}
    assert FULL_NAMES <= listed
    assert "grpc.health.v1.Health" in listed


def test_first_start_creates_key_and_second_reuses_it(tmp_path) -> None:
    first = start_stack(tmp_path)
    key_file = first.data_dir / "api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((first.data_dir / "master.key").stat().st_mode) == 0o600
    # The key is printed as the last line of the start banner.
    assert first.process.stop() == 0
    banner = [ln for ln in first.process.output().splitlines() if ln.startswith("ts-")]
    assert banner == [first.api_key]
    second = start_stack(tmp_path, data_dir=first.data_dir)
    try:
        assert second.api_key == first.api_key
        assert "reusing API key" in second.process.output()
        with second.client() as client:
            assert set(client.check_health().values()) == {"SERVING"}
    finally:
        assert second.process.stop() == 0


@pytest.mark.slow
def test_split_form_six_processes(tmp_path, db_env) -> None:
    data_dir = tmp_path / "data"
    env = base_env(**db_env)
    init = subprocess.run(tensafe_cmd("init", "--data-dir", str(data_dir)), env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert init.returncode == 0, init.stderr
    api_key = init.stdout.strip().splitlines()[-1]
    ports = {s: free_port() for s in SERVICES}
    env.update({f"TENSAFE_{s.upper()}_ENDPOINT": f"127.0.0.1:{p}" for s, p in ports.items()})
    procs = {s: spawn(tensafe_cmd("serve", s, "--data-dir", str(data_dir), "--port", str(ports[s])), env,
                      tmp_path / f"{s}.log") for s in SERVICES}
    try:
        for s, proc in procs.items():
            wait_serving(f"127.0.0.1:{ports[s]}", (s,), proc)
        from tg_tinker import ServiceClient

        # base_url points nowhere: every service must be reached through its own endpoint.
        with ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{free_port()}",
                           endpoints={s: f"127.0.0.1:{p}" for s, p in ports.items()}) as client:
            assert client.check_health() == {s: "SERVING" for s in SERVICES}
        # Each process serves only its own service.
        with grpc.insecure_channel(f"127.0.0.1:{ports['vault']}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]))))
            listed = {s.name for s in resp.list_services_response.service}
        assert "tensafe.api.vault.v1.VaultService" in listed
        assert not (FULL_NAMES - {"tensafe.api.vault.v1.VaultService"}) & listed
    finally:
        codes = {s: p.stop() for s, p in procs.items()}
    assert codes == {s: 0 for s in SERVICES}, {s: procs[s].output() for s in SERVICES if codes[s]}


def test_light_services_import_no_ml_frameworks(tmp_path) -> None:
    """vault, ledger and accountant start without torch, transformers or tenseal in the process."""
    script = f"""
import json, sys
from pathlib import Path
from tensafe.runtime.bootstrap import initialise_data_dir
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.server import TensafeServer
cfg = ServerConfig.load(environ={{}}, data_dir=Path({str(tmp_path / 'd')!r}), port=0, metrics_port=0)
initialise_data_dir(cfg)
server = TensafeServer(cfg, ["vault", "ledger", "accountant"])
server.start()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "tenseal", "peft", "opacus"))
server.stop(0)
print(json.dumps(heavy))
"""
    out = subprocess.run([sys.executable, "-c", script], env=base_env(), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
