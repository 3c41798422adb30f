"""The audit ledger against real servers: entries from every call, proofs, tamper detection, outbox."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import sqlalchemy as sa

from conftest import REPO, base_env, eventually, free_port, spawn, tensafe_cmd, wait_serving
from tensafe.api.ledger.v1 import ledger_pb2
from tg_tinker import AuthenticationError, PermissionDeniedError, ServiceClient
from tg_tinker.transparency import VerificationError


def vkey(stack) -> str:
    out = stack.cli("ledger", "vkey")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def tenant(stack, name: str) -> ServiceClient:
    out = stack.cli("keys", "create", "--tenant", name)
    return stack.client(api_key=out.stdout.strip().splitlines()[-1], retry_count=0)


def ledger_engine(stack):
    url = stack.env.get("TENSAFE_DB_URL") or f"sqlite:///{stack.data_dir / 'ledger.db'}"
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    schema = stack.env.get("TENSAFE_DB_SCHEMA_PREFIX", "tensafe_") + "ledger"
    return engine, (f'"{schema}".' if "postgresql" in url else "")


def test_actions_are_recorded_and_verified_per_tenant(stack) -> None:
    key = vkey(stack)
    with tenant(stack, "audited") as alice, tenant(stack, "neighbour") as bob:
        art = alice.artifacts.put(b"secret bytes", name="a")
        alice.pull_artifact(art.artifact_id)
        alice.artifacts.rotate_key()
        bob.artifacts.put(b"other", name="b")
        def vault_records():
            found = [r for r in alice.get_audit_logs(vkey=key)
                     if r.action in ("vault.PutArtifact", "vault.PullArtifact", "vault.RotateTenantKey")]
            return found if len(found) >= 3 else None

        records = eventually(vault_records, 15, message="the vault's three entries")
        assert [r.action for r in records] == ["vault.PutArtifact", "vault.PullArtifact", "vault.RotateTenantKey"]
        assert all(r.tenant_id == "audited" and r.outcome == "success" for r in records)
        assert records[0].resource_id == art.artifact_id and records[0].request_id
        mine = alice.get_audit_logs(vkey=key)
        assert all(r.tenant_id == "audited" for r in mine)  # never bob's entries
        created = eventually(lambda: [r for r in alice.get_audit_logs(vkey=key)
                                      if r.action == "identity.CreateKey"])  # the key itself, made by the CLI
        assert len(created) == 1 and created[0].resource_id.startswith("key_") and created[0].actor == "operator:cli"
        # Two outboxes (the identity database's and the vault's) deliver independently: any order.
        eventually(lambda: sorted(r.action for r in bob.get_audit_logs(vkey=key))
                   == ["identity.CreateKey", "vault.PutArtifact"], message="bob's two entries, and only those")
        # The client remembers its checkpoint and checks that the next one extends it.
        before = alice._audit.verifier.checkpoint.size
        alice.artifacts.put(b"more", name="c")
        eventually(lambda: len(alice.get_audit_logs(vkey=key, action="vault.PutArtifact")) == 2,
                   message="alice's second PutArtifact entry")
        assert alice._audit.verifier.checkpoint.size > before


def test_rejected_requests_are_recorded(stack) -> None:
    with stack.client(api_key="ts-not-a-key", retry_count=0) as intruder, pytest.raises(AuthenticationError):
        intruder.artifacts.put(b"x", name="nope")
    engine, prefix = ledger_engine(stack)

    def denied():
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT entry FROM {prefix}ledger_leaves WHERE action = 'vault.PutArtifact'"
                                        " AND tenant_id = ''")).all()
        entries = [ledger_pb2.AuditEntry.FromString(bytes(r.entry)) for r in rows]
        return [e for e in entries if e.outcome == ledger_pb2.AUDIT_OUTCOME_DENIED]

    found = eventually(denied, message="the denied PutArtifact entry")
    engine.dispose()
    assert found[0].details["reason"] == "API_KEY_INVALID"


def test_only_services_may_append(stack) -> None:
    with stack.client() as client, pytest.raises(PermissionDeniedError):
        client._call("ledger", "AppendEntries", ledger_pb2.AppendEntriesRequest(
            entries=[ledger_pb2.AuditEntry(entry_id="forged", service="vault", action="vault.DeleteArtifact")]))


def test_wrong_key_or_forged_checkpoint_is_refused(stack) -> None:
    from tg_tinker.transparency import NoteSigner

    with stack.client() as client:
        client.artifacts.put(b"x", name="k")
        other = NoteSigner.generate("tensafe.local/ledger").vkey
        with pytest.raises(VerificationError):
            eventually(lambda: client.get_audit_logs(vkey=other), 10)  # empty until the first checkpoint


def test_storage_refuses_rewrites_and_verify_names_the_edited_entry(stack) -> None:
    with stack.client() as client:
        for i in range(5):
            client.artifacts.put(f"payload {i}".encode(), name=f"n{i}")
    engine, prefix = ledger_engine(stack)
    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT count(*) FROM {prefix}ledger_leaves")).scalar()

    eventually(lambda: count() >= 5, message="five ledger entries")
    ok = stack.cli("ledger", "verify")
    assert ok.returncode == 0, ok.stderr
    with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:  # append-only in the database itself
        conn.execute(sa.text(f"UPDATE {prefix}ledger_leaves SET action = 'x' WHERE idx = 1"))
    # An attacker with the database drops the guard and edits an entry (bytes and leaf hash together).
    from tg_tinker.transparency import leaf_hash

    with engine.begin() as conn:
        if prefix:
            conn.execute(sa.text(f"DROP TRIGGER ledger_leaves_append_only ON {prefix}ledger_leaves"))
        else:
            conn.execute(sa.text("DROP TRIGGER ledger_leaves_no_update"))
        raw = conn.execute(sa.text(f"SELECT entry FROM {prefix}ledger_leaves WHERE idx = 2")).scalar_one()
        entry = ledger_pb2.AuditEntry.FromString(bytes(raw))
        entry.action = "vault.ListArtifacts"
        data = entry.SerializeToString(deterministic=True)
        conn.execute(sa.text(f"UPDATE {prefix}ledger_leaves SET entry = :e, leaf_hash = :h WHERE idx = 2"),
                     {"e": data, "h": leaf_hash(data)})
    engine.dispose()
    bad = stack.cli("ledger", "verify")
    assert bad.returncode == 1
    assert "no longer hash to its signed root" in bad.stderr, bad.stderr
    among = re.search(r"first altered entry is among indices (\d+)\.\.(\d+)", bad.stderr)
    assert among and int(among[1]) <= 2 <= int(among[2]), bad.stderr  # the range holds the edited entry


@pytest.mark.slow
def test_no_entry_is_lost_while_the_ledger_is_down(tmp_path, tiny_model) -> None:
    """Split form: a training run goes on while the ledger is stopped; on restart every entry arrives once."""
    from tg_tinker import LoRAConfig, TrainingConfig

    data_dir = tmp_path / "data"
    env = base_env(TENSAFE_MODEL_DIR=str(tiny_model.parent))
    init = subprocess.run(tensafe_cmd("init", "--data-dir", str(data_dir)), env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    api_key = init.stdout.strip().splitlines()[-1]
    ports = {"trainer": free_port(), "vault": free_port(), "ledger": free_port()}
    env.update({f"TENSAFE_{s.upper()}_ENDPOINT": f"127.0.0.1:{p}" for s, p in ports.items()})

    def serve(name: str):
        proc = spawn(tensafe_cmd("serve", name, "--data-dir", str(data_dir), "--port", str(ports[name])), env,
                     tmp_path / f"{name}-{time.monotonic_ns()}.log")
        wait_serving(f"127.0.0.1:{ports[name]}", (name,), proc)
        return proc

    procs = {name: serve(name) for name in ("trainer", "vault", "ledger")}
    client = ServiceClient(api_key=api_key, base_url="127.0.0.1:1", retry_count=0,
                           endpoints={s: f"127.0.0.1:{p}" for s, p in ports.items()})
    batch = {"input_ids": [[1, 20, 30, 40, 50, 60]]}
    try:
        tc = client.create_training_client(TrainingConfig(model_ref="tiny", seed=0, lora_config=LoRAConfig(rank=4)))
        tc.forward_backward(batch)
        tc.optim_step().result(timeout=60)
        assert procs["ledger"].stop() == 0
        for _ in range(10):  # the ledger is down: training is not blocked
            tc.forward_backward(batch)
            tc.optim_step().result(timeout=60)
        ckpt = tc.save_state()  # trainer -> vault, both audited
        assert procs["vault"].stop() == 0  # and the vault restarts too: its outbox is on disk
        procs["vault"], procs["ledger"] = serve("vault"), serve("ledger")
        key = subprocess.run(tensafe_cmd("ledger", "vkey", "--data-dir", str(data_dir)), env=env,
                             capture_output=True, text=True, cwd=REPO).stdout.strip()

        def complete():
            records = client.get_audit_logs(vkey=key)
            steps = [r for r in records if r.action == "trainer.OptimStep"]
            saved = [r for r in records if r.action in ("trainer.SaveState", "vault.PutArtifact")]
            return records if len(steps) >= 11 and len(saved) >= 2 else None

        records = eventually(complete, 30, message="11 OptimStep and 2 save entries")
        steps = [r for r in records if r.action == "trainer.OptimStep"]
        assert len(steps) == 11 and len({r.request_id for r in steps}) == 11  # all of them, each once
        assert [r.resource_id for r in records if r.action == "vault.PutArtifact"] == [ckpt.artifact_id]
        assert [r.index for r in records] == sorted(r.index for r in records)
        tc.close()
    finally:
        client.close()
        for proc in procs.values():
            proc.stop()


def test_checkpoints_can_carry_several_signatures(tmp_path) -> None:
    """Key rotation: with two keys configured, clients holding either verifier key accept the log."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from conftest import start_stack

    old = start_stack(tmp_path)
    old_vkey = vkey(old)
    assert old.process.stop() == 0
    new_key = tmp_path / "ledger-new.key"
    new_key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    new_key.chmod(0o600)
    keys = f"{new_key},{old.data_dir / 'keys' / 'ledger.key'}"
    s = start_stack(tmp_path, {"TENSAFE_LEDGER_KEY_FILE": keys}, data_dir=old.data_dir)
    try:
        new_vkey = vkey(s)
        assert new_vkey != old_vkey
        with s.client() as client:
            client.artifacts.put(b"after rotation", name="r")
            for key in (old_vkey, new_vkey):
                eventually(lambda k=key: [r.action for r in client.get_audit_logs(vkey=k)
                                          if r.action == "vault.PutArtifact"], message=f"entries under {key}")
    finally:
        s.process.stop()
