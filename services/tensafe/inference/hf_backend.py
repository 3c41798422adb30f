"""The transformers backend (the default): PEFT named adapters on one base model.

Generation is continuous batching across tenants: one decode loop per base runs every active
sequence, whatever its adapter, in ONE forward pass per step, each row through its own adapter
(``tensafe.common.multilora``: segmented LoRA over the PEFT layers, the base computed once).
Sequences join and leave between two steps: a new one is prefilled alone (its prompt, its
adapter, no padding) and its key/value cache joins the batch's, left-padded to the longest
(masked columns, each row at its own positions); a finished or cancelled one leaves, its rows
dropped. Each row's next token is chosen as transformers' ``generate`` chooses it with the
arguments the trainer's ``sample`` uses: the base model's ``generation_config`` processors
``repetition_penalty`` and ``no_repeat_ngram_size`` (over that row's prompt and tokens so far,
greedy or not), then argmax for greedy, or the temperature, top-k, top-p warpers and a multinomial
draw; so an adapter's greedy output is the training session's greedy output and the same as
generating it alone. The other processors a ``generation_config`` can ask for are not applied
(logged when the base loads; docs/inference.md). A token's log-probability is taken from that
step's raw logits exactly as the trainer takes it.

Fairness: a job (one request) has at most one sequence in the batch at a time, its sequences in
order, and jobs are admitted in arrival order, round robin: a job with many prompts or samples
goes to the back of the queue after each of its sequences, so another tenant's short call waits
for at most one sequence of it, never for the whole job. At most ``max_active`` sequences share
a step. A seeded job draws from its own generator, carried from one of its sequences to the
next, so its output does not depend on what else was in the batch. The base's lock (granted in
request order) is taken for each step, so adapters are added and removed between steps; a
sequence whose adapter was removed ends with an error, a cancelled one at the next step.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as st_load
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tensafe.common import multilora
from tensafe.common.devices import model_device
from tensafe.common.models import ModelLocation, load_base_model
from tensafe.runtime.adapter_config import lora_kwargs
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument

from .adapter import AdapterFiles
from .backend import Backend, ChunkQueue, ServedBase
from .generation import GenerationJob, SequenceStream
from .processors import config_processors

# Sequences that share one decode step (the batch), at most.
MAX_ACTIVE = 16

log = logging.getLogger("tensafe.inference.hf")

class _FairLock:
    """A lock granted in the order it was asked for, so a job that releases it and asks again
    queues behind the jobs already waiting. Usable with ``with``; ``acquire`` gives up when
    ``cancelled`` is set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()
        self._held = False

    def acquire(self, cancelled: threading.Event | None = None, poll: float = 0.05) -> bool:
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            while self._held or self._waiting[0] is not ticket:
                if cancelled is not None and cancelled.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return False
                self._cond.wait(poll)
            self._waiting.popleft()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> _FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class HFBase(ServedBase):
    model: PreTrainedModel | None  # None once closed
    tokenizer: PreTrainedTokenizerBase

    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        self.model, self.tokenizer = load_base_model(location)
        self.peft: PeftModel | None = None
        embeddings: torch.Tensor = self.model.get_input_embeddings().weight  # pyright: ignore[reportAssignmentType] - nn.Module attributes are typed Tensor | Module
        self.vocab_size = int(embeddings.shape[0])
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        # The generation_config's processors every row's choice applies (repetition penalty, no repeated n-gram).
        self.processors = config_processors(getattr(self.model, "generation_config", None))
        self.lock = _FairLock()
        self.max_active = MAX_ACTIVE
        self.stats = {"steps": 0, "rows": 0}  # decode steps run, and the rows they decoded
        self._cond = threading.Condition()  # guards the waiting jobs, the batch's rows and the loop handle
        self._waiting: collections.deque[_Job] = collections.deque()
        self._active: list[_Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, [rows, heads, length, dim]
        self._mask: torch.Tensor | None = None  # [rows, length]: 1 where a row has a token
        self._loop: threading.Thread | None = None
        self._closed = False

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: AdapterFiles) -> None:
        """Add a tenant's adapter to the shared base. Its config was checked against the allow-list
        (``tensafe.runtime.adapter_config``): the LoraConfig is built from that plain dict, never from the
        file, so no option that rewrites or restructures the base reaches PEFT; and only tensors that are
        exactly this adapter's own (same key, same shape) are loaded, so the base weights are never written."""
        try:
            config = LoraConfig(**lora_kwargs(adapter.config), inference_mode=True)
            weights = st_load(adapter.weights)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("artifact_id", f"unreadable adapter: {str(exc).splitlines()[0]}") from None
        with self.lock, torch.random.fork_rng(devices=[]):  # PEFT initialises the new layers from the RNG
            try:
                if self.peft is None:
                    self.peft = get_peft_model(self._base(), config, adapter_name=name)
                else:
                    self.peft.add_adapter(name, config)
            except (ValueError, KeyError, RuntimeError) as exc:
                self._drop(name)
                raise InvalidArgument("artifact_id", f"the adapter does not fit this base model: "
                                                     f"{str(exc).splitlines()[0]}") from None
            expected = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)
            unexpected = [k for k in weights if k not in expected]
            missing = [k for k in expected if k not in weights]
            misfit = [k for k in weights if k in expected and tuple(weights[k].shape) != tuple(expected[k].shape)]
            if missing or unexpected or misfit:
                self._drop(name)
                raise InvalidArgument("artifact_id", f"the adapter's weights do not fit this base model "
                                                     f"(missing {missing[:2]}, unexpected {unexpected[:2]}, "
                                                     f"wrong shape {misfit[:2]})")
            set_peft_model_state_dict(self.peft, weights, adapter_name=name)
            self.peft.eval()

    def _drop(self, name: str) -> None:
        if self.peft is None or name not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            self.peft.delete_adapter(name)
            self.model = self.peft.unload()  # back to the plain base model
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self._drop(name)

    def close(self) -> None:
        with self.lock:
            self.peft = None
            self.model = None
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._loop is None:
            self._end_all(FailedPrecondition("the base model was closed"))

    def _base(self) -> PreTrainedModel:
        assert self.model is not None, "the base is closed"
        return self.model

    # -- generation ----------------------------------------------------------------------------
    def start(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        if job.sampling.max_tokens <= 0:  # validate() refuses these; nothing to generate
            out.close()
            return
        with self._cond:
            if self._closed:
                out.close(FailedPrecondition("the base model was closed"))
                return
            self._waiting.append(_Job(adapter, job, out, self.processors))
            self._cond.notify_all()
            if self._loop is None or not self._loop.is_alive():
                self._loop = threading.Thread(target=self._decode_loop, name="inference-hf", daemon=True)
                self._loop.start()

    def _decode_loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._closed:
                    if not self._cond.wait(5.0) and not self._waiting and not self._active:
                        self._loop = None  # idle: the next job starts a new loop
                        return
                if self._closed:
                    self._loop = None
                    self._end_all(FailedPrecondition("the base model was closed"))
                    return
            with self.lock:  # for one step: adapters are added and removed between steps
                if self.model is None:
                    continue  # closed meanwhile: the next round ends the jobs
                try:
                    self._step()
                except Exception as exc:  # the batch's failure ends its jobs, never the loop
                    log.exception("generation failed")
                    self._end_all(exc)

    def _end_all(self, exc: BaseException) -> None:
        """Every job in the batch or waiting ends with ``exc``; the batch's cache is dropped."""
        with self._cond:
            jobs = [r.job for r in self._active] + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        self._kv, self._mask = None, None
        for j in jobs:
            j.out.close(exc)

    def _step(self) -> None:
        """One step: rows that ended leave, waiting jobs' next sequences join (prefilled), then one
        decode step for all."""
        self._drop_rows([i for i, r in enumerate(self._active) if self._gone(r.job)])
        while len(self._active) < self.max_active:
            with self._cond:
                if not self._waiting:
                    break
                job = self._waiting.popleft()
            if self._gone(job):
                continue
            self._admit(job)
        if self._active:
            self._decode()

    def _gone(self, job: _Job) -> bool:
        """True (and the job ended) when it was cancelled or its adapter is no longer loaded."""
        if job.out.cancelled.is_set():
            job.out.close()
            return True
        if job.adapter is not None and (self.peft is None or job.adapter not in self.peft.peft_config):
            job.out.close(InvalidArgument("adapter_id", "the adapter is no longer loaded"))
            return True
        return False

    def _model(self):
        return self.peft if self.peft is not None else self._base()

    def _routed(self, rows: list[_Row]):
        if self.peft is None:
            return contextlib.nullcontext()
        segments = [multilora.Segment(r.job.adapter, i, i + 1, r.step_length) for i, r in enumerate(rows)]
        return multilora.routed(self.peft, segments)

    def _admit(self, job: _Job) -> None:
        """Prefill the job's next sequence alone; it joins the batch unless its first token ends it."""
        index, sample_index, ids = next(job.sequences)
        row = _Row(job, SequenceStream(self.tokenizer, index, sample_index, job.job.stops,
                                       job.job.sampling.return_logprobs), len(ids), ids=list(ids))
        model = self._model()
        model.eval()
        input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))
        row.step_length = len(ids)
        with torch.no_grad(), self._routed([row]):
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                        logits_to_keep=1)
        if self._take(row, out.logits[:, -1].float()):
            return
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._join(kv, len(ids))
        self._active.append(row)

    def _join(self, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Add one sequence's cache to the batch's, left-padding whichever is shorter."""
        device = kv[0][0].device
        ones = torch.ones((1, length), dtype=torch.long, device=device)
        if self._kv is None or self._mask is None:
            self._kv, self._mask = kv, ones
            return
        have = self._mask.shape[1]
        if length < have:
            kv = [(F.pad(k, (0, 0, have - length, 0)), F.pad(v, (0, 0, have - length, 0))) for k, v in kv]
            ones = F.pad(ones, (have - length, 0))
        elif length > have:
            self._kv = [(F.pad(k, (0, 0, length - have, 0)), F.pad(v, (0, 0, length - have, 0))) for k, v in self._kv]
            self._mask = F.pad(self._mask, (length - have, 0))
        self._kv = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(self._kv, kv, strict=True)]
        self._mask = torch.cat([self._mask, ones])

    def _drop_rows(self, rows: list[int]) -> None:
        """Rows leave the batch; leading columns no row uses any more are trimmed."""
        if not rows:
            return
        keep = [i for i in range(len(self._active)) if i not in set(rows)]
        self._active[:] = [self._active[i] for i in keep]
        if not keep or self._kv is None or self._mask is None:
            self._kv, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        used = mask.sum(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self._mask = mask[:, first:]
        self._kv = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                    for k, v in self._kv]

    def _decode(self) -> None:
        """One token for every row of the batch, in one pass (each row through its own adapter)."""
        assert self._kv is not None and self._mask is not None, "rows in the batch have their cache"
        rows = self._active
        model = self._model()
        device = self._mask.device
        last = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=device)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        for r in rows:
            r.step_length = 1
        cache = DynamicCache(ddp_cache_data=self._kv)
        with torch.no_grad(), self._routed(rows):
            out = model(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["rows"] += len(rows)
        for r in rows:
            r.length += 1  # the token fed in is in the cache now
        logits = out.logits[:, -1].float()
        done = [i for i, r in enumerate(rows) if self._take(r, logits[i:i + 1])]
        self._drop_rows(done)

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose the row's next token from its logits [1, V]; True when its sequence is over (then it
        was sent and its job moved on)."""
        job = row.job
        sampling = job.job.sampling
        if job.out.cancelled.is_set():  # stopped between two tokens: nothing more is sent
            job.out.close()
            return True
        scores = logits
        if job.processors:
            # The row's prompt and tokens so far, as generate's input_ids (the warpers read scores only).
            seen = torch.tensor([row.ids if job.reads_ids else []], dtype=torch.long, device=logits.device)
            scores = job.processors(seen, logits.clone())  # pyright: ignore[reportArgumentType] - typed LongTensor, takes a long Tensor
        if job.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=job.generator))
        lp = float(torch.log_softmax(logits[0], -1)[token]) if sampling.return_logprobs else 0.0
        row.generated += 1
        row.last = token
        row.ids.append(token)
        chunk = row.seq.push(token, lp)
        if chunk is not None:
            job.out.put(chunk)
        if not row.seq.stopped and row.generated < sampling.max_tokens:
            return False
        job.out.put(row.seq.finish())
        with self._cond:
            if job.more():
                self._waiting.append(job)  # its next sequence, behind the jobs already waiting
            else:
                job.out.close()
        return True


@dataclass
class _Job:
    """A request: its sequences in order (prompt, then sample), its sampling rule and generator."""

    adapter: str | None
    job: GenerationJob
    out: ChunkQueue
    config_processors: list[LogitsProcessor] = field(default_factory=list[LogitsProcessor])  # the base's
    sequences: Iterator[tuple[int, int, list[int]]] = field(init=False)
    remaining: int = field(init=False)
    greedy: bool = field(init=False)
    processors: LogitsProcessorList = field(init=False)
    reads_ids: bool = field(init=False)  # whether the processors read the tokens so far (the base's do)
    generator: torch.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        job = self.job
        self.sequences = iter([(i, k, ids) for i, ids in enumerate(job.prompts) for k in range(job.num_samples)])
        self.remaining = len(job.prompts) * job.num_samples
        self.greedy = job.temperature == 0.0
        # As generate() builds them: the base's generation_config processors (greedy or not), then the
        # warpers for temperature / top_k / top_p (in that order) when sampling.
        warpers = LogitsProcessorList(self.config_processors)
        self.reads_ids = bool(self.config_processors)
        if not self.greedy:
            if job.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(job.temperature))
            if job.top_k:
                warpers.append(TopKLogitsWarper(job.top_k))
            if job.top_p < 1.0:
                warpers.append(TopPLogitsWarper(job.top_p))
        self.processors = warpers
        # A seeded job: seeded once per request, as the trainer's sample does, and carried across its sequences.
        seed = job.sampling.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def more(self) -> bool:
        self.remaining -= 1
        return self.remaining > 0


@dataclass
class _Row:
    """One sequence in the batch: its stream, its length in the cache, its last token."""

    job: _Job
    seq: SequenceStream
    length: int            # tokens in the cache: the position of the next token fed in
    generated: int = 0
    last: int = 0
    ids: list[int] = field(default_factory=list[int])  # the prompt and the tokens chosen so far
    step_length: int = 1   # positions this row feeds in the current forward (its prompt, then 1)


class HFBackend(Backend):
    name = "hf"

    def open(self, location: ModelLocation) -> HFBase:
        return HFBase(location)
