"""Reinforcement learning from verifiable rewards (RLVR) on a TenSafe training session.

>>> from tensafe.rlvr import REINFORCE, REINFORCEConfig, RolloutSampler, resolve_reward
>>> reward_fn = resolve_reward("keyword_contains", keywords=["answer"])
>>> algo = REINFORCE(REINFORCEConfig(use_baseline=True, normalize_advantages=True, entropy_coef=0.01))
>>> sampler = RolloutSampler(training_client, max_new_tokens=64, tokenizer=tok)
>>> batch = sampler.generate_trajectories(prompts)      # real sampling by the session's current weights
>>> batch.score(reward_fn)                              # or: traj.reward = reward_fn(traj.prompt, traj.response)
>>> result = algo.update(batch, training_client)        # forward_backward + optim_step on the server
>>> batch.mean_reward, result.kl, result.clip_fraction

Everything runs through the :class:`tg_tinker.TrainingClient`: sampling (``sample`` with log-probabilities),
the loss (the server's registered ``policy_gradient`` loss) and the optimizer step; nothing here imports
torch. :func:`train` is the whole loop with a progress bar; on a DP session it Poisson-samples the prompts
at the session's sample rate and stops when the budget is spent. See docs/rlvr.md.
"""

from __future__ import annotations

from .advantages import RunningBaseline, group_advantages, group_means, normalize
from .algorithms import GRPO, PPO, REINFORCE, GRPOConfig, PPOConfig, REINFORCEConfig, UpdateResult
from .loop import Progress, TrainLog, dp_sample_rate, train
from .rewards import (
    available_rewards,
    combine,
    exact_match,
    final_number,
    json_schema_valid,
    keyword_contains,
    length_penalty,
    numeric_answer,
    regex_match,
    register_reward,
    resolve_reward,
)
from .sampler import RolloutSampler
from .trajectory import RewardFn, Trajectory, TrajectoryBatch, to_training_batch

__all__ = [
    "GRPO", "PPO", "REINFORCE", "GRPOConfig", "PPOConfig", "REINFORCEConfig", "RunningBaseline", "UpdateResult",
    "group_advantages", "group_means", "normalize", "Progress", "TrainLog", "dp_sample_rate", "train",
    "available_rewards", "combine", "exact_match", "final_number", "json_schema_valid", "keyword_contains",
    "length_penalty", "numeric_answer", "regex_match", "register_reward", "resolve_reward", "RolloutSampler",
    "RewardFn", "Trajectory", "TrajectoryBatch", "to_training_batch",
]
