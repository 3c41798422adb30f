"""The transformers backend (the default): PEFT named adapters on one base model, CPU.

Generation is transformers' own ``generate`` called with the arguments the trainer's
``sample`` uses, one prompt (and sample) at a time with no padding, so an adapter's greedy
output here is the training session's greedy output, token for token. A streamer receives
each token as it is chosen; a forward hook on the output layer keeps the raw logits of that
step, from which the token's log-probability is taken exactly as the trainer takes it.

Jobs on one base take turns one sequence at a time: the base's lock is granted in request
order (first come, first served) and a job takes it for one sequence, so a job with many
prompts or samples does not hold the base for its whole length: another tenant's short call
waits for at most one sequence. The active adapter, the logits hook and the seeded RNG are
set for each sequence under the lock (a seeded job carries its RNG state from one sequence to
the next, so its output does not depend on the interleaving). A job waiting for the lock
gives up when cancelled.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as st_load
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from tensafe.common.devices import model_device
from tensafe.common.models import ModelLocation, load_base_model
from tensafe.runtime.adapter_config import lora_kwargs
from tensafe.runtime.errors import InvalidArgument

from .adapter import AdapterFiles
from .backend import Backend, ChunkQueue, ServedBase
from .generation import GenerationJob, SequenceStream

log = logging.getLogger("tensafe.inference.hf")


class _Halt(Exception):
    """Raised from the streamer to end ``generate`` early (stop string seen, or cancelled)."""


class _TokenSink(BaseStreamer):
    def __init__(self, on_token) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


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
        self.lock = _FairLock()

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

    def _base(self) -> PreTrainedModel:
        assert self.model is not None, "the base is closed"
        return self.model

    # -- generation ----------------------------------------------------------------------------
    def start(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        threading.Thread(target=self._run, args=(adapter, job, out), name="inference-hf", daemon=True).start()

    def _run(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        try:
            self._generate(adapter, job, out)  # takes the lock for one sequence at a time
            out.close()
        except Exception as exc:  # handed to the caller, who reports it
            if not isinstance(exc, InvalidArgument):
                log.exception("generation failed")
            out.close(exc)

    def _model(self, adapter: str | None, stack: contextlib.ExitStack):
        if adapter is None:
            if self.peft is not None:
                stack.enter_context(self.peft.disable_adapter())
                return self.peft
            return self._base()
        if self.peft is None or adapter not in self.peft.peft_config:
            raise InvalidArgument("adapter_id", "the adapter is no longer loaded")
        self.peft.set_adapter(adapter)
        return self.peft

    def _generate(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        tok = self.tokenizer
        greedy = job.temperature == 0.0
        kwargs: dict = dict(max_new_tokens=job.sampling.max_tokens, do_sample=not greedy,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            return_dict_in_generate=True)
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=job.temperature, top_p=job.top_p, top_k=job.top_k or None)
        rng: torch.Tensor | None = None  # a seeded job's RNG state between two of its sequences
        for index, ids in enumerate(job.prompts):
            for sample_index in range(job.num_samples):
                if out.cancelled.is_set() or not self.lock.acquire(out.cancelled):
                    return
                try:
                    seq, rng = self._sequence(adapter, job, out, ids, (index, sample_index), kwargs, rng)
                finally:
                    self.lock.release()
                if out.cancelled.is_set():
                    return
                out.put(seq.finish())

    def _sequence(self, adapter: str | None, job: GenerationJob, out: ChunkQueue, ids: list[int],
                  where: tuple[int, int], kwargs: dict,
                  rng: torch.Tensor | None) -> tuple[SequenceStream, torch.Tensor | None]:
        """One sequence, under the lock: the adapter, the RNG and the logits hook are set for it alone.
        Returns its stream and, for a seeded job, the RNG state to continue from."""
        want_logprobs = job.sampling.return_logprobs
        seeded = job.sampling.seed is not None
        with contextlib.ExitStack() as stack:
            model = self._model(adapter, stack)
            model.eval()
            stack.enter_context(torch.no_grad())
            if seeded:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                if rng is None:
                    torch.manual_seed(job.sampling.seed)  # once per request, as the trainer's sample does
                else:
                    torch.set_rng_state(rng)
            last_logits: list[torch.Tensor] = []
            if want_logprobs:
                head = model.get_output_embeddings()
                assert head is not None, "a causal LM has an output head"
                hook = head.register_forward_hook(lambda m, i, o: last_logits.__setitem__(slice(None), [o[:, -1]]))
                stack.callback(hook.remove)
            seq = SequenceStream(self.tokenizer, where[0], where[1], job.stops, want_logprobs)

            def on_token(token: int) -> None:
                if out.cancelled.is_set():
                    raise _Halt
                lp = float(torch.log_softmax(last_logits[0][0].float(), -1)[token]) if want_logprobs else 0.0
                chunk = seq.push(token, lp)
                if chunk is not None:
                    out.put(chunk)
                if seq.stopped:
                    raise _Halt

            input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))
            try:
                model.generate(input_ids=input_ids,  # pyright: ignore[reportCallIssue] - PeftModel forwards generate() (typed via nn.Module.__getattr__)
                               attention_mask=torch.ones_like(input_ids),
                               streamer=_TokenSink(on_token), **kwargs)
            except _Halt:
                pass
            return seq, (torch.get_rng_state() if seeded else None)


class HFBackend(Backend):
    name = "hf"

    def open(self, location: ModelLocation) -> HFBase:
        return HFBase(location)
