"""DP-SGD in the trainer: the per-sample clipping engine in-process, then DP sessions through the SDK.

The in-process tests use the engine the trainer uses (services/tensafe/trainer/dp.py) on a real
PEFT LoRA model; only there is the noise switched off (``noise=None``), to compare the engine's
clipped sum with a reference built one sample at a time.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import eventually
from tg_tinker import (
    ConflictError,
    DPBudgetExceededError,
    DPConfig,
    LoRAConfig,
    LossConfig,
    OptimizerConfig,
    TrainingConfig,
    ValidationError,
)

ROWS = [[0, 45, 120, 77, 200, 31, 9, 150, 66, 88, 12, 5],
        [0, 99, 14, 230, 61, 7, 180, 42, 3, 111, 19, 250],
        [0, 17, 18, 19, 20, 21, 22, 2, 2, 2, 2, 2],
        [0, 300, 301, 9, 8, 7, 6, 5, 4, 3, 2, 1]]
MASK = [[1] * 12, [1] * 12, [1] * 7 + [0] * 5, [1] * 12]
LABELS = [ROWS[0], ROWS[1], ROWS[2][:7] + [-100] * 5, [-100] * 6 + ROWS[3][6:]]
BATCH = {"input_ids": ROWS, "attention_mask": MASK, "labels": LABELS}


# ------------------------------------------------------------------------------------- in-process


def _peft(tiny_model, sessions=("ses_a", "ses_b")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    base.requires_grad_(False)
    torch.manual_seed(7)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, lora, adapter_name=sessions[0])
    for name in sessions[1:]:
        model.add_adapter(name, lora)
    for name in sessions:  # LoRA B starts at zero: give it values so every factor has a gradient
        model.set_adapter(name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.normal_(0, 0.05)
    model.set_adapter(sessions[0])
    return model


def _params(model, session_id: str):
    return [p for n, p in model.named_parameters() if f".{session_id}." in n]


def _engine_sum(model, loss, max_grad_norm: float):
    from tensafe.trainer.dp import PerSampleClipper, lora_layers
    from tensafe.trainer.losses import LossInputs

    clipper = PerSampleClipper(lora_layers(model, "ses_a"), max_grad_norm)
    ids, mask, labels = (torch.tensor(BATCH[k]) for k in ("input_ids", "attention_mask", "labels"))

    def run() -> LossInputs:
        model.train(True)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return LossInputs(logits=logits, input_ids=ids, attention_mask=mask, labels=labels)

    outs = clipper.per_sample_backward(run, loss)
    return clipper, outs


def _reference_sum(model, loss, max_grad_norm: float):
    """Each row alone through the model: its own gradient, clipped, then summed."""
    from tensafe.trainer.losses import LossInputs

    params = _params(model, "ses_a")
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ROWS)):
        ids, mask, labels = (torch.tensor(BATCH[k][i:i + 1]) for k in ("input_ids", "attention_mask", "labels"))
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss(LossInputs(logits=logits, input_ids=ids, attention_mask=mask, labels=labels)).loss.backward()
        grads = [p.grad.clone() for p in params]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6], ids=["every-row-clipped", "no-row-clipped"])
def test_clipped_sum_equals_one_sample_at_a_time(tiny_model, max_grad_norm: float) -> None:
    from tensafe.trainer.losses import resolve_loss

    model = _peft(tiny_model)
    loss = resolve_loss("token_ce")
    reference = _reference_sum(model, loss, max_grad_norm)
    clipper, outs = _engine_sum(model, loss, max_grad_norm)
    got = [clipper.clipped_sum(p) for p in _params(model, "ses_a")]
    assert len(outs) == 4 and clipper.rows == 4
    scale = max(float(r.abs().max()) for r in reference)
    assert scale > 0
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * scale)
    # No gradient of the other session's adapter was touched, and no unclipped gradient was left behind.
    assert all(p.grad is None for p in _params(model, "ses_b"))
    assert all(p.grad is None for p in _params(model, "ses_a"))
    if max_grad_norm < 1:  # every row clipped to norm C: the sum's norm is at most rows x C
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in got))
        assert norm <= 4 * max_grad_norm * (1 + 1e-6)
    # Without noise, the step's gradient is that sum over the expected batch size.
    mean = clipper.noised_mean(1.0, 8, noise=None)
    for p, g in zip(_params(model, "ses_a"), got, strict=True):
        torch.testing.assert_close(mean[p], g / 8)


def test_per_row_loss_inputs_are_sliced_with_the_rows(tiny_model) -> None:
    """A loss with a per-row extra input (mse's targets): each row's loss sees its own target."""
    from tensafe.trainer.dp import PerSampleClipper, lora_layers
    from tensafe.trainer.losses import LossInputs, resolve_loss

    model, max_grad_norm = _peft(tiny_model), 0.02

    loss = resolve_loss("mse")
    targets = torch.tensor([-3.0, -4.0, -5.0, -6.0])
    params = _params(model, "ses_a")
    reference = [torch.zeros_like(p) for p in params]
    for i in range(4):
        ids, mask, labels = (torch.tensor(BATCH[k][i:i + 1]) for k in ("input_ids", "attention_mask", "labels"))
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss(LossInputs(logits=logits, input_ids=ids, attention_mask=mask, labels=labels,
                        extra={"targets": targets[i:i + 1]})).loss.backward()
        grads = [p.grad.clone() for p in params]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        reference = [r + min(1.0, max_grad_norm / (norm + 1e-6)) * g for r, g in zip(reference, grads, strict=True)]
    model.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(lora_layers(model, "ses_a"), max_grad_norm)
    ids, mask, labels = (torch.tensor(BATCH[k]) for k in ("input_ids", "attention_mask", "labels"))
    clipper.per_sample_backward(lambda: LossInputs(
        logits=model(input_ids=ids, attention_mask=mask).logits.float(), input_ids=ids, attention_mask=mask,
        labels=labels, extra={"targets": targets}), loss)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(clipper.clipped_sum(p), r, rtol=1e-4, atol=1e-9)


def test_micro_batches_add_up_to_the_logical_batch(tiny_model) -> None:
    from tensafe.trainer.dp import PerSampleClipper, lora_layers
    from tensafe.trainer.losses import LossInputs, resolve_loss

    model = _peft(tiny_model)
    loss = resolve_loss("token_ce")
    whole = _reference_sum(model, loss, 0.05)
    clipper = PerSampleClipper(lora_layers(model, "ses_a"), 0.05)
    for rows in (slice(0, 1), slice(1, 4)):  # two micro-batches of one logical batch
        ids, mask, labels = (torch.tensor(BATCH[k][rows]) for k in ("input_ids", "attention_mask", "labels"))
        clipper.per_sample_backward(lambda ids=ids, mask=mask, labels=labels: LossInputs(
            logits=model(input_ids=ids, attention_mask=mask).logits.float(), input_ids=ids,
            attention_mask=mask, labels=labels), loss)
    assert clipper.rows == 4
    for p, r in zip(_params(model, "ses_a"), whole, strict=True):
        torch.testing.assert_close(clipper.clipped_sum(p), r, rtol=1e-4, atol=1e-9)


def test_captured_backward_clips_as_per_sample_backward(tiny_model) -> None:
    """A pass whose backward someone else runs (start_capture, backward, accumulate_captured) clips the
    same rows as per_sample_backward (autograd.grad to the layers' outputs) and as one row at a time."""
    from tensafe.trainer.dp import PerSampleClipper, lora_layers, split_rows
    from tensafe.trainer.losses import LossInputs, resolve_loss

    model = _peft(tiny_model)
    loss = resolve_loss("token_ce")
    reference = _reference_sum(model, loss, 0.05)
    clipper = PerSampleClipper(lora_layers(model, "ses_a"), 0.05)
    ids, mask, labels = (torch.tensor(BATCH[k]) for k in ("input_ids", "attention_mask", "labels"))
    clipper.start_capture(True)
    try:
        model.train(True)
        batch = LossInputs(logits=model(input_ids=ids, attention_mask=mask).logits.float(), input_ids=ids,
                           attention_mask=mask, labels=labels)
    finally:
        clipper.start_capture(False)
    torch.stack([loss(row).loss for row in split_rows(batch)]).sum().backward()
    clipper.accumulate_captured(4)
    assert clipper.rows == 4 and all(p.grad is None for p in _params(model, "ses_a"))
    captured = [clipper.clipped_sum(p).clone() for p in _params(model, "ses_a")]
    clipper.reset()
    engine = PerSampleClipper(lora_layers(model, "ses_a"), 0.05)
    engine.per_sample_backward(lambda: LossInputs(logits=model(input_ids=ids, attention_mask=mask).logits.float(),
                                                  input_ids=ids, attention_mask=mask, labels=labels), loss)
    for p, c, r in zip(_params(model, "ses_a"), captured, reference, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(engine.clipped_sum(p), r, rtol=1e-4, atol=1e-9)
    # Dropped rows (a failed pass) add nothing.
    engine.reset()
    engine.start_capture(True)
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    engine.start_capture(False)
    engine.accumulate_captured(None)
    assert engine.rows == 0 and engine.summed == {} and all(p.grad is None for p in _params(model, "ses_a"))


def test_secure_gaussian_is_standard_normal() -> None:
    from tensafe.trainer.dp import SecureGaussian

    gen = SecureGaussian()
    z = gen.sample(400_001, torch.float64).numpy()
    assert z.shape == (400_001,)
    n = len(z)
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.std() - 1) < 6 / math.sqrt(2 * n)
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert not np.array_equal(gen.sample(1000).numpy(), gen.sample(1000).numpy())  # fresh key each call


def test_step_noise_has_the_calibrated_standard_deviation(tiny_model) -> None:
    from tensafe.trainer.dp import PerSampleClipper, SecureGaussian, lora_layers

    model = _peft(tiny_model)
    clipper = PerSampleClipper(lora_layers(model, "ses_a"), max_grad_norm=0.5)
    sigma, expected_batch = 2.0, 4
    draws = np.concatenate([torch.cat([g.flatten() for g in clipper.noised_mean(
        sigma, expected_batch, SecureGaussian()).values()]).numpy() for _ in range(10)])
    want = sigma * 0.5 / expected_batch  # noise std x C, added once, divided by the expected batch
    assert len(draws) > 20_000
    assert abs(draws.std() / want - 1) < 0.03
    assert abs(draws.mean()) < 6 * want / math.sqrt(len(draws))


def test_lora_layers_refuses_parameters_outside_linear_layers(tiny_model) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tensafe.runtime.errors import InvalidArgument
    from tensafe.trainer.dp import lora_layers

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), adapter_name="ses_e")
    with pytest.raises(InvalidArgument) as info:
        lora_layers(model, "ses_e")
    assert info.value.field == "config.lora_config.target_modules"


# ------------------------------------------------------------------------------- through the service

DP_LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def dp_config(**kw) -> TrainingConfig:
    dp = {"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "target_epsilon": 8.0,
          "target_delta": 1e-5, "dataset_size": 400}
    dp.update(kw.pop("dp", {}))
    return TrainingConfig(model_ref="tiny", batch_size=4, lora_config=kw.pop("lora_config", DP_LORA),
                          optimizer=OptimizerConfig(name="sgd", learning_rate=0.5), seed=5,
                          dp_config=DPConfig(**dp), **kw)


def pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """An independent dp-accounting computation of what the accountant should report."""
    acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acct.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return acct.get_epsilon(delta)


@pytest.fixture
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


def _logprobs(tc) -> np.ndarray:
    return tc.forward(BATCH, return_logprobs=True).result(timeout=60).logprobs


def test_dp_steps_are_noised_and_accounted(service) -> None:
    with service.create_training_client(dp_config()) as tc:
        info = tc.get_info()
        assert info.dp_enabled and info.budget_id
        before = _logprobs(tc)
        results = []
        for _ in range(3):
            tc.forward_backward(BATCH)
            results.append(tc.optim_step(apply_dp_noise=True).result(timeout=60))
        dp = results[-1].dp_metrics
        assert [r.step for r in results] == [1, 2, 3]
        assert dp.noise_applied and dp.noise_multiplier == 1.1 and dp.max_grad_norm == 1.0
        assert dp.sample_rate == pytest.approx(4 / 400) and dp.accounted_steps == 3
        assert dp.budget_id == info.budget_id
        assert dp.total_epsilon == pytest.approx(pld_epsilon(1.1, 0.01, 3, 1e-5), rel=5e-3)
        assert dp.remaining_epsilon == pytest.approx(8.0 - dp.total_epsilon)
        assert [r.dp_metrics.total_epsilon for r in results] == sorted(r.dp_metrics.total_epsilon for r in results)
        assert not np.allclose(_logprobs(tc), before)  # the weights moved
        assert tc.get_info().total_epsilon == pytest.approx(dp.total_epsilon)
        # Noise cannot be switched off for a step.
        with pytest.raises(ValidationError) as bad:
            tc.optim_step(apply_dp_noise=False)
        assert bad.value.field == "apply_dp_noise"
        # An empty Poisson batch is still a noised, accounted step.
        empty = tc.optim_step().result(timeout=60)
        assert empty.step == 4 and empty.dp_metrics.accounted_steps == 4 and empty.num_tokens == 0


def test_same_data_same_seed_different_noise(service) -> None:
    """The DP noise does not come from the session seed: two identical sessions end up apart."""
    ends = []
    for _ in range(2):
        with service.create_training_client(dp_config(dp={"max_grad_norm": 0.01})) as tc:
            tc.forward_backward(BATCH)
            tc.optim_step().result(timeout=60)
            ends.append(_logprobs(tc))
    assert not np.allclose(ends[0], ends[1])


def test_budget_runs_out_at_exactly_the_right_step(service, trainer_stack) -> None:
    noise, rate, delta = 0.8, 4 / 400, 1e-5
    # A target between epsilon after 3 and after 4 steps: the 4th step must be refused.
    e3, e4 = pld_epsilon(noise, rate, 3, delta), pld_epsilon(noise, rate, 4, delta)
    target = (e3 + e4) / 2
    with service.create_training_client(dp_config(dp={"noise_multiplier": noise, "target_epsilon": target})) as tc:
        for _ in range(3):
            tc.forward_backward(BATCH)
            last = tc.optim_step().result(timeout=60)
        assert last.dp_metrics.accounted_steps == 3 and last.dp_metrics.total_epsilon <= target
        weights_before = _logprobs(tc)
        tc.forward_backward(BATCH)
        with pytest.raises(DPBudgetExceededError):
            tc.optim_step().result(timeout=60)
        np.testing.assert_array_equal(_logprobs(tc), weights_before)  # the refused step changed no weight
        info = tc.get_info()
        assert info.step == 3
        budget_id = info.budget_id
    vkey = trainer_stack.cli("ledger", "vkey").stdout.strip()
    # Every step and the refusal are in the ledger, as the tenant's entries (delivered through an outbox).
    def record_steps() -> list:
        found = [e for e in service.get_audit_logs(service="accountant", resource_id=budget_id, limit=1000,
                                                   vkey=vkey)
                 if e.action.endswith("RecordStep")]
        return found if len(found) >= 4 else []

    entries = eventually(record_steps, 20, interval=0.2, message="four RecordStep entries")
    assert [e.outcome for e in entries] == ["success"] * 3 + ["denied"], entries
    assert entries[-1].details.get("reason") == "DP_BUDGET_EXCEEDED", entries[-1]


def test_noise_is_calibrated_from_max_steps(service) -> None:
    cfg = dp_config(dp={"noise_multiplier": None, "max_steps": 5, "target_epsilon": 2.0})
    with service.create_training_client(cfg) as tc:
        for _ in range(5):
            tc.forward_backward(BATCH)
            last = tc.optim_step().result(timeout=60)
        dp = last.dp_metrics
        assert dp.accounted_steps == 5 and dp.total_epsilon <= 2.0
        assert dp.total_epsilon == pytest.approx(pld_epsilon(dp.noise_multiplier, 0.01, 5, 1e-5), rel=5e-3)
        assert dp.total_epsilon > 0.99 * 2.0  # the planned steps end at the target, not far below it


def test_dp_sessions_refuse_what_would_break_the_guarantee(service) -> None:
    cases = [
        (dp_config(dp={"dataset_size": None}), "config.dp_config.dataset_size"),
        (dp_config(dp={"noise_multiplier": None}), "config.dp_config.noise_multiplier"),
        (dp_config(dp={"dataset_size": 2}), "config.dp_config.dataset_size"),
        (dp_config(dp={"sample_rate": 0.5}), "config.dp_config.sample_rate"),
        (dp_config(lora_config=LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"], bias="all")),
         "config.lora_config.bias"),
        (dp_config(loss=LossConfig(name="margin_ranking")), "config.loss.name"),
    ]
    for cfg, field in cases:
        with pytest.raises(ValidationError) as info:
            service.create_training_client(cfg)
        assert info.value.field == field, (field, info.value)
    with service.create_training_client(dp_config()) as tc:
        with pytest.raises(ValidationError) as info:
            tc.forward_backward({**BATCH, "input_ids": ROWS[:2] * 2}, loss=LossConfig(name="margin_ranking"))
        assert info.value.field == "loss.name"
        with pytest.raises(ConflictError):
            tc.forward_backward_custom(BATCH, lambda logprobs, batch: -logprobs.sum())


def test_loading_a_checkpoint_gives_no_budget_back(service) -> None:
    with service.create_training_client(dp_config()) as tc:
        for _ in range(2):
            tc.forward_backward(BATCH)
            spent = tc.optim_step().result(timeout=60).dp_metrics
        saved = tc.save_state(name="dp-ckpt")
    with service.create_training_client(dp_config()) as fresh:  # a new budget: refused
        with pytest.raises(ConflictError) as info:
            fresh.load_state(saved.artifact_id)
        assert spent.budget_id in str(info.value)
    resumed_cfg = dp_config(dp={"budget_id": spent.budget_id})
    with service.create_training_client(resumed_cfg) as resumed:
        resumed.load_state(saved.artifact_id)
        assert resumed.get_info().total_epsilon == pytest.approx(spent.total_epsilon)
        resumed.forward_backward(BATCH)
        after = resumed.optim_step().result(timeout=60).dp_metrics
        assert after.budget_id == spent.budget_id and after.accounted_steps == 3
        assert after.total_epsilon == pytest.approx(pld_epsilon(1.1, 0.01, 3, 1e-5), rel=5e-3)


def test_rdp_sessions_are_accounted_with_rdp(service) -> None:
    with service.create_training_client(dp_config(dp={"accountant_type": "rdp"})) as tc:
        for _ in range(2):
            tc.forward_backward(BATCH)
            dp = tc.optim_step().result(timeout=60).dp_metrics
    acct = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acct.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 2)
    assert dp.accounted_steps == 2
    assert dp.total_epsilon == pytest.approx(acct.get_epsilon(1e-5), rel=1e-3)
    assert dp.total_epsilon > pld_epsilon(1.1, 0.01, 2, 1e-5)  # RDP is the looser bound


def test_split_rows_cuts_each_tensor_once() -> None:
    """split_rows gives each row alone (the same values as slicing row by row) from one split per tensor:
    the logits' rows share one backward node, whose backward is one concatenation. Row slices would be
    B nodes, each writing a zero tensor of the whole batch's shape (B^2 work in the DP backward)."""
    from tensafe.trainer.dp import split_rows
    from tensafe.trainer.losses import LossInputs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (3, 5), generator=g)
    batch = LossInputs(logits=logits * 1.0, input_ids=ids, attention_mask=torch.ones(3, 5, dtype=torch.long),
                       labels=ids, advantages=torch.randn(3, 5, generator=g), extra={"w": torch.arange(3.0)})
    rows = split_rows(batch)
    assert len(rows) == 3
    for i, r in enumerate(rows):
        torch.testing.assert_close(r.logits, batch.logits[i:i + 1])
        assert r.input_ids.shape == (1, 5) and torch.equal(r.labels, ids[i:i + 1])
        assert r.advantages is not None and torch.equal(r.advantages, batch.advantages[i:i + 1])
        assert r.old_logprobs is None and torch.equal(r.extra["w"], torch.tensor([float(i)]))
    assert len({id(r.logits.grad_fn) for r in rows}) == 1
    torch.stack([r.logits[0, 0, k] for k, r in enumerate(rows)]).sum().backward()
    expected = torch.zeros(3, 5, 7)
    for k in range(3):
        expected[k, 0, k] = 1.0
    torch.testing.assert_close(logits.grad, expected)
