"""Idempotency keys after a crash (issue 13): a call killed mid-way (kill -9) does not leave its key held
after the restart, and the keys of a replica that stopped are released once its lease runs out."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import SERVICES, base_env, free_port, spawn, tensafe_cmd, wait_serving
from tensafe.api.trainer.v1 import trainer_pb2
from tg_tinker import LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig


def _running_key(db: Path, key: str) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            row = conn.execute("SELECT state FROM idempotency_records WHERE idempotency_key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return False
    return row is not None and row[0] == "running"


def test_a_call_killed_mid_way_does_not_hold_its_key_after_restart(tmp_path, tiny_model) -> None:
    """CreateSession of a DP session without a noise multiplier calibrates it (seconds): kill -9 then."""
    from tg_tinker import DPConfig

    port = free_port()  # the same address after the restart: a restart of the same instance
    data = tmp_path / "data"
    env = base_env(TENSAFE_MODEL_DIR=str(tiny_model.parent))
    subprocess.run(tensafe_cmd("init", "--data-dir", str(data)), env=env, check=True, capture_output=True,
                   timeout=60)

    def up(name: str):
        proc = spawn(tensafe_cmd("up", "--data-dir", str(data), "--port", str(port)), env, tmp_path / name)
        wait_serving(f"127.0.0.1:{port}", SERVICES, proc)
        return proc

    cfg = TrainingConfig(model_ref="tiny", batch_size=4, seed=2, optimizer=OptimizerConfig(name="sgd"),
                         lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
                         dp_config=DPConfig(enabled=True, noise_multiplier=None, max_steps=500, target_epsilon=3.0,
                                            target_delta=1e-5, dataset_size=400, max_grad_norm=1.0))
    request = trainer_pb2.CreateSessionRequest(config=cfg.to_proto())
    api_key = (data / "api_key").read_text().strip()
    key = "create-" + uuid.uuid4().hex
    proc = up("first.log")
    client = ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{port}", retry_count=0, timeout=120)
    transport = client._transport
    stub = transport.stub("trainer")
    future = stub.CreateSession.future(request, metadata=transport.metadata(idempotency_key=key), timeout=120)
    deadline = time.monotonic() + 60
    while not _running_key(data / "trainer.db", key):
        assert not future.done(), "the call finished before it could be killed"
        assert time.monotonic() < deadline, "the call never claimed its key"
        time.sleep(0.05)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(30)
    assert _running_key(data / "trainer.db", key)  # what the crash left behind
    client.close()
    proc = up("second.log")
    try:
        with ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{port}", retry_count=0, timeout=120) as again:
            t = again._transport
            session = t.stub("trainer").CreateSession(request, metadata=t.metadata(idempotency_key=key),
                                                      timeout=60).session
            assert session.session_id.startswith("ses_")
            replay, call = t.stub("trainer").CreateSession.with_call(
                request, metadata=t.metadata(idempotency_key=key), timeout=60)
            assert replay.session.session_id == session.session_id  # applied once
            assert ("x-idempotent-replay", "true") in call.trailing_metadata()
    finally:
        assert proc.stop() == 0, proc.output()


def test_keys_of_a_replica_that_stopped_are_released_after_the_lease(tmp_path) -> None:
    from tensafe.runtime.config import ServerConfig
    from tensafe.runtime.idempotency import IdempotencyStore, StoredOutcome, records
    from tensafe.runtime.registry import SPECS, open_service_db

    config = ServerConfig.load(environ={}, env_file=tmp_path / "none.env", data_dir=tmp_path / "d")
    engine = open_service_db(config, SPECS["vault"])
    try:
        crashed = IdempotencyStore(engine, instance="host-a|10.0.0.1:50051|vault", lease_seconds=1)
        assert crashed.claim("acme", "/m", "k1", "d") is None  # running, and its process never heartbeats
        other = IdempotencyStore(engine, wait_seconds=5, instance="host-b|10.0.0.2:50051|vault", lease_seconds=1)
        start = time.monotonic()
        assert other.claim("acme", "/m", "k1", "d") is None  # released once the lease passed: runs here
        assert 0.5 < time.monotonic() - start < 5
        other.complete("acme", "/m", "k1", StoredOutcome(0, b"ok"))
        crashed.complete("acme", "/m", "k1", StoredOutcome(0, b"late"))  # the old holder cannot overwrite it
        assert other.claim("acme", "/m", "k1", "d") == StoredOutcome(0, b"ok")
        # A live replica's key is not taken: it heartbeats.
        live = IdempotencyStore(engine, instance="host-c|10.0.0.3:50051|vault", lease_seconds=1)
        live.start()
        assert live.claim("acme", "/m", "k2", "d") is None
        impatient = IdempotencyStore(engine, wait_seconds=2.5, instance="host-d|x|vault", lease_seconds=1)
        with pytest.raises(Exception, match="still running"):
            impatient.claim("acme", "/m", "k2", "d")
        live.close()  # a clean stop gives its keys back at once
        assert impatient.claim("acme", "/m", "k2", "d") is None
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(records)).scalar_one() == 2
    finally:
        engine.dispose()
