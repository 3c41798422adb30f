"""The OpenAI API's request bodies, as pydantic models with a bound on every field.

A field out of bounds, of the wrong type, or unknown is a 400 naming the field (``param``), in OpenAI's error
shape. What TenSafe does not implement is refused the same way rather than ignored: ``echo``, ``suffix``,
``best_of`` > 1, penalties other than 0, ``logit_bias``, top alternatives (``logprobs`` > 0 on completions,
``top_logprobs`` > 0 on chat), and message parts other than text. Limits that depend on the model (its context
length) or on the server (``TENSAFE_MAX_SAMPLE_TOKENS``) are the inference service's, checked there.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Bounds of the edge (the inference service checks its own too).
MAX_MODEL_CHARS = 256
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 65536
MAX_PROMPT_TOKENS = 16384
MAX_TOKEN_ID = 2**31 - 1
MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 65536
MAX_CHAT_CHARS = 262144
MAX_CONTENT_PARTS = 64
MAX_TOKENS = 4096
MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_USER_CHARS = 256
DEFAULT_CHAT_TOKENS = 128  # a chat request's max_tokens when it gives none
MAX_BODY_BYTES = 4 << 20  # a request body past this is refused before it is parsed (413)

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_CHARS)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
PromptText = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """What both endpoints take: the model and the sampling parameters."""

    model: ModelName
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    user: Annotated[str, StringConstraints(max_length=MAX_USER_CHARS)] | None = None
    # vLLM's extension: each choice also carries the token ids it generated (``token_ids``).
    return_token_ids: bool = False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream=true")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=0, description="0: the sampled tokens' log-probabilities")
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

    def text_prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        return [p for p in self.prompt if isinstance(p, str)]

    def token_prompts(self) -> list[list[int]]:
        if isinstance(self.prompt, str) or not self.prompt:
            return []
        first = self.prompt[0]
        if isinstance(first, int):
            return [[p for p in self.prompt if isinstance(p, int)]]
        return [list(p) for p in self.prompt if isinstance(p, list)]


class TextPart(_Request):
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS)]


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: (Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS)]
              | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)])
    name: Annotated[str, StringConstraints(max_length=64)] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        if not isinstance(value, str) and sum(len(p.text) for p in value) > MAX_MESSAGE_CHARS:
            raise ValueError(f"at most {MAX_MESSAGE_CHARS} characters in all")
        return value


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)

    @field_validator("messages")
    @classmethod
    def _chat_bounded(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if sum(len(m.text) for m in value) > MAX_CHAT_CHARS:
            raise ValueError(f"at most {MAX_CHAT_CHARS} characters of content in all")
        return value

    @property
    def tokens_wanted(self) -> int:
        """max_completion_tokens, else max_tokens, else :data:`DEFAULT_CHAT_TOKENS`."""
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_TOKENS
