"""Futures of one training session: submitted in order, completed in order, watched over a stream.

An op's outcome is kept as the messages it is sent as (its result, its ``ErrorDetail``), built once
when it ends, so that every watcher and every GetFuture is sent the same; ``Op.ref`` and ``Op.event``
wrap them. With ``session``'s results, the one part of the trainer's logic that builds messages
(see ``service``).
"""

from __future__ import annotations

import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.errors import QuotaExceeded, TensafeError, to_rpc_status
from tensafe.runtime.messages import enum_value, timestamp

PENDING = trainer_pb2.FUTURE_STATE_PENDING
RUNNING = trainer_pb2.FUTURE_STATE_RUNNING
SUCCEEDED = trainer_pb2.FUTURE_STATE_SUCCEEDED
FAILED = trainer_pb2.FUTURE_STATE_FAILED
CANCELLED = trainer_pb2.FUTURE_STATE_CANCELLED
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Finished futures kept per session for late watchers; older ones are dropped.
KEEP_FINISHED = 1000
# How long CancelFuture waits for a running op it stopped to end, so the answer says CANCELLED.
CANCEL_WAIT_S = 2.0


class OpCancelled(TensafeError):
    """Raised inside a running op whose cancellation was asked for (checked between tokens)."""

    reason = "FUTURE_CANCELLED"


def _ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    return None if seconds is None else timestamp(seconds)


@dataclass
class Op:
    """One queued operation and, once it ran, its outcome."""

    session_id: str
    future_id: str
    sequence: int
    op_type: int
    # Returns (FutureEvent oneof field, result message), or a generator that yields between slices
    # of work (a Sample, between sequences) and returns that pair: the worker may run other
    # sessions' ops between two slices.
    run: Callable[[], Any] | None
    # Set for ops that can stop while running (Sample): CancelFuture sets it, the op checks it
    # between tokens, and the op then ends CANCELLED whatever it had computed.
    cancel_event: threading.Event | None = None
    stepper: Any = None  # the generator of a sliced op, once started
    submit_time: float = field(default_factory=time.time)
    state: int = PENDING
    start_time: float | None = None
    end_time: float | None = None
    result_field: str | None = None
    result: Any = None
    error: common_pb2.ErrorDetail | None = None

    def advance(self) -> tuple[str, Any] | None:
        """Run the op's next slice: its (field, result) when it is done, None when more slices remain."""
        if self.stepper is None:
            assert self.run is not None, "a finished op is not advanced again"
            out = self.run()
            if not isinstance(out, types.GeneratorType):
                return out
            self.stepper = out
        try:
            next(self.stepper)
        except StopIteration as stop:
            self.stepper = None
            return stop.value
        return None

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_event is not None and self.cancel_event.is_set()

    def ref(self) -> trainer_pb2.FutureRef:
        return trainer_pb2.FutureRef(session_id=self.session_id, future_id=self.future_id,
                                     sequence=self.sequence, op=enum_value(trainer_pb2.OpType, self.op_type))

    def event(self) -> trainer_pb2.FutureEvent:
        ev = trainer_pb2.FutureEvent(session_id=self.session_id, future_id=self.future_id, sequence=self.sequence,
                                     op=enum_value(trainer_pb2.OpType, self.op_type),
                                     state=enum_value(trainer_pb2.FutureState, self.state),
                                     submit_time=_ts(self.submit_time), start_time=_ts(self.start_time),
                                     end_time=_ts(self.end_time))
        if self.result_field is not None:
            getattr(ev, self.result_field).CopyFrom(self.result)
        if self.error is not None:
            ev.error.CopyFrom(self.error)
        return ev


def error_detail(err: TensafeError) -> common_pb2.ErrorDetail:
    status = to_rpc_status(err)
    return common_pb2.ErrorDetail(code=status.code, message=err.message, reason=err.reason,
                                  metadata=err.metadata, domain="tensafe.dev")


class FutureBook:
    """The futures of one session. Thread-safe; watchers wake when an op ends."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._cond = threading.Condition(threading.RLock())
        self._ops: dict[str, Op] = {}
        self._finished: list[Op] = []  # in completion order
        self._dropped = 0  # finished ops dropped from the front of _finished
        self.last_sequence = 0
        self.open_ops = 0  # pending or running
        self.closed = False

    def create(self, op_type: int, run: Callable[[], Any], cancel_event: threading.Event | None = None,
               max_open: int = 0) -> Op:
        """A new pending op; QuotaExceeded (TENSAFE_QUOTA_PENDING_OPS) when ``max_open`` ops are already
        pending or running (0: no limit)."""
        with self._cond:
            if max_open and self.open_ops >= max_open:
                raise QuotaExceeded("TENSAFE_QUOTA_PENDING_OPS", f"the session has {self.open_ops} operations queued "
                                    "or running, the most allowed; wait for some to finish",
                                    limit=max_open, current=self.open_ops)
            self.open_ops += 1
            self.last_sequence += 1
            op = Op(self.session_id, "fut_" + uuid.uuid4().hex[:16], self.last_sequence, op_type, run,
                    cancel_event=cancel_event)
            self._ops[op.future_id] = op
            return op

    def get(self, future_id: str) -> Op | None:
        with self._cond:
            return self._ops.get(future_id)

    def pending_ids(self) -> list[str]:
        with self._cond:
            return [op.future_id for op in self._ops.values() if op.state == PENDING]

    def pending_count(self) -> int:
        with self._cond:
            return self.open_ops

    def start(self, op: Op) -> bool:
        """Mark running; False if it was cancelled meanwhile (then it must not run)."""
        with self._cond:
            if op.state != PENDING:
                return False
            op.state, op.start_time = RUNNING, time.time()
            return True

    def finish(self, op: Op, *, result_field: str | None = None, result: Any = None,
               error: common_pb2.ErrorDetail | None = None, state: int | None = None) -> None:
        with self._cond:
            if op.state in TERMINAL:
                return
            if op.cancel_requested and state != CANCELLED:
                # CancelFuture answered cancelled=true: whatever the op computed is dropped.
                stopped = TensafeError(f"operation {op.future_id} was cancelled while running",
                                       reason="FUTURE_CANCELLED")
                state, result_field, result, error = CANCELLED, None, None, error_detail(stopped)
            op.state = state if state is not None else (FAILED if error is not None else SUCCEEDED)
            op.end_time = time.time()
            self.open_ops -= 1
            op.result_field, op.result, op.error = result_field, result, error
            op.run = op.stepper = None
            self._finished.append(op)
            if len(self._finished) > KEEP_FINISHED:
                old = self._finished.pop(0)
                self._dropped += 1
                self._ops.pop(old.future_id, None)
            self._cond.notify_all()

    def cancel(self, future_id: str, wait: float = CANCEL_WAIT_S) -> tuple[bool, Op | None]:
        """Cancel a pending op, or stop a running cancellable one (a Sample, between tokens).

        True means the op ends CANCELLED: at once for a pending op; for a running one as soon as it
        sees the request (waited for up to ``wait`` seconds, so the returned op usually says so).
        """
        with self._cond:
            op = self._ops.get(future_id)
            if op is None:
                return False, None
            if op.state == RUNNING and op.cancel_event is not None:
                op.cancel_event.set()
                self._cond.wait_for(lambda: op.state in TERMINAL, timeout=wait)
                return True, op
            if op.state != PENDING:
                return False, op
            # Under the lock (re-entrant), so the worker cannot start it between the check and this.
            cancelled = TensafeError(f"operation {future_id} was cancelled before it ran",
                                     reason="FUTURE_CANCELLED")
            self.finish(op, error=error_detail(cancelled), state=CANCELLED)
            return True, op

    def stop_running(self) -> None:
        """Ask every running cancellable op of the session to stop (the session is closing)."""
        with self._cond:
            for op in self._ops.values():
                if op.state == RUNNING and op.cancel_event is not None:
                    op.cancel_event.set()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def watch(self, after_sequence: int, future_ids: set[str], still_wanted: Callable[[], bool],
              poll: float = 1.0) -> Iterator[trainer_pb2.FutureEvent]:
        """Yield the end event of each matching op once, as ops end; returns when all asked-for ids
        were sent, when the session closes (after draining), or when ``still_wanted()`` turns False."""
        sent: set[str] = set()
        index = 0
        while True:
            with self._cond:
                batch = self._finished[max(0, index - self._dropped):]
                index = self._dropped + len(self._finished)
                if not batch:
                    if self.closed or not still_wanted():
                        return
                    self._cond.wait(poll)
                    continue
            for op in batch:
                if op.sequence <= after_sequence or op.future_id in sent:
                    continue
                if future_ids and op.future_id not in future_ids:
                    continue
                sent.add(op.future_id)
                yield op.event()
            if future_ids and future_ids <= sent:
                return
