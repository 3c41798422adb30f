"""The OpenAI-compatible API's parts without a server: the bounded request models and the parameters their
errors name, gRPC field names as OpenAI parameters, the inference service's chat rendering, the model listing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tensafe.common.models import available_models
from tensafe.inference.generation import render_chats
from tensafe.openai.app import validation_error
from tensafe.openai.schemas import ChatCompletionRequest, CompletionRequest
from tensafe.openai.service import openai_param
from tensafe.runtime.errors import InvalidArgument


def _param(cls, body: dict) -> str | None:
    with pytest.raises(ValidationError) as err:
        cls.model_validate(body)
    return validation_error(err.value).param


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "x", "stop": ["", "b"]}, "stop[0]"), ({"prompt": [[1, 2], [-1]]}, "prompt[1][0]"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "presence_penalty": 1}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None), ({}, "prompt"),
    ({"prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"), ({"prompt": "x", "tools": []}, "tools"),
])
def test_completion_bounds_name_the_parameter(body, param) -> None:
    assert _param(CompletionRequest, {"model": "m", **body}) == param


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x" * 70000}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 60000}] * 5}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_chat_bounds_name_the_parameter(body, param) -> None:
    assert _param(ChatCompletionRequest, {"model": "m", **body}) == param


def test_requests_keep_what_was_given() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "stop": "\n"})
    assert req.token_prompts() == [[1, 2], [3]] and req.text_prompts() == [] and req.stops == ["\n"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [5, 6]}).token_prompts() == [[5, 6]]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert (chat.messages[0].template_role, chat.messages[0].text, chat.tokens_wanted) == ("system", "ab", 128)


@pytest.mark.parametrize(("field", "chat", "param"), [
    ("sampling.num_samples", False, "n"), ("sampling.stop[1]", False, "stop"), ("adapter_id", False, "model"),
    ("sampling.max_tokens", True, "max_completion_tokens"), ("chats[0].messages[2].role", True, "messages[2].role"),
    ("chats", True, "messages"), ("prompt_token_ids[0]", False, "prompt"), (None, False, None),
])
def test_grpc_fields_as_openai_parameters(field, chat, param) -> None:
    assert openai_param(field, chat) == param


class _Tokenizer:
    def __init__(self, template: str | None, fail: bool = False) -> None:
        self.chat_template = template
        self.fail = fail

    def apply_chat_template(self, messages, **kw):
        if self.fail:
            from jinja2 import TemplateError

            raise TemplateError("System role not supported")
        return {"input_ids": [len(m["content"]) for m in messages]}


def test_chats_are_rendered_by_the_template_or_refused_naming_the_field() -> None:
    assert render_chats(_Tokenizer("t"), [[("system", "ab"), ("user", "abc")]]) == [[2, 3]]
    for tok, chats, field in ((_Tokenizer(None), [[("user", "x")]], "chats"),
                              (_Tokenizer("t"), [[("user", "x"), ("tool", "y")]], "chats[0].messages[1].role"),
                              (_Tokenizer("t"), [[("user", "x")], []], "chats[1].messages"),
                              (_Tokenizer("t", fail=True), [[("system", "x")]], "chats[0]")):
        with pytest.raises(InvalidArgument) as err:
            render_chats(tok, chats)
        assert err.value.field == field


def test_available_models_are_names_of_models_only(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "good").mkdir(parents=True)
    (models / "good" / "config.json").write_text("{}")
    (models / "good" / "model.safetensors").write_bytes(b"")
    (models / "empty").mkdir()
    (models / "one-gguf").mkdir()
    (models / "one-gguf" / "w.gguf").write_bytes(b"")
    (models / "notes.txt").write_text("x")
    (models / ".hidden").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "m.gguf").write_bytes(b"")
    names = available_models(models, {"registered": elsewhere, "missing": tmp_path / "nothing"})
    assert names == ["good", "one-gguf", "registered"]
    assert available_models(None) == [] and available_models(tmp_path / "absent") == []


def test_tensafe_serve_openai_needs_the_services_endpoints(tmp_path: Path, monkeypatch, capsys) -> None:
    from tensafe.cli import main

    for name in ("TENSAFE_INFERENCE_ENDPOINT", "TENSAFE_LEDGER_ENDPOINT", "TENSAFE_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    assert main(["serve", "openai", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "TENSAFE_INFERENCE_ENDPOINT and TENSAFE_LEDGER_ENDPOINT" in err
