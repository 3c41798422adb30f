"""The three algorithms learn a verifiable task through the real services: the RL tiny model completes each
prompt with one of six names about uniformly; the reward is 1 when the completion says "cat". Starting
near 1/6, the mean reward of the last iterations must be clearly above the first ones'."""

from __future__ import annotations

import numpy as np
import pytest

from rlvr.conftest import MODEL
from rlvr.rl_model import PROMPTS, TARGET
from tensafe.rlvr import (
    GRPO,
    PPO,
    REINFORCE,
    GRPOConfig,
    PPOConfig,
    REINFORCEConfig,
    RolloutSampler,
    resolve_reward,
    train,
)
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

LORA = LoRAConfig(rank=8, alpha=16, dropout=0.0,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def config(lr: float = 2e-2) -> TrainingConfig:
    return TrainingConfig(model_ref=MODEL, lora_config=LORA, batch_size=8, seed=7,
                          optimizer=OptimizerConfig(name="adam", learning_rate=lr))


def run(service, tokenizer, algo, iterations: int, num_samples: int = 1, repeat: int = 4, lr: float = 2e-2):
    reward = resolve_reward("keyword_contains", keywords=[TARGET])
    with service.create_training_client(config(lr)) as tc:
        sampler = RolloutSampler(tc, max_new_tokens=6, num_samples=num_samples, seed=11, tokenizer=tokenizer)
        log = train(algo, sampler, PROMPTS * repeat, reward, iterations=iterations, progress=False, seed=3)
    rewards = log.mean_rewards
    print(f"{type(algo).__name__} mean reward per iteration: {np.round(rewards, 3).tolist()}")
    return log, rewards


def assert_learnt(r: list[float]) -> None:
    """Measured (2026-12-02, seeds as here, 8 iterations): REINFORCE 0.167 in the first iteration -> 0.903 over the
    last three; PPO 0.167 -> 0.972; GRPO 0.25 -> 0.944. Chance is 1/6."""
    assert r[0] < 0.4, r  # before any update: about chance
    assert np.mean(r[-3:]) > 0.75 and np.mean(r[-3:]) > np.mean(r[:3]) + 0.25, r


@pytest.mark.slow
def test_reinforce_learns(service, tokenizer) -> None:
    algo = REINFORCE(REINFORCEConfig(use_baseline=True, normalize_advantages=True, entropy_coef=0.0))
    log, r = run(service, tokenizer, algo, iterations=8)
    assert log.stopped == "completed" and len(r) == 8
    assert_learnt(r)


@pytest.mark.slow
def test_ppo_learns(service, tokenizer) -> None:
    algo = PPO(PPOConfig(ppo_epochs=2, num_minibatches=2, clip_epsilon=0.2, seed=0))
    log, r = run(service, tokenizer, algo, iterations=8, lr=5e-3)
    assert_learnt(r)
    assert any(h.clip_fraction > 0 for h in log.history)  # later passes over a batch do clip


@pytest.mark.slow
def test_grpo_learns(service, tokenizer) -> None:
    algo = GRPO(GRPOConfig())
    log, r = run(service, tokenizer, algo, iterations=8, num_samples=4, repeat=1, lr=1e-2)
    assert_learnt(r)
