"""The OpenAI-compatible API (tensafe.openai) with the official `openai` client, against a real `tensafe up`.

One stack with two tiny Llama models (``tiny`` with a chat template, ``plain`` without) and an adapter trained
through the trainer; every answer is compared with the gRPC path (tg_tinker's SamplingClient) for the same
request: the same text, token ids and log-probabilities.

(No ``__init__.py`` in this folder: a package named ``openai`` here would shadow the client.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from conftest import REPO, eventually, free_port, spawn, start_stack, tensafe_cmd
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

PROMPTS = ["Once upon a time", "The clinic opens at"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "When does the clinic open?"}]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("openai-models")
    shutil.copytree(tiny_model, root / "plain")
    shutil.copytree(tiny_model, root / "tiny")
    tok = AutoTokenizer.from_pretrained(root / "tiny")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "tiny")
    return root


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, models: Path):
    port = free_port()
    stack = start_stack(tmp_path_factory.mktemp("openai"), {"TENSAFE_MODEL_DIR": str(models),
                                                            "TENSAFE_OPENAI_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        assert f"OpenAI-compatible API: {url}" in eventually(lambda: stack.process.output(), 30,
                                                             message="the stack's output")
        eventually(lambda: httpx.get(url + "/models").status_code == 401, 30, ignore=(httpx.HTTPError,),
                   message="the OpenAI-compatible API serving")
        yield stack, url
    finally:
        assert stack.process.stop() == 0, stack.process.output()


@pytest.fixture(scope="module")
def grpc_client(api):
    with api[0].client(retry_count=2) as client:
        yield client


@pytest.fixture(scope="module")
def adapter(grpc_client):
    """An adapter of tenant `default`, trained a little, loaded: its gRPC SamplingClient."""
    config = TrainingConfig(model_ref="tiny", batch_size=2, seed=1,
                            lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                            optimizer=OptimizerConfig(name="adamw", learning_rate=2e-2))
    rows = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]
    with grpc_client.create_training_client(config) as tc:
        for _ in range(2):
            tc.forward_backward({"input_ids": rows, "attention_mask": [[1] * 8] * 2, "labels": rows})
            tc.optim_step()
        artifact = tc.save_state(include_optimizer=False).artifact_id
    return grpc_client.create_sampling_client(artifact_id=artifact)


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[1], api_key=api[0].api_key, max_retries=0)


@pytest.fixture(scope="module")
def other(api) -> openai.OpenAI:
    out = api[0].cli("keys", "create", "--tenant", "other-openai")
    return openai.OpenAI(base_url=api[1], api_key=out.stdout.strip().splitlines()[-1], max_retries=0)


def test_the_client_is_the_official_one_not_our_package() -> None:
    assert "site-packages" in (openai.__file__ or "") and hasattr(openai, "OpenAI")
    import tensafe.openai

    assert Path(tensafe.openai.__file__).parent.name == "openai" and tensafe.openai.NAME == "openai"


def test_models_are_the_tenants_adapters_and_the_base_models(client, other, adapter) -> None:
    mine = {m.id: m for m in client.models.list()}
    assert {adapter.adapter_id, "tiny", "plain"} <= set(mine)
    assert mine[adapter.adapter_id].owned_by == "default"
    theirs = {m.id for m in other.models.list()}
    assert adapter.adapter_id not in theirs and {"tiny", "plain"} <= theirs
    assert client.models.retrieve(adapter.adapter_id).id == adapter.adapter_id
    assert client.models.retrieve("plain").owned_by == "tensafe"
    for c, model in ((other, adapter.adapter_id), (client, "nope")):
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve(model)


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_greedy_completion_equals_the_grpc_path(client, adapter, models) -> None:
    expected = adapter.sample(PROMPTS, max_tokens=24, temperature=0, return_logprobs=True).samples
    got = client.completions.create(model=adapter.adapter_id, prompt=PROMPTS, max_tokens=24, temperature=0,
                                    logprobs=0, extra_body={"return_token_ids": True})
    assert got.object == "text_completion" and got.model == adapter.adapter_id
    assert [c.index for c in got.choices] == [0, 1]
    for choice, want in zip(got.choices, expected, strict=True):
        assert (choice.text, _ids(choice), choice.finish_reason) == (want.completion, want.token_ids,
                                                                    want.finish_reason)
        assert choice.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
        assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.tokens) == len(want.token_ids)
    tok = AutoTokenizer.from_pretrained(models / "tiny")
    assert got.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in PROMPTS)
    assert got.usage.completion_tokens == sum(len(s.token_ids) for s in expected)
    # Token-id prompts too: the same as the gRPC path with token ids.
    ids = tok(PROMPTS[0]).input_ids
    by_ids = client.completions.create(model=adapter.adapter_id, prompt=ids, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert _ids(by_ids.choices[0]) == adapter.sample([ids], max_tokens=8, temperature=0).samples[0].token_ids


def test_streamed_completion_adds_up_to_the_whole(client, adapter) -> None:
    whole = client.completions.create(model=adapter.adapter_id, prompt=PROMPTS, max_tokens=24, temperature=0)
    events = list(client.completions.create(model=adapter.adapter_id, prompt=PROMPTS, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        mine = [e.choices[0] for e in events if e.choices and e.choices[0].index == choice.index]
        assert len(mine) >= 2  # streamed, not one message at the end
        assert "".join(c.text for c in mine) == choice.text
        assert all(c.finish_reason is None for c in mine[:-1]) and mine[-1].finish_reason == choice.finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_uses_the_models_chat_template(client, adapter, models) -> None:
    tok = AutoTokenizer.from_pretrained(models / "tiny")
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    expected = adapter.sample([prompt], max_tokens=16, temperature=0, return_logprobs=True).samples[0]
    got = client.chat.completions.create(model=adapter.adapter_id, messages=CHAT, max_tokens=16, temperature=0,
                                         logprobs=True, extra_body={"return_token_ids": True})
    choice = got.choices[0]
    assert got.object == "chat.completion" and choice.message.role == "assistant"
    assert (choice.message.content, _ids(choice), choice.finish_reason) == (expected.completion, expected.token_ids,
                                                                           expected.finish_reason)
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-5)
    assert got.usage.prompt_tokens == len(prompt)
    streamed = list(client.chat.completions.create(model=adapter.adapter_id, messages=CHAT, max_tokens=16,
                                                   temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in streamed) == choice.message.content
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason
    # The base model alone, by name.
    base = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert _ids(base.choices[0]) == grpc_base_ids(adapter, prompt)


def grpc_base_ids(adapter, prompt: list[int]) -> list[int]:
    from tg_tinker.sampling import SamplingClient

    base = SamplingClient(adapter._transport, model_ref="tiny")
    return base.sample([prompt], max_tokens=16, temperature=0).samples[0].token_ids


def test_n_samples_with_a_seed(client, adapter) -> None:
    kw = dict(model=adapter.adapter_id, prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_p=0.9, n=3, seed=7,
              extra_body={"return_token_ids": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [_ids(c) for c in a.choices] == [_ids(c) for c in b.choices]  # seeded
    assert len({tuple(_ids(c)) for c in a.choices}) > 1
    chat = client.chat.completions.create(model=adapter.adapter_id, messages=CHAT, max_tokens=8, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_strings_cut_as_on_the_grpc_path(client, adapter) -> None:
    greedy = client.completions.create(model=adapter.adapter_id, prompt=PROMPTS, max_tokens=24, temperature=0)
    text = next(c.text for c in greedy.choices if len(c.text) > 4)
    stop = text[len(text) // 2:][:2]
    got = client.completions.create(model=adapter.adapter_id, prompt=PROMPTS, max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"return_token_ids": True})
    expected = adapter.sample(PROMPTS, max_tokens=24, temperature=0, stop=[stop]).samples
    assert [(c.text, _ids(c), c.finish_reason) for c in got.choices] == \
        [(s.completion, s.token_ids, s.finish_reason) for s in expected]
    assert any(c.finish_reason == "stop" for c in got.choices) and all(stop not in c.text for c in got.choices)


def test_another_tenants_adapter_is_not_found(other, adapter) -> None:
    for call in (lambda: other.completions.create(model=adapter.adapter_id, prompt="Hi", max_tokens=2),
                 lambda: other.chat.completions.create(model=adapter.adapter_id, messages=CHAT, max_tokens=2),
                 lambda: other.completions.create(model=adapter.adapter_id, prompt="Hi", max_tokens=2, stream=True)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.status_code == 404 and err.value.code == "model_not_found" and err.value.param == "model"


BAD_COMPLETIONS = [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 255}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ["x" * 300]}, "stop[0]"), ({"seed": -1}, "seed"),
    ({"logprobs": 3}, "logprobs"), ({"echo": True}, "echo"), ({"prompt": ["x"] * 17}, "prompt"),
    ({"prompt": "x" * 70000}, "prompt"), ({"extra_body": {"foo": 1}}, "foo"), ({"model": "../etc"}, "model"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD_COMPLETIONS)
def test_bad_completion_parameters_are_400_naming_the_field(client, adapter, kwargs, param) -> None:
    args = {"model": adapter.adapter_id, "prompt": PROMPTS[0], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.status_code == 400 and err.value.param == param, err.value.body
    assert set(err.value.body) == {"message", "type", "param", "code"}  # OpenAI's error shape
    assert err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "plain"}, "messages"), ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
])
def test_bad_chat_parameters_are_400_naming_the_field(client, adapter, kwargs, param) -> None:
    args = {"model": adapter.adapter_id, "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == 400 and err.value.param == param, err.value.body


def test_the_api_key_is_the_bearer_token(api) -> None:
    for key in ("", "not-a-key", "tsk_forged.abc"):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=api[1], api_key=key or "x", max_retries=0).models.list()
        assert err.value.status_code == 401
    assert httpx.get(api[1] + "/models").json()["error"]["code"] == "api_key_missing"


def test_tensafe_serve_openai_alone_calls_the_services_at_their_endpoints(api, tmp_path, adapter) -> None:
    stack = api[0]
    args = tensafe_cmd("serve", "openai", "--data-dir", str(stack.data_dir))
    port = free_port()
    env = {**stack.env, "TENSAFE_INFERENCE_ENDPOINT": stack.target, "TENSAFE_LEDGER_ENDPOINT": stack.target}
    proc = spawn([*args, "--port", str(port)], env, tmp_path / "serve-openai.log")
    try:
        url = f"http://127.0.0.1:{port}/v1"
        eventually(lambda: f"tensafe openai serving on {url}" in proc.output(), 30, message="the start line")
        alone = openai.OpenAI(base_url=url, api_key=stack.api_key, max_retries=0)
        assert adapter.adapter_id in {m.id for m in alone.models.list()}
    finally:
        assert proc.stop() == 0, proc.output()


def test_leaving_a_stream_early_cancels_its_generation(api, client, grpc_client) -> None:
    # 16 x 240 tokens take seconds on the tiny model; the client leaves after the first event.
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPTS[0], max_tokens=240, n=16,
                                                      seed=1, stream=True)
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    vkey = api[0].cli("ledger", "vkey").stdout.strip()
    (entry,) = eventually(lambda: [e for e in grpc_client.get_audit_logs(service="openai", vkey=vkey)
                                   if e.request_id == raw.headers["x-request-id"]], 30, interval=0.2,
                          message="the audit entry of the abandoned stream")
    assert entry.details["code"] == "CANCELLED" and int(entry.details["completion_tokens"]) < 16 * 240


def test_a_huge_body_and_unknown_paths_are_answered_in_openais_shape(api) -> None:
    headers = {"authorization": f"Bearer {api[0].api_key}", "content-type": "application/json"}
    big = httpx.post(api[1] + "/completions", headers=headers, content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    for method, path in (("GET", "/nothing"), ("DELETE", "/models")):
        reply = httpx.request(method, api[1] + path, headers=headers)
        assert reply.status_code in (404, 405) and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    not_json = httpx.post(api[1] + "/completions", headers=headers, content=b"{nope")
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"


def test_every_call_is_in_the_ledger(api, client, other, adapter, grpc_client) -> None:
    reply = client.completions.with_raw_response.create(model=adapter.adapter_id, prompt="Hi", max_tokens=2)
    rid = reply.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=adapter.adapter_id, prompt="Hi", max_tokens=2)
    vkey = api[0].cli("ledger", "vkey").stdout.strip()

    def entries():
        return [e for e in grpc_client.get_audit_logs(service="openai", vkey=vkey)
                if e.action == "openai.CreateCompletion" and e.request_id == rid]
    mine = eventually(entries, 20, interval=0.2, message="the openai.CreateCompletion entry")
    assert mine[0].outcome == "success" and mine[0].resource_id == adapter.adapter_id
    # The same request id on the inference service's entry: one call, followed across both.
    eventually(lambda: [e for e in grpc_client.get_audit_logs(service="inference", vkey=vkey)
                        if e.action == "inference.Generate" and e.request_id == rid], 20, interval=0.2,
               message="the inference.Generate entry of the same request")


DOC_MODEL = "smollm2-135m-instruct"


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "docs" / "openai.md").read_text(), re.S)


def test_the_documented_curl_and_openai_snippets_work(api) -> None:
    env = {**os.environ, "OPENAI_BASE_URL": api[1], "OPENAI_API_KEY": api[0].api_key}
    (curl,) = [b for b in _doc_blocks("bash") if "curl" in b]
    assert DOC_MODEL in curl
    script = "\n".join(ln for ln in curl.splitlines() if not ln.startswith("export ")).replace(DOC_MODEL, "tiny")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    decoder, text, replies = json.JSONDecoder(), out.stdout.strip(), []
    while text:
        reply, end = decoder.raw_decode(text)
        replies.append(reply)
        text = text[end:].strip()
    assert [r["object"] for r in replies] == ["list", "chat.completion"], replies
    assert "tiny" in {m["id"] for m in replies[0]["data"]} and replies[1]["choices"][0]["message"]["role"]
    (snippet,) = _doc_blocks("python")
    out = subprocess.run([sys.executable, "-c", snippet.replace(DOC_MODEL, "tiny")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'tiny'" in out.stdout.splitlines()[0]
