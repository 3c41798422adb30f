"""The Tinker-compatible gateway's logic: the ``tinker`` client's sessions, models, futures and samplers, each
op done by calling the TenSafe services over gRPC (through ``tg_tinker``) *as the caller's tenant*.

It keeps no data of its own: a model is a trainer session, a checkpoint a vault artifact (found again by its
session and name, so ``tinker://<session>/weights/<name>`` paths need no table), a sampler an adapter of the
inference service. What it holds in memory is the client's protocol state: which futures are pending, the
``seq_id`` each model expects next, heartbeats. Ops of one model are submitted to the trainer in ``seq_id``
order (the client may send them out of order: chunks of one call in parallel, retries), and the trainer
applies them in submission order.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from tensafe.runtime.config import ServerConfig
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.runtime.http_edge import EdgeCaller
from tg_tinker import ServiceClient
from tg_tinker.configs import LoRAConfig, OptimizerConfig, TrainingConfig
from tg_tinker.errors import TGTinkerError, ValidationError

from . import wire
from .futures import Box, FutureTable, Outcome, failure
from .policy import DPPolicy, check_id, check_name, load_policies, parse_models
from .state import ClientSession, Model, Sampler

log = logging.getLogger("tensafe.tinker")

SESSION_TTL_SECONDS = 600.0  # a session whose client stopped heartbeating is closed (its models released)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
KINDS = {"weights": "training", "sampler_weights": "sampler"}


class Gateway:
    """Everything the HTTP routes call; every method takes the verified caller and checks ownership."""

    def __init__(self, config: ServerConfig, endpoints: dict[str, str]) -> None:
        self.config = config
        self.endpoints = endpoints
        self.models_by_name = parse_models(config.tinker_models)
        self.dp_tenants, self.dp_keys = load_policies(config.tinker_policy_file)
        self.futures = FutureTable()
        self.pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="tinker-op")
        self._lock = threading.Lock()
        self._clients: dict[str, ServiceClient] = {}
        self._sessions: dict[str, ClientSession] = {}
        self._models: dict[str, Model] = {}
        self._samplers: dict[str, Sampler] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="tinker-reaper", daemon=True)
        self._reaper.start()

    # -- plumbing -------------------------------------------------------------------------------
    def client(self, caller: EdgeCaller) -> ServiceClient:
        with self._lock:
            sc = self._clients.get(caller.api_key)
            if sc is None:
                sc = self._clients[caller.api_key] = ServiceClient(
                    api_key=caller.api_key, base_url=self.endpoints["trainer"], endpoints=self.endpoints,
                    retry_count=2)
            return sc

    def _run(self, box: Box, fn: Callable[[], Outcome]) -> None:
        """Run ``fn`` on the op pool; its outcome (or its failure) completes ``box``."""
        def work() -> None:
            try:
                box.future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - every failure is the future's outcome
                box.future.set_result(failure(exc))
        self.pool.submit(work)

    @staticmethod
    def _chain(box: Box, handle: Any, then: Callable[[Any], Outcome]) -> None:
        """When the trainer future ``handle`` is done, ``then(result)`` (or its failure) completes ``box``."""
        def done(h: Any) -> None:
            try:
                err = h.exception()
                box.future.set_result(failure(err) if err is not None else then(h.result()))
            except BaseException as exc:  # noqa: BLE001
                box.future.set_result(failure(exc))
        handle.add_done_callback(done)

    def resolve_model(self, base_model: str) -> str:
        """The local model for a base-model name: the operator's mapping, else the name itself."""
        check_id(base_model, "base_model")
        return self.models_by_name.get(base_model, base_model)

    def dp_policy(self, caller: EdgeCaller) -> DPPolicy | None:
        return self.dp_keys.get(caller.key_id) or self.dp_tenants.get(caller.tenant_id)

    # -- sessions ---------------------------------------------------------------------------------
    def create_session(self, caller: EdgeCaller) -> str:
        sid = f"tsess-{uuid.uuid4().hex[:24]}"
        with self._lock:
            self._sessions[sid] = ClientSession(sid, caller.tenant_id, time.monotonic())
        return sid

    def session(self, caller: EdgeCaller, session_id: str) -> ClientSession:
        with self._lock:
            s = self._sessions.get(check_id(session_id, "session_id"))
        if s is None or s.tenant != caller.tenant_id:
            raise NotFound("session", session_id)
        return s

    def heartbeat(self, caller: EdgeCaller, session_id: str) -> bool:
        """False when the session has finished (the client then stops heartbeating: 410)."""
        s = self.session(caller, session_id)
        s.last_seen = time.monotonic()
        return not s.finished

    def finish_session(self, caller: EdgeCaller, session_id: str) -> None:
        s = self.session(caller, session_id)
        s.finished = True
        self.pool.submit(self._release, s)

    def _release(self, s: ClientSession) -> None:
        with self._lock:
            models = [self._models.pop(m) for m in s.models if m in self._models]
            samplers = [self._samplers.pop(x) for x in s.samplers if x in self._samplers]
        for m in models:
            if m.tc is not None:
                try:
                    m.tc.close()
                except TGTinkerError as exc:
                    log.warning("closing %s: %s", m.model_id, exc)
        for sp in samplers:
            self._close_sampler(sp)

    @staticmethod
    def _close_sampler(sp: Sampler) -> None:
        for close in (sp.client.unload, sp.scorer.close if sp.scorer else None):
            if close is not None:
                try:
                    close()
                except TGTinkerError as exc:
                    log.warning("closing sampler %s: %s", sp.sampler_id, exc)

    def _reap(self) -> None:
        while not self._stop.wait(30):
            now = time.monotonic()
            with self._lock:
                stale = [s for s in self._sessions.values() if now - s.last_seen > SESSION_TTL_SECONDS]
                for s in stale:
                    del self._sessions[s.session_id]
            for s in stale:
                log.info("session %s stopped heartbeating; releasing its models", s.session_id)
                self._release(s)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            self._release(s)
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for sc in clients:
            sc.close()

    # -- models -------------------------------------------------------------------------------------
    def model(self, caller: EdgeCaller, model_id: str) -> Model:
        with self._lock:
            m = self._models.get(check_id(model_id, "model_id"))
        if m is None or m.tenant != caller.tenant_id:
            raise NotFound("model", model_id)
        return m

    def _training_config(self, caller: EdgeCaller, local_ref: str, rank: int, train: tuple[bool, bool, bool],
                         seed: int | None, base_model: str) -> TrainingConfig:
        targets = (MLP if train[0] else []) + (ATTN if train[1] else []) + (["lm_head"] if train[2] else [])
        if not targets:
            raise InvalidArgument("lora_config", "at least one of train_mlp, train_attn, train_unembed must be true")
        if not 0 < rank <= 256:
            raise InvalidArgument("lora_config.rank", f"must be in 1..256, got {rank}")
        policy = self.dp_policy(caller)
        try:
            return TrainingConfig(
                model_ref=local_ref, lora_config=LoRAConfig(rank=rank, alpha=32.0, dropout=0.0, target_modules=targets),
                optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-12),
                batch_size=policy.batch_size if policy else 8, seed=seed,
                dp_config=policy.config() if policy else None,
                metadata={"tinker_base_model": base_model, "tinker_rank": rank,
                          "tinker_train": ",".join("1" if t else "0" for t in train)})
        except ValidationError as exc:
            raise InvalidArgument(exc.field or "lora_config", exc.message) from None

    def create_model(self, caller: EdgeCaller, session_id: str, model_seq_id: int, base_model: str,
                     lora: dict[str, Any], seed: int | None) -> Box:
        s = self.session(caller, session_id)
        model_id = f"{session_id}:train:{model_seq_id}"
        train = (bool(lora.get("train_mlp", True)), bool(lora.get("train_attn", True)),
                 bool(lora.get("train_unembed", True)))
        rank = int(lora.get("rank", 0))
        return self._new_model(caller, s, model_id, base_model, rank, train, seed, None,
                               {"model_id": model_id, "type": "create_model"})

    def _new_model(self, caller: EdgeCaller, s: ClientSession, model_id: str, base_model: str, rank: int,
                   train: tuple[bool, bool, bool], seed: int | None, artifact_id: str | None,
                   answer: dict[str, Any]) -> Box:
        """Create the model's trainer session on the op pool (then load ``artifact_id`` into it); its future
        answers ``answer``. A retried creation of the same model id gets the same future."""
        local = self.resolve_model(base_model)
        config = self._training_config(caller, local, rank, train, seed, base_model)
        with self._lock:
            existing = self._models.get(model_id)
            if existing is not None:
                if existing.tenant != caller.tenant_id or existing.created is None:
                    raise FailedPrecondition(f"model {model_id} exists already")
                return existing.created
            m = Model(model_id, caller.tenant_id, caller.key_id, s.session_id, base_model, local, rank, train,
                      dp=config.dp_config is not None)
            m.created = self.futures.new(caller.tenant_id)
            self._models[model_id] = m
            s.models.append(model_id)

        def create() -> Outcome:
            try:
                m.tc = self.client(caller).create_training_client(config)
                if artifact_id is not None:
                    m.tc.load_state(artifact_id)
            except BaseException:
                with self._lock:
                    self._models.pop(model_id, None)
                raise
            return Outcome(json=answer)
        self._run(m.created, create)
        return m.created

    def get_info(self, caller: EdgeCaller, model_id: str) -> dict[str, Any]:
        m = self.model(caller, model_id)
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank,
                "model_name": m.base_model, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": m.local_ref, "model_name": m.base_model, "tokenizer_id": m.base_model}}

    def submit(self, caller: EdgeCaller, model_id: str, seq_id: int | None, op: Callable[[Model, Box], None]) -> Box:
        """Queue ``op`` for ``seq_id``: it runs (submits to the trainer) once every lower seq_id has. A retry of
        a seq_id already taken gets the same future."""
        m = self.model(caller, model_id)
        if m.tc is None:
            raise FailedPrecondition(f"model {model_id} is still being created")
        with m.lock:
            seq = m.next_seq + len(m.waiting) if seq_id is None else seq_id
            if seq in m.seen:
                box = self.futures.peek(m.seen[seq])
                if box is not None:
                    return box
            if seq < m.next_seq or seq in m.waiting or seq > m.next_seq + 10_000:
                raise InvalidArgument("seq_id", f"{seq} is not the next op of model {model_id} "
                                                f"(expected {m.next_seq} or later)")
            box = self.futures.new(caller.tenant_id)
            m.seen[seq] = box.request_id

            def run(box: Box = box) -> None:
                try:
                    op(m, box)
                except BaseException as exc:  # noqa: BLE001 - a refused submission fails its future
                    box.future.set_result(failure(exc))
            m.waiting[seq] = run
            while m.next_seq in m.waiting:
                m.waiting.pop(m.next_seq)()
                m.seen = {k: v for k, v in m.seen.items() if k > m.next_seq - 1000}
                m.next_seq += 1
        return box

    # -- training ops ---------------------------------------------------------------------------------
    def forward_backward(self, caller: EdgeCaller, call: wire.FwdBwdCall) -> Box:
        name, kwargs = wire.loss_spec(call.loss_fn, call.loss_config)
        batch = wire.to_batch(call.data)

        def op(m: Model, box: Box) -> None:
            assert m.tc is not None
            run = m.tc.forward if call.forward_only else m.tc.forward_backward
            handle = run(batch, name, return_logprobs=True, **kwargs)

            def result(res: Any) -> Outcome:
                lps = wire.per_datum_logprobs(call.data, np.asarray(res.logprobs))
                fields: dict[str, list[np.ndarray]] = {"logprobs": lps}
                if call.loss_fn == "cross_entropy":
                    ws = [d.inputs.get("weights", np.ones(len(d.tokens), np.float32)) for d in call.data]
                    fields["elementwise_loss"] = [(-lp * w).astype(np.float32) for lp, w in zip(lps, ws, strict=True)]
                metrics = wire.metric_names(res.metrics)
                return Outcome(proto=wire.forward_backward_output(fields, metrics, len(call.data)))
            self._chain(box, handle, result)
        return self.submit(caller, call.model_id, call.seq_id, op)

    def optim_step(self, caller: EdgeCaller, model_id: str, seq_id: int | None, adam: dict[str, Any]) -> Box:
        params = {"learning_rate": adam.get("learning_rate", 1e-4), "beta1": adam.get("beta1", 0.9),
                  "beta2": adam.get("beta2", 0.95), "eps": adam.get("eps", 1e-12),
                  "weight_decay": adam.get("weight_decay", 0.0), "grad_clip_norm": adam.get("grad_clip_norm", 0.0)}
        for k, v in params.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise InvalidArgument(f"adam_params.{k}", "must be a number")
        unknown = set(adam) - set(params) - {"type"}
        if unknown:
            raise InvalidArgument(f"adam_params.{sorted(unknown)[0]}", "unknown field (only AdamParams are supported)")

        def op(m: Model, box: Box) -> None:
            assert m.tc is not None
            p = {k: float(v) for k, v in params.items()}
            handle = m.tc.optim_step(learning_rate=p["learning_rate"], beta1=p["beta1"], beta2=p["beta2"],
                                     eps=p["eps"], weight_decay=p["weight_decay"], grad_clip_norm=p["grad_clip_norm"])

            def result(res: Any) -> Outcome:
                metrics = {"step:unique": float(res.step), "learning_rate:unique": float(res.learning_rate),
                           "grad_norm:mean": float(res.grad_norm)}
                if res.dp_metrics is not None:
                    metrics |= {"dp_epsilon:unique": float(res.dp_metrics.total_epsilon),
                                "dp_delta:unique": float(res.dp_metrics.delta)}
                return Outcome(json={"metrics": metrics})
            self._chain(box, handle, result)
        return self.submit(caller, model_id, seq_id, op)

    def save_weights(self, caller: EdgeCaller, model_id: str, seq_id: int | None, name: str | None,
                     for_sampler: bool, sampling_session_seq_id: int | None) -> Box:
        kind = "sampler_weights" if for_sampler else "weights"
        if name is not None:
            check_name(name, "path")
        elif not for_sampler or sampling_session_seq_id is None:
            raise InvalidArgument("path", "a checkpoint name is required")

        def op(m: Model, box: Box) -> None:
            assert m.tc is not None
            label = name if name is not None else f"ephemeral-{uuid.uuid4().hex[:12]}"
            handle = m.tc.save_state_async(include_optimizer=not for_sampler, name=label, metadata={
                "tinker_kind": kind, "tinker_base_model": m.base_model, "tinker_rank": m.rank,
                "tinker_train": ",".join("1" if t else "0" for t in m.train)})

            def result(res: Any) -> Outcome:
                path = f"tinker://{m.run_id}/{kind}/{label}"
                if name is not None:
                    return Outcome(json={"path": path, "type": "save_weights_for_sampler" if for_sampler
                                         else "save_weights"})
                sid = f"{m.session_id}:sample:{sampling_session_seq_id}"
                self._open_sampler(caller, sid, m.session_id, m.base_model, path, res.artifact_id)
                return Outcome(json={"sampling_session_id": sid, "type": "save_weights_for_sampler"})
            self._chain(box, handle, result)
        return self.submit(caller, model_id, seq_id, op)

    def artifact_of(self, caller: EdgeCaller, path: str) -> tuple[str, Any]:
        """``tinker://<run>/<weights|sampler_weights>/<name>`` -> (kind, the vault's ArtifactInfo)."""
        if not isinstance(path, str) or not path.startswith("tinker://"):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidArgument("path", "must be a tinker:// path")
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise InvalidArgument("path", "must be tinker://<training run>/<weights|sampler_weights>/<name>")
        run, kind, name = check_id(parts[0], "path"), parts[1], check_name(parts[2], "path")
        found = [a for a in self.client(caller).list_artifacts(session_id=run)
                 if a.name == name and a.metadata.get("tinker_kind") == kind and a.state == "available"]
        if not found:
            raise NotFound("checkpoint", path)
        return kind, max(found, key=lambda a: a.create_time)

    def load_weights(self, caller: EdgeCaller, body: dict[str, Any]) -> Box:
        path, optimizer = body.get("path"), bool(body.get("optimizer", False))
        if body.get("session_id") is not None:
            return self._create_from_state(caller, body, str(path))
        model_id = check_id(body.get("model_id"), "model_id")

        def op(m: Model, box: Box) -> None:
            assert m.tc is not None
            _kind, art = self.artifact_of(caller, str(path))
            handle = m.tc.load_state_async(art.artifact_id)
            self._chain(box, handle, lambda res: Outcome(json={"path": path, "model_id": m.model_id,
                                                               "type": "load_weights"}))
        del optimizer  # TenSafe restores a checkpoint's optimizer state whenever it holds one
        return self.submit(caller, model_id, body.get("seq_id"), op)

    def _create_from_state(self, caller: EdgeCaller, body: dict[str, Any], path: str) -> Box:
        session_id = check_id(body.get("session_id"), "session_id")
        s = self.session(caller, session_id)
        seq = body.get("model_seq_id")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidArgument("model_seq_id", "must be an integer")
        _kind, art = self.artifact_of(caller, path)
        meta = art.metadata
        base_model = str(body.get("base_model") or meta.get("tinker_base_model") or "")
        rank = int(meta.get("tinker_rank") or 0)
        train = tuple(flag == "1" for flag in str(meta.get("tinker_train", "1,1,1")).split(","))
        if not base_model or rank <= 0 or len(train) != 3:
            raise FailedPrecondition(f"{path} was not saved through the Tinker API (no base model and LoRA rank)")
        model_id = f"{session_id}:train:{seq}"
        return self._new_model(caller, s, model_id, base_model, rank, (train[0], train[1], train[2]), None,
                               art.artifact_id, {"path": path, "model_id": model_id, "type": "load_weights"})

    # -- checkpoints (REST) -----------------------------------------------------------------------------
    def _run_id(self, caller: EdgeCaller, run: str) -> str:
        check_id(run, "training_run_id")
        with self._lock:
            m = self._models.get(run)
        if m is not None and m.tenant == caller.tenant_id and m.tc is not None:
            return m.run_id
        return run

    def list_checkpoints(self, caller: EdgeCaller, run: str) -> list[dict[str, Any]]:
        run_id = self._run_id(caller, run)
        out = []
        for a in self.client(caller).list_artifacts(session_id=run_id):
            kind = a.metadata.get("tinker_kind")
            if kind not in KINDS or a.state != "available" or a.name.startswith("ephemeral-"):
                continue
            out.append({"checkpoint_id": f"{kind}/{a.name}", "checkpoint_type": KINDS[kind],
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.create_time)),
                        "tinker_path": f"tinker://{run_id}/{kind}/{a.name}", "size_bytes": a.size_bytes})
        return sorted(out, key=lambda c: c["time"])

    def delete_checkpoint(self, caller: EdgeCaller, run: str, checkpoint_id: str) -> None:
        kind, _, name = checkpoint_id.partition("/")
        _kind, art = self.artifact_of(caller, f"tinker://{self._run_id(caller, run)}/{kind}/{name}")
        self.client(caller).delete_artifact(art.artifact_id)

    # -- sampling ----------------------------------------------------------------------------------------
    def _open_sampler(self, caller: EdgeCaller, sampler_id: str, session_id: str, base_model: str,
                      model_path: str | None, artifact_id: str | None) -> Sampler:
        local = self.resolve_model(base_model)
        sc = self.client(caller)
        client = (sc.create_sampling_client(artifact_id) if artifact_id
                  else sc.create_sampling_client(model_ref=local))
        sp = Sampler(sampler_id, caller.tenant_id, base_model, local, model_path, artifact_id, client)
        with self._lock:
            self._samplers[sampler_id] = sp
            s = self._sessions.get(session_id)
            if s is not None:
                s.samplers.append(sampler_id)
        return sp

    def create_sampling_session(self, caller: EdgeCaller, session_id: str, seq: int, model_path: str | None,
                                base_model: str | None) -> str:
        self.session(caller, session_id)
        sid = f"{session_id}:sample:{seq}"
        with self._lock:
            if sid in self._samplers:
                return sid
        if model_path:
            _kind, art = self.artifact_of(caller, model_path)
            base = str(art.metadata.get("tinker_base_model") or base_model or "")
            if not base:
                raise FailedPrecondition(f"{model_path} was not saved through the Tinker API (no base model)")
            self._open_sampler(caller, sid, session_id, base, model_path, art.artifact_id)
        elif base_model:
            self._open_sampler(caller, sid, session_id, base_model, None, None)
        else:
            raise InvalidArgument("base_model", "give model_path or base_model")
        return sid

    def sampler(self, caller: EdgeCaller, sampler_id: str) -> Sampler:
        with self._lock:
            sp = self._samplers.get(check_id(sampler_id, "sampling_session_id"))
        if sp is None or sp.tenant != caller.tenant_id:
            raise NotFound("sampler", sampler_id)
        return sp

    def sample(self, caller: EdgeCaller, body: dict[str, Any]) -> tuple[Box, list[str]]:
        sid = body.get("sampling_session_id")
        if sid is None:
            raise InvalidArgument("sampling_session_id", "required (create a sampling session first)")
        sp = self.sampler(caller, sid)
        prompt = wire.model_input_tokens(body.get("prompt"), "prompt")
        n = body.get("num_samples", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise InvalidArgument("num_samples", "must be an integer in 1..64")
        params = body.get("sampling_params") or {}
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(unsupported):
                raise InvalidArgument(unsupported, "is not supported by TenSafe")
        if body.get("target_prompt_logprobs") is not None or body.get("prompt_logprobs_last_n") is not None:
            raise InvalidArgument("target_prompt_logprobs", "is not supported by TenSafe")
        kwargs = wire.sampling_kwargs(params)
        want_prompt = bool(body.get("prompt_logprobs"))
        box = self.futures.new(caller.tenant_id)
        seq_ids = [f"{sid}:{body.get('seq_id', 0)}:{i}" for i in range(n)]

        def run() -> Outcome:
            res = sp.client.sample([prompt], num_samples=n, return_logprobs=True, **kwargs)
            seqs = [wire.SampledSeq(s.token_ids, list(s.logprobs), "length" if s.finish_reason == "length"
                                    else "stop") for s in sorted(res.samples, key=lambda s: s.sample_index)]
            prompt_lps = self._prompt_logprobs(caller, sp, prompt) if want_prompt else None
            return Outcome(proto=wire.sample_response(seqs, prompt_lps))
        self._run(box, run)
        return box, seq_ids

    def _prompt_logprobs(self, caller: EdgeCaller, sp: Sampler, prompt: list[int]) -> list[float]:
        """log p(prompt[i] | prompt[:i]) under the sampler's weights (NaN at 0), computed by a scoring session of
        the trainer holding the same adapter (the inference service returns no prompt log-probabilities)."""
        with sp.lock:
            if sp.scorer is None:
                config = TrainingConfig(model_ref=sp.local_ref, optimizer=OptimizerConfig(name="adamw"),
                                        lora_config=LoRAConfig(rank=1, dropout=0.0, target_modules=["q_proj"]),
                                        metadata={"tinker_role": "prompt_logprobs", "sampler": sp.sampler_id})
                if sp.artifact_id:
                    art = self.client(caller).describe_artifact(sp.artifact_id)
                    rank = int(art.metadata.get("tinker_rank") or 1)
                    train = tuple(f == "1" for f in str(art.metadata.get("tinker_train", "1,1,1")).split(","))
                    config = self._training_config(caller, sp.local_ref, rank, (train[0], train[1], train[2]),
                                                   None, sp.base_model)
                    config.dp_config = None  # it only scores (Forward, no gradient): nothing to account
                    config.metadata["tinker_role"] = "prompt_logprobs"
                scorer = self.client(caller).create_training_client(config)
                if sp.artifact_id:
                    scorer.load_state(sp.artifact_id)
                sp.scorer = scorer
            scorer = sp.scorer
        ids = np.asarray([prompt], np.int64)
        labels = ids.copy()
        labels[0, 0] = wire.IGNORE
        res = scorer.forward({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels},
                             "token_ce", return_logprobs=True).result()
        lps = np.asarray(res.logprobs)[0].astype(float).tolist()
        lps[0] = float("nan")
        return lps

    def sampler_info(self, caller: EdgeCaller, sampler_id: str) -> dict[str, Any]:
        sp = self.sampler(caller, sampler_id)
        return {"sampler_id": sp.sampler_id, "base_model": sp.base_model, "model_path": sp.model_path}

    def capabilities(self) -> list[dict[str, Any]]:
        names = list(self.models_by_name) or sorted(self.config.registered_models())
        return [{"model_name": n, "trainable": True, "sampleable": True} for n in names]
