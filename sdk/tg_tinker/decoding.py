"""Turning generated tokens into streamed increments, with the trainer's sampling rules.

Shared by the inference service (its backends) and the SDK's two-plane HE-LoRA generation,
so that every plane ends a sequence the same way as ``TrainingClient.sample``: at EOS (kept
in the token ids), at the earliest stop string (cut from the text; the token ids are the
longest prefix whose decoding fits the cut text), or at max_tokens. Text that could still
turn out to be the start of a stop string, and an incomplete multi-byte character, are held
back until decided, so a reader never receives text that the final completion lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tensafe.api.common.v1 import common_pb2

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
CANCELLED = common_pb2.FINISH_REASON_CANCELLED


class Tokenizer(Protocol):
    """What decoding needs of a tokenizer: a Hugging Face one (its ``eos_token_id`` is read if it has one).

    ``decode`` of one sequence of ids returns a string; Hugging Face's signature also allows a list.
    """

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str | list[str]: ...


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of ``ids`` without special tokens."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """``text`` up to the earliest stop string, or None when none occurs (the trainer's rule)."""
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def ids_within(tokenizer: Tokenizer, ids: list[int], text: str) -> list[int]:
    """The longest prefix of ``ids`` whose decoding is a prefix of ``text`` (the trainer's rule).

    A prefix ending inside a multi-byte character decodes with a replacement character and does
    not match, but a longer one that completes the character does: every prefix is tried, until
    the decoding is longer than ``text``.
    """
    keep = 0
    for n in range(1, len(ids) + 1):
        piece = decode(tokenizer, ids[:n])
        if text.startswith(piece):
            keep = n
        elif len(piece) > len(text):
            break
    return ids[:keep]


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

    def __init__(self, tokenizer: Tokenizer, prompt_index: int, sample_index: int, stops: list[str],
                 want_logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.stops = stops
        self.want_logprobs = want_logprobs
        eos: object = getattr(tokenizer, "eos_token_id", None)
        self.eos = eos if isinstance(eos, int) else None
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.sent_text = ""
        self.sent_ids = 0
        self.stopped = False  # a stop string or EOS was produced: nothing more is needed

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

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
        if self.stops and cut_at_stop(full, self.stops) is not None:
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
        cut = cut_at_stop(completion, self.stops) if self.stops else None
        if cut is not None:
            completion, finish = cut, STOP
            generated = ids_within(self.tokenizer, generated, cut)
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
