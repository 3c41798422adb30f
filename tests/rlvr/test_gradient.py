"""The update the server applies is the gradient of the objective the algorithms promise: the same trajectories,
advantages and old log-probabilities, run through an in-process reference on the same tiny model (transformers +
PEFT, the same LoRA initialisation), written directly from the formulas, give the same gradient norms and the same
weights after the steps (compared through the log-probabilities of the batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlvr.conftest import MODEL
from rlvr.rl_model import PROMPTS
from tensafe.rlvr import PPO, REINFORCE, PPOConfig, REINFORCEConfig, RolloutSampler, to_training_batch
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SEED = 1234
LR = 1.0


def session_config() -> TrainingConfig:
    return TrainingConfig(model_ref=MODEL, batch_size=8, seed=SEED,
                          lora_config=LoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=TARGETS),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=LR))


def reference_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    base.requires_grad_(False)
    torch.manual_seed(SEED)  # the trainer seeds the adapter's initialisation with the session's seed
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))


def objective(model, batch, clip_eps: float | None, entropy_coef: float, kl_coef: float) -> torch.Tensor:
    """From the formulas: per row, the mean over its response tokens of
    -min(r A, clip(r) A) + kl_coef (exp(ref - logp) - (ref - logp) - 1) - entropy_coef H; then the mean over rows."""
    ids = torch.tensor(batch["input_ids"])
    logits = model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"])).logits.float()
    rows = []
    for b in range(ids.shape[0]):
        terms = []
        for t in range(1, ids.shape[1]):
            label = int(batch["labels"][b, t])
            if label == -100:
                continue
            lsm = torch.log_softmax(logits[b, t - 1], -1)
            logp = lsm[label]
            ratio = torch.exp(logp - float(batch["old_logprobs"][b, t]))
            a = float(batch["advantages"][b, t])
            surr = ratio * a
            if clip_eps is not None:
                surr = torch.minimum(surr, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
            term = -surr - entropy_coef * -(lsm.exp() * lsm).sum()
            if kl_coef:
                d = float(batch["ref_logprobs"][b, t]) - logp
                term = term + kl_coef * (d.exp() - d - 1)
            terms.append(term)
        rows.append(torch.stack(terms).mean())
    return torch.stack(rows).mean()


def sgd_step(model, loss: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= LR * g
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def batch_logprobs(model, batch) -> np.ndarray:
    ids = torch.tensor(batch["input_ids"])
    with torch.no_grad():
        lsm = torch.log_softmax(model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"])).logits, -1)
    labels = torch.tensor(batch["labels"])
    out = torch.zeros(labels.shape)
    out[:, 1:] = lsm[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == -100, 0.0, out).numpy()


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
def test_server_update_equals_the_objective_gradient(service, tokenizer, rl_model, algorithm) -> None:
    # Coefficients large enough that a wrong entropy or KL term would show in the gradient norms.
    entropy_coef, kl_coef = 0.5, 0.5
    with service.create_training_client(session_config()) as tc, \
            service.create_training_client(session_config()) as ref_tc:
        if algorithm == "reinforce":
            algo = REINFORCE(REINFORCEConfig(baseline="constant", baseline_value=0.5, normalize_advantages=False,
                                             entropy_coef=entropy_coef, kl_coef=kl_coef, micro_batch_size=3),
                             reference=ref_tc)
            clip, steps = None, 1
        else:
            algo = PPO(PPOConfig(ppo_epochs=3, num_minibatches=1, clip_epsilon=0.05, baseline="group",
                                 normalize_advantages=False, entropy_coef=entropy_coef, kl_coef=kl_coef,
                                 micro_batch_size=3), reference=ref_tc)
            clip, steps = 0.05, 3  # steps 2 and 3: ratios off 1 (clipping) and a policy off the base (KL)
        sampler = RolloutSampler(tc, max_new_tokens=5, num_samples=2, seed=5, tokenizer=tokenizer)
        batch = sampler.generate_trajectories(PROMPTS[:4])
        for i, traj in enumerate(batch):
            traj.reward = [1.0, 0.0, 0.25, 0.75][i % 4]
        advantages = algo.compute_advantages(batch)
        result = algo.update(batch, tc)
        tb = to_training_batch(list(batch), advantages, pad_token_id=tokenizer.pad_token_id, with_ref=True)
        after = tc.forward({k: tb[k] for k in ("input_ids", "attention_mask", "labels")},
                           return_logprobs=True).result().logprobs

    model = reference_model(rl_model)
    with model.disable_adapter(), torch.no_grad():
        ref_lp = batch_logprobs(model, tb)
    np.testing.assert_allclose(tb["ref_logprobs"], ref_lp, atol=2e-4)  # the reference session is the base model
    model.train()
    norms = [sgd_step(model, objective(model, tb, clip, entropy_coef, kl_coef)) for _ in range(steps)]
    assert result.optimizer_steps == steps
    assert [s.grad_norm for s in result.steps] == pytest.approx(norms, rel=2e-3), norms
    np.testing.assert_allclose(after, batch_logprobs(model, tb), atol=5e-4)
    assert result.entropy > 0 and result.kl >= 0
    if algorithm == "ppo":
        assert result.clip_fraction > 0  # the later steps clipped: the comparison covers the clipped branch
