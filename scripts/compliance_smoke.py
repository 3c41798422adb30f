"""`make compliance-smoke`: a fresh stack, a short scripted DP scenario, then its compliance report.

On a fresh data dir (a temp dir unless --data-dir): SmolLM2-135M-Instruct (converted once into --models),
`tensafe up`, a DP session whose small budget (epsilon 0.65: 0.483 after one step, 0.596 after two) refuses its
third step, a checkpoint, a tenant key rotation, an API key created and revoked; then `tensafe compliance report`
on the data dir. It fails unless the report verifies and holds the scenario's session, steps, refusal,
checkpoint, rotation and key events. About a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TENANT = "default"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensafe.cli", *args, "--data-dir", str(data_dir)], env=env,
                          capture_output=True, text=True, timeout=300)


def scenario(base_url: str, api_key: str, model_dir: Path, data_dir: Path, env: dict[str, str]) -> dict:
    from transformers import AutoTokenizer

    from tg_tinker import DPBudgetExceededError, DPConfig, LoRAConfig, ServiceClient, TrainingConfig

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    texts = ["The clinic opens at eight.", "Refills take two business days.", "Bring your insurance card.",
             "Lab results are ready in three days."]
    enc = tok(texts, padding="max_length", max_length=16, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    seen: dict = {}
    with ServiceClient(api_key=api_key, base_url=base_url) as service:
        cfg = TrainingConfig(model_ref=model_dir.name, batch_size=4, lora_config=LoRAConfig(rank=4, alpha=8.0),
                             dp_config=DPConfig(enabled=True, noise_multiplier=0.8, max_grad_norm=1.0,
                                                target_epsilon=0.65, target_delta=1e-5, dataset_size=400))
        with service.create_training_client(cfg) as tc:
            eps = []
            for step in range(3):
                tc.forward_backward(batch)
                try:
                    dp = tc.optim_step().result(timeout=300).dp_metrics
                    assert dp is not None, "a DP session's steps report their DP metrics"
                    eps.append(dp.total_epsilon)
                    print(f"  DP step {step + 1}: epsilon {eps[-1]:.4f}", flush=True)
                except DPBudgetExceededError as exc:
                    print(f"  DP step {step + 1}: refused by the accountant ({exc.code})", flush=True)
                    seen["refused"] = True
            seen["epsilons"] = eps
            seen["checkpoint"] = tc.save_state(include_optimizer=False).artifact_id
            seen["session"] = tc.get_info().session_id
        info, rewrapped = service.artifacts.rotate_key()
        print(f"  tenant key rotated to version {info.current_version} ({rewrapped} data keys rewrapped)")
        created = _cli(data_dir, env, "keys", "create", "--tenant", TENANT, "--description", "compliance smoke")
        seen["key_id"] = created.stdout.split()[2]
        _cli(data_dir, env, "keys", "revoke", seen["key_id"])
        vkey = _cli(data_dir, env, "ledger", "vkey").stdout.strip()
        deadline = time.monotonic() + 60
        while not any(e.action == "identity.RevokeKey" for e in service.get_audit_logs(limit=10000, vkey=vkey)):
            if time.monotonic() > deadline:
                raise SystemExit("the key revocation did not reach the ledger within 60 s")
            time.sleep(0.5)
    return seen


def check(report: dict, seen: dict) -> list[str]:
    problems = []
    if not report["verification"]["ok"]:
        problems.append(f"ledger not verified: {report['verification']['problem']}")
    session = next((s for s in report["sessions"] if s["session_id"] == seen["session"]), None)
    if session is None:
        return [*problems, f"session {seen['session']} missing"]
    if [round(p["epsilon"], 9) for p in session["epsilon"]] != [round(e, 9) for e in seen["epsilons"]]:
        problems.append(f"epsilon points {session['epsilon']} != {seen['epsilons']}")
    if seen.get("refused") and not session["refusals"]:
        problems.append("the budget refusal is missing")
    if seen["checkpoint"] not in {a["artifact_id"] for a in report["artifacts"]}:
        problems.append("the checkpoint artifact is missing")
    if not any(k["action"] == "vault.RotateTenantKey" for k in report["key_events"]):
        problems.append("the key rotation is missing")
    if [k["action"] for k in report["api_keys"] if k["key_id"] == seen["key_id"]] != [
            "identity.CreateKey", "identity.RevokeKey"]:
        problems.append("the API key events are missing")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=".tensafe/models", help="where SmolLM2 is converted once")
    parser.add_argument("--data-dir", help="fresh data dir (default: a temp dir)")
    parser.add_argument("--out", default="build/compliance-smoke")
    args = parser.parse_args()
    from tensafe.common.models import prepare_smollm2

    model_dir = prepare_smollm2(Path(args.models))
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="tensafe-compliance-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSAFE_", "TS_"))}
    env.update(TENSAFE_MODEL_DIR=str(model_dir.parent.resolve()), TENSAFE_METRICS_PORT="0",
               TENSAFE_LOG_LEVEL="WARNING", TENSAFE_OPENAI_PORT="0", TENSAFE_TINKER_PORT="0")
    print(f"fresh stack on 127.0.0.1:{port}, data dir {data_dir}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(data_dir), "--port",
                               str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        api_key = next((line.strip() for line in server.stdout if line.startswith("ts-")), None)
        if api_key is None:
            raise SystemExit(f"`tensafe up` exited ({server.wait()}) before printing its API key")
        seen = scenario(f"127.0.0.1:{port}", api_key, model_dir, data_dir, env)
    finally:
        server.terminate()
        server.wait(60)
    rc = subprocess.run([sys.executable, "-m", "tensafe.cli", "compliance", "report", "--tenant", TENANT,
                         "--data-dir", str(data_dir), "--out", args.out], env=env).returncode
    report = json.loads((Path(args.out) / "report.json").read_text())
    problems = check(report, seen) + ([f"the report command exited {rc}"] if rc else [])
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print(f"compliance smoke: ok ({len(report['entries'])} verified entries); open {args.out}/report.html")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
