"""The unmodified ``tinker`` client (0.38) against ``tensafe up``'s Tinker-compatible API: every op's result
equals the same op through ``tg_tinker`` on a twin session (same model, seed and steps), checkpoints are
encrypted vault artifacts, a DP tenant's models are DP sessions, and every op is in the verified ledger."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from conftest import Stack, free_port, start_stack  # noqa: E402
from tg_tinker.configs import LoRAConfig, OptimizerConfig, TrainingConfig  # noqa: E402

HUB = "meta-llama/Llama-3.2-1B"
SEED = 7
RANK = 4
TARGETS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
# Two datums of different lengths (padding on the TenSafe side), weights 0 on the "prompt" tokens.
DATA = [([1, 5, 9, 14, 20, 33], [5, 9, 14, 20, 33, 2], [0, 0, 1, 1, 1, 1]),
        ([1, 40, 41, 42], [40, 41, 42, 2], [0, 1, 1, 1])]
ADAM = {"learning_rate": 5e-2, "beta1": 0.8, "beta2": 0.9, "eps": 1e-8, "weight_decay": 0.01, "grad_clip_norm": 5.0}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Stack, str, str]]:
    """A stack with the Tinker API on a free port; returns (stack, its URL, a DP tenant's API key)."""
    tmp = tmp_path_factory.mktemp("tinker")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"tenants": {"dp-lab": {"dp": {
        "target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "batch_size": 2, "dataset_size": 200,
        "noise_multiplier": 1.0, "max_steps": 10}}}}))
    port = free_port()
    os.environ["TINKER_TELEMETRY"] = "0"
    stack = start_stack(tmp, {"TENSAFE_MODEL_DIR": str(tiny_model.parent), "TENSAFE_TINKER_PORT": str(port),
                              "TENSAFE_TINKER_MODELS": f"{HUB}={tiny_model.name}",
                              "TENSAFE_TINKER_POLICY_FILE": str(policy)})
    created = stack.cli("keys", "create", "--tenant", "dp-lab")
    assert created.returncode == 0, created.stderr
    assert f"Tinker-compatible API: http://127.0.0.1:{port}" in stack.process.output()
    yield stack, f"http://127.0.0.1:{port}", created.stdout.strip().splitlines()[-1]
    assert stack.process.stop() == 0, stack.process.output()


def service_client(url: str, key: str):
    return tinker.ServiceClient(base_url=url, api_key="tml-" + key)


def datums(data=DATA, **extra) -> list:
    out = []
    for i, (x, y, w) in enumerate(data):
        inputs = {"target_tokens": y, "weights": w, **{k: v[i] for k, v in extra.items()}}
        if extra:
            inputs.pop("weights")
        out.append(types.Datum(model_input=types.ModelInput.from_ints(x), loss_fn_inputs=inputs))
    return out


def tensafe_batch(data=DATA, **extra) -> dict[str, np.ndarray]:
    """The same datums as a TenSafe batch, built by hand: HF labels (logits t-1 predict labels t), one pad."""
    width = max(len(x) for x, _, _ in data) + 1
    rows = len(data)
    batch = {"input_ids": np.zeros((rows, width), np.int64), "attention_mask": np.zeros((rows, width), np.int64),
             "labels": np.full((rows, width), -100, np.int64)}
    floats = {name: np.zeros((rows, width), np.float32) for name in ("weights", *extra)}
    for r, (x, y, w) in enumerate(data):
        batch["input_ids"][r, :len(x)] = x
        batch["attention_mask"][r, :len(x)] = 1
        batch["labels"][r, 1:len(x) + 1] = y
        floats["weights"][r, 1:len(x) + 1] = w
        for name, values in extra.items():
            floats[name][r, 1:len(x) + 1] = values[r]
    if extra:
        floats.pop("weights")
        batch |= {{"logprobs": "old_logprobs"}.get(k, k): v for k, v in floats.items()}
    else:
        batch["weights"] = floats["weights"]
    return batch


def twin_config(model_ref: str) -> TrainingConfig:
    """What the gateway creates for create_lora_training_client(rank=4, seed=7) (all of mlp, attn, unembed)."""
    return TrainingConfig(model_ref=model_ref, seed=SEED,
                          lora_config=LoRAConfig(rank=RANK, alpha=32.0, dropout=0.0, target_modules=TARGETS),
                          optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-12))


def logprobs_of(result) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, np.float32) for o in result.loss_fn_outputs]


def row_logprobs(tg_logprobs: np.ndarray, data=DATA) -> list[np.ndarray]:
    return [np.asarray(tg_logprobs[r, 1:len(x) + 1], np.float32) for r, (x, _, _) in enumerate(data)]


def test_tinker_client_matches_tg_tinker(gateway: tuple[Stack, str, str], tiny_model: Path) -> None:
    stack, url, _ = gateway
    sc = service_client(url, stack.api_key)
    caps = tinker.RestClient(base_url=url, api_key="tml-" + stack.api_key).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [HUB]
    tc = sc.create_lora_training_client(base_model=HUB, rank=RANK, seed=SEED).result()
    info = tc.get_info()
    assert (info.model_data.model_name, info.model_data.tokenizer_id, info.lora_rank) == (HUB, HUB, RANK)

    with stack.client() as tg:
        twin = tg.create_training_client(twin_config(tiny_model.name))
        try:
            # SL step: forward_backward with per-token weights (a weighted SUM), optim_step with AdamParams.
            fb = tc.forward_backward(datums(), "cross_entropy")
            opt = tc.optim_step(types.AdamParams(**ADAM))
            fb_r, opt_r = fb.result(), opt.result()
            tw_fb = twin.forward_backward(tensafe_batch(), "cross_entropy", return_logprobs=True).result()
            tw_opt = twin.optim_step(**ADAM).result()
            assert math.isclose(fb_r.metrics["loss:sum"], tw_fb.metrics["loss:sum"], rel_tol=1e-5)
            for got, want in zip(logprobs_of(fb_r), row_logprobs(tw_fb.logprobs), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            w = np.concatenate([np.asarray(d[2], np.float32) for d in DATA])
            assert math.isclose(fb_r.metrics["loss:sum"], float(-(np.concatenate(logprobs_of(fb_r)) * w).sum()),
                                rel_tol=1e-4)
            elementwise = np.concatenate([o["elementwise_loss"].data for o in fb_r.loss_fn_outputs])
            np.testing.assert_allclose(elementwise, -np.concatenate(logprobs_of(fb_r)) * w, rtol=1e-5, atol=1e-6)
            assert opt_r.metrics["learning_rate:unique"] == ADAM["learning_rate"]
            assert math.isclose(opt_r.metrics["grad_norm:mean"], tw_opt.grad_norm, rel_tol=1e-4)

            # forward after the step: the update (lr, betas, eps, weight decay, clip) was the same on both.
            fwd = tc.forward(datums(), "cross_entropy").result()
            tw_fwd = twin.forward(tensafe_batch(), "cross_entropy", return_logprobs=True).result()
            assert fwd.metrics["loss:sum"] < fb_r.metrics["loss:sum"]
            assert math.isclose(fwd.metrics["loss:sum"], tw_fwd.metrics["loss:sum"], rel_tol=1e-4)

            # An RL loss (importance_sampling: a sum of ratio * advantage), and the other RL losses forward.
            lps = [list(np.asarray(lp) - 0.1) for lp in logprobs_of(fwd)]
            adv = [[0.0, 0.0, 1.0, -1.0, 0.5, 2.0], [0.0, 1.0, 1.0, -0.5]]
            rl = tc.forward_backward(datums(logprobs=lps, advantages=adv), "importance_sampling").result()
            tw_rl = twin.forward_backward(tensafe_batch(logprobs=lps, advantages=adv), "importance_sampling",
                                          reduction="sum").result()
            assert math.isclose(rl.metrics["loss:sum"], tw_rl.metrics["loss:sum"], rel_tol=1e-4)
            for loss_fn, config, kwargs in [
                    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
                     {"reduction": "sum", "clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
                    ("cispo", None, {}), ("dro", {"beta": 0.5}, {"beta": 0.5})]:
                got = tc.forward(datums(logprobs=lps, advantages=adv), loss_fn, config).result()
                want = twin.forward(tensafe_batch(logprobs=lps, advantages=adv), loss_fn, **kwargs).result()
                assert math.isclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rel_tol=1e-4), loss_fn
            tc.optim_step(types.AdamParams(**ADAM)).result()
            twin.optim_step(**ADAM).result()

            # save_state: an encrypted checkpoint in the vault, listed behind its tinker:// path.
            saved = tc.save_state("step-2").result()
            run = saved.path.split("/")[2]
            assert saved.path == f"tinker://{run}/weights/step-2"
            rest = tinker.RestClient(base_url=url, api_key="tml-" + stack.api_key)
            listed = rest.list_checkpoints(run).result()
            assert [c.tinker_path for c in listed.checkpoints] == [saved.path]
            (art,) = [a for a in tg.list_artifacts(session_id=run) if a.name == "step-2"]
            assert art.encryption.algorithm and art.size_bytes > 0 and art.lineage.attested

            # Sampling: greedy tokens equal the inference service's through tg_tinker on the same artifact.
            sampler = tc.save_weights_and_get_sampling_client().result()
            prompt = [1, 5, 9, 14]
            got = sampler.sample(types.ModelInput.from_ints(prompt), 2,
                                 types.SamplingParams(max_tokens=6, temperature=0.0)).result()
            tw_art = twin.save_state(include_optimizer=False)
            with tg.create_sampling_client(tw_art.artifact_id) as tw_sampler:
                want = tw_sampler.sample([prompt], max_tokens=6, temperature=0.0)
            assert [s.tokens for s in got.sequences] == [want.samples[0].token_ids] * 2

            # compute_logprobs: the prompt's log-probabilities under the sampler's weights.
            lp = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
            tw_lp = twin.forward({"input_ids": np.array([prompt]), "attention_mask": np.ones((1, 4), np.int64),
                                  "labels": np.array([[-100, *prompt[1:]]])}, "token_ce", return_logprobs=True).result()
            assert lp[0] is None
            np.testing.assert_allclose(lp[1:], tw_lp.logprobs[0, 1:], rtol=1e-4, atol=1e-5)

            # load_state to resume: a new model from the checkpoint (with its optimizer) picks up where it was.
            resumed = sc.create_training_client_from_state_with_optimizer(saved.path).result()
            again = resumed.forward(datums(), "cross_entropy").result()
            before = tc.forward(datums(), "cross_entropy").result()
            assert math.isclose(again.metrics["loss:sum"], before.metrics["loss:sum"], rel_tol=1e-5)
            step_a = resumed.forward_backward(datums(), "cross_entropy")
            resumed.optim_step(types.AdamParams(**ADAM)).result()
            tc.forward_backward(datums(), "cross_entropy").result()
            tc.optim_step(types.AdamParams(**ADAM)).result()
            step_a.result()
            assert math.isclose(resumed.forward(datums(), "cross_entropy").result().metrics["loss:sum"],
                                tc.forward(datums(), "cross_entropy").result().metrics["loss:sum"], rel_tol=1e-4)

            # Checkpoint deletion through the REST API removes the artifact.
            rest.delete_checkpoint(run, "weights/step-2").result()
            assert not [a for a in tg.list_artifacts(session_id=run) if a.name == "step-2"]
        finally:
            twin.close()
    sc.close("success").result()


def test_refusals_are_client_errors(gateway: tuple[Stack, str, str]) -> None:
    stack, url, dp_key = gateway
    with pytest.raises(tinker.AuthenticationError):
        service_client(url, "ts-not-a-key").create_lora_training_client(base_model=HUB, rank=RANK).result()
    sc = service_client(url, stack.api_key)
    tc = sc.create_lora_training_client(base_model=HUB, rank=RANK).result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn"):
        tc.forward(datums(), "gspo").result()
    # Another tenant sees none of this tenant's models or checkpoints.
    other = service_client(url, dp_key)
    with pytest.raises(tinker.NotFoundError):
        other.create_training_client_from_state(f"tinker://{tc.get_info().model_id}/weights/x").result()
    sc.close("success").result()
    other.close("success").result()


def test_dp_tenant_models_are_dp_sessions(gateway: tuple[Stack, str, str]) -> None:
    """The DP tenant's policy makes every model DP: steps are noised and accounted (epsilon reported), an
    implausible DP batch is refused as a RequestFailedError, and every op is in the verified ledger."""
    stack, url, dp_key = gateway
    sc = service_client(url, dp_key)
    tc = sc.create_lora_training_client(base_model=HUB, rank=RANK).result()
    tc.forward_backward(datums(), "cross_entropy").result()
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert step.metrics["dp_epsilon:unique"] > 0
    with pytest.raises(tinker.RequestFailedError, match="DP_BATCH|Poisson"):
        tc.forward_backward(datums(DATA * 40), "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    run = tc.save_state("dp-1").result().path.split("/")[2]
    vkey = stack.cli("ledger", "vkey").stdout.strip()
    with stack.client(api_key=dp_key) as tg:
        twin = tg.get_training_client(run)
        info = twin.get_info()
        twin._router.stop()  # only looked at: the session stays the gateway's
        assert info.dp_enabled and info.budget_id and info.total_epsilon > 0
        actions = {r.action for r in tg.get_audit_logs(resource_id=run, vkey=vkey)}
        assert {"trainer.ForwardBackward", "trainer.OptimStep", "trainer.SaveState"} <= actions, actions
        edge = {r.action for r in tg.get_audit_logs(service="tinker", vkey=vkey)}
        assert {"tinker.CreateModel", "tinker.ForwardBackward", "tinker.OptimStep"} <= edge, edge
    sc.close("success").result()
