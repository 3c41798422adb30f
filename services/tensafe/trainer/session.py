"""A training session: its adapter, optimizer, RNG and futures, and what each op does.

An op's arguments are plain values; what it returns is its future's result, the message the
``FutureEvent`` carries (``ForwardBackwardResult``, ``SampleResult``, ...): kept as built, so that
every watcher of the future is sent the same bytes. That is the one place the logic builds
messages (with ``futures``, ``sampling``, ``checkpoint``, ``lineage`` and ``settings`` for their parts
of it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from google.protobuf import struct_pb2

from tensafe.api.common.v1 import common_pb2
from tensafe.api.trainer.v1 import trainer_pb2
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.context import CallContext
from tensafe.runtime.errors import DependencyUnavailable, FailedPrecondition, InvalidArgument, TensafeError
from tg_tinker.tensors import to_proto

from .audit_trail import DENIED, FAILED, OpAudit
from .base import SharedBase
from .batches import PreparedBatch
from .dp import PerSampleClipper
from .futures import FutureBook, Op, error_detail
from .lineage import SessionLineage
from .losses import Loss, LossInputs, LossOutput, token_logprobs
from .messages import lora_proto, struct
from .sampling import generate_steps
from .settings import DPState, SessionSettings, StepParams
from .values import SamplingSpec


@dataclass
class CustomForward:
    future_id: str
    logprobs: torch.Tensor  # with graph
    num_tokens: int


@dataclass
class TrainingSession:
    session_id: str
    tenant_id: str
    settings: SessionSettings
    base: SharedBase
    create_time: float = field(default_factory=time.time)
    close_time: float | None = None
    step: int = 0
    micro_steps: int = 0            # forward_backward calls since the last optimizer update
    optim_calls: int = 0            # optim_step calls since the last update (gradient accumulation)
    tokens_since_update: int = 0
    tokens_processed: int = 0
    rng_state: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    custom: CustomForward | None = None
    dp: DPState | None = None
    accountant: AccountantClient | None = None
    audit: OpAudit = field(default_factory=lambda: OpAudit(None))
    lineage: SessionLineage = field(default_factory=SessionLineage)
    params: list[torch.nn.Parameter] = field(default_factory=list)  # the session's adapter parameters
    book: FutureBook = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.book = FutureBook(self.session_id)

    # -- lifecycle --------------------------------------------------------------------
    def init_optimizer(self) -> None:
        s = self.settings
        params = self.params = self.base.adapter_parameters(self.session_id)
        if s.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum,
                                             weight_decay=s.weight_decay)
        else:
            cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
            self.optimizer = cls(params, lr=s.learning_rate, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
        gen = torch.Generator().manual_seed(s.seed + 1)
        self.rng_state = gen.get_state()

    @property
    def closed(self) -> bool:
        return self.close_time is not None

    def _optimizer(self) -> torch.optim.Optimizer:
        assert self.optimizer is not None, "init_optimizer runs when the session is created"
        return self.optimizer

    def _dp_parts(self) -> tuple[DPState, PerSampleClipper, AccountantClient]:
        """A DP session's state, clipper and accountant (all set when it is created)."""
        dp = self.dp
        assert dp is not None and dp.clipper is not None and self.accountant is not None, "not a DP session"
        return dp, dp.clipper, self.accountant

    def error_detail(self, err: TensafeError) -> common_pb2.ErrorDetail:
        return error_detail(err)

    # -- running an op (called on the base's worker, under its lock) --------------------
    def run_op(self, op: Op) -> tuple[str, Any] | None:
        """Run the op, or its next slice (a Sample runs one sequence per slice): None while unfinished."""
        if self.closed:
            raise FailedPrecondition(f"session {self.session_id} is closed")
        model = self.base.activate(self.session_id)
        for p in self.params:  # PEFT freezes inactive adapters; this session's own are trainable in its op
            p.requires_grad_(True)
        saved = torch.get_rng_state()
        assert self.rng_state is not None, "init_optimizer runs when the session is created"
        torch.set_rng_state(self.rng_state)
        try:
            return op.advance()
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)
            model.eval()

    def _loss_output(self, batch: PreparedBatch, loss: Loss, train: bool):
        model = self.base.peft_model()
        model.train(train)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        return loss(LossInputs(logits=logits, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               labels=batch.labels, advantages=batch.advantages,
                               old_logprobs=batch.old_logprobs, extra=batch.extra))

    def forward_backward(self, batch: PreparedBatch, loss: Loss, return_logprobs: bool) -> tuple[str, Any]:
        self._drop_custom()
        if self.dp is not None:
            return self._dp_forward_backward(batch, loss, return_logprobs)
        out = self._loss_output(batch, loss, train=True)
        if not torch.isfinite(out.loss):
            raise InvalidArgument("batch", "the loss is not finite for this batch; no gradient was accumulated")
        (out.loss / self.settings.accumulation).backward()
        return self.fb_result(out, len(batch.input_ids), return_logprobs)

    def empty_draw(self) -> tuple[str, Any]:
        """A server-sampled ForwardBackward whose Poisson draw took no row: no gradient, still a micro-step
        (its OptimStep is noised and accounted like any other)."""
        self._drop_custom()
        self.micro_steps += 1
        return "forward_backward", trainer_pb2.ForwardBackwardResult()

    def fb_result(self, out: LossOutput, rows: int, return_logprobs: bool) -> tuple[str, Any]:
        """A ForwardBackward's counters and result, once its gradient is in (alone or in a batched pass)."""
        self.micro_steps += 1
        self.tokens_since_update += out.num_tokens
        self.tokens_processed += out.num_tokens
        res = trainer_pb2.ForwardBackwardResult(loss=float(out.loss.detach()), metrics=out.metrics,
                                                num_tokens=out.num_tokens, num_sequences=rows)
        if return_logprobs:
            res.logprobs.CopyFrom(to_proto(out.token_logprobs.cpu().numpy().astype(np.float32)))
        return "forward_backward", res

    def _dp_forward_backward(self, batch: PreparedBatch, loss: Loss, return_logprobs: bool) -> tuple[str, Any]:
        """Each row's loss on its own; each row's gradient clipped and added to the step's sum."""
        model = self.base.peft_model()

        def run_model() -> LossInputs:
            model.train(True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            return LossInputs(logits=logits, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              labels=batch.labels, advantages=batch.advantages, old_logprobs=batch.old_logprobs,
                              extra=batch.extra)

        outs = self._dp_parts()[1].per_sample_backward(run_model, loss)
        return self.fb_result(merge_rows(outs), len(batch.input_ids), return_logprobs)

    def forward(self, batch: PreparedBatch, loss: Loss, return_logprobs: bool) -> tuple[str, Any]:
        with torch.no_grad():
            out = self._loss_output(batch, loss, train=False)
        return self.forward_result(out, len(batch.input_ids), return_logprobs)

    @staticmethod
    def forward_result(out: LossOutput, rows: int, return_logprobs: bool) -> tuple[str, Any]:
        """A Forward's result (alone or in a batched pass)."""
        res = trainer_pb2.ForwardResult(loss=float(out.loss), metrics=out.metrics, num_tokens=out.num_tokens,
                                        num_sequences=rows)
        if return_logprobs:
            res.logprobs.CopyFrom(to_proto(out.token_logprobs.cpu().numpy().astype(np.float32)))
        return "forward", res

    def forward_custom(self, op_id: str, batch: PreparedBatch) -> tuple[str, Any]:
        """Per-token log-probabilities of the labels, keeping the graph for the client's gradient."""
        self._drop_custom()
        model = self.base.peft_model()
        model.train(True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        logprobs, mask = token_logprobs(logits, batch.labels)
        num_tokens = int(mask.sum())
        self.custom = CustomForward(op_id, logprobs, num_tokens)
        return "forward_custom", trainer_pb2.ForwardCustomResult(
            logprobs=to_proto(logprobs.detach().cpu().numpy().astype(np.float32)), num_tokens=num_tokens)

    def backward_custom(self, forward_future_id: str, grad: torch.Tensor, loss: float | None) -> tuple[str, Any]:
        pending = self.custom
        if pending is None or pending.future_id != forward_future_id:
            raise FailedPrecondition(
                f"no pending ForwardCustom {forward_future_id}: BackwardCustom must follow its ForwardCustom "
                "with no other forward in between")
        if tuple(grad.shape) != tuple(pending.logprobs.shape):
            raise InvalidArgument("grad_logprobs", f"shape {list(grad.shape)} differs from the logprobs "
                                                   f"{list(pending.logprobs.shape)}")
        self.custom = None
        pending.logprobs.backward(grad / self.settings.accumulation)
        self.micro_steps += 1
        self.tokens_since_update += pending.num_tokens
        self.tokens_processed += pending.num_tokens
        res = trainer_pb2.BackwardCustomResult(num_tokens=pending.num_tokens)
        if loss is not None:
            res.loss = loss
        return "backward_custom", res

    def _drop_custom(self) -> None:
        self.custom = None  # an abandoned custom forward frees its graph

    def apply_step_params(self, step: StepParams | None) -> float:
        """Set the optimizer's hyperparameters from ``step`` (kept for later steps); return its clip norm (0: off)."""
        if step is None:
            return 0.0
        for group in self._optimizer().param_groups:
            if step.learning_rate is not None:
                group["lr"] = step.learning_rate
            if step.weight_decay is not None:
                group["weight_decay"] = step.weight_decay
            if "betas" in group and (step.beta1 is not None or step.beta2 is not None):
                b1, b2 = group["betas"]
                group["betas"] = (b1 if step.beta1 is None else step.beta1, b2 if step.beta2 is None else step.beta2)
            if "eps" in group and step.eps is not None:
                group["eps"] = step.eps
        return step.grad_clip_norm or 0.0

    def optim_step(self, caller: CallContext | None = None, step: StepParams | None = None) -> tuple[str, Any]:
        self._drop_custom()
        if self.dp is not None:
            assert caller is not None, "a DP step is made for its caller (the accountant is called as them)"
            return self._dp_optim_step(caller, step)
        params = self.base.adapter_parameters(self.session_id)
        optimizer = self._optimizer()
        if self.micro_steps == 0:
            raise FailedPrecondition("optim_step without gradients: call forward_backward first")
        self.optim_calls += 1
        clip = self.apply_step_params(step)
        grad_norm = _norm([p.grad for p in params if p.grad is not None])
        lr = float(optimizer.param_groups[0]["lr"])
        if self.optim_calls < self.settings.accumulation:
            # Accumulating: gradients are kept until the configured number of micro-batches is reached.
            return "optim_step", trainer_pb2.OptimStepResult(step=self.step, learning_rate=lr, grad_norm=grad_norm,
                                                             num_tokens=self.tokens_since_update,
                                                             metrics={"applied": 0.0})
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._reset_accumulation()
            raise InvalidArgument("batch", "gradients are not finite; the step was skipped and gradients cleared")
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lineage.own_non_private_steps += 1
        tokens = self.tokens_since_update
        self._reset_accumulation()
        return "optim_step", trainer_pb2.OptimStepResult(step=self.step, learning_rate=lr, grad_norm=grad_norm,
                                                         num_tokens=tokens, metrics={"applied": 1.0})

    def _dp_optim_step(self, caller: CallContext, step: StepParams | None = None) -> tuple[str, Any]:
        """Check the batch, noise the update, record the step with the accountant, THEN apply it.

        Everything that can fail runs before the record (the batch-size check, drawing the noise,
        the noised mean), so that after it only the apply is left, and that is atomic: if it fails,
        weights and optimizer state are put back and the step is reported as spent without update
        (the budget stays spent: see docs/privacy.md). A step refused before or by the accountant
        changes nothing. An optimizer step with no forward_backward before it is allowed: under
        Poisson sampling a batch may be empty, and that step is still noised and accounted.
        """
        dp, clipper, accountant = self._dp_parts()
        clip = self.apply_step_params(step)
        lr = float(self._optimizer().param_groups[0]["lr"])
        self.optim_calls += 1
        if self.optim_calls < self.settings.accumulation:
            return "optim_step", trainer_pb2.OptimStepResult(step=self.step, learning_rate=lr,
                                                             num_tokens=self.tokens_since_update,
                                                             metrics={"applied": 0.0}, dp_metrics=dp.metrics())
        if clipper.rows > dp.batch_limit:
            rows = clipper.rows
            self._drop_logical_batch()
            self.audit.record(caller, self.tenant_id, "trainer.OptimStep", DENIED, self.session_id, {
                "code": "FAILED_PRECONDITION", "reason": "DP_BATCH_IMPLAUSIBLE", "rows": rows,
                "limit": dp.batch_limit, "sample_rate": dp.sample_rate, "dataset_size": dp.dataset_size or ""})
            raise FailedPrecondition(
                f"this DP logical batch has {rows} rows, but Poisson sampling at rate {dp.sample_rate:.6g}"
                + (f" from {dp.dataset_size} examples" if dp.dataset_size else "")
                + f" gives more than {dp.batch_limit} rows with probability below 1e-9: the privacy accounting "
                "would not hold for it. Nothing was recorded, no weight changed, the batch was dropped; sample "
                "batches with tg_tinker.data.PoissonSampler", reason="DP_BATCH_IMPLAUSIBLE", rows=rows,
                limit=dp.batch_limit, sample_rate=dp.sample_rate, dataset_size=dp.dataset_size or "")
        # The update, computed (and its noise drawn) before the record, released only after it.
        grads = clipper.noised_mean(dp.noise_multiplier, dp.expected_batch_size, dp.noise)
        grad_norm = _norm(list(grads.values()))
        if clip > 0 and grad_norm > clip:  # post-processing of the noised gradient: no privacy cost
            grads = {p: g * (clip / grad_norm) for p, g in grads.items()}
        dp.updates += 1
        step_id = f"{self.session_id}:u{dp.updates}"
        try:
            recorded = accountant.record_step(caller, dp.budget_id, step_id, dp.noise_multiplier,
                                                   dp.sample_rate)
        except DependencyUnavailable:
            # Maybe recorded, maybe not: keep the logical batch and the step id, so that retrying
            # optim_step records the same step (counted once) and applies it.
            dp.updates -= 1
            self.optim_calls -= 1
            raise
        except TensafeError:
            self._drop_logical_batch()  # refused (budget exceeded or closed): the weights stay as they were
            raise
        # Recorded: from here on the step counts against the budget whether or not it is applied.
        try:
            self._apply_atomically(grads)
        except Exception as exc:  # reported, never hidden
            dp.spent_without_update += 1
            dp.metrics(recorded.budget)
            self._drop_logical_batch()
            self.audit.record(caller, self.tenant_id, "trainer.OptimStep", FAILED, self.session_id, {
                "code": "INTERNAL", "reason": "INTERNAL", "dp_step": "spent_without_update", "step_id": step_id,
                "budget_id": dp.budget_id, "spent_without_update": dp.spent_without_update,
                "error": type(exc).__name__})
            raise TensafeError(
                f"DP step {step_id} was recorded with the accountant (its privacy cost is spent) but applying it "
                f"failed ({type(exc).__name__}); no weight changed. The session reports it as spent without "
                "update", reason="INTERNAL", step_id=step_id, budget_id=dp.budget_id,
                spent_without_update=dp.spent_without_update) from exc
        clipper.reset()
        self.step += 1
        self.lineage.own_private_steps += 1
        tokens = self.tokens_since_update
        self._reset_accumulation()
        return "optim_step", trainer_pb2.OptimStepResult(
            step=self.step, learning_rate=lr, grad_norm=grad_norm, num_tokens=tokens,
            metrics={"applied": 1.0, "duplicate_record": float(recorded.duplicate)},
            dp_metrics=dp.metrics(recorded.budget, applied=True))

    def _drop_logical_batch(self) -> None:
        self._dp_parts()[1].reset()
        self._optimizer().zero_grad(set_to_none=True)
        self._reset_accumulation()

    def _apply_atomically(self, grads: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """optimizer.step() with these gradients; on any failure weights and optimizer state are put back."""
        optimizer = self._optimizer()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                       for p, st in optimizer.state.items()}
        try:
            for p, g in grads.items():
                p.grad = g
            optimizer.step()
        except BaseException:
            with torch.no_grad():
                for p, saved in zip(params, saved_params, strict=True):
                    p.copy_(saved)
            optimizer.state.clear()
            optimizer.state.update(saved_state)
            raise
        finally:
            optimizer.zero_grad(set_to_none=True)

    def _reset_accumulation(self) -> None:
        self.micro_steps = self.optim_calls = self.tokens_since_update = 0

    def sample(self, prompts: list[list[int]], texts: list[str], sampling: SamplingSpec,
               cancel: threading.Event | None = None) -> Iterator[None]:
        """A generator: one sequence per slice (see SharedBase), returning ("sample", SampleResult)."""
        self._drop_custom()
        result = yield from generate_steps(self.base.peft_model(), self.base.tokenizer, prompts, texts, sampling,
                                           cancel)
        return "sample", result

    def info(self) -> tuple[str, Any]:
        cfg = self.settings.config
        tok = self.base.tokenizer
        trainable = sum(p.numel() for p in self.base.adapter_parameters(self.session_id))
        msg = trainer_pb2.SessionInfo(
            session_id=self.session_id, model_ref=cfg.model_ref, step=self.step,
            lora_config=lora_proto(cfg.lora_or_default),
            num_trainable_parameters=trainable, num_parameters=self.base.num_base_parameters + trainable,
            vocab_size=self.base.vocab_size, max_sequence_length=self.settings.max_length,
            pending_ops=self.book.pending_count() - 1, tokens_processed=self.tokens_processed,
            metadata=struct(cfg.metadata) if cfg.metadata is not None else struct_pb2.Struct(),
            dp_enabled=self.dp is not None, budget_id=self.dp.budget_id if self.dp else "",
            total_epsilon=self.dp.total_epsilon if self.dp else 0.0,
            lineage=self.lineage.proto(self.session_id, self.dp),
            spent_without_update=self.dp.spent_without_update if self.dp else 0)
        if tok.eos_token_id is not None:
            msg.eos_token_id = int(tok.eos_token_id)  # pyright: ignore[reportArgumentType] - transformers types it as any special token
        if tok.pad_token_id is not None:
            msg.pad_token_id = int(tok.pad_token_id)  # pyright: ignore[reportArgumentType] - as eos_token_id
        return "info", msg

    def saved(self, artifact: Any) -> tuple[str, Any]:
        """SaveState's result, from the vault's record of the checkpoint just stored."""
        return "save_state", trainer_pb2.SaveStateResult(
            artifact_id=artifact.artifact_id, step=self.step, encryption=artifact.encryption,
            size_bytes=artifact.size_bytes, sha256=artifact.plaintext_sha256, name=artifact.name,
            metadata=artifact.metadata, create_time=artifact.create_time, lineage=artifact.lineage)

    def loaded(self, artifact: Any, artifact_id: str, optimizer_restored: bool) -> tuple[str, Any]:
        """LoadState's result, once the checkpoint is in the session."""
        return "load_state", trainer_pb2.LoadStateResult(
            step=self.step, artifact_id=artifact_id, optimizer_restored=optimizer_restored,
            metadata=artifact.metadata, lineage=self.lineage.proto(self.session_id, self.dp))


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def merge_rows(outs: list[LossOutput]) -> LossOutput:
    """One result for a DP micro-batch from its rows' own losses: the loss and each metric are the
    mean over rows (the gradient is of their sum), num_tokens the total."""
    n = len(outs)
    keys = {k for o in outs for k in o.metrics}
    sums = {k: sum(o.metrics.get(k, 0.0) for o in outs) for k in keys}
    metrics = {k: v if k.endswith(":sum") else v / n for k, v in sums.items()}  # "name:sum" metrics add up
    tokens = sum(o.num_tokens for o in outs)
    metrics["num_tokens"] = float(tokens)
    loss = torch.stack([o.loss.detach() for o in outs]).mean()
    metrics["loss"] = float(loss)
    return LossOutput(loss, tokens, metrics, torch.cat([o.token_logprobs for o in outs]))
