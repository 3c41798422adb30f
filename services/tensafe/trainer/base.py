"""One loaded base model, shared by every session on it, and the worker that runs their ops.

The frozen base weights are loaded once per model; each session adds its own LoRA
adapter (a PEFT adapter named after the session) and has its own optimizer, so N
sessions cost about base + N x adapter. Ops of all sessions on one base run on one
worker thread in submission order: the active adapter, the RNG state and the
train/eval mode are switched per op, so sessions never see each other's state.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tensafe.runtime.errors import InvalidArgument, TensafeError

from .futures import Op
from .models import ModelLocation, load_base_model

if TYPE_CHECKING:
    from .session import TrainingSession

log = logging.getLogger("tensafe.trainer")


class SharedBase:
    def __init__(self, location: ModelLocation, on_empty: Callable[[SharedBase], None]) -> None:
        self.location = location
        self.model, self.tokenizer = load_base_model(location)
        self.peft: PeftModel | None = None
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        self.num_base_parameters = sum(p.numel() for p in self.model.parameters())
        self.lock = threading.RLock()
        self.sessions: dict[str, TrainingSession] = {}
        self._queue: queue.Queue[tuple[TrainingSession, Op] | None] = queue.Queue()
        self._on_empty = on_empty
        self._worker = threading.Thread(target=self._work, name=f"trainer-{location.path.name}", daemon=True)
        self._worker.start()

    # -- adapters ---------------------------------------------------------------------
    def attach(self, session: TrainingSession, lora: LoraConfig, seed: int) -> None:
        """Add the session's adapter, initialised from ``seed`` (same seed, same initial adapter)."""
        with self.lock:
            saved_rng = torch.get_rng_state()
            torch.manual_seed(seed)
            try:
                if self.peft is None:
                    self.peft = get_peft_model(self.model, lora, adapter_name=session.session_id)
                else:
                    self.peft.add_adapter(session.session_id, lora)
            except (ValueError, KeyError) as exc:
                if self.peft is not None and not self.peft.peft_config:
                    self.peft = None
                raise InvalidArgument("config.lora_config.target_modules", str(exc).splitlines()[0]) from None
            finally:
                torch.set_rng_state(saved_rng)
            self.sessions[session.session_id] = session

    def adapter_parameters(self, session_id: str) -> list[torch.nn.Parameter]:
        marker = f".{session_id}."
        return [p for n, p in self.peft.named_parameters() if marker in n + "."]  # also ParameterDict entries

    def activate(self, session_id: str) -> PeftModel:
        self.peft.set_adapter(session_id)
        return self.peft

    def detach(self, session_id: str) -> None:
        with self.lock:
            self.sessions.pop(session_id, None)
            if self.peft is not None and session_id in self.peft.peft_config:
                self.peft.delete_adapter(session_id)
            empty = not self.sessions
        if empty:
            self._queue.put(None)
            self._on_empty(self)

    # -- the worker ---------------------------------------------------------------------
    def submit(self, session: TrainingSession, op: Op) -> None:
        self._queue.put((session, op))

    def queued(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            session, op = item
            if not session.book.start(op):
                continue  # cancelled while queued
            try:
                with self.lock:
                    field, result = session.run_op(op)
                session.book.finish(op, result_field=field, result=result)
            except TensafeError as exc:
                session.book.finish(op, error=session.error_detail(exc))
            except Exception as exc:  # noqa: BLE001 - an op failure must not kill the worker
                log.exception("op %s of session %s failed", op.future_id, session.session_id)
                session.book.finish(op, error=session.error_detail(
                    TensafeError(f"operation failed: {type(exc).__name__}", reason="INTERNAL")))
