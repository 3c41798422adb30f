"""An empirical privacy audit through a running stack: plant canaries, fine-tune, try to extract them.

A *canary* is a made-up patient record with a secret in it (``"Ada Moreau's patient ID is 482-917."``, or
with ``secret="allergy"``, ``"Ada Moreau is allergic to penicillin."``).
Each of ``canaries`` canaries is put into the training data or held out by an independent fair coin
(seeded); the session fine-tunes on the data (with DP or without, the same data and steps), and then
the audit plays the attacker, with the trained model's log-probabilities only (the ``forward`` and
``sample`` calls any tenant has):

- **leak**: whether greedy decoding after ``"<name>'s patient ID is"`` produces the secret, and the
  secret's rank among ``candidates`` random secrets of the same kind by log-probability; the
  *exposure* of Carlini et al., "The Secret Sharer" (USENIX Security 2019), estimated from the sample:
  ``log2(candidates + 1) - log2(rank)`` bits (its maximum is ``log2(candidates + 1)``).
- **membership inference**: the score of a canary is how much more likely its secret became
  (log-probability after minus before training; the base model is the reference); the AUC of the
  planted canaries' scores against the held-out canaries'.
- **an empirical lower bound on epsilon** from the same scores, by the one-run audit of Steinke, Nasr
  & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): the attacker guesses "in"
  for the k highest scores and "out" for the k lowest; under (epsilon, delta)-DP the number of right
  guesses is dominated by Binomial(2k, e^eps / (1 + e^eps)) up to a delta term (Theorem 3.1 there),
  so the largest epsilon for which that many right guesses would have probability below ``alpha``
  is ruled out: every smaller epsilon is a lower bound with confidence ``1 - alpha``. A few k are
  tried (Bonferroni over them). The bound is *empirical*: it says how much privacy loss the attack
  demonstrates, never more than the true epsilon (with probability ``1 - alpha``); the accountant's
  epsilon is the proven upper bound. With m canaries no audit can show more than about
  ``ln(p / (1 - p))``, ``p = alpha ** (1 / m)``: a tight demonstration needs many canaries.

Used by ``tensafe audit-privacy``, ``examples/privacy/canary_demo.py`` and ``make demo``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bound import auc, exposure, max_demonstrable_epsilon, one_run_epsilon_bound

NAMES_FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi",
               "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tomasz", "Uma", "Viktor",
               "Wanda", "Xavier", "Yara", "Zoltan"]
NAMES_LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Costa", "Novak", "Haddad", "Berg", "Fischer", "Ivanova",
              "Mensah", "Rossi", "Duarte", "Kowalski", "Nakamura", "Schmidt", "Alvarez", "Petrov", "Dubois",
              "Keller", "Larsen", "Mbeki", "Oliveira", "Quinn", "Varga", "Weber"]
PROMPT = "Pull up the chart of {name}."

# What a canary's secret is: the sentence that states it (before the secret), and the secret space.
# "id": a made-up six-digit patient ID (10^6 of them: any number of candidates); "allergy": one of
# ALLERGIES (a secret of one or two words, which a fine-tune memorises in far fewer passes than six
# random digits: what `make demo` uses to show a verbatim leak in a few minutes).
SECRET_KINDS = ("id", "allergy")
PREFIXES = {"id": "{name}'s patient ID is", "allergy": "{name} is allergic to"}
ALLERGIES = ("penicillin", "amoxicillin", "sulfa drugs", "aspirin", "ibuprofen", "codeine", "morphine", "latex",
             "iodine", "peanuts", "tree nuts", "shellfish", "eggs", "soy", "wheat", "sesame", "bee stings",
             "cephalexin", "tetracycline", "erythromycin", "naproxen", "lidocaine", "contrast dye", "nickel",
             "adhesive tape", "chlorhexidine", "gelatin", "mustard", "celery", "kiwi", "strawberries", "milk",
             "corn", "mold", "dust mites", "cat dander", "ragweed", "vancomycin", "ciprofloxacin", "doxycycline")


def secret_space(kind: str) -> int:
    """How many distinct secrets of ``kind`` there are."""
    if kind not in SECRET_KINDS:
        raise ValueError(f"secret: must be one of {', '.join(SECRET_KINDS)}, got {kind!r}")
    return 10 ** 6 if kind == "id" else len(ALLERGIES)


def secret_text(rng: random.Random, kind: str = "id") -> str:
    """A made-up secret of ``kind``: a six-digit patient ID (``482-917``) or an allergy (``penicillin``)."""
    if kind == "allergy":
        return ALLERGIES[rng.randrange(len(ALLERGIES))]
    return f"{rng.randrange(1000):03d}-{rng.randrange(1000):03d}"


@dataclass(frozen=True)
class Canary:
    name: str
    secret: str
    planted: bool  # in the training data (the coin said so) or held out
    kind: str = "id"

    @property
    def prompt(self) -> str:
        return PROMPT.format(name=self.name)

    @property
    def prefix(self) -> str:
        return PREFIXES[self.kind].format(name=self.name)

    def response(self, secret: str | None = None) -> str:
        return f"{self.prefix} {secret or self.secret}."

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response()}


def make_canaries(count: int, seed: int, kind: str = "id") -> list[Canary]:
    """``count`` canaries with distinct names and secrets, each planted by its own fair coin."""
    if not 1 <= count <= secret_space(kind):
        raise ValueError(f"canaries: at most {secret_space(kind)} distinct {kind} secrets, got {count}")
    rng = random.Random(f"tensafe-canaries-{seed}")
    names = rng.sample([f"{a} {b}" for a in NAMES_FIRST for b in NAMES_LAST], count)
    secrets_: set[str] = set()
    out = []
    for name in names:
        s = secret_text(rng, kind)
        while s in secrets_:
            s = secret_text(rng, kind)
        secrets_.add(s)
        out.append(Canary(name, s, planted=rng.random() < 0.5, kind=kind))
    return out


# ------------------------------------------------------------------------------------- the text format


class Formatter:
    """``Q: <prompt>\\nA: <response><eos>`` token ids, and where a substring of the response lies in them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def prompt_text(self, prompt: str) -> str:
        return f"Q: {prompt}\nA:"

    def ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        """(token ids of prompt + response + EOS, the number of prompt tokens)."""
        head = self.tok(self.prompt_text(prompt), add_special_tokens=False).input_ids
        body = self.tok(" " + response, add_special_tokens=False).input_ids
        return head + body + [self.tok.eos_token_id], len(head)

    def span(self, prompt: str, before: str, secret: str) -> tuple[list[int], int, int]:
        """Token ids of prompt + ``before`` + `` secret``, and the [start, end) of the secret's tokens."""
        head = self.tok(self.prompt_text(prompt) + " " + before, add_special_tokens=False).input_ids
        tail = self.tok(" " + secret, add_special_tokens=False).input_ids
        return head + tail, len(head), len(head) + len(tail)

    def batch(self, rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, list[list[int]]]:
        """Right-padded batch of (ids, labels) rows (labels -100 where not scored)."""
        width = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in rows:
            gap = width - len(ids)
            out["input_ids"].append(ids + [pad] * gap)
            out["attention_mask"].append([1] * len(ids) + [0] * gap)
            out["labels"].append(labels + [-100] * gap)
        return out

    def train_batch(self, records: Sequence[dict[str, str]]) -> dict[str, list[list[int]]]:
        """Train on the response tokens only."""
        rows = []
        for r in records:
            ids, n = self.ids(r["prompt"], r["response"])
            rows.append((ids, [-100] * n + ids[n:]))
        return self.batch(rows)


# ------------------------------------------------------------------------------------------ scoring


def _logprob_sums(tc: Any, fmt: Formatter, rows: Sequence[tuple[list[int], int, int]], chunk: int) -> list[float]:
    """Sum of the log-probabilities of tokens [start, end) of each row, by ``forward`` (no gradient)."""
    out: list[float] = []
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        batch = fmt.batch([(ids, [-100] * s + ids[s:e] + [-100] * (len(ids) - e)) for ids, s, e in part])
        lp = tc.forward(batch, return_logprobs=True).result().logprobs
        out += [float(lp[j, s:e].sum()) for j, (_, s, e) in enumerate(part)]
    return out


def heldout_loss(tc: Any, fmt: Formatter, records: Sequence[dict[str, str]], chunk: int = 16) -> float:
    """Mean negative log-likelihood per response token of ``records`` (perplexity = exp of it)."""
    rows = []
    for r in records:
        ids, n = fmt.ids(r["prompt"], r["response"])
        rows.append((ids, n, len(ids)))
    total = -sum(_logprob_sums(tc, fmt, rows, chunk))
    return total / sum(e - s for _, s, e in rows)


@dataclass
class CanaryScores:
    """Per canary: the secret's log-probability, and its rank among the candidates (1 = most likely)."""

    logprob: list[float]
    rank: list[int]


def score_canaries(tc: Any, fmt: Formatter, canaries: Sequence[Canary], candidates: int, seed: int,
                   chunk: int = 64) -> CanaryScores:
    rng = random.Random(f"tensafe-candidates-{seed}")
    rows, owners = [], []
    for k, c in enumerate(canaries):
        if candidates >= secret_space(c.kind):
            raise ValueError(f"candidates: at most {secret_space(c.kind) - 1} for {c.kind} secrets, got {candidates}")
        alts: set[str] = set()
        while len(alts) < candidates:
            s = secret_text(rng, c.kind)
            if s != c.secret:
                alts.add(s)
        for s in [c.secret, *sorted(alts)]:
            rows.append(fmt.span(c.prompt, c.prefix, s))
            owners.append(k)
    sums = _logprob_sums(tc, fmt, rows, chunk)
    per = 1 + candidates
    logprob, rank = [], []
    for k in range(len(canaries)):
        mine = sums[k * per:(k + 1) * per]
        logprob.append(mine[0])
        rank.append(1 + sum(v > mine[0] for v in mine[1:]))
    return CanaryScores(logprob, rank)


def greedy_leaks(tc: Any, fmt: Formatter, canaries: Sequence[Canary]) -> list[str]:
    """What greedy decoding writes after the canary's prefix (``"<name>'s patient ID is"``); a leak if it
    starts with the secret."""
    prompts = []
    for c in canaries:
        ids, start, _ = fmt.span(c.prompt, c.prefix, c.secret)
        prompts.append(ids[:start])
    result = tc.sample(prompts, max_tokens=8, temperature=0)
    return [s.completion for s in result.samples]


# -------------------------------------------------------------------------------------------- a run


@dataclass
class AuditConfig:
    model: str
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 3e-3
    rank: int = 16
    canaries: int = 16
    candidates: int = 49
    seed: int = 0
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    alpha: float = 0.05
    secret: str = "id"  # one of SECRET_KINDS
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:  # refused here, before any session or training
        space = secret_space(self.secret)
        if self.canaries > space:
            raise ValueError(f"canaries: at most {space} ({self.secret} has {space} secrets), got {self.canaries}")
        if self.candidates >= space:
            raise ValueError(f"candidates: at most {space - 1} ({self.secret} has {space} secrets), "
                             f"got {self.candidates}")


@dataclass
class RunResult:
    dp: bool
    losses: list[float] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    answers_before: list[str] = field(default_factory=list)
    answers_after: list[str] = field(default_factory=list)
    greedy: list[str] = field(default_factory=list)
    scores_before: CanaryScores | None = None
    scores_after: CanaryScores | None = None
    auc: float = float("nan")
    epsilon_lower_bound: float = 0.0
    epsilon_spent: float = 0.0
    noise_multiplier: float = 0.0
    steps_done: int = 0

    @property
    def median_step_s(self) -> float:
        t = sorted(self.step_seconds[1:] or self.step_seconds)
        return t[len(t) // 2] if t else float("nan")


def training_set(records: Sequence[dict[str, str]], canaries: Sequence[Canary], seed: int) -> list[dict[str, str]]:
    data = [*records, *(c.record() for c in canaries if c.planted)]
    random.Random(f"tensafe-shuffle-{seed}").shuffle(data)
    return data


def step_batches(cfg: AuditConfig, data: Sequence[dict[str, str]]) -> Iterator[list[dict[str, str]]]:
    """The batches of ``cfg.steps`` steps: Poisson at rate batch_size / len(data), seeded by ``cfg.seed``.

    With DP and without, the same batches (``cfg.dp`` is not an input): the only difference between the
    two runs is the clipping and the noise, and their step times compare like for like.
    """
    from tg_tinker.data import PoissonSampler

    return PoissonSampler.for_batch_size(len(data), cfg.batch_size, steps=cfg.steps, seed=cfg.seed).batches(data)


Progress = Callable[[str, int, int, dict[str, float]], None]


def run(service: Any, fmt: Formatter, cfg: AuditConfig, records: Sequence[dict[str, str]],
        heldout: Sequence[dict[str, str]], canaries: Sequence[Canary], *, baseline: CanaryScores | None = None,
        questions: Sequence[str] = (), progress: Progress | None = None) -> RunResult:
    """One session through ``service`` (a tg_tinker.ServiceClient): measure, fine-tune, measure again."""
    from tg_tinker import DPBudgetExceededError, DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig

    data = training_set(records, canaries, cfg.seed)
    config = TrainingConfig(
        model_ref=cfg.model,
        lora_config=LoRAConfig(rank=cfg.rank, alpha=2 * cfg.rank, dropout=0.0, target_modules=list(cfg.target_modules)),
        optimizer=OptimizerConfig(name="adamw", learning_rate=cfg.learning_rate, weight_decay=0.0),
        batch_size=cfg.batch_size, seed=cfg.seed,
        dp_config=DPConfig(enabled=True, noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                           target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                           dataset_size=len(data), max_steps=cfg.steps) if cfg.dp else None,
        metadata={"example": "privacy_audit", "canaries": str(len(canaries))})
    res = RunResult(dp=cfg.dp)
    with service.create_training_client(config) as tc:
        res.loss_before = heldout_loss(tc, fmt, heldout)
        res.scores_before = baseline or score_canaries(tc, fmt, canaries, cfg.candidates, cfg.seed)
        if questions:
            res.answers_before = _answers(tc, fmt, questions)
        batches = step_batches(cfg, data)
        pending = None
        last = time.perf_counter()
        try:
            for rows in batches:
                if not rows and not cfg.dp:
                    continue  # an empty Poisson batch (p = e^-batch_size): DP still takes its noise step
                # The next step is queued before the previous one is waited for: the server is never idle.
                fb = tc.forward_backward(fmt.train_batch(rows)) if rows else None
                step = (fb, tc.optim_step())
                if pending is not None:
                    last = _finish(res, pending, last, cfg, progress)
                pending = step
            if pending is not None:
                _finish(res, pending, last, cfg, progress)
        except DPBudgetExceededError:
            pass  # the accountant refused a step past the target: reported through steps_done
        res.steps_done = tc.step
        res.loss_after = heldout_loss(tc, fmt, heldout)
        res.scores_after = score_canaries(tc, fmt, canaries, cfg.candidates, cfg.seed)
        res.greedy = greedy_leaks(tc, fmt, canaries)
        if questions:
            res.answers_after = _answers(tc, fmt, questions)
    gain = [a - b for a, b in zip(res.scores_after.logprob, res.scores_before.logprob, strict=True)]
    members = [g for g, c in zip(gain, canaries, strict=True) if c.planted]
    others = [g for g, c in zip(gain, canaries, strict=True) if not c.planted]
    res.auc = auc(members, others)
    res.epsilon_lower_bound = one_run_epsilon_bound(members, others, cfg.target_delta, cfg.alpha)
    return res


def _finish(res: RunResult, pending: tuple[Any, Any], last: float, cfg: AuditConfig,
            progress: Progress | None) -> float:
    fb, opt = pending
    loss = fb.result().loss if fb is not None else (res.losses[-1] if res.losses else float("nan"))
    result = opt.result()
    now = time.perf_counter()
    res.losses.append(loss)
    res.step_seconds.append(now - last)
    if result.dp_metrics is not None:
        res.epsilons.append(result.dp_metrics.total_epsilon)
        res.epsilon_spent = result.dp_metrics.total_epsilon
        res.noise_multiplier = result.dp_metrics.noise_multiplier
    else:
        res.epsilons.append(float("inf"))
    if progress is not None:
        progress("DP" if cfg.dp else "non-DP", result.step, cfg.steps,
                 {"loss": loss, "epsilon": res.epsilons[-1], "seconds": now - last})
    return now


def _answers(tc: Any, fmt: Formatter, questions: Sequence[str]) -> list[str]:
    prompts = [fmt.tok(fmt.prompt_text(q), add_special_tokens=False).input_ids for q in questions]
    return [s.completion.strip() for s in tc.sample(prompts, max_tokens=40, temperature=0, stop=["\nQ:"]).samples]


def leaked(canary: Canary, completion: str) -> bool:
    """The completion starts with the secret, as a whole word (``"shellfish."`` is not ``"fish"``)."""
    text = completion.lstrip()
    return text.startswith(canary.secret) and not text[len(canary.secret):][:1].isalnum()


def summary(cfg: AuditConfig, canaries: Sequence[Canary], res: RunResult) -> dict[str, Any]:
    """Plain values of one run (for JSON and the CLI)."""
    assert res.scores_after is not None
    planted = [k for k, c in enumerate(canaries) if c.planted]
    return {
        "dp": res.dp, "steps": res.steps_done, "median_step_s": res.median_step_s,
        "heldout_loss_before": res.loss_before, "heldout_loss_after": res.loss_after,
        "epsilon_spent": res.epsilon_spent if res.dp else None, "target_delta": cfg.target_delta,
        "noise_multiplier": res.noise_multiplier if res.dp else None,
        "canaries": len(canaries), "planted": len(planted),
        "leaked_greedy": sum(leaked(canaries[k], res.greedy[k]) for k in planted),
        "leaked_greedy_heldout": sum(leaked(c, g) for c, g in zip(canaries, res.greedy, strict=True) if not c.planted),
        "mean_exposure_planted": _mean([exposure(res.scores_after.rank[k], cfg.candidates) for k in planted]),
        "mean_exposure_heldout": _mean([exposure(res.scores_after.rank[k], cfg.candidates)
                                        for k, c in enumerate(canaries) if not c.planted]),
        "membership_auc": res.auc, "epsilon_lower_bound": res.epsilon_lower_bound,
        "max_demonstrable_epsilon": max_demonstrable_epsilon(len(canaries), cfg.alpha), "alpha": cfg.alpha,
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def audit(service: Any, tokenizer: Any, cfg: AuditConfig, records: Sequence[dict[str, str]],
          heldout: Sequence[dict[str, str]], progress: Progress | None = None) -> dict[str, Any]:
    """The canary audit of one configuration: its canaries, the run, and :func:`summary` of it."""
    fmt = Formatter(tokenizer)
    canaries = make_canaries(cfg.canaries, cfg.seed, cfg.secret)
    res = run(service, fmt, cfg, records, heldout, canaries, progress=progress)
    return summary(cfg, canaries, res)


__all__ = ["ALLERGIES", "PREFIXES", "SECRET_KINDS", "AuditConfig", "Canary", "CanaryScores", "Formatter", "RunResult",
           "audit", "auc", "exposure", "heldout_loss", "make_canaries", "max_demonstrable_epsilon",
           "one_run_epsilon_bound", "run", "score_canaries", "secret_space", "step_batches", "summary"]
