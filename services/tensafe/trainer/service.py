"""The trainer's logic: sessions, their validated ops, and the shared base models.

Plain values in (``values``: what ``servicer`` read out of each request), plain values out (a
``TrainingSession``, an ``Op``, lists of them); no gRPC and no generated message module here. What an
op computes is a future's result, which is a message (built in ``session``, ``futures``,
``checkpoint``); and the vault and accountant clients answer with their services' messages, of which
this module reads fields (``budget.state``, ``artifact.lineage``) but builds none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig

from tensafe.common.devices import model_device
from tensafe.common.models import resolve_model_ref
from tensafe.runtime import context as call_context
from tensafe.runtime import lineage as lineage_mac
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from tensafe.runtime.pagination import after_key
from tensafe.runtime.sample_work import check_sample_work
from tensafe.runtime.vault_client import VaultClient

from . import checkpoint
from .audit_trail import SUCCESS, OpAudit
from .base import SharedBase
from .batches import PreparedBatch, float_matrix, prepare_batch
from .config_checks import check_step_params, resolve_request_loss, server_dataset_id, validate_config
from .dataset import PoissonSampler, ServerDataset, check_tokens
from .dataset import batch as draw_batch
from .dataset import parse as parse_dataset
from .dp import PerSampleClipper, lora_layers
from .futures import Op
from .losses import Loss, resolve_loss
from .messages import (
    OP_BACKWARD_CUSTOM,
    OP_FORWARD,
    OP_FORWARD_BACKWARD,
    OP_FORWARD_CUSTOM,
    OP_GET_INFO,
    OP_LOAD_STATE,
    OP_OPTIM_STEP,
    OP_SAMPLE,
    OP_SAVE_STATE,
    budget_is_active,
    budget_state_name,
)
from .passes import PassOp, StepOp
from .session import TrainingSession
from .settings import SessionSettings, StepParams
from .values import (
    BatchInput,
    LossSpec,
    SamplingSpec,
    SessionConfig,
    TensorData,
)


@dataclass(frozen=True)
class TrainerLimits:
    """Per-tenant quotas and per-call work caps (0: off); the settings are named in each error."""

    sessions: int = 8          # TENSAFE_QUOTA_SESSIONS: open sessions per tenant
    private_copies: int = 2    # TENSAFE_QUOTA_PRIVATE_COPIES: open sessions with their own base copy
    sample_tokens: int = 8192  # TENSAFE_MAX_SAMPLE_TOKENS: prompts x samples x max_tokens per Sample
    batch_tokens: int = 32768  # TENSAFE_MAX_BATCH_TOKENS: rows x length per Forward/ForwardBackward/Custom
    pending_ops: int = 256     # TENSAFE_QUOTA_PENDING_OPS: ops queued or running per session


# Closed sessions kept per tenant for GetSession/ListSessions(include_closed); older ones are forgotten.
KEEP_CLOSED = 32


BATCH_TOKENS_SETTING = "TENSAFE_MAX_BATCH_TOKENS"


class Trainer:
    def __init__(self, model_dir: Path | None, vault: VaultClient | None = None,
                 accountant: AccountantClient | None = None, *, models: Mapping[str, Path] | None = None,
                 limits: TrainerLimits | None = None) -> None:
        self.model_dir = model_dir
        self.models = dict(models or {})
        self.limits = limits or TrainerLimits()
        self.vault = vault
        self.accountant = accountant
        # Set by the servicer: the ledger entries ops write when they run, and the services' key that
        # authenticates a saved checkpoint's lineage to the vault (see tensafe.runtime.lineage).
        self.audit = OpAudit(None)
        self.service_key: Callable[[], str] = lambda: ""
        self._lock = threading.Lock()
        self._bases: dict[str, SharedBase] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._sessions: dict[str, TrainingSession] = {}
        self._private: set[str] = set()  # open sessions holding their own copy of the base
        self._reserved: dict[str, list[int]] = {}  # tenant -> [sessions, private copies] being created

    # -- sessions -------------------------------------------------------------------------
    def _base_for(self, model_ref: str, private_key: str | None) -> SharedBase:
        location = resolve_model_ref(model_ref, self.model_dir, self.models)
        key = location.cache_key if private_key is None else f"{location.cache_key}#{private_key}"
        with self._lock:
            if key in self._bases:
                return self._bases[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per model even when several sessions start at once
            with self._lock:
                if key in self._bases:
                    return self._bases[key]
            base = SharedBase(location, on_empty=lambda b: self._drop_base(key, b))
            with self._lock:
                self._bases[key] = base
                self._loading.pop(key, None)
            return base

    def _drop_base(self, key: str, base: SharedBase) -> None:
        with self._lock:
            if self._bases.get(key) is base and not base.sessions:
                del self._bases[key]

    def _reserve(self, tenant: str, private: bool) -> None:
        """Take a place in the tenant's session quotas (and, for a private copy, that quota too)."""
        with self._lock:
            reserved = self._reserved.setdefault(tenant, [0, 0])
            mine = [s for s in self._sessions.values() if s.tenant_id == tenant and not s.closed]
            open_now = len(mine) + reserved[0]
            if self.limits.sessions and open_now >= self.limits.sessions:
                raise QuotaExceeded("TENSAFE_QUOTA_SESSIONS", f"the tenant has {open_now} open training sessions, "
                                    f"the most allowed; close one first", limit=self.limits.sessions,
                                    current=open_now)
            copies = sum(1 for s in mine if s.session_id in self._private) + reserved[1]
            if private and self.limits.private_copies and copies >= self.limits.private_copies:
                raise QuotaExceeded("TENSAFE_QUOTA_PRIVATE_COPIES",
                                    f"the tenant has {copies} open sessions with their own copy of the base model "
                                    "(LoRA bias other than 'none'), the most allowed; close one, or train with "
                                    "bias 'none' (shared base)", limit=self.limits.private_copies, current=copies)
            reserved[0] += 1
            reserved[1] += int(private)

    def _release(self, tenant: str, private: bool) -> None:
        with self._lock:
            reserved = self._reserved[tenant]
            reserved[0] -= 1
            reserved[1] -= int(private)
            if reserved == [0, 0]:
                del self._reserved[tenant]

    def create_session(self, tenant: str, config: SessionConfig) -> TrainingSession:
        dataset = self._server_dataset(config)
        if dataset is not None:  # N is the dataset's: q = expected batch / N follows in validate_dp
            assert config.dp is not None
            config = dataclasses.replace(config, dp=dataclasses.replace(config.dp, dataset_size=len(dataset)))
        settings, peft_config = validate_config(config)
        if settings.dp is not None and self.accountant is None:
            raise FailedPrecondition("this trainer has no accountant configured: set TENSAFE_ACCOUNTANT_ENDPOINT")
        private = peft_config.bias != "none"
        self._reserve(tenant, private)
        try:
            return self._create_session(tenant, config, settings, peft_config, private, dataset)
        finally:
            self._release(tenant, private)

    def _server_dataset(self, config: SessionConfig) -> ServerDataset | None:
        """DPConfig.sampling = SERVER: the session's dataset, read from the vault as the caller and checked."""
        artifact_id = server_dataset_id(config)
        if artifact_id is None:
            return None
        if self.vault is None:
            raise FailedPrecondition("this trainer has no vault configured: set TENSAFE_VAULT_ENDPOINT")
        _, data = self.vault.get(call_context.current(), artifact_id)
        dataset = parse_dataset(data, artifact_id)
        size = config.dp_or_default.dataset_size
        if size is not None and size != len(dataset):
            raise InvalidArgument("config.dp_config.dataset_size", f"is {size}, but the dataset has "
                                                                   f"{len(dataset)} rows: omit it")
        return dataset

    def _create_session(self, tenant: str, config: SessionConfig, settings: SessionSettings,
                        peft_config: LoraConfig, private: bool,
                        dataset: ServerDataset | None = None) -> TrainingSession:
        session_id = "ses_" + uuid.uuid4().hex[:16]
        # Training base biases would change weights other sessions share: such a session gets its own copy.
        base = self._base_for(config.model_ref, session_id if private else None)
        limit = base.max_length
        if settings.max_length > limit:
            raise InvalidArgument("config.max_sequence_length", f"exceeds the model's limit of {limit} tokens")
        settings.max_length = settings.max_length or limit
        if dataset is not None:
            check_tokens(dataset, base.vocab_size, settings.max_length)
        session = TrainingSession(session_id, tenant, settings, base, dp=settings.dp, accountant=self.accountant,
                                  audit=self.audit)
        with base.lock:
            base.attach(session, peft_config, settings.seed)
            try:
                if session.dp is not None:
                    session.dp.clipper = PerSampleClipper(lora_layers(base.peft_model(), session_id),
                                                          session.dp.max_grad_norm,
                                                          base.adapter_parameters(session_id))
                session.init_optimizer()
            except Exception:
                base.detach(session_id)
                raise
        if session.dp is not None and dataset is not None:
            session.dp.dataset, session.dp.sampler = dataset, PoissonSampler(len(dataset), session.dp.sample_rate)
        if session.dp is not None:
            try:
                self._open_budget(session)
            except Exception:
                with base.lock:
                    if session.dp.clipper is not None:  # set above, with the adapter
                        session.dp.clipper.close()
                    base.detach(session_id)
                raise
        with self._lock:
            self._sessions[session_id] = session
            if private:
                self._private.add(session_id)
        self._note_session(session, config, peft_config)
        return session

    @staticmethod
    def _note_session(session: TrainingSession, config: SessionConfig, peft_config: LoraConfig) -> None:
        """The session's settings, in its CreateSession ledger entry (evidence from the ledger alone)."""
        dp = session.dp
        facts: dict[str, object] = {"session_id": session.session_id, "model_ref": config.model_ref,
                                    "lora_rank": peft_config.r, "dp": "true" if dp is not None else "false"}
        if dp is not None:
            facts.update(noise_multiplier=repr(dp.noise_multiplier), max_grad_norm=repr(dp.max_grad_norm),
                         sample_rate=repr(dp.sample_rate), expected_batch_size=dp.expected_batch_size,
                         target_epsilon=repr(dp.target_epsilon), target_delta=repr(dp.target_delta),
                         budget_id=dp.budget_id, dataset_size=dp.dataset_size or "",
                         sampling=dp.sampling)  # server: attested; client: declared (docs/privacy.md)
            if dp.dataset is not None:
                facts.update(dataset_artifact_id=dp.dataset.artifact_id, dataset_sha256=dp.dataset.sha256)
        call_context.note_audit(**facts)

    def _open_budget(self, session: TrainingSession) -> None:
        """Create the session's accountant budget (or take over the one named in the config) and fix
        the noise multiplier, calibrating it from max_steps when it was not given."""
        dp, cfg, caller = session.dp, session.settings.config.dp_or_default, call_context.current()
        accountant = self.accountant
        assert dp is not None and accountant is not None, "a DP session (created only with the accountant)"
        if cfg.budget_id:
            budget = accountant.get_budget(caller, cfg.budget_id)
            if not budget_is_active(budget):
                raise FailedPrecondition(f"budget {cfg.budget_id} takes no more steps (state "
                                         f"{budget_state_name(budget)})")
            dp.target_epsilon, dp.target_delta = budget.target_epsilon, budget.target_delta
            dp.accountant_type = budget.accountant_type
            dp.total_epsilon, dp.accounted_steps = budget.spent_epsilon, budget.num_steps
            dp.budget_id = cfg.budget_id
            return
        if not dp.noise_multiplier:
            dp.noise_multiplier = accountant.calibrate(caller, dp.target_epsilon, dp.target_delta,
                                                            dp.sample_rate, cfg.max_steps or 0,
                                                            dp.accountant_type).noise_multiplier
        dp.budget_id = accountant.create_budget(caller, session.session_id, dp.target_epsilon,
                                                     dp.target_delta, dp.accountant_type,
                                                     dp.sample_rate).budget_id

    def get(self, tenant: str, session_id: str, *, active: bool = False) -> TrainingSession:
        session = self._sessions.get(session_id)
        if session is None or session.tenant_id != tenant:
            raise NotFound("session", session_id)
        if active and session.closed:
            raise FailedPrecondition(f"session {session_id} is closed")
        return session

    def list(self, tenant: str, include_closed: bool, after: tuple[float, str] | None = None,
             limit: int | None = None) -> list[TrainingSession]:
        """The tenant's sessions ordered by (create_time, session_id): the first ``limit`` after ``after``."""
        with self._lock:
            found = [s for s in self._sessions.values() if s.tenant_id == tenant and (include_closed or not s.closed)]
        key = lambda s: (s.create_time, s.session_id)  # noqa: E731
        return after_key(sorted(found, key=key), key, after)[:limit]

    def close(self, tenant: str, session_id: str) -> TrainingSession:
        session = self.get(tenant, session_id)
        if session.closed:
            return session
        for future_id in session.book.pending_ids():  # queued ops die with the session
            session.book.cancel(future_id)
        session.book.stop_running()  # a running Sample stops at its next token
        with session.base.lock:
            session.close_time = time.time()
            session.optimizer = None
            session.custom = None
            if session.dp is not None and session.dp.clipper is not None:
                session.dp.clipper.close()
            session.base.detach(session_id)
        session.book.close()
        with self._lock:
            self._private.discard(session_id)  # its quota places are free again
            closed = sorted((s for s in self._sessions.values() if s.tenant_id == tenant and s.closed),
                            key=lambda s: s.close_time or 0.0)  # closed: close_time is set
            for old in closed[:-KEEP_CLOSED]:  # a create/close loop must not grow the trainer without end
                del self._sessions[old.session_id]
        return session

    def shutdown(self) -> None:
        for session in list(self._sessions.values()):
            if not session.closed:
                self.close(session.tenant_id, session.session_id)

    # -- ops: validated here, at submission, then queued ------------------------------------
    def _submit(self, session: TrainingSession, op_type: int, run,
                cancel: threading.Event | None = None) -> Op:
        op = session.book.create(op_type, run, cancel_event=cancel, max_open=self.limits.pending_ops)
        session.base.submit(session, op)
        return op

    @staticmethod
    def _no_custom_in_dp(session: TrainingSession, op: str) -> None:
        if session.dp is not None:
            raise FailedPrecondition(f"{op} is not available in DP sessions: a client-side loss can couple rows, "
                                     "so per-sample clipping could not bound each row's influence; use a "
                                     "server-side per-example loss")

    def _batch(self, session: TrainingSession, batch: BatchInput, loss: Loss) -> PreparedBatch:
        if session.dp is not None and not loss.per_example:
            raise InvalidArgument("loss.name", f"loss '{loss.name}' compares rows with each other, so a row's "
                                               "gradient is not its own; DP sessions need a per-example loss")
        self._check_batch_work(batch)
        prepared = prepare_batch(batch, vocab_size=session.base.vocab_size, max_length=session.settings.max_length,
                                 ignore_index=int(loss.kwargs.get("ignore_index", -100)))
        prepared = prepared.to(model_device(session.base.model))  # TENSAFE_DEVICE: where the base runs
        loss.check_batch(prepared.shapes, int(prepared.input_ids.shape[0]), int(prepared.input_ids.shape[1]))
        return prepared

    def _check_batch_work(self, batch: BatchInput) -> None:
        """rows x length within TENSAFE_MAX_BATCH_TOKENS, from the declared shape, before decoding."""
        limit = self.limits.batch_tokens
        shape = list(batch.input_ids.shape) if batch.input_ids is not None else []
        if limit and len(shape) == 2 and shape[0] >= 0 and shape[1] >= 0 and shape[0] * shape[1] > limit:
            raise InvalidArgument("batch.input_ids", f"{shape[0]} rows x {shape[1]} tokens = {shape[0] * shape[1]} "
                                                     f"exceeds the per-call limit of {limit} "
                                                     f"({BATCH_TOKENS_SETTING}); split the batch",
                                  quota=BATCH_TOKENS_SETTING, limit=limit)

    def forward_backward(self, tenant: str, session_id: str, batch: BatchInput, loss: LossSpec | None = None,
                         return_logprobs: bool = False) -> Op:
        s = self.get(tenant, session_id, active=True)
        resolved = resolve_request_loss(s.settings.default_loss, loss)
        if s.dp is not None and s.dp.dataset is not None:
            drawn = self._server_batch(s, batch, resolved)
            if drawn is None:
                return self._submit(s, OP_FORWARD_BACKWARD, s.empty_draw)
            prepared = drawn
        else:
            prepared = self._batch(s, batch, resolved)
        return self._submit(s, OP_FORWARD_BACKWARD, PassOp(s, True, prepared, resolved, return_logprobs))

    def _server_batch(self, session: TrainingSession, batch: BatchInput, loss: Loss) -> PreparedBatch | None:
        """A server-sampled session's logical batch: every dataset row in with probability q (CSPRNG); None when
        the draw took no row."""
        dp = session.dp
        assert dp is not None and dp.dataset is not None and dp.sampler is not None
        sent = (batch.input_ids, batch.attention_mask, batch.labels, batch.advantages, batch.old_logprobs)
        if any(t is not None for t in sent) or batch.extra:
            raise InvalidArgument("batch", "this session samples its own batches from its dataset "
                                           "(dp_config.sampling = SERVER): send ForwardBackward without a batch")
        if not loss.per_example:
            raise InvalidArgument("loss.name", f"loss '{loss.name}' compares rows with each other, so a row's "
                                               "gradient is not its own; DP sessions need a per-example loss")
        indices = dp.sampler.draw()
        if not indices:
            return None
        prepared = draw_batch(dp.dataset, indices, int(loss.kwargs.get("ignore_index", -100)))
        prepared = prepared.to(model_device(session.base.model))
        loss.check_batch(prepared.shapes, int(prepared.input_ids.shape[0]), int(prepared.input_ids.shape[1]))
        return prepared

    def forward(self, tenant: str, session_id: str, batch: BatchInput, loss: LossSpec | None = None,
                return_logprobs: bool = False) -> Op:
        s = self.get(tenant, session_id, active=True)
        resolved = resolve_request_loss(s.settings.default_loss, loss)
        prepared = self._batch(s, batch, resolved)
        return self._submit(s, OP_FORWARD, PassOp(s, False, prepared, resolved, return_logprobs))

    def forward_custom(self, tenant: str, session_id: str, batch: BatchInput) -> Op:
        s = self.get(tenant, session_id, active=True)
        self._no_custom_in_dp(s, "ForwardCustom")
        prepared = self._batch(s, batch, resolve_loss("token_ce"))
        holder: dict[str, str] = {}
        op = self._submit(s, OP_FORWARD_CUSTOM, lambda: s.forward_custom(holder["id"], prepared))
        holder["id"] = op.future_id
        return op

    def backward_custom(self, tenant: str, session_id: str, forward_future_id: str,
                        grad_logprobs: TensorData | None, loss: float | None = None) -> Op:
        s = self.get(tenant, session_id, active=True)
        self._no_custom_in_dp(s, "BackwardCustom")
        if not forward_future_id:
            raise InvalidArgument("forward_future_id", "is required")
        if grad_logprobs is None or len(grad_logprobs.shape) != 2:
            raise InvalidArgument("grad_logprobs", "is required, as a float tensor [batch, seq]")
        shape = (int(grad_logprobs.shape[0]), int(grad_logprobs.shape[1]))
        grad = float_matrix(grad_logprobs, "grad_logprobs", shape)
        return self._submit(s, OP_BACKWARD_CUSTOM, lambda: s.backward_custom(forward_future_id, grad, loss))

    def optim_step(self, tenant: str, session_id: str, apply_dp_noise: bool | None = None,
                   step: StepParams | None = None) -> Op:
        """``apply_dp_noise`` None: not given (the session's DP setting applies). ``step``: per-step
        optimizer hyperparameters (OptimStep ``params``), checked here."""
        s = self.get(tenant, session_id, active=True)
        check_step_params(step, s.settings.optimizer)
        if s.dp is not None:
            if apply_dp_noise is False:
                raise InvalidArgument("apply_dp_noise", "this is a DP session: every optimizer step is clipped, "
                                                        "noised and accounted; false is refused, not obeyed")
            caller = call_context.current()  # the accountant is called as this caller, from the worker
            return self._submit(s, OP_OPTIM_STEP, StepOp(s, lambda: s.optim_step(caller, step)))
        if apply_dp_noise:
            raise InvalidArgument("apply_dp_noise", "this session has no DP configuration (dp_config.enabled is "
                                                    "false); create a DP session to train with noise")
        return self._submit(s, OP_OPTIM_STEP, StepOp(s, lambda: s.optim_step(None, step)))

    def sample(self, tenant: str, session_id: str, sampling: SamplingSpec, prompts: Sequence[str] = (),
               prompt_token_ids: Sequence[Sequence[int]] = ()) -> Op:
        """Generate from the session's weights. ``sampling``'s own ranges are the servicer's check
        (``tg_tinker.sampling_rules``, shared with inference and the SDK); the limits that depend on
        this trainer (tokens per call, the vocabulary, the session's length) are checked here."""
        s = self.get(tenant, session_id, active=True)
        sp = sampling
        if prompts and prompt_token_ids:
            raise InvalidArgument("prompts", "give prompts as text or as token ids, not both")
        if not prompts and not prompt_token_ids:
            raise InvalidArgument("prompts", "at least one prompt is required")
        if sp.max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", "must be > 0")
        check_sample_work(len(prompts) or len(prompt_token_ids), sp, self.limits.sample_tokens)
        tok = s.base.tokenizer
        if prompts:
            texts = list(prompts)
            ids_list = [tok(t).input_ids for t in texts]
            field = "prompts"
        else:
            ids_list = [list(p) for p in prompt_token_ids]
            texts: list[str] = [tok.decode(p) for p in ids_list]  # pyright: ignore[reportAssignmentType] - one sequence decodes to a str
            field = "prompt_token_ids"
        for i, ids in enumerate(ids_list):
            if not ids:
                raise InvalidArgument(f"{field}[{i}]", "is empty")
            if min(ids) < 0 or max(ids) >= s.base.vocab_size:
                raise InvalidArgument(f"{field}[{i}]", f"token ids must be in [0, {s.base.vocab_size})")
            if len(ids) + sp.max_tokens > s.settings.max_length:
                raise InvalidArgument("sampling.max_tokens", f"prompt {i} ({len(ids)} tokens) plus max_tokens "
                                                             f"exceeds the limit of {s.settings.max_length}")
        cancel = threading.Event()  # CancelFuture stops it between tokens, even once it runs
        return self._submit(s, OP_SAMPLE, lambda: s.sample(ids_list, texts, sp, cancel), cancel)

    def save_state(self, tenant: str, session_id: str, name: str = "", include_optimizer: bool = False,
                   metadata: Mapping[str, Any] | None = None) -> Op:
        s = self.get(tenant, session_id, active=True)
        if self.vault is None:
            raise FailedPrecondition("this trainer has no vault configured: set TENSAFE_VAULT_ENDPOINT")
        if len(name) > 256:
            raise InvalidArgument("name", "must be at most 256 characters")
        caller = call_context.current()  # the vault is called as this caller, later, from the worker
        meta = dict(metadata or {})
        vault = self.vault
        try:
            lineage_key = lineage_mac.derive_key(self.service_key())
        except lineage_mac.LineageKeyMissing as exc:
            raise FailedPrecondition(f"{exc}; the trainer does not save checkpoints without their lineage") from None

        def run() -> tuple[str, Any]:
            lineage = s.lineage.proto(s.session_id, s.dp)
            data = checkpoint.build(s, include_optimizer, meta, lineage)
            tag = lineage_mac.mac(lineage_key, s.tenant_id, hashlib.sha256(data).digest(), lineage)
            artifact = vault.put(caller, data, kind=checkpoint.ARTIFACT_KIND,
                                 name=name or f"{s.session_id}-step{s.step}", metadata=meta,
                                 session_id=s.session_id, content_type=checkpoint.CONTENT_TYPE,
                                 lineage=lineage, lineage_mac=tag)
            self.audit.record(caller, s.tenant_id, "trainer.SaveState", SUCCESS, artifact.artifact_id,
                              {"session_id": s.session_id, **lineage_mac.summary(artifact.lineage)})
            return s.saved(artifact)

        return self._submit(s, OP_SAVE_STATE, run)

    def load_state(self, tenant: str, session_id: str, artifact_id: str) -> Op:
        s = self.get(tenant, session_id, active=True)
        if self.vault is None:
            raise FailedPrecondition("this trainer has no vault configured: set TENSAFE_VAULT_ENDPOINT")
        if not artifact_id:
            raise InvalidArgument("artifact_id", "is required")
        caller = call_context.current()
        vault = self.vault

        def run() -> tuple[str, Any]:
            artifact, data = vault.get(caller, artifact_id)
            # The lineage is the vault's record of the artifact, never what its own files claim.
            _, optimizer_restored = checkpoint.restore(s, checkpoint.read(data), artifact.lineage, artifact_id)
            return s.loaded(artifact, artifact_id, optimizer_restored)

        return self._submit(s, OP_LOAD_STATE, run)

    def get_info(self, tenant: str, session_id: str) -> Op:
        s = self.get(tenant, session_id, active=True)
        return self._submit(s, OP_GET_INFO, s.info)

    # -- futures ------------------------------------------------------------------------------
    def future(self, tenant: str, session_id: str, future_id: str) -> Op:
        op = self.get(tenant, session_id).book.get(future_id)
        if op is None:
            raise NotFound("future", future_id)
        return op

    def cancel(self, tenant: str, session_id: str, future_id: str) -> tuple[bool, Op]:
        session = self.get(tenant, session_id)
        cancelled, op = session.book.cancel(future_id)
        if op is None:
            raise NotFound("future", future_id)
        return cancelled, op

    def watch(self, tenant: str, session_id: str, after_sequence: int, future_ids: Iterable[str],
              still_wanted: Callable[[], bool]) -> Iterator:
        """The end events of the session's ops after ``after_sequence`` (only ``future_ids``, if any)."""
        session = self.get(tenant, session_id)
        return session.book.watch(after_sequence, set(future_ids), still_wanted)

