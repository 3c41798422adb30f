"""The OpenAI API on the inference service: requests become gRPC calls made as the caller, chunks become
OpenAI's responses (whole, or as server-sent events). No HTTP here (``app.py``), no data kept.

* A ``model`` is one of the caller's adapters (its ``adapter_id``, ``adp_...``) or a base model's name;
  another tenant's adapter is NOT_FOUND, exactly as over gRPC (the inference service decides).
* ``/v1/completions`` sends text prompts as text and token-id prompts as token ids; ``/v1/chat/completions``
  sends the conversation, which the inference service renders with the model's chat template.
* Choice ``index`` is ``prompt_index * n + sample_index`` (OpenAI's order). ``logprobs.tokens`` (and chat's
  ``logprobs.content[].token``) is the text each token added, so the tokens join to the choice's text: a
  token that ends inside a character, or whose text was held back until a stop string was ruled out,
  adds "" and the token that settles it carries the text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tensafe.api.common.v1 import common_pb2
from tensafe.api.inference.v1 import inference_pb2, inference_pb2_grpc
from tensafe.runtime.http_edge import EdgeCaller, HttpEdge

from .schemas import ChatCompletionRequest, CompletionRequest

GENERATE_TIMEOUT_S = 900.0
CALL_TIMEOUT_S = 30.0
ADAPTER_PREFIX = "adp_"
OWNED_BY_SERVER = "tensafe"
FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_CANCELLED: "cancelled"}

Request = CompletionRequest | ChatCompletionRequest


def openai_param(grpc_field: str | None, chat: bool) -> str | None:
    """The OpenAI parameter a gRPC field path names (``sampling.num_samples`` -> ``n``)."""
    if not grpc_field:
        return None
    if grpc_field == "chats" or grpc_field.startswith("chats["):  # chats[0].messages[2].role -> messages[2].role
        return grpc_field.partition("].")[2] or "messages"
    name = grpc_field.removeprefix("sampling.").split("[")[0]
    return {"adapter_id": "model", "model_ref": "model", "backend": "model", "base_model_ref": "model",
            "num_samples": "n", "return_logprobs": "logprobs", "prompts": "prompt", "prompt_token_ids": "prompt",
            "max_tokens": "max_tokens" if not chat else "max_completion_tokens"}.get(name, name)


@dataclass
class Choice:
    """One generated sequence, assembled from its increments."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # the text each token added
    finish_reason: str | None = None
    prompt_tokens: int = 0


def token_texts(msg: inference_pb2.GenerateResponse, before: list[str]) -> list[str]:
    """The text each token of ``msg`` added (the last carries the message's text); text with no new token
    goes to the token before (``before``, changed in place when so)."""
    n = len(msg.token_ids)
    if n:
        return [""] * (n - 1) + [msg.text]
    if msg.text and before:
        before[-1] += msg.text
    return []


class Generation:
    """A started Generate call: its first message already read (so a refusal is an error before any
    response starts), the rest as they come."""

    def __init__(self, request: Request, call: Any, first: inference_pb2.GenerateResponse | None,
                 num_prompts: int) -> None:
        self.request = request
        self._call = call
        self._first = first
        self.n = request.n
        self.num_prompts = num_prompts
        self.choices = [Choice(i) for i in range(num_prompts * request.n)]

    def messages(self) -> Iterator[inference_pb2.GenerateResponse]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._call

    def absorb(self, msg: inference_pb2.GenerateResponse) -> Choice:
        choice = self.choices[msg.prompt_index * self.n + msg.sample_index]
        choice.text += msg.text
        choice.token_ids += msg.token_ids
        choice.logprobs += msg.logprobs
        choice.tokens += token_texts(msg, choice.tokens)
        if msg.finish_reason:
            choice.finish_reason = FINISH.get(msg.finish_reason, "stop")
            choice.prompt_tokens = msg.prompt_tokens
        return choice

    def run(self) -> list[Choice]:
        for msg in self.messages():
            self.absorb(msg)
        return self.choices

    def cancel(self) -> None:
        self._call.cancel()

    def usage(self) -> dict[str, int]:
        prompt = sum(self.choices[p * self.n].prompt_tokens for p in range(self.num_prompts))
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class OpenAIService:
    """The OpenAI API's operations, each made as ``caller`` on the inference service."""

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge

    def _stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.edge.channel("inference"))

    # -- models ----------------------------------------------------------------------------
    def list_models(self, caller: EdgeCaller) -> list[dict[str, Any]]:
        """The caller's adapters (oldest first), then the base models."""
        stub = self._stub()
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            page = stub.ListAdapters(inference_pb2.ListAdaptersRequest(page_size=1000, page_token=token),
                                     metadata=caller.metadata(), timeout=CALL_TIMEOUT_S)
            out += [adapter_model(a) for a in page.adapters]
            token = page.next_page_token
            if not token:
                break
        caps = stub.GetCapabilities(inference_pb2.GetCapabilitiesRequest(), metadata=caller.metadata(),
                                    timeout=CALL_TIMEOUT_S)
        return out + [base_model(m.name) for m in caps.models]

    def retrieve_model(self, caller: EdgeCaller, model: str) -> dict[str, Any] | None:
        """The model named ``model`` (None when the caller has no such model), as /v1/models lists it."""
        stub = self._stub()
        if model.startswith(ADAPTER_PREFIX):
            resp = stub.GetAdapter(inference_pb2.GetAdapterRequest(adapter_id=model), metadata=caller.metadata(),
                                   timeout=CALL_TIMEOUT_S)
            return adapter_model(resp.adapter)
        caps = stub.GetCapabilities(inference_pb2.GetCapabilitiesRequest(), metadata=caller.metadata(),
                                    timeout=CALL_TIMEOUT_S)
        return base_model(model) if any(m.name == model for m in caps.models) else None

    # -- generation --------------------------------------------------------------------------
    def generate_request(self, req: Request) -> tuple[inference_pb2.GenerateRequest, int]:
        """The gRPC request for ``req``, and how many prompts it has."""
        chat = isinstance(req, ChatCompletionRequest)
        sampling = common_pb2.SamplingParams(
            max_tokens=req.tokens_wanted if chat else req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            stop=req.stops, num_samples=req.n,
            return_logprobs=bool(req.logprobs) if chat else req.logprobs is not None)
        if req.seed is not None:
            sampling.seed = req.seed
        grpc_req = inference_pb2.GenerateRequest(sampling=sampling)
        if req.model.startswith(ADAPTER_PREFIX):
            grpc_req.adapter_id = req.model
        else:
            grpc_req.model_ref = req.model
        if isinstance(req, ChatCompletionRequest):
            grpc_req.chats.append(inference_pb2.Chat(messages=[
                inference_pb2.ChatMessage(role=m.template_role, content=m.text) for m in req.messages]))
            return grpc_req, 1
        texts, ids = req.text_prompts(), req.token_prompts()
        grpc_req.prompts.extend(texts)
        grpc_req.prompt_token_ids.extend(common_pb2.TokenSequence(token_ids=p) for p in ids)
        return grpc_req, len(texts) or len(ids)

    def start(self, caller: EdgeCaller, req: Request) -> Generation:
        """Start generating; a refusal (NOT_FOUND, INVALID_ARGUMENT, ...) raises grpc.RpcError here."""
        grpc_req, num_prompts = self.generate_request(req)
        call = self._stub().Generate(grpc_req, metadata=caller.metadata(), timeout=GENERATE_TIMEOUT_S)
        try:
            first = next(call)
        except StopIteration:
            first = None
        return Generation(req, call, first, num_prompts)


# -- OpenAI's shapes --------------------------------------------------------------------------


def adapter_model(a: inference_pb2.Adapter) -> dict[str, Any]:
    return {"id": a.adapter_id, "object": "model", "created": a.load_time.seconds, "owned_by": a.tenant_id,
            "base_model": a.base_model_ref, "artifact_id": a.artifact_id}


def base_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNED_BY_SERVER}


def _completion_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=False)], "refusal": None}


def completion_body(gen: Generation, completion_id: str, created: int) -> dict[str, Any]:
    req = gen.request
    assert isinstance(req, CompletionRequest)
    choices = []
    for c in gen.choices:
        item: dict[str, Any] = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": _completion_logprobs(c.tokens, c.logprobs) if req.logprobs is not None
                                else None}
        if req.return_token_ids:
            item["token_ids"] = c.token_ids
        choices.append(item)
    return {"id": completion_id, "object": "text_completion", "created": created, "model": req.model,
            "choices": choices, "usage": gen.usage(), "system_fingerprint": None}


def chat_body(gen: Generation, completion_id: str, created: int) -> dict[str, Any]:
    req = gen.request
    assert isinstance(req, ChatCompletionRequest)
    choices = []
    for c in gen.choices:
        item: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                                "finish_reason": c.finish_reason,
                                "logprobs": _chat_logprobs(c.tokens, c.logprobs) if req.logprobs else None}
        if req.return_token_ids:
            item["token_ids"] = c.token_ids
        choices.append(item)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": choices, "usage": gen.usage(), "system_fingerprint": None}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def stream_events(gen: Generation, completion_id: str, created: int) -> Iterator[str]:
    """The server-sent events of a streamed completion or chat completion, ending with ``[DONE]``."""
    req = gen.request
    chat = isinstance(req, ChatCompletionRequest)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": completion_id, "object": obj, "created": created, "model": req.model, "choices": choices,
                    "system_fingerprint": None, **extra})

    if chat:
        yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in gen.choices])
    for msg in gen.messages():
        choice = gen.absorb(msg)
        if not msg.text and not msg.token_ids and not msg.finish_reason:
            continue
        tokens = token_texts(msg, [])
        if chat:
            item: dict[str, Any] = {"index": choice.index, "delta": {"content": msg.text} if msg.text else {},
                                    "logprobs": _chat_logprobs(tokens, list(msg.logprobs)) if req.logprobs else None}
        else:
            item = {"index": choice.index, "text": msg.text,
                    "logprobs": _completion_logprobs(tokens, list(msg.logprobs)) if req.logprobs is not None
                    else None}
        item["finish_reason"] = FINISH.get(msg.finish_reason, "stop") if msg.finish_reason else None
        if req.return_token_ids:
            item["token_ids"] = list(msg.token_ids)
        yield event([item])
    if req.include_usage:
        yield event([], usage=gen.usage())
    yield sse("[DONE]")


def new_id(chat: bool) -> tuple[str, int]:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())


