"""One loaded base model, shared by every session on it, and the worker that runs their ops.

The frozen base weights are loaded once per model; each session adds its own LoRA
adapter (a PEFT adapter named after the session) and has its own optimizer, so N
sessions cost about base + N x adapter. Ops of all sessions on one base run on one
worker thread: the active adapter, the RNG state and the train/eval mode are switched
per op, so sessions never see each other's state.

Scheduling is fair between tenants, then between one tenant's sessions (start-time fair
queueing on worker seconds): the worker always serves the tenant that has used the least
worker time among those with work waiting, then that tenant's least-served session; a
tenant (or session) that was idle starts level with the others, so idle time is not banked.
Each session's own ops run strictly in submission order. A ``Sample`` runs one sequence per
slice: between two slices the worker may serve other sessions, so one tenant's long sample
delays another tenant's small op by at most one sequence, and its RNG state is kept with the
session so the output is the same however it was interleaved.

Batching: when the op served next is a Forward or ForwardBackward, the worker takes with it the
next op of other sessions on this base when that is of the same kind (up to ``pass_sessions``
sessions and ``pass_tokens`` padded tokens), in the order the queue would serve them, and runs
them as ONE pass of the base, each session's rows through its own adapter (``passes``, with
``tensafe.common.multilora``). Only a session's own next op can join, so each session's ops still
run in submission order; each session is charged its share of the pass's seconds (its tokens
over the pass's tokens), so batching changes what a pass costs, not who is served first.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tensafe.common import multilora
from tensafe.common.models import ModelLocation, load_base_model
from tensafe.runtime.errors import InvalidArgument, TensafeError

from .futures import CANCELLED, PENDING, RUNNING, FutureBook, Op, OpCancelled

log = logging.getLogger("tensafe.trainer")


class WorkerSession(Protocol):
    """What the worker needs of a session (``session.TrainingSession`` is the one implementation).

    A protocol, so that this module does not import ``session`` (which imports it): the trainer's
    import graph stays acyclic (tests/test_trainer_imports.py).
    """

    session_id: str
    tenant_id: str
    book: FutureBook

    def run_op(self, op: Op) -> tuple[str, Any] | None: ...

    def error_detail(self, err: TensafeError) -> Any: ...


@runtime_checkable
class PassPart(Protocol):
    """An op that can share one pass of the base with other sessions' ops (``passes.PassOp``)."""

    @property
    def kind(self) -> str: ...  # ops of one kind can share a pass

    @property
    def weight(self) -> int: ...  # its share of a pass's cost (tokens)

    @property
    def shape(self) -> tuple[int, int]: ...  # rows, length

    def batchable(self) -> bool: ...

    def together(self, parts: list[Any]) -> list[Any]: ...  # one pass of these parts: their outcomes


# A pass takes at most this many sessions' ops, and this many padded tokens (rows x the longest
# length) unless the first op alone is larger.
PASS_SESSIONS = 8
PASS_TOKENS = 8192


class FairQueue:
    """Per-session FIFOs, served fairly by tenant, then by session, on worker seconds used.

    Not thread-safe by itself: SharedBase guards it with its condition.
    """

    def __init__(self) -> None:
        self.queues: dict[str, collections.deque[tuple[WorkerSession, Op]]] = {}
        self.tenant_served: dict[str, float] = {}
        self.session_served: dict[str, float] = {}
        self.clock = 0.0  # the served time of the tenant picked last: where an idle tenant restarts

    def _active(self, tenant: str | None = None) -> list[str]:
        return [sid for sid, q in self.queues.items() if q and (tenant is None or q[0][0].tenant_id == tenant)]

    def push(self, session: WorkerSession, op: Op) -> None:
        tenant, sid = session.tenant_id, session.session_id
        if not self._active(tenant):  # the tenant was idle: it restarts level, without banked credit
            self.tenant_served[tenant] = max(self.tenant_served.get(tenant, 0.0), self.clock)
        if not self.queues.get(sid):
            level = [self.session_served[s] for s in self._active(tenant)]
            self.session_served[sid] = max(self.session_served.get(sid, 0.0), min(level, default=0.0))
        self.queues.setdefault(sid, collections.deque()).append((session, op))

    def _drop_cancelled(self) -> None:
        for q in self.queues.values():
            while q and q[0][1].state not in (PENDING, RUNNING):
                q.popleft()  # cancelled while queued: never runs

    def peek(self) -> tuple[WorkerSession, Op] | None:
        """The next op to run (left at the head of its session's queue until it is done)."""
        self._drop_cancelled()
        active = self._active()
        if not active:
            return None

        def waited(sid: str) -> float:
            return self.queues[sid][0][1].submit_time

        tenants: dict[str, list[str]] = {}
        for sid in active:
            tenants.setdefault(self.queues[sid][0][0].tenant_id, []).append(sid)
        tenant = min(tenants, key=lambda t: (self.tenant_served.get(t, 0.0), min(map(waited, tenants[t]))))
        sid = min(tenants[tenant], key=lambda s: (self.session_served.get(s, 0.0), waited(s)))
        self.clock = self.tenant_served.get(tenant, 0.0)
        return self.queues[sid][0]

    def companions(self, head: tuple[WorkerSession, Op], limit: int,
                   fits: Callable[[Op], bool]) -> list[tuple[WorkerSession, Op]]:
        """Other sessions' next ops that ``fits`` accepts, in the order the queue would serve them
        (tenant served, then session served, then waited), at most ``limit``."""
        first = head[0].session_id
        found = [q[0] for sid, q in self.queues.items()
                 if q and sid != first and q[0][1].state == PENDING and fits(q[0][1])]
        found.sort(key=lambda it: (self.tenant_served.get(it[0].tenant_id, 0.0),
                                   self.session_served.get(it[0].session_id, 0.0), it[1].submit_time))
        return found[:limit]

    def charge(self, session: WorkerSession, seconds: float, done: bool) -> None:
        tenant, sid = session.tenant_id, session.session_id
        self.tenant_served[tenant] = self.tenant_served.get(tenant, 0.0) + seconds
        self.session_served[sid] = self.session_served.get(sid, 0.0) + seconds
        q = self.queues.get(sid)
        if done and q:
            q.popleft()

    def forget(self, session: WorkerSession) -> None:
        """A session left the base: drop its bookkeeping (and its tenant's, if that has nothing queued)."""
        sid, tenant = session.session_id, session.tenant_id
        if not self.queues.get(sid):
            self.queues.pop(sid, None)
            self.session_served.pop(sid, None)
        if not self._active(tenant) and not any(q and q[0][0].tenant_id == tenant for q in self.queues.values()):
            self.tenant_served.pop(tenant, None)

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())


class SharedBase:
    def __init__(self, location: ModelLocation, on_empty: Callable[[SharedBase], None]) -> None:
        self.location = location
        self.model, self.tokenizer = load_base_model(location)
        self.peft: PeftModel | None = None
        embeddings: torch.Tensor = self.model.get_input_embeddings().weight  # pyright: ignore[reportAssignmentType] - nn.Module attributes are typed Tensor | Module
        self.vocab_size = int(embeddings.shape[0])
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        self.num_base_parameters = sum(p.numel() for p in self.model.parameters())
        self.lock = threading.RLock()  # held while an op (slice) runs, and while adapters change
        self.sessions: dict[str, WorkerSession] = {}
        self._cond = threading.Condition()  # guards the queue and the worker handle
        self._fair = FairQueue()
        self._on_empty = on_empty
        self._worker: threading.Thread | None = None
        self._routable: dict[str, bool] = {}  # session -> its adapter can share a pass (multilora.routable)
        self.pass_sessions = PASS_SESSIONS
        self.stats = {"passes": 0, "batched_ops": 0}  # batched passes run, and the ops they ran
        self.pass_tokens = PASS_TOKENS

    # -- adapters ---------------------------------------------------------------------
    def attach(self, session: WorkerSession, lora: LoraConfig, seed: int) -> None:
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
            self._routable[session.session_id] = multilora.routable(self.peft, session.session_id)
        with self._cond:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name=f"trainer-{self.location.path.name}",
                                                daemon=True)
                self._worker.start()

    def peft_model(self) -> PeftModel:
        """The PEFT model holding the sessions' adapters (None only while no session is attached)."""
        assert self.peft is not None, "no session is attached to this base"
        return self.peft

    def adapter_parameters(self, session_id: str) -> list[torch.nn.Parameter]:
        marker = f".{session_id}."
        return [p for n, p in self.peft_model().named_parameters() if marker in n + "."]  # also ParameterDict entries

    def is_routable(self, session_id: str) -> bool:
        """Whether the session's ops can share a pass with other sessions' (plain LoRA on Linear layers)."""
        return self._routable.get(session_id, False)

    def activate(self, session_id: str) -> PeftModel:
        peft = self.peft_model()
        peft.set_adapter(session_id)
        return peft

    def detach(self, session_id: str) -> None:
        with self.lock:
            session = self.sessions.pop(session_id, None)
            self._routable.pop(session_id, None)
            if self.peft is not None and session_id in self.peft.peft_config:
                self.peft.delete_adapter(session_id)
            empty = not self.sessions
        with self._cond:
            if session is not None:
                self._fair.forget(session)
            self._cond.notify_all()  # an idle worker with no session left exits
        if empty:
            self._on_empty(self)

    # -- the worker ---------------------------------------------------------------------
    def submit(self, session: WorkerSession, op: Op) -> None:
        with self._cond:
            self._fair.push(session, op)
            self._cond.notify_all()

    def queued(self) -> int:
        with self._cond:
            return self._fair.pending()

    def _next(self) -> list[tuple[WorkerSession, Op]] | None:
        """Wait for the next op to run, with the other sessions' ops that share its pass; None when
        no session is left and nothing is queued."""
        with self._cond:
            while True:
                item = self._fair.peek()
                if item is not None:
                    return [item, *self._companions(item)]
                if not self.sessions:
                    self._worker = None
                    return None
                self._cond.wait(1.0)

    def _companions(self, head: tuple[WorkerSession, Op]) -> list[tuple[WorkerSession, Op]]:
        first = head[1].run
        if head[1].state != PENDING or not isinstance(first, PassPart) or not first.batchable():
            return []
        rows, length = first.shape
        budget = max(self.pass_tokens, rows * length)

        def fits(op: Op) -> bool:
            part = op.run
            if not isinstance(part, PassPart) or part.kind != first.kind or not part.batchable():
                return False
            r, t = part.shape
            return (rows + r) * max(length, t) <= budget

        out: list[tuple[WorkerSession, Op]] = []
        for session, op in self._fair.companions(head, self.pass_sessions - 1, fits):
            part = op.run
            assert isinstance(part, PassPart)
            r, t = part.shape
            if (rows + r) * max(length, t) > budget:  # the budget is shared: re-check as the pass grows
                continue
            rows, length = rows + r, max(length, t)
            out.append((session, op))
        return out

    def _work(self) -> None:
        while True:
            items = self._next()
            if items is None:
                return
            if len(items) > 1:
                self._run_pass(items)
            else:
                self._run_one(*items[0])

    def _run_pass(self, items: list[tuple[WorkerSession, Op]]) -> None:
        """Several sessions' ops in one pass; each op ends with its own outcome, each session is charged
        its share of the pass's seconds. If the shared pass itself fails, the ops run one at a time."""
        started = time.monotonic()
        running: list[tuple[WorkerSession, Op]] = []
        for session, op in items:
            if op.state == PENDING and not session.book.start(op):
                with self._cond:
                    self._fair.charge(session, 0.0, done=True)  # cancelled while queued
                continue
            running.append((session, op))
        if len(running) < 2:
            for session, op in running:
                self._run_one(session, op)
            return
        parts: list[PassPart] = [op.run for _, op in running]  # pyright: ignore[reportAssignmentType] - checked by _companions
        try:
            with self.lock:
                outcomes = parts[0].together(parts)
        except Exception:
            log.exception("a batched pass of %d sessions failed; its ops run one at a time", len(running))
            for session, op in running:
                self._run_one(session, op)
            return
        elapsed = time.monotonic() - started
        self.stats["passes"] += 1
        self.stats["batched_ops"] += len(running)
        total = sum(p.weight for p in parts) or 1
        for (session, op), part, out in zip(running, parts, outcomes, strict=True):
            if isinstance(out, TensafeError):
                session.book.finish(op, error=session.error_detail(out))
            else:
                field, result = out
                session.book.finish(op, result_field=field, result=result)
            with self._cond:
                self._fair.charge(session, elapsed * part.weight / total, done=True)
                if session.session_id not in self.sessions:
                    self._fair.forget(session)

    def _run_one(self, session: WorkerSession, op: Op) -> None:
        if op.state == PENDING and not session.book.start(op):
            with self._cond:
                self._fair.charge(session, 0.0, done=True)  # cancelled while queued
            return
        started = time.monotonic()
        done = True
        try:
            if op.cancel_requested:
                raise OpCancelled(f"operation {op.future_id} was cancelled while running")
            with self.lock:
                out = session.run_op(op)
            if out is None:
                done = False  # a slice of a longer op (a Sample): more to do, maybe after others
            else:
                field, result = out
                session.book.finish(op, result_field=field, result=result)
        except OpCancelled as exc:
            session.book.finish(op, error=session.error_detail(exc), state=CANCELLED)
        except TensafeError as exc:
            session.book.finish(op, error=session.error_detail(exc))
        except Exception as exc:  # an op failure must not kill the worker
            log.exception("op %s of session %s failed", op.future_id, session.session_id)
            session.book.finish(op, error=session.error_detail(
                TensafeError(f"operation failed: {type(exc).__name__}", reason="INTERNAL")))
        with self._cond:
            self._fair.charge(session, time.monotonic() - started, done=done or op.state != RUNNING)
            if session.session_id not in self.sessions:
                self._fair.forget(session)  # closed while its last op ran
