"""`tensafe audit-privacy`: the canary audit of one configuration against a running stack (TS_API_KEY, TS_BASE_URL).

Prints the accountant's epsilon (the proven upper bound) beside the empirical lower bound the canaries
show, the membership-inference AUC and the leak; ``--json`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import SECRET_KINDS

MAX_CANARIES = 600
MAX_CANDIDATES = 999
MAX_STEPS = 100_000


def _bounded(lo: int, hi: int):
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="model_ref: a model name on the server")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer directory (the client builds the ids)")
    p.add_argument("--data", help="JSONL of {prompt, response} trained on beside the canaries (default: none)")
    p.add_argument("--heldout", help="JSONL of {prompt, response} for the held-out loss (default: --data's last 10)")
    p.add_argument("--canaries", type=_bounded(2, MAX_CANARIES), default=64,
                   help="canaries made, each planted by a fair coin (more canaries: a tighter bound)")
    p.add_argument("--candidates", type=_bounded(1, MAX_CANDIDATES), default=15,
                   help="random IDs each secret is ranked against (exposure)")
    p.add_argument("--secret", choices=SECRET_KINDS, default="id",
                   help="the canaries' secret: a six-digit patient ID, or one of 40 allergies (learned in fewer steps;"
                        " at most 40 canaries and 39 candidates)")
    p.add_argument("--steps", type=_bounded(1, MAX_STEPS), default=60)
    p.add_argument("--batch-size", type=_bounded(1, 4096), default=32)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--rank", type=_bounded(1, 256), default=16)
    p.add_argument("--no-dp", dest="dp", action="store_false", help="audit a run without DP (it should leak)")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--target-delta", type=float, default=1e-5)
    p.add_argument("--noise-multiplier", type=float, default=None, help="default: calibrated to --target-epsilon")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.05, help="the bound holds with confidence 1 - alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here as JSON")
    return p


def _records(path: str | None, field: str) -> list[dict[str, str]]:
    if not path:
        return []
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise ValueError(f"{field} line {n}: expected an object with string 'prompt' and 'response'")
        out.append({"prompt": row["prompt"], "response": row["response"]})
    return out


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from tg_tinker import ServiceClient
    from tg_tinker.errors import TGTinkerError

    from . import AuditConfig, audit

    if not 0 < args.alpha < 1:
        print("error: --alpha must be in (0, 1)", file=sys.stderr)
        return 2
    records = _records(args.data, "--data")
    heldout = _records(args.heldout, "--heldout") or records[-10:]
    if args.data and not args.heldout:
        records = records[:-10]
    if not heldout:
        heldout = [{"prompt": "What does a privacy audit measure?",
                    "response": "How much a trained model reveals about the examples it was trained on."}]
    try:
        cfg = AuditConfig(model=args.model, steps=args.steps, batch_size=args.batch_size,
                          learning_rate=args.learning_rate, rank=args.rank, canaries=args.canaries,
                          candidates=args.candidates, seed=args.seed, dp=args.dp, target_epsilon=args.target_epsilon,
                          target_delta=args.target_delta, noise_multiplier=args.noise_multiplier,
                          max_grad_norm=args.max_grad_norm, alpha=args.alpha, secret=args.secret)
    except ValueError as exc:  # a size the secret space cannot hold: refused before any training
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    try:
        with ServiceClient() as service:
            s = audit(service, tok, cfg, records, heldout)
    except TGTinkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    kind = "DP" if s["dp"] else "non-DP"
    print(f"{kind} run: {s['steps']} steps, {s['canaries']} canaries ({s['planted']} planted)")
    print(f"  membership-inference AUC   {s['membership_auc']:.3f}")
    print(f"  planted secrets leaked     {s['leaked_greedy']}/{s['planted']} (greedy)")
    print(f"  mean exposure              {s['mean_exposure_planted']:.2f} bits planted, "
          f"{s['mean_exposure_heldout']:.2f} held out")
    print(f"  epsilon, empirical (lower) {s['epsilon_lower_bound']:.3f} at {100 * (1 - s['alpha']):g}% confidence "
          f"(at most {s['max_demonstrable_epsilon']:.2f} with {s['canaries']} canaries)")
    if s["dp"]:
        print(f"  epsilon, accountant (upper) {s['epsilon_spent']:.3f} at delta {s['target_delta']:g}")
        if s["epsilon_lower_bound"] > s["epsilon_spent"]:
            print("  THE EMPIRICAL BOUND EXCEEDS THE ACCOUNTANT'S EPSILON: the guarantee does not hold",
                  file=sys.stderr)
            return 1
    else:
        print("  epsilon, accountant (upper) none: not a DP run")
    return 0
