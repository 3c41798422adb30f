"""The canary audit (tensafe.privacy_audit) on the tiny model through a live stack: a non-DP run shows a large
empirical epsilon; a DP run's empirical lower bound stays within the accountant's epsilon."""

from __future__ import annotations

import dataclasses
import math

import pytest
from transformers import AutoTokenizer

from tensafe import privacy_audit as pa

# Canaries only (no other data): the tiny model memorises them quickly without DP.
AUDIT = dict(model="tiny", canaries=64, candidates=7, steps=60, batch_size=32, learning_rate=1e-2, rank=16)
HELDOUT = [{"prompt": "When does the clinic open?", "response": "The clinic opens at eight in the morning."}]


def test_bound_is_a_valid_binomial_bound() -> None:
    # Perfect separation of m canaries: the bound approaches, never passes, what m guesses can show.
    m = 64
    bound = pa.one_run_epsilon_bound([1.0] * (m // 2), [0.0] * (m // 2), delta=1e-5)
    assert 0 < bound <= pa.max_demonstrable_epsilon(m)
    # No signal: no bound.
    assert pa.one_run_epsilon_bound([0.0] * 32, [0.0] * 32, delta=1e-5) == 0.0
    assert pa.auc([2.0, 3.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert pa.exposure(1, 49) == pytest.approx(math.log2(50))


def _audit(trainer_stack, tiny_model, **over):
    from tg_tinker import ServiceClient

    tok = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    cfg = pa.AuditConfig(**{**AUDIT, **over})
    with ServiceClient(api_key=trainer_stack.api_key, base_url=trainer_stack.target) as service:
        return pa.audit(service, tok, cfg, [], HELDOUT)


def test_non_dp_run_leaks_and_dp_run_stays_within_its_epsilon(trainer_stack, tiny_model) -> None:
    plain = _audit(trainer_stack, tiny_model, dp=False)
    print(plain)
    assert plain["membership_auc"] > 0.9, plain
    assert plain["epsilon_lower_bound"] > 1.5, plain
    private = _audit(trainer_stack, tiny_model, dp=True, target_epsilon=1.0)
    print(private)
    assert private["steps"] == AUDIT["steps"] and 0 < private["epsilon_spent"] <= 1.0, private
    assert private["epsilon_lower_bound"] <= private["epsilon_spent"], private
    assert private["epsilon_lower_bound"] < plain["epsilon_lower_bound"], (private, plain)


def test_cli_audits_a_dp_run(trainer_stack, tiny_model, tmp_path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "audit.json"
    env = dict(trainer_stack.env, TS_API_KEY=trainer_stack.api_key, TS_BASE_URL=trainer_stack.target)
    proc = subprocess.run([sys.executable, "-m", "tensafe.cli", "audit-privacy", "--model", "tiny", "--tokenizer",
                           str(tiny_model), "--canaries", "32", "--candidates", "3", "--steps", "10",
                           "--batch-size", "8", "--target-epsilon", "2", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    assert s["dp"] and s["steps"] == 10 and 0 < s["epsilon_spent"] <= 2.0, s
    assert s["epsilon_lower_bound"] <= s["epsilon_spent"]
    assert "epsilon, accountant (upper)" in proc.stdout and "epsilon, empirical (lower)" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "tensafe.cli", "audit-privacy", "--model", "tiny", "--tokenizer",
                          str(tiny_model), "--canaries", "100000"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--canaries" in bad.stderr


def test_allergy_canaries_are_distinct_bounded_and_matched_as_whole_words() -> None:
    canaries = pa.make_canaries(40, seed=3, kind="allergy")
    assert sorted(c.secret for c in canaries) == sorted(pa.ALLERGIES)  # all 40, none twice
    c = canaries[0]
    assert c.kind == "allergy" and c.record()["response"] == f"{c.name} is allergic to {c.secret}."
    assert pa.make_canaries(16, seed=3, kind="allergy") != pa.make_canaries(16, seed=4, kind="allergy")
    with pytest.raises(ValueError, match="canaries: at most 40"):
        pa.make_canaries(41, seed=3, kind="allergy")
    with pytest.raises(ValueError, match="secret: must be one of"):
        pa.make_canaries(4, seed=3, kind="ssn")
    shellfish = pa.Canary("Ada Moreau", "shellfish", planted=True, kind="allergy")
    soy = pa.Canary("Ada Moreau", "soy", planted=True, kind="allergy")
    assert pa.leaked(shellfish, " shellfish.") and pa.leaked(soy, " soy and milk")
    assert not pa.leaked(soy, " soybeans.") and not pa.leaked(shellfish, " sesame, not shellfish")
    # Ranking against 40 or more other allergies is impossible: refused before any forward pass.
    with pytest.raises(ValueError, match="candidates: at most 39"):
        pa.score_canaries(None, None, [shellfish], candidates=40, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidates: at most 39"):
        pa.run(None, None, pa.AuditConfig(model="tiny", secret="allergy", candidates=40), [], [], [shellfish])  # type: ignore[arg-type]


def test_cli_refuses_more_candidates_than_the_secret_space(tmp_path) -> None:
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "tensafe.cli", "audit-privacy", "--model", "tiny", "--tokenizer",
                          str(tmp_path), "--secret", "allergy", "--canaries", "16", "--candidates", "40"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--candidates" in bad.stderr and "40 secrets" in bad.stderr, bad.stderr


def test_dp_and_non_dp_runs_train_on_the_same_poisson_batches() -> None:
    """Both runs of an audit (and of `make demo`) take the same batches, Poisson-sampled at batch_size / N:
    the clipping and the noise are then the only difference, and the step times compare like for like."""
    data = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(64)]
    cfg = pa.AuditConfig(model="m", steps=40, batch_size=16, seed=3)
    dp = list(pa.step_batches(cfg, data))
    plain = list(pa.step_batches(dataclasses.replace(cfg, dp=False), data))
    assert len(dp) == 40 and dp == plain
    sizes = [len(b) for b in dp]
    assert len(set(sizes)) > 1 and 10 <= sum(sizes) / len(sizes) <= 22  # Poisson, mean 16: not a fixed size
    assert all(len({r["prompt"] for r in b}) == len(b) for b in dp)  # each record at most once per batch
    assert list(pa.step_batches(dataclasses.replace(cfg, seed=4), data)) != dp
