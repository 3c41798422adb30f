"""Advantages, batch layout, and the server's policy_gradient loss (ratios, clipping, KL, entropy) against
hand computations on fixed log-probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensafe.rlvr import (
    GRPO,
    PPO,
    REINFORCE,
    GRPOConfig,
    PPOConfig,
    REINFORCEConfig,
    RunningBaseline,
    Trajectory,
    TrajectoryBatch,
    group_advantages,
    normalize,
    to_training_batch,
)
from tensafe.trainer.losses import LossInputs, resolve_loss
from tg_tinker import ValidationError

LN2 = math.log(2.0)


def batch_of(rewards, groups) -> TrajectoryBatch:
    return TrajectoryBatch([Trajectory("q", "r", [1], [2], [-1.0], group=g, reward=r)
                            for r, g in zip(rewards, groups, strict=True)])


def test_group_advantages_by_hand() -> None:
    adv = group_advantages(np.array([1.0, 0, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 1, 1]))
    # group 0: mean 1/3, population std sqrt(2)/3 -> (2/3)/(sqrt(2)/3) = sqrt(2), -(1/3)/(sqrt(2)/3) = -1/sqrt(2)
    assert adv[:3] == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-5)
    assert adv[3:] == pytest.approx([0, 0, 0])  # all equal: no signal, not a division by zero
    unscaled = group_advantages(np.array([1.0, 0, 3, 1]), np.array([0, 0, 1, 1]), scale=False)
    assert unscaled == pytest.approx([0.5, -0.5, 1, -1])
    with pytest.raises(ValidationError) as e:
        group_advantages(np.array([1.0, 0, 1]), np.array([0, 0, 1]))
    assert e.value.field == "num_samples"
    assert GRPO(GRPOConfig()).compute_advantages(batch_of([1, 0, 0, 0], [0, 0, 1, 1])) == pytest.approx(
        [1, -1, 0, 0], abs=1e-5)


def test_running_baseline_and_normalisation_by_hand() -> None:
    b = RunningBaseline(momentum=0.5)
    assert b.advantages(np.array([1.0, 0.0])) == pytest.approx([0.5, -0.5])   # first baseline: the batch mean
    assert b.advantages(np.array([1.0, 1.0])) == pytest.approx([0.5, 0.5])    # baseline 0.5 (then 0.75)
    assert b.advantages(np.array([0.0, 0.0])) == pytest.approx([-0.75, -0.75])
    assert normalize(np.array([1.0, 2.0, 3.0])) == pytest.approx([-1.2247449, 0, 1.2247449], rel=1e-5)
    algo = REINFORCE(REINFORCEConfig(baseline="constant", baseline_value=0.25, normalize_advantages=False))
    assert algo.compute_advantages(batch_of([1, 0], [0, 1])) == pytest.approx([0.75, -0.25])
    grouped = PPO(PPOConfig(baseline="group", normalize_advantages=False))
    assert grouped.compute_advantages(batch_of([1, 0, 1, 1], [0, 0, 1, 1])) == pytest.approx([0.5, -0.5, 0, 0])
    with pytest.raises(ValidationError) as e:
        grouped.compute_advantages(batch_of([1, 0], [0, 1]))
    assert e.value.field == "baseline"
    plain = REINFORCE(REINFORCEConfig(use_baseline=False, normalize_advantages=False))
    assert plain.compute_advantages(batch_of([1, 0], [0, 1])) == pytest.approx([1, 0])


@pytest.mark.parametrize(("config", "kwargs", "field"), [
    (REINFORCEConfig, {"baseline": "median"}, "baseline"),
    (REINFORCEConfig, {"entropy_coef": -0.1}, "entropy_coef"),
    (PPOConfig, {"clip_epsilon": 0.0}, "clip_epsilon"),
    (PPOConfig, {"ppo_epochs": 0}, "ppo_epochs"),
    (PPOConfig, {"kl_coef": math.inf}, "kl_coef"),
    (GRPOConfig, {"num_minibatches": 100}, "num_minibatches"),
    (GRPOConfig, {"micro_batch_size": 0}, "micro_batch_size"),
])
def test_bad_configs_name_the_field(config, kwargs, field) -> None:
    with pytest.raises(ValidationError) as e:
        config(**kwargs)
    assert e.value.field == field


def test_training_batch_layout_matches_the_server_token_alignment() -> None:
    trajs = [Trajectory("a", "b", [5, 6, 7], [8, 9], [-0.5, -1.5], ref_logprobs=[-0.25, -1.0]),
             Trajectory("c", "d", [5], [4], [-2.0], ref_logprobs=[-3.0])]
    b = to_training_batch(trajs, [1.5, -0.5], pad_token_id=2, with_ref=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 2, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 4, -100, -100, -100]]
    assert b["old_logprobs"].tolist() == [[0, 0, 0, -0.5, -1.5], [0, -2.0, 0, 0, 0]]
    assert b["advantages"].tolist() == [[0, 0, 0, 1.5, 1.5], [0, -0.5, 0, 0, 0]]
    assert b["ref_logprobs"].tolist() == [[0, 0, 0, -0.25, -1.0], [0, -3.0, 0, 0, 0]]
    # The server's token log-probabilities put labels[:, t]'s value at t: the same positions.
    logits = torch.randn(2, 5, 11)
    out = resolve_loss("token_ce")(LossInputs(logits, torch.tensor(b["input_ids"]), torch.tensor(b["attention_mask"]),
                                              torch.tensor(b["labels"])))
    assert ((out.token_logprobs != 0) == torch.tensor(b["labels"] != -100)).all()
    with pytest.raises(ValidationError) as e:
        to_training_batch([Trajectory("a", "b", [1], [2, 3], [-1.0])], [1.0], 0)
    assert e.value.field == "batch[0].logprobs"


def fixed_inputs(old_ratio_row0=(1.5, 0.9), old_ratio_row1=0.5):
    """Every position's logits are [0, 0, ln 2]: p = (1/4, 1/4, 1/2), entropy 1.5 ln 2.

    Row 0 labels tokens 2 then 0 (log p = ln 1/2, ln 1/4), advantage +1; row 1 labels token 1 (ln 1/4),
    advantage -2. old_logprobs are chosen so that the ratios are 1.5, 0.9 (row 0) and 0.5 (row 1)."""
    logits = torch.tensor([0.0, 0.0, LN2]).repeat(2, 3, 1).requires_grad_(True)
    labels = torch.tensor([[-100, 2, 0], [-100, 1, -100]])
    logp = torch.tensor([[0.0, math.log(0.5), math.log(0.25)], [0.0, math.log(0.25), 0.0]])
    ratios = torch.tensor([[1.0, *old_ratio_row0], [1.0, old_ratio_row1, 1.0]])
    old = logp - ratios.log()
    adv = torch.tensor([[0.0, 1.0, 1.0], [0.0, -2.0, 0.0]])
    ref = logp + LN2  # d = ref - logp = ln 2 everywhere: k3 = 2 - ln 2 - 1
    return LossInputs(logits, torch.tensor([[0, 2, 0], [0, 1, 2]]), torch.ones(2, 3, dtype=torch.long), labels,
                      adv, old, {"ref_logprobs": ref})


def test_policy_gradient_clipping_by_hand() -> None:
    x = fixed_inputs()
    out = resolve_loss("policy_gradient", clip_epsilon=0.2)(x)
    # row 0: min(1.5, 1.2) = 1.2 and min(0.9, 0.9) = 0.9 -> -(1.2 + 0.9) / 2 = -1.05
    # row 1: min(0.5 * -2, 0.8 * -2) = -1.6 -> +1.6 ; loss = mean(-1.05, 1.6) = 0.275
    assert out.loss.item() == pytest.approx(0.275, rel=1e-5)
    assert out.metrics["clip_fraction"] == pytest.approx(2 / 3)          # 1.5 and 0.5 are outside [0.8, 1.2]
    assert out.metrics["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, rel=1e-5)
    k1 = [r - 1 - math.log(r) for r in (1.5, 0.9, 0.5)]
    assert out.metrics["approx_kl"] == pytest.approx(sum(k1) / 3, rel=1e-5)
    assert out.metrics["entropy"] == pytest.approx(1.5 * LN2, rel=1e-5)
    assert out.num_tokens == 3
    out.loss.backward()
    g = x.logits.grad
    # Clipped tokens pass no gradient: row 0's first token (ratio 1.5, A > 0) and row 1's (ratio 0.5, A < 0).
    assert torch.all(g[0, 0] == 0) and torch.all(g[1, 0] == 0)
    # Row 0's second token: d loss / d logp = -ratio * A / (2 tokens * 2 rows) = -0.225, times
    # d logp / d logits = onehot(0) - p = (3/4, -1/4, -1/2).
    assert g[0, 1].tolist() == pytest.approx([-0.16875, 0.05625, 0.1125], rel=1e-4)


def test_policy_gradient_without_clip_entropy_and_kl_by_hand() -> None:
    plain = resolve_loss("policy_gradient", clip=False)(fixed_inputs())
    assert plain.loss.item() == pytest.approx(-0.1, rel=1e-5)   # mean(-(1.5 + 0.9) / 2, -(0.5 * -2))
    x = fixed_inputs()
    full = resolve_loss("policy_gradient", clip_epsilon=0.2, entropy_coef=0.1, kl_coef=0.5, scale=2.0)(x)
    k3 = 2 - LN2 - 1
    assert full.loss.item() == pytest.approx(2.0 * (0.275 - 0.1 * 1.5 * LN2 + 0.5 * k3), rel=1e-5)
    assert full.metrics["kl_ref"] == pytest.approx(k3, rel=1e-5)
    assert full.metrics["pg_loss"] == pytest.approx(0.275, rel=1e-5)
    # On policy (ratio 1) without clipping the gradient is the REINFORCE one: -mean_i A_i mean_t grad log p.
    x = fixed_inputs((1.0, 1.0), 1.0)
    resolve_loss("policy_gradient", clip=False)(x).loss.backward()
    logits = torch.tensor([0.0, 0.0, LN2]).repeat(2, 3, 1).requires_grad_(True)
    lsm = torch.log_softmax(logits, -1)
    reference = -(1.0 * (lsm[0, 0, 2] + lsm[0, 1, 0]) / 2 + -2.0 * lsm[1, 0, 1]) / 2
    reference.backward()
    assert torch.allclose(x.logits.grad, logits.grad, atol=1e-6)


def test_policy_gradient_kl_needs_reference_logprobs() -> None:
    from tensafe.runtime.errors import InvalidArgument

    x = fixed_inputs()
    x.extra = {}
    with pytest.raises(InvalidArgument) as e:
        resolve_loss("policy_gradient", kl_coef=0.1)(x)
    assert e.value.field == "batch.extra.ref_logprobs"
    for kwargs, field in (({"kl_coef": -1.0}, "loss.kwargs.kl_coef"), ({"scale": 0.0}, "loss.kwargs.scale"),
                          ({"entropy_coef": -0.5}, "loss.kwargs.entropy_coef")):
        with pytest.raises(InvalidArgument) as e:
            resolve_loss("policy_gradient", **kwargs)
        assert e.value.field == field
