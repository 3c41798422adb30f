"""What a generation request means, independent of the backend that runs it.

* :class:`Sampling` is the request's sampling parameters as plain values; :func:`sampling_from_proto`
  builds it at the gRPC edge once ``SamplingParams`` passed the one set of rules
  (``tg_tinker.sampling_rules.check_sampling``, shared with the trainer and the SDK).
* :func:`validate` checks the prompts the way the trainer's ``Sample`` does (same fields, same limits),
  and tokenizes text prompts (and conversations, through the tokenizer's chat template: :func:`render_chats`).
* :class:`~tg_tinker.decoding.SequenceStream` (shared with the SDK's two-plane generation)
  turns one sequence's tokens into the increments sent to the client, ending it with the
  rules of the trainer's sampling (``tensafe.trainer.sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2 import TemplateError

from tensafe.api.common.v1 import common_pb2
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.ids import bounded
from tg_tinker.decoding import CANCELLED, LENGTH, STOP, Chunk, SequenceStream
from tg_tinker.sampling_rules import MAX_SAMPLES, SamplingParamError, check_sampling

__all__ = ["CANCELLED", "CHAT_ROLES", "LENGTH", "MAX_CHAT_MESSAGES", "MAX_SAMPLES", "STOP", "Chunk", "GenerationJob",
           "Sampling", "SequenceStream", "render_chats", "sampling_from_proto", "validate"]


# What a chat message's role may be (what chat templates know), and the most messages in one conversation.
CHAT_ROLES = ("system", "user", "assistant")
MAX_CHAT_MESSAGES = 256


@dataclass(frozen=True)
class Sampling:
    """Checked sampling parameters, with the defaults of unset fields applied."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0: off
    num_samples: int = 1
    stops: list[str] = field(default_factory=list)
    seed: int | None = None         # None: unseeded
    return_logprobs: bool = False


def sampling_from_proto(sp: common_pb2.SamplingParams) -> Sampling:
    """``SamplingParams`` checked by the shared rules, as plain values; InvalidArgument naming the field."""
    try:
        check_sampling(sp)
    except SamplingParamError as exc:
        raise InvalidArgument(exc.field, exc.reason) from None
    return Sampling(max_tokens=sp.max_tokens,
                    temperature=sp.temperature if sp.HasField("temperature") else 1.0,
                    top_p=sp.top_p if sp.HasField("top_p") else 1.0,
                    top_k=sp.top_k if sp.HasField("top_k") else 0,
                    num_samples=max(1, sp.num_samples), stops=[s for s in sp.stop if s],
                    seed=sp.seed if sp.HasField("seed") else None, return_logprobs=sp.return_logprobs)


@dataclass(frozen=True)
class GenerationJob:
    """A validated request: token ids per prompt (and their text), and the sampling parameters."""

    prompts: list[list[int]]
    texts: list[str]
    sampling: Sampling

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def top_p(self) -> float:
        return self.sampling.top_p

    @property
    def top_k(self) -> int:
        return self.sampling.top_k

    @property
    def num_samples(self) -> int:
        return self.sampling.num_samples

    @property
    def stops(self) -> list[str]:
        return self.sampling.stops


def render_chats(tokenizer, chats: list[list[tuple[str, str]]]) -> list[list[int]]:
    """Each conversation as the token ids of the tokenizer's chat template (with the generation prompt),
    or InvalidArgument naming ``chats...`` (a role outside :data:`CHAT_ROLES`, an empty conversation, a
    model whose tokenizer has no chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("chats", "this model's tokenizer has no chat template: give prompts instead")
    out: list[list[int]] = []
    for i, chat in enumerate(chats):
        if not chat:
            raise InvalidArgument(f"chats[{i}].messages", "at least one message is required")
        if len(chat) > MAX_CHAT_MESSAGES:
            raise InvalidArgument(f"chats[{i}].messages", f"at most {MAX_CHAT_MESSAGES} messages")
        for j, (role, _) in enumerate(chat):
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"chats[{i}].messages[{j}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        try:
            rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat],
                                                     add_generation_prompt=True, tokenize=True, return_dict=True)
        except TemplateError as exc:  # a template may refuse a conversation (raise_exception in Jinja)
            raise InvalidArgument(f"chats[{i}]", f"the model's chat template refused it: {bounded(str(exc), 200)}"
                                  ) from None
        out.append(list(rendered["input_ids"]))
    return out


def validate(tokenizer, prompts: list[str], prompt_token_ids: list[list[int]],
             sampling: Sampling | common_pb2.SamplingParams, vocab_size: int, max_length: int,
             chats: list[list[tuple[str, str]]] | None = None) -> GenerationJob:
    """A GenerationJob from the request's prompts (text, token ids or conversations: one kind), or
    InvalidArgument naming the field (``SamplingParams`` are checked by the shared rules and converted first)."""
    if isinstance(sampling, common_pb2.SamplingParams):
        sampling = sampling_from_proto(sampling)
    if sum(1 for kind in (prompts, prompt_token_ids, chats) if kind) > 1:
        raise InvalidArgument("prompts", "give prompts as text, as token ids or as chats: one of them")
    if not prompts and not prompt_token_ids and not chats:
        raise InvalidArgument("prompts", "at least one prompt is required")
    if chats:
        ids = render_chats(tokenizer, chats)
        texts = [tokenizer.decode(p) for p in ids]
        name = "chats"
    elif prompts:
        texts = list(prompts)
        ids = [list(tokenizer(t).input_ids) for t in texts]
        name = "prompts"
    else:
        ids = [list(p) for p in prompt_token_ids]
        texts = [tokenizer.decode(p) for p in ids]
        name = "prompt_token_ids"
    for i, seq in enumerate(ids):
        if not seq:
            raise InvalidArgument(f"{name}[{i}]", "is empty")
        if min(seq) < 0 or max(seq) >= vocab_size:
            raise InvalidArgument(f"{name}[{i}]", f"token ids must be in [0, {vocab_size})")
        if len(seq) + sampling.max_tokens > max_length:
            raise InvalidArgument("sampling.max_tokens", f"prompt {i} ({len(seq)} tokens) plus max_tokens exceeds "
                                                         f"the model's limit of {max_length}")
    return GenerationJob(ids, texts, sampling)
