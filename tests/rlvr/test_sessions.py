"""Rollouts from a real session, and RL on a DP session: what is refused (naming the field), the Poisson rounds
at the session's sample rate, one accounted step per update, and the end of the budget."""

from __future__ import annotations

import numpy as np
import pytest

from rlvr.conftest import MODEL
from rlvr.rl_model import PROMPTS, TARGET
from tensafe.rlvr import (
    GRPO,
    PPO,
    REINFORCE,
    PPOConfig,
    REINFORCEConfig,
    RolloutSampler,
    TrajectoryBatch,
    dp_sample_rate,
    resolve_reward,
    train,
)
from tensafe.rlvr import sampler as sampler_module
from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig, ValidationError

LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def plain_config() -> TrainingConfig:
    return TrainingConfig(model_ref=MODEL, lora_config=LORA, batch_size=4, seed=3,
                          optimizer=OptimizerConfig(name="adam", learning_rate=1e-2))


def test_rollouts_carry_the_policy_logprobs_and_contexts(service, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(sampler_module, "SAMPLE_WORK_TOKENS", 12)  # 2 prompts per Sample call: 3 calls here
    prompts = PROMPTS[:5]
    with service.create_training_client(plain_config()) as tc:
        with pytest.raises(ValidationError) as e:
            RolloutSampler(tc, max_new_tokens=6).generate_trajectories(prompts)
        assert e.value.field == "tokenizer"
        sampler = RolloutSampler(tc, max_new_tokens=6, seed=1, tokenizer=tokenizer)
        batch = sampler.generate_trajectories(prompts, contexts=[{"answer": str(i)} for i in range(5)])
        assert [t.prompt for t in batch] == prompts and batch.groups.tolist() == [0, 1, 2, 3, 4]
        assert [t.context["answer"] for t in batch] == ["0", "1", "2", "3", "4"]
        for t, p in zip(batch, prompts, strict=True):
            assert t.prompt_tokens == tokenizer(p).input_ids and 0 < len(t.response_tokens) <= 6
            assert len(t.logprobs) == len(t.response_tokens) and all(lp <= 0 for lp in t.logprobs)
            assert t.response == tokenizer.decode(t.response_tokens, skip_special_tokens=True)
        # The sampling log-probabilities are the session's own: a forward pass gives the same numbers.
        algo = REINFORCE()
        redo = algo._forward_logprobs(tc, list(batch), tokenizer.pad_token_id)
        for t, lp in zip(batch, redo, strict=True):
            np.testing.assert_allclose(t.logprobs, lp, atol=1e-4)
        # Token-id prompts need no tokenizer.
        by_ids = RolloutSampler(tc, max_new_tokens=4, num_samples=3)
        ids = by_ids.generate_trajectories([tokenizer(PROMPTS[0]).input_ids])
        assert len(ids) == 3 and {t.group for t in ids} == {0} and [t.sample_index for t in ids] == [0, 1, 2]
        batch.score(resolve_reward("keyword_contains", keywords=[TARGET]))
        assert batch.mean_reward == np.mean([float(TARGET in t.response) for t in batch])


def dp_config(target_epsilon: float, dataset_size: int) -> TrainingConfig:
    return TrainingConfig(model_ref=MODEL, lora_config=LORA, batch_size=4, seed=3,
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.05),
                          dp_config=DPConfig(enabled=True, noise_multiplier=3.0, max_grad_norm=1.0,
                                             target_epsilon=target_epsilon, target_delta=1e-5,
                                             dataset_size=dataset_size))


def test_rl_on_a_dp_session(service, tokenizer) -> None:
    prompts = PROMPTS * 2  # 12 examples, expected 4 per round: q = 1/3
    reward = resolve_reward("keyword_contains", keywords=[TARGET])
    with service.create_training_client(dp_config(1.6, len(prompts))) as tc:
        assert dp_sample_rate(tc, len(prompts)) == pytest.approx(1 / 3)
        with pytest.raises(ValidationError) as e:
            dp_sample_rate(tc, 7)
        assert e.value.field == "prompts"
        one = RolloutSampler(tc, max_new_tokens=6, seed=2, tokenizer=tokenizer)
        batch = one.generate_trajectories(prompts[:3]).score(reward)
        refused = [
            (REINFORCE(REINFORCEConfig(use_baseline=True, normalize_advantages=True)), batch, "normalize_advantages"),
            (REINFORCE(REINFORCEConfig(normalize_advantages=False)), batch, "baseline"),  # running mean couples rows
            (PPO(PPOConfig(baseline="constant", normalize_advantages=False)), batch, "ppo_epochs"),
            (GRPO(), batch, "num_samples"),
        ]
        two = RolloutSampler(tc, max_new_tokens=6, num_samples=2, seed=2, tokenizer=tokenizer)
        pairs = two.generate_trajectories(prompts[:2]).score(reward)
        dp_reinforce = REINFORCE(REINFORCEConfig(baseline="constant", baseline_value=0.2, normalize_advantages=False))
        refused.append((dp_reinforce, pairs, "num_samples"))  # k samples of one prompt: k examples of it
        for algo, b, field in refused:
            with pytest.raises(ValidationError) as e:
                algo.update(b, tc)
            assert e.value.field == field, (type(algo).__name__, e.value)
        assert tc.get_info().step == 0  # nothing was sent for the refused updates

        # An empty Poisson round is still one noised, accounted step.
        empty = dp_reinforce.update(TrajectoryBatch(), tc)
        assert empty.optimizer_steps == 1 and empty.steps[0].dp_metrics.noise_applied and empty.epsilon > 0

        log = train(dp_reinforce, one, prompts, reward, iterations=60, progress=False, seed=9)
    assert log.stopped == "dp_budget_exceeded" and log.error is not None and log.error.code == "DP_BUDGET_EXCEEDED"
    eps = [h.epsilon for h in log.history]
    assert 3 <= len(eps) < 60 and eps == sorted(eps) and eps[-1] <= 1.6
    for h in log.history:
        assert h.optimizer_steps == 1 and h.steps[0].dp_metrics.noise_applied
        assert h.steps[0].dp_metrics.sample_rate == pytest.approx(1 / 3)
    sizes = [h.num_trajectories for h in log.history]
    assert np.mean(sizes) == pytest.approx(4, abs=2.0), sizes  # Poisson rounds of mean q N = 4
    print(f"DP RL: {len(eps)} updates before the budget of 1.6 ran out; epsilon {eps[0]:.3f} -> {eps[-1]:.3f}; "
          f"round sizes {sizes}")
