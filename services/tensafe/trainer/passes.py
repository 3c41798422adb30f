"""Several sessions' Forward or ForwardBackward ops in one pass of their shared base (multi-LoRA).

The base's worker (``base.SharedBase``) takes the op the fair queue serves next and, when it is a
Forward or ForwardBackward, the next op of other sessions on the same base of the same kind (each
session's own next op only, so its ops still run in submission order), and hands them here as one
pass: their rows are stacked (right-padded to the longest; causal attention never looks right, so
padding changes no real position) and run through the base once, each session's rows through its
own LoRA adapter (``tensafe.common.multilora``). Then, per session, exactly what its op does alone:

* its loss on its own rows and positions (a DP session: each row's own loss);
* one backward of the sum of the sessions' terms (a non-DP session's loss / its accumulation steps;
  a DP session's row losses). The terms share no row and no adapter, so the gradient that reaches a
  session's parameters is the gradient of its own term alone: no gradient or activation of one
  session reaches another, and the others' rows only add exact zeros;
* a DP session's per-sample gradients, captured by its own clipper's hooks on its own LoRA layers
  (which see its rows only), clipped and added to its own logical batch; its parameters keep no
  unclipped gradient;
* its counters and its op's result.

A session whose loss fails (not finite, a loss's own check) fails alone, and nothing of its op is
kept (its gradients are restored); the others' ops succeed. A failure of the shared forward pass
itself (rare: memory) raises before anything changed, and the worker then runs the ops one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tensafe.common import multilora
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, TensafeError

from .batches import PreparedBatch
from .dp import PerSampleClipper, row_losses
from .losses import Loss, LossInputs, LossOutput
from .session import TrainingSession, merge_rows

log = logging.getLogger("tensafe.trainer")

Outcome = tuple[str, Any] | TensafeError


@dataclass
class PassOp:
    """A Forward (``train`` False) or ForwardBackward op: the op's ``run`` when it runs alone, or a
    part of a pass shared with other sessions' ops (:meth:`together`)."""

    session: TrainingSession
    train: bool
    batch: PreparedBatch
    loss: Loss
    return_logprobs: bool

    @property
    def kind(self) -> str:
        return "forward_backward" if self.train else "forward"

    @property
    def weight(self) -> int:
        """Its share of a pass's cost: its tokens (rows x length)."""
        return int(self.batch.input_ids.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.batch.input_ids.shape[0]), int(self.batch.input_ids.shape[1])

    def batchable(self) -> bool:
        s = self.session
        return not s.closed and s.base.is_routable(s.session_id)

    def __call__(self) -> tuple[str, Any]:
        s = self.session
        if self.train:
            return s.forward_backward(self.batch, self.loss, self.return_logprobs)
        return s.forward(self.batch, self.loss, self.return_logprobs)

    def together(self, parts: list[Any]) -> list[Outcome]:
        return run_pass(parts)


@dataclass
class StepOp:
    """An OptimStep. Nothing of it is shared, but the worker runs it in one turn with other sessions' next
    OptimSteps (one after another, each its own op), so that sessions training side by side stay in step:
    their next ForwardBackwards are queued together and share one pass, instead of each arriving while the
    others still wait for their OptimStep and running alone."""

    session: TrainingSession
    run: Callable[[], tuple[str, Any]]

    kind = "optim_step"
    shape = (0, 0)  # no rows in a pass

    @property
    def weight(self) -> int:
        """Its share of a turn's cost: the optimizer's work grows with the adapter's size."""
        return sum(p.numel() for p in self.session.params) or 1

    def batchable(self) -> bool:
        return not self.session.closed

    def __call__(self) -> tuple[str, Any]:
        return self.run()

    def together(self, parts: list[Any]) -> list[Outcome]:
        out: list[Outcome] = []
        for part in parts:
            try:
                if part.session.closed:
                    raise FailedPrecondition(f"session {part.session.session_id} is closed")
                out.append(part())
            except TensafeError as exc:
                out.append(exc)
            except Exception as exc:  # noqa: BLE001 - one session's failure is its op's, never the others'
                out.append(_internal(exc, f"the optimizer step of session {part.session.session_id}"))
        return out


def _padded(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value) if t.shape[1] < length else t


def _clipper(session: TrainingSession) -> PerSampleClipper:
    dp = session.dp
    assert dp is not None and dp.clipper is not None, "a DP session has its clipper from its creation"
    return dp.clipper


def _dp_capture(session: TrainingSession, on: bool) -> None:
    _clipper(session).start_capture(on)


def _dp_finish(session: TrainingSession, rows: int | None) -> None:
    """Clip the captured rows into the session's sum (``rows`` None: drop them), as per_sample_backward ends."""
    _clipper(session).accumulate_captured(rows)


def _loss(op: PassOp, logits: torch.Tensor) -> LossOutput | list[LossOutput]:
    """The op's loss on its own rows' logits (a DP session: one per row), checked as alone."""
    b = op.batch
    inputs = LossInputs(logits=logits, input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                        advantages=b.advantages, old_logprobs=b.old_logprobs, extra=b.extra)
    if op.train and op.session.dp is not None:
        return row_losses(op.loss, inputs)
    out = op.loss(inputs)
    if op.train and not torch.isfinite(out.loss):
        raise InvalidArgument("batch", "the loss is not finite for this batch; no gradient was accumulated")
    return out


def _internal(exc: Exception, what: str) -> TensafeError:
    log.exception("%s failed in a batched pass", what)
    return TensafeError(f"operation failed: {type(exc).__name__}", reason="INTERNAL")


def run_pass(ops: list[PassOp]) -> list[Outcome]:
    """One pass of the shared base for these ops (one per session, all of one kind): their outcomes."""
    assert ops and len({id(op.session) for op in ops}) == len(ops) and len({op.train for op in ops}) == 1
    train = ops[0].train
    base = ops[0].session.base
    model = base.peft_model()
    outcomes: list[Outcome | None] = [None] * len(ops)
    for i, op in enumerate(ops):
        if op.session.closed:
            outcomes[i] = FailedPrecondition(f"session {op.session.session_id} is closed")
    live = [i for i, o in enumerate(outcomes) if o is None]
    if not live:
        return [o for o in outcomes if o is not None]
    length = max(ops[i].shape[1] for i in live)
    embeddings: torch.Tensor = base.model.get_input_embeddings().weight  # pyright: ignore[reportAssignmentType] - nn.Module attributes are typed Tensor | Module
    device = embeddings.device
    ids = torch.cat([_padded(ops[i].batch.input_ids, length, 0) for i in live]).to(device)
    mask = torch.cat([_padded(ops[i].batch.attention_mask, length, 0) for i in live]).to(device)
    sessions = [ops[i].session for i in live]
    segments = multilora.segments_for([s.session_id for s in sessions], [ops[i].shape[0] for i in live],
                                      [ops[i].shape[1] for i in live], sessions if train else None)
    dp_live = [i for i in live if train and ops[i].session.dp is not None]
    rng_before = [s.rng_state for s in sessions]
    for s in sessions:
        s._drop_custom()  # pyright: ignore[reportPrivateUsage] - as its own forward does
        if train:
            for p in s.params:  # PEFT freezes inactive adapters: each session's own are trainable in its op
                p.requires_grad_(True)
    for i in dp_live:
        _dp_capture(ops[i].session, True)
    try:
        multilora.set_training(model, train)
        with torch.set_grad_enabled(train), multilora.routed(model, segments):
            logits = model(input_ids=ids, attention_mask=mask).logits
    except BaseException:
        for s, state in zip(sessions, rng_before, strict=True):
            s.rng_state = state  # nothing of the pass is kept: the ops can run alone as if it never was
        for i in dp_live:
            _dp_finish(ops[i].session, None)
        raise
    finally:
        for i in dp_live:
            _dp_capture(ops[i].session, False)
        multilora.set_training(model, False)
    losses: dict[int, LossOutput | list[LossOutput]] = {}
    # One split into the ops' rows (a slice each would make its backward write a zero tensor of the whole
    # pass's logits per op; see dp.split_rows), then each op's own length.
    pieces = torch.split(logits, [seg.stop - seg.start for seg in segments])
    for i, seg, piece in zip(live, segments, pieces, strict=True):
        try:
            losses[i] = _loss(ops[i], piece[:, :seg.length].float())
        except TensafeError as exc:
            outcomes[i] = exc
        except Exception as exc:  # noqa: BLE001 - a loss's own failure is that op's, never the others'
            outcomes[i] = _internal(exc, f"the loss of session {ops[i].session.session_id}")
    if train:
        _backward(ops, losses, outcomes, dp_live)
    for i, got in losses.items():
        if outcomes[i] is not None:
            continue
        s, op = ops[i].session, ops[i]
        rows = op.shape[0]
        if isinstance(got, list):
            outcomes[i] = s.fb_result(merge_rows(got), rows, op.return_logprobs)
        elif train:
            outcomes[i] = s.fb_result(got, rows, op.return_logprobs)
        else:
            outcomes[i] = s.forward_result(got, rows, op.return_logprobs)
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(ops), "every op of the pass has its outcome"
    return done


def _backward(ops: list[PassOp], losses: dict[int, LossOutput | list[LossOutput]], outcomes: list[Outcome | None],
              dp_live: list[int]) -> None:
    """One backward for every session whose loss is good; the failed ones' gradients put back as they were."""
    keep: dict[torch.nn.Parameter, torch.Tensor | None] = {}
    terms: list[torch.Tensor] = []
    for i in [*losses, *(j for j, o in enumerate(outcomes) if o is not None and j not in losses)]:
        session = ops[i].session
        if outcomes[i] is not None:  # failed (or closed, then it was not in the pass: nothing to keep)
            if session.dp is None:
                keep.update({p: None if p.grad is None else p.grad.clone() for p in session.params})
            continue
        got = losses[i]
        if isinstance(got, list):
            terms.append(torch.stack([o.loss for o in got]).sum())
        else:
            terms.append(got.loss / session.settings.accumulation)
    try:
        if terms:
            torch.stack(terms).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the gradients may be half-made: every op of the pass fails
        for i in losses:
            if outcomes[i] is None:
                outcomes[i] = _internal(exc, "the backward")
        for i in dp_live:
            _dp_finish(ops[i].session, None)
        return
    finally:
        for p, grad in keep.items():
            p.grad = grad
    for i in dp_live:
        ok = outcomes[i] is None
        try:
            _dp_finish(ops[i].session, ops[i].shape[0] if ok else None)
        except TensafeError as exc:
            outcomes[i] = exc
