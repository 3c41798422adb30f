"""What a generation request means, independent of the backend that runs it.

* :func:`validate` checks the sampling parameters and the prompts the way the trainer's
  ``Sample`` does (same fields, same limits), and tokenizes text prompts.
* :class:`SequenceStream` turns one sequence's tokens, as they are produced, into the
  increments sent to the client, and decides its final completion with exactly the rules of
  the trainer's sampling (``tensafe.trainer.sampling``): the sequence ends at EOS (kept in
  the token ids), or at the earliest stop string (cut from the text, its tokens dropped), or
  at max_tokens. Text that could still turn out to be the start of a stop string, and an
  incomplete multi-byte character, are held back until they are decided, so a client never
  receives text that the final completion does not contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensafe.api.common.v1 import common_pb2
from tensafe.runtime.errors import InvalidArgument
from tensafe.trainer.sampling import _cut_at_stop, _ids_within

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
CANCELLED = common_pb2.FINISH_REASON_CANCELLED
MAX_SAMPLES = 64


@dataclass(frozen=True)
class GenerationJob:
    """A validated request: token ids per prompt (and their text), and the sampling parameters."""

    prompts: list[list[int]]
    texts: list[str]
    sampling: common_pb2.SamplingParams

    @property
    def temperature(self) -> float:
        return self.sampling.temperature if self.sampling.HasField("temperature") else 1.0

    @property
    def top_p(self) -> float:
        return self.sampling.top_p if self.sampling.HasField("top_p") else 1.0

    @property
    def top_k(self) -> int:
        return self.sampling.top_k if self.sampling.HasField("top_k") else 0

    @property
    def num_samples(self) -> int:
        return max(1, self.sampling.num_samples)

    @property
    def stops(self) -> list[str]:
        return [s for s in self.sampling.stop if s]


@dataclass
class Chunk:
    """An increment of one sequence; the last one of a sequence has ``finish_reason`` set."""

    prompt_index: int
    sample_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED

    def absorb(self, later: Chunk) -> None:
        """Append a later increment of the same sequence (to send several in one message)."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason = later.finish_reason


def validate_sampling(sp: common_pb2.SamplingParams) -> None:
    if sp.max_tokens <= 0:
        raise InvalidArgument("sampling.max_tokens", "must be > 0")
    if sp.HasField("temperature") and not sp.temperature >= 0:
        raise InvalidArgument("sampling.temperature", "must be >= 0 (0 is greedy)")
    if sp.HasField("top_p") and not 0 < sp.top_p <= 1:
        raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
    if sp.HasField("top_k") and sp.top_k < 0:
        raise InvalidArgument("sampling.top_k", "must be >= 0 (0 disables it)")
    if sp.num_samples < 0 or sp.num_samples > MAX_SAMPLES:
        raise InvalidArgument("sampling.num_samples", f"must be between 1 and {MAX_SAMPLES}")


def validate(tokenizer, prompts: list[str], prompt_token_ids: list[list[int]],  # noqa: ANN001
             sampling: common_pb2.SamplingParams, vocab_size: int, max_length: int) -> GenerationJob:
    """A GenerationJob from the request's prompts, or InvalidArgument naming the field."""
    validate_sampling(sampling)
    if prompts and prompt_token_ids:
        raise InvalidArgument("prompts", "give prompts as text or as token ids, not both")
    if not prompts and not prompt_token_ids:
        raise InvalidArgument("prompts", "at least one prompt is required")
    if prompts:
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


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (it may yet become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class SequenceStream:
    """One sequence being generated: feed it tokens with :meth:`push`, end it with :meth:`finish`."""

    def __init__(self, tokenizer, prompt_index: int, sample_index: int, stops: list[str],  # noqa: ANN001
                 want_logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.stops = stops
        self.want_logprobs = want_logprobs
        self.eos = tokenizer.eos_token_id
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.sent_text = ""
        self.sent_ids = 0
        self.stopped = False  # a stop string or EOS was produced: nothing more is needed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _chunk(self, text: str, upto: int, finish: int = common_pb2.FINISH_REASON_UNSPECIFIED) -> Chunk:
        lps = self.logprobs[self.sent_ids:upto] if self.want_logprobs else []
        chunk = Chunk(self.prompt_index, self.sample_index, text, self.ids[self.sent_ids:upto], lps, finish)
        self.sent_text += text
        self.sent_ids = max(self.sent_ids, upto)
        return chunk

    def push(self, token_id: int, logprob: float = 0.0) -> Chunk | None:
        """Record a generated token; returns the increment that is now certain, if any."""
        if self.stopped:
            return None
        self.ids.append(token_id)
        self.logprobs.append(logprob)
        if self.eos is not None and token_id == self.eos:
            self.stopped = True
            return None
        full = self._decode(self.ids)
        if self.stops and _cut_at_stop(full, self.stops) is not None:
            self.stopped = True
            return None
        if full.endswith("\ufffd") or not full.startswith(self.sent_text):
            return None  # an incomplete character, or a decoding that is not settled yet
        if not self.stops:
            safe, upto = full, len(self.ids)
        else:
            # Token ids follow the trainer's rule for a cut completion (the longest prefix of ids whose decoding
            # fits the text, scanned from the start), so ids past a token that decodes to half a character
            # wait until the end shows whether a stop string cut them off.
            safe = full[: len(full) - _held_back(full, self.stops)]
            upto = self.sent_ids
            while upto < len(self.ids) and safe.startswith(self._decode(self.ids[: upto + 1])):
                upto += 1
        if len(safe) == len(self.sent_text) and upto == self.sent_ids:
            return None
        return self._chunk(safe[len(self.sent_text):], upto)

    def final(self) -> tuple[str, list[int], list[float], int]:
        """(completion, token ids, logprobs, finish reason): the trainer's sampling rules, applied to the whole."""
        generated, logprobs, finish = list(self.ids), list(self.logprobs), LENGTH
        if self.eos is not None and self.eos in generated:
            end = generated.index(self.eos) + 1
            generated, logprobs, finish = generated[:end], logprobs[:end], STOP
        completion = self._decode(generated)
        cut = _cut_at_stop(completion, self.stops) if self.stops else None
        if cut is not None:
            completion, finish = cut, STOP
            generated = _ids_within(self.tokenizer, generated, cut)
            logprobs = logprobs[: len(generated)]
        return completion, generated, logprobs, finish

    def finish(self, cancelled: bool = False) -> Chunk:
        """The last increment of the sequence, with its finish reason."""
        if cancelled:
            return self._chunk("", self.sent_ids, CANCELLED)
        completion, generated, _, finish = self.final()
        self.ids = generated
        self.logprobs = self.logprobs[: len(generated)]
        # Held-back text is always a prefix of the final completion (see the module docstring).
        rest = completion[len(self.sent_text):] if completion.startswith(self.sent_text) else ""
        return self._chunk(rest, len(generated), finish)
