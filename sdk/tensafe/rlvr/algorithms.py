"""REINFORCE, PPO and GRPO: advantages computed here, the update applied by the session on the server.

Each ``update(batch, training_client)`` turns a scored :class:`TrajectoryBatch` into advantages (this
module, numpy), then queues ``forward_backward`` calls with the server's registered ``policy_gradient``
loss (clipped or plain ratio to the sampling log-probabilities, optional KL penalty to a reference
session's log-probabilities, optional entropy bonus; docs/losses.md) and ``optim_step`` calls on the
training client. No gradient is computed on this side and nothing bypasses the services.

Per trajectory i with advantage A_i and per response token t (ratio = exp(logp - logp_sampling)):

    term_t = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps) A_i) + kl_coef KL_t - entropy_coef H_t

and the loss of a (mini)batch is the mean over its trajectories of each one's mean term over its tokens.
REINFORCE uses the unclipped ratio for one step per batch (at ratio 1 its gradient is the policy gradient
mean_i A_i mean_t grad log p); PPO and GRPO take ``ppo_epochs`` passes over the batch in
``num_minibatches`` shuffled mini-batches, one optimizer step each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .advantages import RunningBaseline, baseline_advantages, group_advantages, invalid, normalize
from .trajectory import Trajectory, TrajectoryBatch, response_logprobs, to_training_batch

if TYPE_CHECKING:
    from tg_tinker import ForwardBackwardResult, FutureHandle, OptimStepResult, TrainingClient

LOSS = "policy_gradient"
BASELINES = ("running", "group", "constant", "none")


# ---------------------------------------------------------------------------------------------- configs


def _check_common(cfg: Any) -> None:
    for name in ("entropy_coef", "kl_coef"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise invalid(name, f"must be a finite number >= 0, got {v!r}")
    if not isinstance(cfg.micro_batch_size, int) or cfg.micro_batch_size <= 0:
        raise invalid("micro_batch_size", f"must be a positive int, got {cfg.micro_batch_size!r}")


@dataclass
class REINFORCEConfig:
    """REINFORCE: one policy-gradient step per rollout batch.

    ``use_baseline`` subtracts ``baseline``: ``"running"`` (moving average of past batches' mean reward,
    momentum ``baseline_momentum``), ``"group"`` (the mean reward of the same prompt's completions in this
    batch) or ``"constant"`` (``baseline_value``). ``normalize_advantages`` then whitens them over the batch.
    ``entropy_coef``: the bonus on the policy's next-token entropy; ``kl_coef``: the KL penalty to the
    ``reference`` session given to :class:`REINFORCE`. ``recompute_logprobs`` as PPO's (the ratio is then
    exactly 1). ``micro_batch_size``: rows per forward_backward."""

    use_baseline: bool = True
    baseline: str = "running"
    baseline_value: float = 0.0
    baseline_momentum: float = 0.9
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    recompute_logprobs: bool = False
    micro_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise invalid("baseline", f"must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if not math.isfinite(self.baseline_value):
            raise invalid("baseline_value", "must be finite")
        _check_common(self)


@dataclass
class PPOConfig:
    """PPO without a value function: advantages from the rewards and a baseline (as REINFORCE's), the
    clipped ratio to the sampling log-probabilities, ``ppo_epochs`` passes over the rollout batch in
    ``num_minibatches`` shuffled mini-batches (one optimizer step each). ``kl_coef`` > 0 penalises
    KL(policy || reference) with the reference session given to :class:`PPO` (the base model: a fresh
    session on the same model). ``recompute_logprobs``: take the old log-probabilities from a forward pass
    of the session before the first step instead of from sampling (they agree up to float rounding)."""

    clip_epsilon: float = 0.2
    ppo_epochs: int = 4
    num_minibatches: int = 2
    use_baseline: bool = True
    baseline: str = "running"
    baseline_value: float = 0.0
    baseline_momentum: float = 0.9
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    recompute_logprobs: bool = False
    micro_batch_size: int = 32
    seed: int | None = None  # shuffling of the mini-batches

    def __post_init__(self) -> None:
        if not 0 < self.clip_epsilon < 1:
            raise invalid("clip_epsilon", f"must be in (0, 1), got {self.clip_epsilon!r}")
        for name in ("ppo_epochs", "num_minibatches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise invalid(name, f"must be an int in 1..64, got {v!r}")
        if self.baseline not in BASELINES:
            raise invalid("baseline", f"must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        _check_common(self)


@dataclass
class GRPOConfig:
    """GRPO: PPO's clipped objective with group-relative advantages, (r - group mean) / (group std + eps)
    over the ``num_samples`` completions of each prompt (``scale_rewards=False``: the mean only); no
    value function, no baseline. Defaults as DeepSeekMath's: one pass (on-policy), ``kl_coef`` 0 here
    (DeepSeek used 0.04, which needs a ``reference`` session)."""

    clip_epsilon: float = 0.2
    ppo_epochs: int = 1
    num_minibatches: int = 1
    scale_rewards: bool = True
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    recompute_logprobs: bool = False
    micro_batch_size: int = 32
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.clip_epsilon < 1:
            raise invalid("clip_epsilon", f"must be in (0, 1), got {self.clip_epsilon!r}")
        for name in ("ppo_epochs", "num_minibatches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise invalid(name, f"must be an int in 1..64, got {v!r}")
        _check_common(self)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class UpdateResult:
    """What one ``update`` did. ``kl`` is the KL to the reference when there is one (``kl_coef`` > 0),
    else the approximate KL to the sampling policy (``approx_kl``); loss terms and token metrics are the
    means over the update's forward_backward calls."""

    mean_reward: float
    std_reward: float
    loss: float
    kl: float
    approx_kl: float
    clip_fraction: float
    entropy: float
    grad_norm: float
    mean_advantage_abs: float
    num_trajectories: int
    num_tokens: int
    optimizer_steps: int
    reward_errors: int
    step: int
    epsilon: float | None = None          # DP sessions: the total epsilon spent after this update
    steps: list[OptimStepResult] = field(default_factory=list, repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        out = {k: float(getattr(self, k)) for k in (
            "mean_reward", "std_reward", "loss", "kl", "approx_kl", "clip_fraction", "entropy", "grad_norm",
            "mean_advantage_abs", "num_trajectories", "num_tokens", "optimizer_steps", "reward_errors", "step")}
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        return out


# ---------------------------------------------------------------------------------------------- algorithms


def _dp_enabled(tc: TrainingClient) -> bool:
    cfg = tc.config
    return bool(cfg.HasField("dp_config") and cfg.dp_config.enabled)


class _PolicyGradient:
    """What the three algorithms share: the checks, the batches, the queued steps and the metrics."""

    clip: bool = True
    name = "policy gradient"

    config: Any

    def __init__(self, config: Any, reference: TrainingClient | None = None) -> None:
        self.config = config
        self.reference = reference
        self.running = RunningBaseline(getattr(config, "baseline_momentum", 0.9))
        self._pad: dict[str, int] = {}

    # subclasses
    def compute_advantages(self, batch: TrajectoryBatch) -> np.ndarray:
        raise NotImplementedError

    def _passes(self) -> tuple[int, int]:
        """(passes over the batch, mini-batches per pass): PPO's and GRPO's from their config; REINFORCE's 1, 1."""
        return int(getattr(self._cfg, "ppo_epochs", 1)), int(getattr(self._cfg, "num_minibatches", 1))

    def _clip_epsilon(self) -> float:
        return float(getattr(self._cfg, "clip_epsilon", 0.2))

    def _dp_check(self, batch: TrajectoryBatch) -> None:
        raise NotImplementedError

    @property
    def _cfg(self) -> Any:
        return self.config

    # shared
    def _pad_id(self, tc: TrainingClient) -> int:
        if tc.session_id not in self._pad:
            info = tc.get_info()
            pad = info.pad_token_id if info.pad_token_id is not None else info.eos_token_id
            self._pad[tc.session_id] = int(pad) if pad is not None else 0
        return self._pad[tc.session_id]

    def _check_session(self, tc: TrainingClient, batch: TrajectoryBatch) -> bool:
        if tc.config.gradient_accumulation_steps not in (0, 1):
            raise invalid("gradient_accumulation_steps", "tensafe.rlvr splits batches itself: use a session with "
                                                          "gradient_accumulation_steps=1 (and micro_batch_size)")
        if self._cfg.kl_coef > 0 and self.reference is None:
            raise invalid("reference", f"kl_coef > 0 needs a reference session: {type(self).__name__}(config, "
                                        "reference=service.create_training_client(<the same model>))")
        dp = _dp_enabled(tc)
        if dp:
            self._dp_check(batch)
        return dp

    def _forward_logprobs(self, client: TrainingClient, rows: list[Trajectory], pad: int) -> list[list[float]]:
        out: list[list[float]] = []
        size = self._cfg.micro_batch_size
        handles: list[tuple[list[Trajectory], FutureHandle[ForwardBackwardResult]]] = []
        for i in range(0, len(rows), size):
            part = rows[i:i + size]
            b = to_training_batch(part, np.zeros(len(part)), pad)
            handles.append((part, client.forward(
                {k: b[k] for k in ("input_ids", "attention_mask", "labels")}, return_logprobs=True)))
        for part, h in handles:
            lp = h.result().logprobs
            assert lp is not None, "forward(return_logprobs=True) returned no logprobs"
            out.extend(response_logprobs(part, lp))
        return out

    def update(self, batch: TrajectoryBatch | Sequence[Trajectory], training_client: TrainingClient) -> UpdateResult:
        """Train the session on one scored rollout batch; returns the update's metrics.

        In a DP session the update is one DP-SGD step whatever the batch holds (an empty Poisson batch is
        still a noised, accounted step); ``DPBudgetExceededError`` comes out of here when the budget is spent
        (nothing was applied by that step)."""
        tc = training_client
        if not isinstance(batch, TrajectoryBatch):
            batch = TrajectoryBatch(list(batch))
        dp = self._check_session(tc, batch)
        rewards = batch.rewards()
        adv = self.compute_advantages(batch) if len(batch) else np.zeros(0)
        rows = [i for i, t in enumerate(batch) if t.response_tokens]  # a row without tokens trains nothing
        trajs = [batch[i] for i in rows]
        pad = self._pad_id(tc)
        cfg = self._cfg
        if trajs and cfg.kl_coef > 0:
            assert self.reference is not None
            for t, ref in zip(trajs, self._forward_logprobs(self.reference, trajs, pad), strict=True):
                t.ref_logprobs = ref
        old = self._forward_logprobs(tc, trajs, pad) if trajs and cfg.recompute_logprobs else None
        epochs, minibatches = self._passes()
        order = list(range(len(trajs)))
        rng = random.Random(getattr(cfg, "seed", None))
        queued: list[tuple[list[tuple[FutureHandle[ForwardBackwardResult], int]], FutureHandle[OptimStepResult]]]
        queued = []
        kwargs: dict[str, Any] = {"clip": self.clip, "clip_epsilon": self._clip_epsilon(),
                                  "entropy_coef": float(cfg.entropy_coef), "kl_coef": float(cfg.kl_coef)}
        for epoch in range(epochs):
            if epoch or minibatches > 1:
                rng.shuffle(order)
            chunks: list[list[int]] = [order[k::minibatches] for k in range(minibatches)] if trajs else [[]]
            for mb in chunks:
                fbs: list[tuple[FutureHandle[ForwardBackwardResult], int]] = []
                for s in range(0, len(mb), cfg.micro_batch_size):
                    part = mb[s:s + cfg.micro_batch_size]
                    tb = to_training_batch([trajs[j] for j in part], [float(adv[rows[j]]) for j in part], pad,
                                           with_ref=cfg.kl_coef > 0,
                                           old_logprobs=None if old is None else [old[j] for j in part])
                    # scale: the micro-batches of a mini-batch add up to its mean over trajectories. A DP
                    # session computes each row alone (its clipped gradient must not depend on the batch).
                    scale = 1.0 if dp else len(part) / len(mb)
                    fbs.append((tc.forward_backward(tb, LOSS, scale=scale, **kwargs), len(part)))
                if fbs or dp:
                    queued.append((fbs, tc.optim_step()))
        return self._result(batch, rewards, adv, queued, dp)

    def _result(self, batch: TrajectoryBatch, rewards: np.ndarray, adv: np.ndarray,
                queued: list[tuple[list[tuple[FutureHandle[ForwardBackwardResult], int]],
                                   FutureHandle[OptimStepResult]]], dp: bool) -> UpdateResult:
        losses: list[float] = []
        sums: dict[str, float] = {}
        tokens = 0
        steps: list[OptimStepResult] = []
        error: BaseException | None = None
        for fbs, opt in queued:
            mb_loss = 0.0
            mb_rows = 0
            for h, n_rows in fbs:
                r = h.result()
                mb_loss += r.loss * (n_rows if dp else 1.0)
                mb_rows += n_rows
                tokens += r.num_tokens
                for k in ("approx_kl", "clip_fraction", "entropy", "kl_ref"):
                    if k in r.metrics:
                        sums[k] = sums.get(k, 0.0) + r.metrics[k] * r.num_tokens
            if fbs:
                losses.append(mb_loss / mb_rows if dp else mb_loss)
            try:
                steps.append(opt.result())
            except Exception as exc:  # noqa: BLE001 - re-raised after the other results are collected
                error = error or exc
        if error is not None:
            raise error
        n_tok = max(tokens, 1)
        approx_kl = sums.get("approx_kl", 0.0) / n_tok
        kl = sums["kl_ref"] / n_tok if "kl_ref" in sums else approx_kl
        last = steps[-1] if steps else None
        eps = last.dp_metrics.total_epsilon if last is not None and last.dp_metrics is not None else None
        return UpdateResult(
            mean_reward=float(rewards.mean()) if len(rewards) else 0.0,
            std_reward=float(rewards.std()) if len(rewards) else 0.0,
            loss=float(np.mean(losses)) if losses else 0.0, kl=kl, approx_kl=approx_kl,
            clip_fraction=sums.get("clip_fraction", 0.0) / n_tok, entropy=sums.get("entropy", 0.0) / n_tok,
            grad_norm=float(np.mean([s.grad_norm for s in steps])) if steps else 0.0,
            mean_advantage_abs=float(np.abs(adv).mean()) if len(adv) else 0.0,
            num_trajectories=len(batch), num_tokens=tokens, optimizer_steps=len(steps),
            reward_errors=len(batch.reward_errors), step=last.step if last is not None else 0, epsilon=eps,
            steps=steps)


def _baselined(cfg: REINFORCEConfig | PPOConfig, batch: TrajectoryBatch, running: RunningBaseline) -> np.ndarray:
    rewards = batch.rewards()
    adv = (baseline_advantages(rewards, batch.groups, cfg.baseline, cfg.baseline_value, running)
           if cfg.use_baseline else rewards.astype(np.float64))
    return normalize(adv) if cfg.normalize_advantages else adv


def _dp_common(cfg: REINFORCEConfig | PPOConfig, batch: TrajectoryBatch, algo: str) -> None:
    if cfg.normalize_advantages or (cfg.use_baseline and cfg.baseline != "constant"):
        raise invalid("normalize_advantages" if cfg.normalize_advantages else "baseline",
                       "on a DP session a trajectory's advantage may depend on its own reward only (its "
                       "clipped gradient must not change with other examples): use normalize_advantages="
                       "False and baseline='constant' (a fixed baseline_value) or use_baseline=False")
    groups = batch.groups
    if len(np.unique(groups)) != len(groups):
        raise invalid("num_samples", f"{algo} on a DP session: each trajectory is one example for clipping and "
                                      "accounting, so each prompt may have one trajectory (num_samples=1); k "
                                      "completions of one prompt would be k examples of one person's data")


class REINFORCE(_PolicyGradient):
    """REINFORCE with a baseline: ``REINFORCE(REINFORCEConfig(use_baseline=True, normalize_advantages=True,
    entropy_coef=0.01)).update(batch, training_client)``."""

    clip = False
    name = "REINFORCE"

    config: REINFORCEConfig

    def __init__(self, config: REINFORCEConfig | None = None, *, reference: TrainingClient | None = None) -> None:
        super().__init__(config or REINFORCEConfig(), reference)

    def compute_advantages(self, batch: TrajectoryBatch) -> np.ndarray:
        return _baselined(self.config, batch, self.running)

    def _dp_check(self, batch: TrajectoryBatch) -> None:
        _dp_common(self.config, batch, "REINFORCE")


class PPO(_PolicyGradient):
    """Value-free PPO: ``PPO(PPOConfig(clip_epsilon=0.2, ppo_epochs=4), reference=ref_tc).update(batch, tc)``."""

    name = "PPO"

    config: PPOConfig

    def __init__(self, config: PPOConfig | None = None, *, reference: TrainingClient | None = None) -> None:
        super().__init__(config or PPOConfig(), reference)

    def compute_advantages(self, batch: TrajectoryBatch) -> np.ndarray:
        return _baselined(self.config, batch, self.running)

    def _dp_check(self, batch: TrajectoryBatch) -> None:
        cfg = self.config
        if cfg.ppo_epochs != 1 or cfg.num_minibatches != 1:
            raise invalid("ppo_epochs" if cfg.ppo_epochs != 1 else "num_minibatches",
                           "on a DP session each optimizer step is accounted as a fresh Poisson sample: "
                           "several steps on one rollout batch would spend privacy the accountant does not "
                           "see; use ppo_epochs=1 and num_minibatches=1")
        _dp_common(cfg, batch, "PPO")


class GRPO(_PolicyGradient):
    """GRPO: ``GRPO(GRPOConfig()).update(batch, tc)`` on a batch with several completions per prompt."""

    name = "GRPO"

    config: GRPOConfig

    def __init__(self, config: GRPOConfig | None = None, *, reference: TrainingClient | None = None) -> None:
        super().__init__(config or GRPOConfig(), reference)

    def compute_advantages(self, batch: TrajectoryBatch) -> np.ndarray:
        return group_advantages(batch.rewards(), batch.groups, self.config.scale_rewards)

    def _dp_check(self, batch: TrajectoryBatch) -> None:
        raise invalid("num_samples", "GRPO on a DP session: its advantages compare the completions of one prompt "
                                      "(rows depend on each other) and a prompt contributes num_samples examples; "
                                      "use REINFORCE or PPO with num_samples=1 and a constant baseline")
