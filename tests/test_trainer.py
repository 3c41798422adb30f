"""Training through the SDK against a real `tensafe up`, on a tiny Llama model loaded from disk."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tg_tinker import (
    ConflictError,
    FutureCancelledError,
    FutureTimeoutError,
    LoRAConfig,
    LossConfig,
    NotFoundError,
    OptimizerConfig,
    TrainingConfig,
    ValidationError,
)

PROMPT_IDS = [[0, 45, 120, 77, 200, 31, 9, 150, 66, 88, 12, 5],
              [0, 99, 14, 230, 61, 7, 180, 42, 3, 111, 19, 250]]
BATCH = {"input_ids": PROMPT_IDS, "attention_mask": [[1] * 12, [1] * 12], "labels": PROMPT_IDS}


def config(**kw) -> TrainingConfig:
    kw.setdefault("lora_config", LoRAConfig(rank=8, alpha=16, dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    kw.setdefault("optimizer", OptimizerConfig(name="adamw", learning_rate=2e-2))
    kw.setdefault("seed", 1234)
    return TrainingConfig(model_ref="tiny", batch_size=2, **kw)


@pytest.fixture
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


def test_loss_goes_down_on_a_memorisable_batch(service) -> None:
    with service.create_training_client(config()) as tc:
        futures = []
        for _ in range(30):  # queued, not awaited, as the guide shows
            futures.append((tc.forward_backward(BATCH), tc.optim_step()))
        losses = [fb.result(timeout=120).loss for fb, _ in futures]
        steps = [opt.result(timeout=120).step for _, opt in futures]
        assert steps == list(range(1, 31)) and tc.step == 30
        assert losses[-1] < 0.5 * losses[0], losses
        assert all(np.isfinite(losses))


def test_ops_complete_in_submission_order(service) -> None:
    with service.create_training_client(config()) as tc:
        order: list[str] = []
        lock = threading.Lock()
        handles = []
        for i in range(4):
            for h in (tc.forward_backward(BATCH), tc.optim_step(), tc.get_info_async()):
                h.add_done_callback(lambda f, tag=f"{i}-{len(handles)}": (lock.acquire(), order.append(tag),
                                                                          lock.release()))
                handles.append(h)
        results = [h.result(timeout=120) for h in handles]
        assert order == [f"{i // 3}-{i}" for i in range(12)]
        infos = results[2::3]
        assert [info.step for info in infos] == [1, 2, 3, 4]  # each info saw exactly the ops before it
        assert [r.step for r in results[1::3]] == [1, 2, 3, 4]


def _in_process_training(tiny_model, steps: int):
    """The same fine-tune written directly against transformers + PEFT + torch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    base.requires_grad_(False)
    torch.manual_seed(1234)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.tensor(PROMPT_IDS)
    for _ in range(steps):
        model.train()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def test_greedy_sample_equals_in_process_generate(service, tiny_model) -> None:
    model = _in_process_training(tiny_model, steps=5)
    prompt = PROMPT_IDS[0][:6]
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                  max_new_tokens=16, do_sample=False, pad_token_id=2, eos_token_id=1)[0, 6:].tolist()
    with service.create_training_client(config()) as tc:
        for _ in range(5):
            tc.forward_backward(BATCH)
            tc.optim_step()
        result = tc.sample([prompt], max_tokens=16, temperature=0)
    sample = result.samples[0]
    assert sample.token_ids == expected[: len(sample.token_ids)]
    assert len(sample.token_ids) == 16 or sample.finish_reason == "stop"


def test_two_sessions_on_one_base_do_not_disturb_each_other(service) -> None:
    with service.create_training_client(config()) as a, service.create_training_client(config()) as b:
        before = b.forward(BATCH).result(timeout=60).loss
        sample_before = b.sample([PROMPT_IDS[1][:5]], max_tokens=8, temperature=0).samples[0].token_ids
        assert a.forward(BATCH).result(timeout=60).loss == pytest.approx(before)  # same seed, same start
        for _ in range(10):
            a.forward_backward(BATCH)
            a.optim_step()
        trained = a.forward(BATCH).result(timeout=60).loss
        assert trained < before * 0.8
        assert b.forward(BATCH).result(timeout=60).loss == pytest.approx(before, rel=1e-6)
        assert b.sample([PROMPT_IDS[1][:5]], max_tokens=8, temperature=0).samples[0].token_ids == sample_before
        assert b.get_info().step == 0 and a.get_info().step == 10


def test_custom_client_loss_gives_the_server_side_gradient(service) -> None:
    sgd = OptimizerConfig(name="sgd", learning_rate=0.5)
    with service.create_training_client(config(optimizer=sgd)) as server_side, \
            service.create_training_client(config(optimizer=sgd)) as client_side:
        labels = torch.tensor(BATCH["labels"])
        mask = torch.zeros_like(labels, dtype=torch.float32)
        mask[:, 1:] = 1.0

        def mean_ce(logprobs: torch.Tensor, batch) -> torch.Tensor:
            return -(logprobs * mask).sum() / mask.sum()

        custom = client_side.forward_backward_custom(BATCH, mean_ce).result(timeout=60)
        builtin = server_side.forward_backward(BATCH).result(timeout=60)
        assert custom.loss == pytest.approx(builtin.loss, rel=1e-5)
        assert custom.num_tokens == builtin.num_tokens == 22
        g_client = client_side.optim_step().result(timeout=60).grad_norm
        g_server = server_side.optim_step().result(timeout=60).grad_norm
        assert g_client == pytest.approx(g_server, rel=1e-4) and g_server > 0
        after_client = client_side.forward(BATCH).result(timeout=60).loss
        after_server = server_side.forward(BATCH).result(timeout=60).loss
        assert after_client == pytest.approx(after_server, rel=1e-5) and after_server < builtin.loss


BAD_BATCHES = [
    ({"input_ids": [[1, 2, 3], [4, 5]]}, "batch.input_ids"),                                   # ragged
    ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}, "batch.attention_mask"),           # mismatched
    ({"input_ids": [[1, 2, 100000]]}, "batch.input_ids"),                                      # out of vocabulary
    ({"input_ids": [[-1, 2, 3]]}, "batch.input_ids"),                                          # negative id
    ({"input_ids": np.zeros((0, 4), dtype=np.int64)}, "batch.input_ids"),                      # empty
    ({"input_ids": [[1] * 300]}, "batch.input_ids"),                                           # longer than the model
    ({"input_ids": [[1, 2, 3]], "labels": [[1, 2]]}, "batch.labels"),                          # labels of wrong shape
    ({"input_ids": [1, 2, 3]}, "batch.input_ids"),                                             # not [batch, seq]
    ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 2, 1]]}, "batch.attention_mask"),        # mask not 0/1
]


@pytest.mark.parametrize("batch,field", BAD_BATCHES)
def test_bad_batches_are_refused_naming_the_field(service, batch, field) -> None:
    with service.create_training_client(config()) as tc:
        before = tc.forward(BATCH).result(timeout=60).loss
        with pytest.raises(ValidationError) as info:
            tc.forward_backward(batch)
        assert info.value.field == field, info.value
        # Nothing was queued or accumulated: the session is as it was.
        assert tc.get_info().step == 0
        with pytest.raises(ConflictError):  # no gradient was accumulated by the refused call
            tc.optim_step().result(timeout=60)
        assert tc.forward(BATCH).result(timeout=60).loss == before


@pytest.mark.parametrize("loss,kwargs,field", [
    ("no_such_loss", {}, "loss.name"),
    ("token_ce", {"bogus": 1}, "loss.kwargs.bogus"),
    ("token_ce", {"label_smoothing": 2.0}, "loss.kwargs.label_smoothing"),
    ("importance_sampling", {}, "batch.advantages"),
])
def test_bad_losses_are_refused(service, loss, kwargs, field) -> None:
    with service.create_training_client(config()) as tc, pytest.raises(ValidationError) as info:
        tc.forward_backward(BATCH, loss, **kwargs)
    assert info.value.field == field


def test_named_losses_and_yaml(service) -> None:
    yaml_cfg = LossConfig.from_yaml("loss:\n  type: token_ce\n  kwargs:\n    label_smoothing: 0.1\n")
    assert yaml_cfg == LossConfig("token_ce", {"label_smoothing": 0.1})
    with service.create_training_client(config(loss=yaml_cfg)) as tc:
        smoothed = tc.forward(BATCH).result(timeout=60).loss
        plain = tc.forward(BATCH, "token_ce").result(timeout=60).loss
        assert smoothed != pytest.approx(plain)
        adv = np.ones((2, 12), dtype=np.float32)
        old = tc.forward(BATCH, return_logprobs=True).result(timeout=60).logprobs
        rl = tc.forward_backward({**BATCH, "advantages": adv, "old_logprobs": old}, "ppo", clip_epsilon=0.2)
        result = rl.result(timeout=60)
        assert result.loss == pytest.approx(-1.0, abs=1e-4)  # ratio 1 everywhere, advantage 1
        assert "clip_fraction" in result.metrics


def test_model_that_does_not_exist_is_not_found(service) -> None:
    with pytest.raises(NotFoundError):
        service.create_training_client(TrainingConfig(model_ref="no-such-model"))


def test_client_side_validation_happens_before_any_call() -> None:
    with pytest.raises(ValidationError) as info:
        LoRAConfig(rank=0)
    assert info.value.field == "lora_config.rank"
    with pytest.raises(ValidationError):
        TrainingConfig(model_ref="")
    with pytest.raises(ValidationError):
        OptimizerConfig(name="lion")
    with pytest.raises(ValidationError):
        TrainingConfig(model_ref="tiny", batch_size=0)


def test_server_validates_config_too(service) -> None:
    from tensafe.api.trainer.v1 import trainer_pb2

    bad = config().to_proto()
    bad.lora_config.target_modules[:] = ["no_such_module"]
    with pytest.raises(ValidationError) as info:
        service._call("trainer", "CreateSession", trainer_pb2.CreateSessionRequest(config=bad))
    assert info.value.field == "config.lora_config.target_modules"
    bad = config().to_proto()
    bad.optimizer.learning_rate = -1
    with pytest.raises(ValidationError) as info:
        service._call("trainer", "CreateSession", trainer_pb2.CreateSessionRequest(config=bad))
    assert info.value.field == "config.optimizer.learning_rate"


def test_timeout_and_cancel(service) -> None:
    with service.create_training_client(config()) as tc:
        queued = [tc.forward_backward(BATCH) for _ in range(20)]
        last = tc.get_info_async()
        assert last.cancel() is True
        with pytest.raises(FutureCancelledError):
            last.result(timeout=5)
        with pytest.raises(FutureTimeoutError):
            queued[-1].result(timeout=0.0001)
        assert all(f.result(timeout=120).loss > 0 for f in queued)
        assert queued[0].cancel() is False  # already ran


def test_sessions_list_get_close_and_tenant_scope(service, trainer_stack) -> None:
    tc = service.create_training_client(config())
    listed = {s["session_id"]: s for s in service.list_training_clients()}
    assert listed[tc.session_id]["state"] == "active"
    again = service.get_training_client(tc.session_id)
    assert again.forward(BATCH).result(timeout=60).loss > 0
    again._router.stop()
    out = trainer_stack.cli("keys", "create", "--tenant", "intruder")
    with trainer_stack.client(api_key=out.stdout.strip().splitlines()[-1]) as other:
        with pytest.raises(NotFoundError):
            other.get_training_client(tc.session_id)
        assert other.list_training_clients() == []
    tc.close()
    assert tc.session_id not in {s["session_id"] for s in service.list_training_clients()}
    assert {s["session_id"]: s["state"] for s in service.list_training_clients(include_closed=True)}[
        tc.session_id] == "closed"
    with pytest.raises(ConflictError):
        service.get_training_client(tc.session_id)


def test_sampling_parameters(service) -> None:
    with service.create_training_client(config()) as tc:
        a = tc.sample(["Once upon a time"], max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7,
                      num_samples=2, return_logprobs=True)
        b = tc.sample(["Once upon a time"], max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7,
                      num_samples=2, return_logprobs=True)
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]  # seeded
        assert len(a.samples) == 2 and all(len(s.logprobs) == len(s.token_ids) for s in a.samples)
        assert all(lp <= 0 for s in a.samples for lp in s.logprobs)
        greedy = tc.sample(["Once upon a time"], max_tokens=12, temperature=0).samples[0]
        assert greedy.completion, greedy  # an empty sample fails here, it does not skip the stop check below
        stop = greedy.completion[len(greedy.completion) // 2:][:2] or greedy.completion[:1]
        cut = tc.sample(["Once upon a time"], max_tokens=12, temperature=0, stop=[stop]).samples[0]
        assert stop not in cut.completion and cut.finish_reason == "stop"
        assert greedy.completion.startswith(cut.completion)
        for bad, field in [({"temperature": -1}, "sampling.temperature"), ({"top_p": 0}, "sampling.top_p"),
                           ({"max_tokens": 0}, "sampling.max_tokens")]:
            with pytest.raises(ValidationError) as info:
                tc.sample(["x"], **{"max_tokens": 4, **bad})
            assert info.value.field == field


def test_noise_cannot_be_asked_for_in_a_session_without_dp(service) -> None:
    with service.create_training_client(config()) as tc:
        with pytest.raises(ValidationError) as bad:
            tc.optim_step(apply_dp_noise=True)
        assert bad.value.field == "apply_dp_noise"


def test_gradient_accumulation_applies_the_mean_every_k_calls(service) -> None:
    adam = OptimizerConfig(name="adam", learning_rate=1e-2)
    with service.create_training_client(config(optimizer=adam, gradient_accumulation_steps=2)) as acc, \
            service.create_training_client(config(optimizer=adam)) as single:
        acc.forward_backward(BATCH)
        first = acc.optim_step().result(timeout=60)
        assert (first.step, first.applied) == (0, False)
        acc.forward_backward(BATCH)
        second = acc.optim_step().result(timeout=60)
        assert (second.step, second.applied) == (1, True)
        single.forward_backward(BATCH)
        one = single.optim_step().result(timeout=60)
        # Two identical micro-batches averaged give the single batch's gradient, hence the same update.
        assert second.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
        assert second.num_tokens == 2 * one.num_tokens
        assert acc.forward(BATCH).result(timeout=60).loss == pytest.approx(
            single.forward(BATCH).result(timeout=60).loss, rel=1e-5)
