"""The RLVR loop: rollout, score, update, repeated, with a progress bar (reward, KL), DP sampling of the
prompts and the end of a DP budget handled."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from tg_tinker.data import PoissonSampler
from tg_tinker.errors import DPBudgetExceededError, ValidationError

from .algorithms import UpdateResult
from .trajectory import RewardFn, TrajectoryBatch, contexts_for

if TYPE_CHECKING:
    from tg_tinker import TrainingClient

    from .sampler import RolloutSampler


class Algorithm(Protocol):
    def update(self, batch: TrajectoryBatch, training_client: TrainingClient) -> UpdateResult: ...


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, field=field, code="INVALID_ARGUMENT")


class Progress:
    """One line per run on stderr: tqdm's bar when tqdm is installed, else a plain line per update."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, desc: str = "rlvr") -> None:
        self.total, self.enabled, self.desc, self.n = total, enabled, desc, 0
        self.stream = stream or sys.stderr
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm  # pyright: ignore[reportMissingModuleSource]

                self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, result: UpdateResult) -> None:
        self.n += 1
        if not self.enabled:
            return
        fields = {"reward": f"{result.mean_reward:.3f}", "kl": f"{result.kl:.4f}"}
        if result.epsilon is not None:
            fields["eps"] = f"{result.epsilon:.3f}"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.desc}] {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in fields.items()),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class TrainLog:
    """The updates of a :func:`train` run and why it ended: ``"completed"`` or ``"dp_budget_exceeded"``
    (then ``error`` is the DPBudgetExceededError: the step that would have passed the budget changed nothing)."""

    history: list[UpdateResult] = field(default_factory=list)
    stopped: str = "completed"
    error: DPBudgetExceededError | None = None

    @property
    def mean_rewards(self) -> list[float]:
        return [r.mean_reward for r in self.history]


def dp_sample_rate(training_client: TrainingClient, num_prompts: int) -> float:
    """A DP session's sample rate for a prompt set: each prompt is one example (``dataset_size`` must be the
    number of prompts when the session names one); q = sample_rate, or expected batch size / dataset size."""
    dp = training_client.config.dp_config
    if dp.HasField("dataset_size") and dp.dataset_size != num_prompts:
        raise _invalid("prompts", f"the DP session's dataset_size is {dp.dataset_size} but {num_prompts} prompts "
                                  "were given: each prompt is one example, so they must agree")
    if dp.HasField("sample_rate") and dp.sample_rate > 0:
        return float(dp.sample_rate)
    expected = training_client.config.batch_size * max(1, training_client.config.gradient_accumulation_steps)
    return min(1.0, expected / num_prompts)


def train(algorithm: Algorithm, sampler: RolloutSampler, prompts: Sequence[str] | Sequence[Sequence[int]],
          reward_fn: RewardFn, *, iterations: int, contexts: Sequence[Mapping[str, Any]] | None = None,
          prompts_per_iteration: int | None = None, progress: bool = True, seed: int | None = None,
          on_update: Callable[[int, TrajectoryBatch, UpdateResult], None] | None = None) -> TrainLog:
    """``iterations`` rounds of: sample the prompts' trajectories with the session's current weights, score
    them with ``reward_fn``, ``algorithm.update`` the session. Returns the history.

    Without DP each round takes ``prompts_per_iteration`` prompts (all by default) in a shuffled cycle. On a
    DP session each round is a Poisson sample of the prompt set at the session's sample rate (each prompt
    one example; :func:`dp_sample_rate`), possibly empty (still one noised, accounted step), and a run ends
    early, ``stopped="dp_budget_exceeded"``, when the next step would pass the budget. ``seed`` makes the
    prompt order reproducible (in DP runs too: for tests only; by default DP sampling uses the OS CSPRNG)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise _invalid("iterations", f"must be a positive int, got {iterations!r}")
    tc = sampler.training_client
    ctxs = contexts_for(prompts, contexts)
    items = list(prompts)
    if not items:
        raise _invalid("prompts", "at least one prompt is required")
    dp = tc.config.HasField("dp_config") and tc.config.dp_config.enabled
    if dp:
        if prompts_per_iteration is not None:
            raise _invalid("prompts_per_iteration", "a DP session samples each round's prompts by Poisson sampling "
                                                    "at its sample rate; prompts_per_iteration does not apply")
        rounds = iter(PoissonSampler(len(items), dp_sample_rate(tc, len(items)), steps=iterations, seed=seed))
    else:
        per = prompts_per_iteration or len(items)
        if not 0 < per <= len(items):
            raise _invalid("prompts_per_iteration", f"must be in 1..{len(items)}, got {per!r}")
        rng = random.Random(seed)
        order: list[int] = []

        def next_round() -> list[int]:
            while len(order) < per:
                more = list(range(len(items)))
                rng.shuffle(more)
                order.extend(more)
            chosen = order[:per]
            del order[:per]
            return chosen

        rounds = (next_round() for _ in range(iterations))
    log = TrainLog()
    bar = Progress(iterations, progress)
    try:
        for it, chosen in enumerate(rounds):
            if chosen:
                batch = sampler.generate_trajectories([items[i] for i in chosen],  # pyright: ignore[reportArgumentType]
                                                      [ctxs[i] for i in chosen])
                batch.score(reward_fn)
            else:
                batch = TrajectoryBatch()
            try:
                result = algorithm.update(batch, tc)
            except DPBudgetExceededError as exc:
                log.stopped, log.error = "dp_budget_exceeded", exc
                break
            log.history.append(result)
            bar.update(result)
            if on_update is not None:
                on_update(it, batch, result)
    finally:
        bar.close()
    return log
