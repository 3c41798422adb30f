"""`make demo`'s main job (examples/privacy/canary_demo.py) on the tiny model, few steps: it runs both sessions
through the stack, prints the side-by-side table and the DP/non-DP ratio, and writes the PNG."""

from __future__ import annotations

import json

from test_examples import run_example


def test_canary_demo_on_the_tiny_model(trainer_stack, tiny_model, tmp_path) -> None:
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    out = run_example(trainer_stack, "examples/privacy/canary_demo.py", "--model", "tiny", "--tokenizer",
                      str(tiny_model), "--steps", "4", "--records", "16", "--canaries", "8", "--candidates", "3",
                      "--questions", "1", "--plot", str(png), "--json", str(js))
    assert out.returncode == 0, out.stderr
    for row in ("membership-inference AUC", "epsilon, accountant (proven upper bound)",
                "epsilon, empirical lower bound", "held-out FAQ loss (perplexity), after", "Verdict:"):
        assert row in out.stdout, out.stdout
    assert "DP step" in out.stdout and "ratio" in out.stdout
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"Plot: {png}" in out.stdout
    s = json.loads(js.read_text())
    assert s["non-DP"]["steps"] == 4 and s["non-DP"]["epsilon_spent"] is None
    assert s["DP"]["steps"] == 4 and 0 < s["DP"]["epsilon_spent"] <= 8.0
    assert s["DP"]["epsilon_lower_bound"] <= s["DP"]["epsilon_spent"]
