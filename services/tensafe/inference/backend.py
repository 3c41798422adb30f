"""The one interface every generation backend implements, and the queue its tokens travel through.

A backend opens a base model (:meth:`Backend.open` -> :class:`ServedBase`); a served base
holds tenants' adapters by name and starts generation jobs. A job runs on the backend's own
thread or event loop and hands its increments to a :class:`ChunkQueue`; the gRPC handler
reads the queue, sending whatever has accumulated as one message per sequence, so a slow
client costs fewer, larger messages rather than holding generation back; and after each
message the reader lets increments gather for ``FLUSH_SECONDS``, so a fast model is not slowed
by a message (and a wake-up of this thread) per token. Setting the job's
``cancelled`` event (the client went away) stops generation at the next token.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .generation import Chunk, GenerationJob

if TYPE_CHECKING:
    from tensafe.common.models import ModelLocation
    from tg_tinker.decoding import Tokenizer

    from .adapter import AdapterFiles

_END = object()
# Long enough to gather a few tokens of a fast model, short enough to be invisible to a reader.
FLUSH_SECONDS = 0.01


class ChunkQueue:
    """Increments from a generation job to the handler that streams them."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled
        self._queue: queue.Queue = queue.Queue()

    def put(self, chunk: Chunk) -> None:
        self._queue.put(chunk)

    def close(self, error: BaseException | None = None) -> None:
        """The job is over; ``error`` is raised to the reader after the increments before it."""
        self._queue.put(error if error is not None else _END)

    def __iter__(self) -> Iterator[Chunk]:
        """Increments in order; consecutive ones of the same sequence are merged into one."""
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.cancelled.is_set():
                    return
                continue
            items = [item]
            while items[-1] is not _END and not isinstance(items[-1], BaseException):
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            merged: list[Chunk] = []
            for it in items:
                if it is _END:
                    yield from merged
                    return
                if isinstance(it, BaseException):
                    yield from merged
                    raise it
                last = merged[-1] if merged else None
                if last is not None and (last.prompt_index, last.sample_index) == (it.prompt_index, it.sample_index) \
                        and not last.finish_reason:
                    last.absorb(it)
                else:
                    merged.append(it)
            yield from merged
            time.sleep(FLUSH_SECONDS)


class ServedBase(ABC):
    """A loaded base model with tenants' adapters on it (named by adapter id)."""

    tokenizer: Tokenizer
    vocab_size: int
    max_length: int

    @abstractmethod
    def add_adapter(self, name: str, adapter: AdapterFiles) -> None:
        """Put the adapter on this base; raises InvalidArgument when it does not fit the model."""

    @abstractmethod
    def remove_adapter(self, name: str) -> None: ...

    @abstractmethod
    def start(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        """Begin generating (``adapter`` None: the base model alone) and return at once; increments and
        the end go to ``out``."""

    @abstractmethod
    def close(self) -> None: ...


class Backend(ABC):
    name: str

    @abstractmethod
    def open(self, location: ModelLocation) -> ServedBase:
        """Load the base model; raises FailedPrecondition when this backend cannot run here."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds beyond its bases."""
