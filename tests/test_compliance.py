"""`tensafe compliance report`: a scripted scenario's report holds exactly its events, from the verified ledger;
an edited ledger makes the report mark what it can no longer prove (and the command fail)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, eventually, tensafe_cmd
from tg_tinker import DPBudgetExceededError, DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig

BATCH = {"input_ids": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7], [0, 17, 18, 19, 20, 21],
                       [0, 300, 301, 9, 8, 7]],
         "attention_mask": [[1] * 6] * 4, "labels": [[0, 45, 120, 77, 200, 31], [0, 99, 14, 230, 61, 7],
                                                      [0, 17, 18, 19, 20, 21], [0, 300, 301, 9, 8, 7]]}
NOISE, RATE, DELTA = 0.8, 4 / 400, 1e-5


def _report(stack, out: Path, *extra: str, env: dict[str, str] | None = None, tenant: str = "default"
            ) -> tuple[int, dict, str]:
    proc = subprocess.run(tensafe_cmd("compliance", "report", "--tenant", tenant, "--out", str(out), "--no-pdf",
                                      *extra), env=env or stack.env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    data = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def scenario(trainer_stack):
    """Two sessions (one DP, run until its budget refuses a step), a checkpoint, a key rotation, a key created
    and revoked; returns what the SDK saw."""
    import dp_accounting

    def eps(steps: int) -> float:
        acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        acct.compose(dp_accounting.PoissonSampledDpEvent(RATE, dp_accounting.GaussianDpEvent(NOISE)), steps)
        return acct.get_epsilon(DELTA)

    target = (eps(2) + eps(3)) / 2  # the third DP step is refused
    seen: dict = {"epsilons": []}
    with trainer_stack.client(retry_count=2) as service:
        dp_cfg = TrainingConfig(model_ref="tiny", batch_size=4, lora_config=LoRAConfig(rank=2, alpha=4.0),
                                optimizer=OptimizerConfig(name="sgd", learning_rate=0.1), seed=3,
                                dp_config=DPConfig(enabled=True, noise_multiplier=NOISE, max_grad_norm=1.0,
                                                   target_epsilon=target, target_delta=DELTA, dataset_size=400))
        with service.create_training_client(dp_cfg) as tc:
            for _ in range(2):
                tc.forward_backward(BATCH)
                seen["epsilons"].append(tc.optim_step().result(timeout=60).dp_metrics.total_epsilon)
            tc.forward_backward(BATCH)
            with pytest.raises(DPBudgetExceededError):
                tc.optim_step().result(timeout=60)
            seen["checkpoint"] = tc.save_state(include_optimizer=False).artifact_id
            info = tc.get_info()
            seen["dp_session"], seen["budget"] = info.session_id, info.budget_id
        with service.create_training_client(TrainingConfig(model_ref="tiny", lora_config=LoRAConfig(rank=4),
                                                           seed=1)) as tc:
            seen["plain_session"] = tc.get_info().session_id
        info, _ = service.artifacts.rotate_key()
        seen["kek_version"] = info.current_version
        created = trainer_stack.cli("keys", "create", "--tenant", "default", "--description", "auditor")
        seen["key_id"] = created.stdout.split()[2]
        assert trainer_stack.cli("keys", "revoke", seen["key_id"]).returncode == 0
        vkey = trainer_stack.cli("ledger", "vkey").stdout.strip()
        # Delivered through the services' outboxes: wait until the ledger has the revocation (the last event).
        seen["entries"] = eventually(
            lambda: (logs := service.get_audit_logs(limit=10000, vkey=vkey)) and
            any(e.action == "identity.RevokeKey" for e in logs) and logs, 30, message="the revocation entry")
        seen["vkey"] = vkey
    return seen


def test_report_holds_exactly_the_scenario(trainer_stack, scenario, tmp_path) -> None:
    rc, report, out = _report(trainer_stack, tmp_path / "r", "--data-dir", str(trainer_stack.data_dir))
    assert rc == 0, out
    v = report["verification"]
    assert v["ok"] and v["problem"] is None and v["excluded_entries"] == 0
    # Every entry the tenant can prove through the SDK is in the report, and nothing else of this tenant's
    # (the report may see entries delivered after the SDK's read: they must be later ones).
    sdk = {e.index for e in scenario["entries"]}
    mine = {e["index"] for e in report["entries"]}
    assert sdk <= mine and all(i > max(sdk) for i in mine - sdk), (sdk ^ mine)
    assert all(e["tenant_id"] == "default" for e in report["entries"])

    sessions = {s["session_id"]: s for s in report["sessions"]}
    assert set(sessions) >= {scenario["dp_session"], scenario["plain_session"]}
    dp = sessions[scenario["dp_session"]]
    assert dp["dp"] and dp["sampling"] == "declared" and dp["budget_id"] == scenario["budget"]
    assert float(dp["dp_settings"]["noise_multiplier"]) == NOISE
    assert float(dp["dp_settings"]["sample_rate"]) == pytest.approx(RATE)
    assert [p["step"] for p in dp["epsilon"]] == [1, 2]
    assert [p["epsilon"] for p in dp["epsilon"]] == pytest.approx(scenario["epsilons"], rel=1e-9)
    assert len(dp["refusals"]) == 1
    assert [c["artifact_id"] for c in dp["checkpoints"]] == [scenario["checkpoint"]]
    assert not sessions[scenario["plain_session"]]["dp"]
    # The refusal: one accountant entry, DP_BUDGET_EXCEEDED, with the epsilon the step would have reached.
    refusals = [r for r in report["budget_refusals"] if r["action"] == "accountant.RecordStep"]
    assert len(refusals) == 1 and refusals[0]["reason"] == "DP_BUDGET_EXCEEDED"
    assert float(refusals[0]["epsilon_with_step"]) > float(refusals[0]["target_epsilon"])
    arts = {a["artifact_id"]: a for a in report["artifacts"]}
    assert arts[scenario["checkpoint"]]["cipher"] == "AES-256-GCM"
    assert arts[scenario["checkpoint"]]["kind"] == "checkpoint"
    assert arts[scenario["checkpoint"]]["kek_version"] == "1"
    rotations = [k for k in report["key_events"] if k["action"] == "vault.RotateTenantKey"]
    assert [k["kek_version"] for k in rotations] == [str(scenario["kek_version"])]
    keys = [(k["action"], k["key_id"]) for k in report["api_keys"] if k["key_id"] == scenario["key_id"]]
    assert keys == [("identity.CreateKey", scenario["key_id"]), ("identity.RevokeKey", scenario["key_id"])]
    refused = {(r["action"], r["reason"]) for r in report["refused_requests"]}
    assert ("accountant.RecordStep", "DP_BUDGET_EXCEEDED") in refused
    # Each figure links its ledger entry, and the HTML is self-contained.
    html = (tmp_path / "r" / "report.html").read_text()
    for point in dp["epsilon"]:
        assert f'href="#e{point["entry"]}"' in html and f'id="e{point["entry"]}"' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "not certification" in html


def test_report_from_a_running_deployment_as_the_tenant(trainer_stack, scenario, tmp_path) -> None:
    env = {**trainer_stack.env, "TS_API_KEY": trainer_stack.api_key}
    rc, report, out = _report(trainer_stack, tmp_path / "u", "--url", trainer_stack.target, "--vkey",
                              scenario["vkey"], env=env)
    assert rc == 0, out
    assert {e.index for e in scenario["entries"]} <= {e["index"] for e in report["entries"]}
    dp = next(s for s in report["sessions"] if s["session_id"] == scenario["dp_session"])
    assert [p["epsilon"] for p in dp["epsilon"]] == pytest.approx(scenario["epsilons"], rel=1e-9)
    # Another tenant's name with this key: refused, nothing written; a malformed tenant id too.
    rc, _, out = _report(trainer_stack, tmp_path / "x", "--url", trainer_stack.target, "--vkey", scenario["vkey"],
                         env=env, tenant="other")
    assert rc != 0 and "belongs to tenant 'default'" in out and not (tmp_path / "x").exists()
    bad = subprocess.run(tensafe_cmd("compliance", "report", "--tenant", "../etc", "--out", str(tmp_path / "y"),
                                     "--data-dir", str(trainer_stack.data_dir)), env=trainer_stack.env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode != 0 and "tenant" in bad.stderr and not (tmp_path / "y").exists()


def test_an_edited_ledger_is_marked_and_refused(trainer_stack, scenario, tmp_path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trainer_stack.data_dir), str(copy)], check=True)
    db = copy / "ledger.db"
    target = next(e.index for e in scenario["entries"] if e.action == "accountant.RecordStep"
                  and e.outcome == "denied")
    with sqlite3.connect(db) as conn:
        # The table is append-only by triggers; a forger with the database drops them first.
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND "
                                    "tbl_name = 'ledger_leaves'").fetchall():
            conn.execute(f'DROP TRIGGER "{name}"')
        (entry,) = conn.execute("SELECT entry FROM ledger_leaves WHERE idx = ?", (target,)).fetchone()
        # Turn the refusal into a success, keeping the stored leaf hash: what a forger would do.
        forged = bytes(entry).replace(b"DP_BUDGET_EXCEEDED", b"OK________________")
        assert forged != bytes(entry)
        conn.execute("UPDATE ledger_leaves SET entry = ? WHERE idx = ?", (forged, target))
    rc, report, out = _report(trainer_stack, tmp_path / "t", "--data-dir", str(copy), "--vkey", scenario["vkey"])
    assert rc == 1 and "LEDGER NOT VERIFIED" in out
    v = report["verification"]
    assert not v["ok"] and f"entry {target}" in v["problem"]
    assert v["verified_size"] <= target and v["excluded_entries"] > 0
    assert all(e["index"] < v["verified_size"] for e in report["entries"])
    assert "did not verify" in (tmp_path / "t" / "report.html").read_text()


def test_pdf_is_printed_when_chromium_is_installed(trainer_stack, scenario, tmp_path) -> None:
    from tensafe.compliance.render import chromium

    if chromium() is None:
        if os.environ.get("TENSAFE_REQUIRE_CHROMIUM"):
            pytest.fail("TENSAFE_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("no Chromium here (apt install chromium): the report is HTML and JSON only")
    proc = subprocess.run(tensafe_cmd("compliance", "report", "--tenant", "default", "--out", str(tmp_path),
                                      "--data-dir", str(trainer_stack.data_dir)), env=trainer_stack.env,
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and b"/Type /Page" in pdf and len(pdf) > 10_000
