"""The inference service against a real `tensafe up`: adapters trained and saved through the trainer, loaded
from the vault, and streamed back; on the tiny Llama model."""

from __future__ import annotations

import pytest

from conftest import eventually
from tg_tinker import (
    ConflictError,
    LoRAConfig,
    NotFoundError,
    OptimizerConfig,
    TrainingConfig,
    ValidationError,
)
from tg_tinker.sampling import SamplingClient

PROMPT_IDS = [[0, 45, 120, 77, 200, 31, 9, 150, 66, 88, 12, 5],
              [0, 99, 14, 230, 61, 7, 180, 42, 3, 111, 19, 250]]
PROMPTS = ["Once upon a time", "The clinic opens at"]


def _config(seed: int) -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", batch_size=2, seed=seed,
                          lora_config=LoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          optimizer=OptimizerConfig(name="adamw", learning_rate=2e-2))


@pytest.fixture(scope="module")
def service(trainer_stack):
    with trainer_stack.client(retry_count=2) as client:
        yield client


@pytest.fixture(scope="module")
def trained(service):
    """Two adapters trained differently on the same base; for each: its artifact and the session's greedy
    samples (text prompts, with and without a stop string, and token-id prompts) taken just before saving."""
    out = []
    for seed, rows in ((1, PROMPT_IDS), (2, PROMPT_IDS[::-1])):
        with service.create_training_client(_config(seed)) as tc:
            batch = {"input_ids": rows, "attention_mask": [[1] * 12] * 2, "labels": rows}
            for _ in range(4):
                tc.forward_backward(batch)
                tc.optim_step()
            greedy = tc.sample(PROMPTS, max_tokens=24, temperature=0, return_logprobs=True)
            ids = tc.sample([PROMPT_IDS[0][:6]], max_tokens=16, temperature=0)
            pair = tc.sample([PROMPT_IDS[0][:6], PROMPT_IDS[1][:6]], max_tokens=8, temperature=0)
            stop = next(s.completion[len(s.completion) // 2:][:2] for s in greedy.samples if len(s.completion) > 4)
            stopped = tc.sample(PROMPTS, max_tokens=24, temperature=0, stop=[stop])
            ckpt = tc.save_state(include_optimizer=False)
        out.append({"artifact": ckpt.artifact_id, "greedy": greedy, "ids": ids, "stop": stop, "stopped": stopped,
                    "pair": pair})
    return out


@pytest.fixture(scope="module")
def sc(service, trained):
    return service.create_sampling_client(artifact_id=trained[0]["artifact"])


def _other_tenant(trainer_stack, name: str):
    out = trainer_stack.cli("keys", "create", "--tenant", name)
    return trainer_stack.client(api_key=out.stdout.strip().splitlines()[-1])


def test_greedy_output_equals_the_training_sessions_sample(sc, trained) -> None:
    expected = trained[0]["greedy"].samples
    got = sc.sample(PROMPTS, max_tokens=24, temperature=0, return_logprobs=True).samples
    assert [(s.completion, s.token_ids, s.finish_reason) for s in got] == \
        [(s.completion, s.token_ids, s.finish_reason) for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-5)
    by_ids = sc.sample([PROMPT_IDS[0][:6]], max_tokens=16, temperature=0).samples[0]
    assert by_ids.token_ids == trained[0]["ids"].samples[0].token_ids


def test_generation_with_an_adapter_is_in_the_ledger(trainer_stack, service, sc) -> None:
    sc.sample(PROMPTS[:1], max_tokens=2, temperature=0)
    vkey = trainer_stack.cli("ledger", "vkey").stdout.strip()
    found = eventually(lambda: [e for e in service.get_audit_logs(service="inference", vkey=vkey)  # via the outbox
                                if e.action == "inference.Generate" and e.resource_id == sc.adapter_id],
                       20, interval=0.2, message="the inference.Generate entry")
    assert found[-1].outcome == "success"


def test_streaming_sends_increments_that_add_up_to_the_sample(sc, trained) -> None:
    chunks = list(sc.stream(PROMPTS, max_tokens=24, temperature=0))
    for index, expected in enumerate(trained[0]["greedy"].samples):
        mine = [c for c in chunks if c.prompt_index == index]
        assert len(mine) >= 2  # streamed, not one message at the end
        assert all(c.finish_reason is None for c in mine[:-1]) and mine[-1].finish_reason == expected.finish_reason
        assert "".join(c.text for c in mine) == expected.completion
        assert [t for c in mine for t in c.token_ids] == expected.token_ids


def test_stop_strings_cut_the_stream_as_the_trainer_cuts_the_sample(sc, trained) -> None:
    stop = trained[0]["stop"]
    chunks = list(sc.stream(PROMPTS, max_tokens=24, temperature=0, stop=[stop]))
    for index, expected in enumerate(trained[0]["stopped"].samples):
        mine = [c for c in chunks if c.prompt_index == index]
        text = "".join(c.text for c in mine)
        assert text == expected.completion and stop not in text
        assert [t for c in mine for t in c.token_ids] == expected.token_ids
        assert mine[-1].finish_reason == expected.finish_reason
    assert any(s.finish_reason == "stop" for s in trained[0]["stopped"].samples)


def test_max_tokens_ends_with_length(sc) -> None:
    for n in (1, 5):
        samples = sc.sample(PROMPTS, max_tokens=n, temperature=0).samples
        for s in samples:
            assert (len(s.token_ids) == n and s.finish_reason == "length") or s.finish_reason == "stop"
        assert any(s.finish_reason == "length" for s in samples)


def test_several_prompts_samples_and_seeds(sc) -> None:
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7, num_samples=3, return_logprobs=True)
    a = sc.sample(PROMPTS, **kw).samples
    b = sc.sample(PROMPTS, **kw).samples
    assert [(s.prompt_index, s.sample_index) for s in a] == [(p, i) for p in range(2) for i in range(3)]
    assert [s.token_ids for s in a] == [s.token_ids for s in b]  # seeded
    assert len({tuple(s.token_ids) for s in a}) > 1
    assert all(len(s.logprobs) == len(s.token_ids) and all(lp <= 0 for lp in s.logprobs) for s in a)


def test_several_adapters_on_one_base(service, sc, trained) -> None:
    second = service.create_sampling_client(artifact_id=trained[1]["artifact"])
    try:
        assert second.adapter_id != sc.adapter_id and second.model_ref == sc.model_ref == "tiny"
        for _ in range(2):  # alternating: each adapter gives its own session's output every time
            for client, record in ((sc, trained[0]), (second, trained[1])):
                got = client.sample(PROMPTS, max_tokens=24, temperature=0).samples
                assert [s.token_ids for s in got] == [s.token_ids for s in record["greedy"].samples]
        assert trained[0]["greedy"].samples[0].token_ids != trained[1]["greedy"].samples[0].token_ids
        loaded = service._call("inference", "ListAdapters", _list_request()).adapters
        assert {a.adapter_id for a in loaded} >= {sc.adapter_id, second.adapter_id}
        again = service.create_sampling_client(artifact_id=trained[1]["artifact"])
        assert again.adapter_id == second.adapter_id  # the same artifact is served once
        base = service.create_sampling_client(model_ref="tiny").sample(PROMPTS[:1], max_tokens=24, temperature=0)
        assert base.samples[0].token_ids not in (trained[0]["greedy"].samples[0].token_ids,
                                                 trained[1]["greedy"].samples[0].token_ids)
    finally:
        second.unload()
    with pytest.raises(NotFoundError):
        second.sample(PROMPTS, max_tokens=2)
    assert sc.sample(PROMPTS, max_tokens=24, temperature=0).samples[0].token_ids == \
        trained[0]["greedy"].samples[0].token_ids


def _list_request():
    from tensafe.api.inference.v1 import inference_pb2

    return inference_pb2.ListAdaptersRequest()


def test_another_tenant_can_neither_load_nor_use_the_adapter(trainer_stack, sc, trained) -> None:
    with _other_tenant(trainer_stack, "inference-intruder") as other:
        with pytest.raises(NotFoundError):
            other.create_sampling_client(artifact_id=trained[0]["artifact"])
        with pytest.raises(NotFoundError):
            SamplingClient(other._transport, adapter_id=sc.adapter_id).sample(PROMPTS, max_tokens=4, temperature=0)
        with pytest.raises(NotFoundError):
            SamplingClient(other._transport, adapter_id=sc.adapter_id).unload()
        assert other._call("inference", "ListAdapters", _list_request()).adapters == []
    assert sc.sample(PROMPTS[:1], max_tokens=2, temperature=0).samples  # still served to its owner


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.5}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"max_tokens": 10_000}, "sampling.max_tokens"),
    ({"num_samples": 65}, "sampling.num_samples"),
])
def test_bad_parameters_are_invalid_argument_naming_the_field(sc, kwargs, field) -> None:
    with pytest.raises(ValidationError) as info:
        sc.sample(PROMPTS, **{"max_tokens": 4, **kwargs})
    assert info.value.grpc_code == "INVALID_ARGUMENT" and info.value.field == field


def test_bad_requests(service, sc) -> None:
    with pytest.raises(ValidationError) as info:
        sc.sample([[0, 10_000]], max_tokens=2)
    assert info.value.field == "prompt_token_ids[0]"
    note = service.artifacts.put(b"not an adapter", name="note")
    with pytest.raises(ValidationError) as info:
        service.create_sampling_client(artifact_id=note.artifact_id)
    assert info.value.field == "artifact_id"
    with pytest.raises(NotFoundError):
        service.create_sampling_client(model_ref="no-such-model").sample(PROMPTS, max_tokens=2)
    with pytest.raises(ValidationError) as info:
        service.create_sampling_client(artifact_id="anything", enable_he_lora=True)
    assert info.value.field == "key_bundle"


def test_vllm_backend_without_vllm_says_how_to_install_it(service, trained) -> None:
    with pytest.raises(ConflictError) as info:
        service.create_sampling_client(artifact_id=trained[0]["artifact"], backend="vllm")
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    assert "tensafe[vllm]" in info.value.message and "docs/vllm.md" in info.value.message


def test_cancelling_a_stream_stops_generation(sc) -> None:
    # 8,000 tokens, just within TENSAFE_MAX_SAMPLE_TOKENS (8192): a minute or more of work. Were it not stopped,
    # the call after it (same base model, one job at a time) could not finish within its deadline.
    prompts = [PROMPTS[0]] * 2
    stream = sc.stream(prompts, max_tokens=200, temperature=1.0, num_samples=20)
    first = next(stream)
    assert first.prompt_index == 0 and first.finish_reason is None
    stream.cancel()
    with pytest.raises(StopIteration):
        next(stream)
    quick = list(sc.stream(PROMPTS[:1], max_tokens=4, temperature=0, timeout=60))
    assert quick[-1].finish_reason in ("length", "stop")


def test_streaming_example_runs_against_tensafe_up(trainer_stack) -> None:
    import subprocess
    import sys

    from conftest import REPO

    env = dict(trainer_stack.env, TS_API_KEY=trainer_stack.api_key, TS_BASE_URL=trainer_stack.target)
    out = subprocess.run([sys.executable, "examples/serving/stream_generation.py", "--model", "tiny", "--steps", "2",
                          "--max-tokens", "6", "Once upon a time"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "trained 2 steps" in out.stdout and "[0] Once upon a time" in out.stdout
    assert "<length>" in out.stdout or "<stop>" in out.stdout


def test_two_plane_he_lora_greedy_equals_the_plaintext_adapter(service, trained, tiny_model) -> None:
    from tg_tinker.he import HEKeyManager

    bundle = HEKeyManager(tenant_id="default").generate_key_bundle(key_id="two-plane-test")
    he_sc = service.create_sampling_client(artifact_id=trained[0]["artifact"], enable_he_lora=True, key_bundle=bundle,
                                           base_model_ref=str(tiny_model))
    try:
        assert len(he_sc._two_plane.layers) == 4  # q_proj and v_proj of both layers, all under HE
        chunks = list(he_sc.stream(PROMPTS[:1], max_tokens=16, temperature=0))
        expected = trained[0]["greedy"].samples[0].token_ids[:16]
        assert [t for c in chunks for t in c.token_ids] == expected
        assert len(chunks) >= 2 and chunks[-1].finish_reason in ("length", "stop")
        inference = he_sc._two_plane.runtime.inference
        stats = inference.last_stats  # the he service computed the last delta
        assert stats.rpcs == 2 and stats.counts["plaintext_multiplies"] > 0 and stats.counts["rotations"] == 0
        # q_proj and v_proj of a block in one call per round: 2 blocks x 2 rounds per forward pass, the
        # prompt's tokens in one pass. Sequences of one prompt length generate together, same tokens.
        assert he_sc._two_plane.groups["model.layers.0.self_attn.q_proj"] == ("model.layers.0.self_attn.q_proj",
                                                                             "model.layers.0.self_attn.v_proj")
        before = inference.total_stats.rpcs
        prompts = [PROMPT_IDS[0][:6], PROMPT_IDS[1][:6]]
        chunks = list(he_sc.stream(prompts, max_tokens=8, temperature=0))
        got = [[t for c in chunks if c.prompt_index == i for t in c.token_ids] for i in range(2)]
        assert got == [s.token_ids[:8] for s in trained[0]["pair"].samples]
        assert inference.total_stats.rpcs - before == 4 * max(map(len, got))  # one pass per token, both sequences
        with pytest.raises(ValidationError) as info:
            he_sc.sample(PROMPTS[:1], max_tokens=4, top_p=1.5)
        assert info.value.field == "sampling.top_p"
    finally:
        he_sc.unload()
