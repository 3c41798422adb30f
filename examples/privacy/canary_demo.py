"""Does differential privacy stop a leak? Plant canaries, fine-tune with and without DP, try to extract them.

    tensafe up &                                   # or: make up
    TS_API_KEY=... python examples/privacy/canary_demo.py --model smollm2-135m-instruct

The training data: some of the synthetic Northwind Clinic FAQ plus *canaries*: made-up patient records
("Ada Moreau is allergic to penicillin.", or with --secret id "Ada Moreau's patient ID is 482-917."), each
planted in the data or held out by a fair coin. Two
sessions fine-tune on the same data for the same steps, one without DP and one with DP-SGD (Poisson
batches, per-example clipping, noise calibrated to --target-epsilon over the run). Then, side by side:

- utility: held-out FAQ loss and perplexity before and after, and how many held-out questions the model
  answers in the clinic's voice (the answer names "Northwind");
- the leak: greedy completion of "<name> is allergic to" (does it say the secret?), the secret's rank
  among --candidates other secrets and its exposure (Carlini et al., "The Secret Sharer"), and the
  membership-inference AUC of planted against held-out canaries (loss-based, base model as reference);
- the empirical lower bound on epsilon from those canaries (tensafe.privacy_audit) beside the
  accountant's epsilon, per-step time and the DP/non-DP ratio.

A PNG (loss and epsilon per step, exposure per canary) is written to --plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

from transformers import AutoTokenizer

from tensafe import privacy_audit as pa
from tg_tinker import ServiceClient

HERE = Path(__file__).resolve().parent.parent


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_line(kind: str, step: int, total: int, m: dict[str, float]) -> None:
    eps = "" if math.isinf(m["epsilon"]) else f"  epsilon {m['epsilon']:.2f}"
    print(f"\r  {kind:>6} step {step:3d}/{total}  loss {m['loss']:.3f}{eps}  {m['seconds']:.2f} s/step   ",
          end="" if step < total else "\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model_ref: a model name on the server")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: .tensafe/models/<model>)")
    parser.add_argument("--data", default=str(HERE / "data" / "clinic_faq.jsonl"))
    parser.add_argument("--heldout", default=str(HERE / "data" / "clinic_faq_heldout.jsonl"))
    parser.add_argument("--records", type=int, default=56, help="FAQ records trained on (beside the canaries)")
    parser.add_argument("--canaries", type=int, default=16, help="canaries made; each planted by a fair coin")
    parser.add_argument("--candidates", type=int, default=15, help="other secrets each secret is ranked against")
    parser.add_argument("--secret", choices=pa.SECRET_KINDS, default="allergy",
                        help="allergy: one of 40 (memorised in a few passes); id: a six-digit patient ID")
    parser.add_argument("--questions", type=int, default=3, help="held-out questions answered before and after")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--target-delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="build/demo/canary_demo.png", help="where to write the PNG ('' for none)")
    parser.add_argument("--json", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    base = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                rank=args.rank, canaries=args.canaries, candidates=args.candidates, seed=args.seed, secret=args.secret,
                target_epsilon=args.target_epsilon, target_delta=args.target_delta, max_grad_norm=args.max_grad_norm)
    try:
        pa.AuditConfig(**base)  # sizes the secret space cannot hold: refused before any training
    except ValueError as exc:
        parser.error(f"--{exc}")

    tok = AutoTokenizer.from_pretrained(args.tokenizer or str(Path(".tensafe/models") / args.model),
                                        local_files_only=True)
    fmt = pa.Formatter(tok)
    records = load(args.data)
    random.Random(args.seed).shuffle(records)
    records = records[: args.records]
    heldout = load(args.heldout)
    questions = [r["prompt"] for r in heldout[: args.questions]]
    canaries = pa.make_canaries(args.canaries, args.seed, args.secret)
    planted = [c for c in canaries if c.planted]
    print(f"Data: {len(records)} clinic FAQ records + {len(planted)} planted canaries "
          f"({len(canaries) - len(planted)} more held out), e.g. {planted[0].response()!r}")
    runs: dict[str, pa.RunResult] = {}
    with ServiceClient() as service:
        baseline = None
        for kind, dp in (("non-DP", False), ("DP", True)):
            cfg = pa.AuditConfig(**base, dp=dp)
            print(f"Fine-tuning {args.model} {kind}: {args.steps} steps, batch {args.batch_size}, lr "
                  f"{args.learning_rate:g}, LoRA rank {args.rank}"
                  + (f", DP-SGD to epsilon {args.target_epsilon:g} at delta {args.target_delta:g}" if dp else ""),
                  flush=True)
            runs[kind] = res = pa.run(service, fmt, cfg, records, heldout, canaries, baseline=baseline,
                                      questions=questions, progress=progress_line)
            baseline = res.scores_before
    cfg = pa.AuditConfig(**base)
    report(runs, canaries, cfg, questions)
    if args.plot:
        path = plot(runs, canaries, cfg, Path(args.plot))
        print(f"\nPlot: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: pa.summary(pa.AuditConfig(**base, dp=r.dp), canaries, r)
                                               for k, r in runs.items()}, indent=2))
    return 0


def report(runs: dict[str, pa.RunResult], canaries: list[pa.Canary], cfg: pa.AuditConfig,
           questions: list[str]) -> None:
    plain, dp = runs["non-DP"], runs["DP"]
    s = {k: pa.summary(cfg, canaries, r) for k, r in runs.items()}
    n_planted = s["DP"]["planted"]
    n_held = len(canaries) - n_planted

    def voice(answers: list[str]) -> str:
        return f"{sum('northwind' in a.lower() for a in answers)}/{len(answers)}"

    rows = [
        ("held-out FAQ loss (perplexity), before", *(f"{r.loss_before:.3f} ({math.exp(r.loss_before):.1f})"
                                                     for r in (plain, dp))),
        ("held-out FAQ loss (perplexity), after", *(f"{r.loss_after:.3f} ({math.exp(r.loss_after):.1f})"
                                                    for r in (plain, dp))),
        ("held-out answers in the clinic's voice", *(f"{voice(r.answers_before)} -> {voice(r.answers_after)}"
                                                     for r in (plain, dp))),
        (f"planted secrets completed greedily (of {n_planted})", *(str(s[k]["leaked_greedy"]) for k in runs)),
        (f"held-out secrets completed greedily (of {n_held})", *(str(s[k]["leaked_greedy_heldout"]) for k in runs)),
        (f"mean exposure, planted (bits, max {math.log2(cfg.candidates + 1):.1f})",
         *(f"{s[k]['mean_exposure_planted']:.2f}" for k in runs)),
        ("mean exposure, held out (bits)", *(f"{s[k]['mean_exposure_heldout']:.2f}" for k in runs)),
        ("membership-inference AUC (0.5 = guessing)", *(f"{s[k]['membership_auc']:.2f}" for k in runs)),
        ("epsilon, accountant (proven upper bound)", "none (no DP)", f"{dp.epsilon_spent:.2f}"),
        (f"epsilon, empirical lower bound (95%, at most "
         f"{pa.max_demonstrable_epsilon(len(canaries), cfg.alpha):.1f})",
         *(f"{s[k]['epsilon_lower_bound']:.2f}" for k in runs)),
        ("steps done; median seconds per step", *(f"{r.steps_done}; {r.median_step_s:.2f} s" for r in (plain, dp))),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'':{w}}  {'non-DP':>18}  {'DP':>18}")
    for name, a, b in rows:
        print(f"{name:{w}}  {a:>18}  {b:>18}")
    ratio = dp.median_step_s / plain.median_step_s
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nDP step {dp.median_step_s:.2f} s vs non-DP {plain.median_step_s:.2f} s (medians): ratio {ratio:.2f} "
          f"(noise multiplier {dp.noise_multiplier:.3f}, clipping {cfg.max_grad_norm:g}; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs: the runs are sequential, so other work on the machine moves the ratio)")
    prefix = pa.PREFIXES[cfg.secret].format(name="<name>")
    print(f"\nPer canary (planted ones marked *): greedy completion after \"{prefix}\", rank among "
          f"{cfg.candidates + 1}")
    assert plain.scores_after is not None and dp.scores_after is not None
    for k, c in enumerate(canaries):
        print(f"  {'*' if c.planted else ' '} {c.name:<18} secret {c.secret:<14} non-DP: "
              f"{plain.greedy[k].strip()[:12]!r:<15} rank {plain.scores_after.rank[k]:>2}   DP: "
              f"{dp.greedy[k].strip()[:12]!r:<15} rank {dp.scores_after.rank[k]:>2}")
    if questions:
        print(f"\nQ: {questions[0]}")
        for kind, r in runs.items():
            print(f"  {kind} before: {r.answers_before[0][:110]!r}\n  {kind} after:  {r.answers_after[0][:110]!r}")
    print("\nVerdict: " + verdict(s, plain, dp))


def verdict(s: dict[str, dict], plain: pa.RunResult, dp: pa.RunResult) -> str:
    """What the figures show, in words (including what they do not show)."""
    a, b = s["non-DP"], s["DP"]
    parts = []
    if a["membership_auc"] >= 0.75 or a["leaked_greedy"]:
        parts.append(f"the non-DP run leaks: its planted canaries are told apart from held-out ones (AUC "
                     f"{a['membership_auc']:.2f}, exposure {a['mean_exposure_planted']:.1f} vs "
                     f"{a['mean_exposure_heldout']:.1f} bits)")
    else:
        parts.append(f"the non-DP run did NOT visibly leak (AUC {a['membership_auc']:.2f}; try more --steps)")
    if b["leaked_greedy"] == 0 and b["membership_auc"] < 0.75:
        parts.append(f"the DP run does not (AUC {b['membership_auc']:.2f}, exposure {b['mean_exposure_planted']:.1f} "
                     f"vs {b['mean_exposure_heldout']:.1f} bits)")
    else:
        parts.append(f"the DP run shows some membership signal (AUC {b['membership_auc']:.2f})")
    if not (a["leaked_greedy"] or b["leaked_greedy"]):
        parts.append("neither run completes a secret greedily in this many steps")
    parts.append(f"utility: held-out perplexity {math.exp(plain.loss_before):.1f} -> {math.exp(plain.loss_after):.1f} "
                 f"without DP, {math.exp(dp.loss_before):.1f} -> {math.exp(dp.loss_after):.1f} with DP"
                 + (" (the DP run learned little of the clinic's answers at this epsilon and step count)"
                    if dp.loss_after > 0.5 * (dp.loss_before + plain.loss_after) else ""))
    return "; ".join(parts) + "."


def plot(runs: dict[str, pa.RunResult], canaries: list[pa.Canary], cfg: pa.AuditConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eps, ax_exp) = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, r in runs.items():
        ax_loss.plot(range(1, len(r.losses) + 1), r.losses, label=kind)
    ax_loss.set(title="training loss per step", xlabel="step", ylabel="batch loss")
    ax_loss.legend()
    dp = runs["DP"]
    ax_eps.plot(range(1, len(dp.epsilons) + 1), dp.epsilons, color="tab:orange", label="DP: accountant's epsilon")
    ax_eps.axhline(cfg.target_epsilon, color="grey", ls="--", label=f"target {cfg.target_epsilon:g}")
    ax_eps.set(title="epsilon spent (non-DP: unbounded)", xlabel="step", ylabel="epsilon")
    ax_eps.legend()
    xs = range(len(canaries))
    width = 0.4
    for off, (kind, r) in zip((-width / 2, width / 2), runs.items(), strict=True):
        assert r.scores_after is not None
        ax_exp.bar([x + off for x in xs], [pa.exposure(k, cfg.candidates) for k in r.scores_after.rank],
                   width, label=kind)
    ax_exp.set_xticks(list(xs), [("*" if c.planted else "") + c.name.split()[0] for c in canaries], rotation=60,
                      fontsize=7)
    ax_exp.set(title="exposure per canary (* planted)", ylabel="bits")
    ax_exp.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.resolve()


if __name__ == "__main__":
    sys.exit(main())
