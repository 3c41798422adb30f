"""The vLLM backend (GPU, multi-LoRA), and the engine wrapper the user guide names.

``TenSafeVLLMConfig`` and ``TenSafeAsyncEngine`` are the guide's names: a config that becomes
vLLM's ``AsyncEngineArgs`` (LoRA on), and an engine around vLLM's ``AsyncLLMEngine`` that
adds a tenant adapter from its in-memory files and streams ``RequestOutput`` objects.
:class:`VLLMBackend` serves the inference service's adapters through them.

vLLM is not a dependency of the server: it needs CUDA and its own torch, so it lives in its
own environment (the ``vllm`` extra, docs/vllm.md). Without it, every entry point here
raises FailedPrecondition saying so; nothing is answered in its place.

vLLM reads a LoRA adapter from a directory. The decrypted files are written to a private
directory on RAM-backed ``/dev/shm`` (mode 0700, files 0600), loaded and pinned in the engine
(so that it never needs to read them again), and deleted at once: the plaintext never
reaches a disk, and lives in tmpfs only while vLLM reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensafe.common.models import ModelLocation
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotImplementedYet

from .adapter import CONFIG, WEIGHTS, AdapterFiles
from .backend import Backend, ChunkQueue, ServedBase
from .generation import GenerationJob, SequenceStream

log = logging.getLogger("tensafe.inference.vllm")

INSTALL_HINT = ("install TenSafe with the `vllm` extra in an environment of its own (CUDA torch): "
                "pip install 'tensafe[vllm]'; see docs/vllm.md")
SHM = Path("/dev/shm")


def require_vllm() -> Any:
    """The vllm module, or FailedPrecondition naming the extra to install."""
    try:
        import vllm  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment
    except Exception as exc:  # noqa: BLE001 - ImportError, or a vLLM that cannot load against this torch
        raise FailedPrecondition(f"the vllm backend needs vLLM, which cannot be imported here "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                                 f"{INSTALL_HINT}") from None
    return vllm


@dataclass(frozen=True)
class TenSafeVLLMConfig:
    """Settings of a :class:`TenSafeAsyncEngine` (vLLM's engine arguments, LoRA on).

    ``model`` is a local model directory (safetensors). ``max_loras`` adapters can be served at
    once, each of rank at most ``max_lora_rank``. ``enable_he_lora`` asks for two-plane
    HE-LoRA generation (base model here, LoRA deltas under CKKS in the he service): that runs in
    the SDK (``tg_tinker.two_plane``), not in vLLM, so it is refused here.
    """

    model: str
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    enable_lora: bool = True
    max_loras: int = 8
    max_lora_rank: int = 64
    enable_he_lora: bool = False
    he_lora_adapter_path: str | None = None
    he_lora_rank: int = 16
    he_lora_alpha: float = 32.0

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgument("model", "must name a local model directory")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgument("gpu_memory_utilization", "must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise InvalidArgument("tensor_parallel_size", "must be >= 1")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise InvalidArgument("max_loras", "max_loras and max_lora_rank must be >= 1")
        if self.enable_he_lora:
            raise NotImplementedYet("two-plane HE-LoRA generation runs in the SDK, where the tenant's secret key is: "
                                    "service.create_sampling_client(artifact_id, enable_he_lora=True, key_bundle=..., "
                                    "base_model_ref=PATH); vLLM's kernels cannot call the he service per layer")

    def engine_args(self) -> Any:
        """vLLM's ``AsyncEngineArgs`` for this config."""
        from vllm import AsyncEngineArgs  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment

        return AsyncEngineArgs(model=self.model, tokenizer=self.tokenizer or self.model,
                               tensor_parallel_size=self.tensor_parallel_size,
                               gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                               dtype=self.dtype, seed=self.seed, enable_lora=self.enable_lora,
                               max_loras=self.max_loras, max_lora_rank=self.max_lora_rank)


class TenSafeAsyncEngine:
    """vLLM's ``AsyncLLMEngine`` with tenant adapters added from memory.

    >>> engine = TenSafeAsyncEngine(TenSafeVLLMConfig(model="/models/smollm2"))
    >>> await engine.initialize()
    >>> async for output in engine.generate("Explain privacy-preserving ML:", "req-001"):
    ...     print(output.outputs[0].text, end="")
    """

    def __init__(self, config: TenSafeVLLMConfig) -> None:
        self.config = config
        self._engine: Any = None
        self._loras: dict[str, Any] = {}
        self._next_id = 1

    async def initialize(self) -> None:
        """Start vLLM (loads the model onto the GPU); FailedPrecondition when vLLM or CUDA is missing."""
        require_vllm()
        import torch
        from vllm import AsyncLLMEngine  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment

        if not torch.cuda.is_available():
            raise FailedPrecondition("the vllm backend needs a CUDA GPU, and none is visible to this process")
        self._engine = AsyncLLMEngine.from_engine_args(self.config.engine_args())

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise FailedPrecondition("call `await engine.initialize()` first")
        return self._engine

    async def add_adapter(self, name: str, adapter: AdapterFiles) -> Any:
        """Load a PEFT adapter held in memory; returns the ``LoRARequest`` that selects it."""
        from vllm.lora.request import LoRARequest  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment

        if adapter.rank > self.config.max_lora_rank:
            raise FailedPrecondition(f"adapter rank {adapter.rank} exceeds this engine's max_lora_rank "
                                     f"{self.config.max_lora_rank} (TENSAFE_VLLM_MAX_LORA_RANK)")
        if len(self._loras) >= self.config.max_loras:
            raise FailedPrecondition(f"this engine already serves {len(self._loras)} adapters, its max_loras "
                                     "(TENSAFE_VLLM_MAX_LORAS); unload one first")
        if not SHM.is_dir():
            raise FailedPrecondition("vLLM loads adapters from a directory and /dev/shm (RAM-backed) is missing; "
                                     "refusing to write a decrypted adapter to disk")
        private = Path(tempfile.mkdtemp(prefix="tensafe-lora-", dir=SHM))  # mode 0700
        try:
            for file_name, data in ((CONFIG, json.dumps(adapter.config).encode()), (WEIGHTS, adapter.weights)):
                fd = os.open(private / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            request = LoRARequest(lora_name=name, lora_int_id=self._next_id, lora_path=str(private))
            await self.engine.add_lora(request)
            await self.engine.pin_lora(request.lora_int_id)  # never evicted, so never read from the path again
        finally:
            shutil.rmtree(private, ignore_errors=True)
        self._next_id += 1
        self._loras[name] = request
        return request

    async def remove_adapter(self, name: str) -> None:
        request = self._loras.pop(name, None)
        if request is not None:
            await self.engine.remove_lora(request.lora_int_id)

    def lora_request(self, name: str | None) -> Any:
        return self._loras[name] if name is not None else None

    async def generate(self, prompt: str | dict[str, Any], request_id: str, sampling_params: Any = None,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        """vLLM ``RequestOutput`` objects for ``prompt`` (text, or ``{"prompt_token_ids": [...]}``)."""
        from vllm import SamplingParams  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment

        params = sampling_params if sampling_params is not None else SamplingParams()
        async for output in self.engine.generate(prompt, params, request_id, lora_request=lora_request):
            yield output

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def sampling_params(job: GenerationJob) -> Any:
    """vLLM's SamplingParams for a validated job (increments only: output_kind DELTA)."""
    from vllm import SamplingParams  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment
    from vllm.sampling_params import RequestOutputKind  # pyright: ignore[reportMissingImports] - the [vllm] extra, installed in its own environment

    kwargs: dict[str, Any] = dict(n=job.num_samples, temperature=job.temperature, top_p=job.top_p,
                                  top_k=job.top_k or 0, max_tokens=job.sampling.max_tokens, stop=job.stops or None,
                                  output_kind=RequestOutputKind.DELTA, skip_special_tokens=True)
    if job.sampling.seed is not None:
        kwargs["seed"] = job.sampling.seed
    if job.sampling.return_logprobs:
        kwargs["logprobs"] = 0  # the chosen token's own log-probability only
    return SamplingParams(**kwargs)


class VLLMBase(ServedBase):
    """One vLLM engine on its own event loop thread, for one base model."""

    def __init__(self, location: ModelLocation, config: TenSafeVLLMConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.location = location
        self.tokenizer = AutoTokenizer.from_pretrained(str(location.path), local_files_only=True)
        model_config = AutoConfig.from_pretrained(str(location.path), local_files_only=True)
        self.vocab_size = int(model_config.vocab_size)
        self.max_length = int(config.max_model_len or getattr(model_config, "max_position_embeddings", 0) or 4096)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inference-vllm", daemon=True)
        self._thread.start()
        self.engine = TenSafeAsyncEngine(config)
        try:
            self._run(self.engine.initialize())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def add_adapter(self, name: str, adapter: AdapterFiles) -> None:
        self._run(self.engine.add_adapter(name, adapter))

    def remove_adapter(self, name: str) -> None:
        self._run(self.engine.remove_adapter(name))

    def start(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        asyncio.run_coroutine_threadsafe(self._stream(adapter, job, out), self.loop)

    async def _stream(self, adapter: str | None, job: GenerationJob, out: ChunkQueue) -> None:
        try:
            params = sampling_params(job)
            lora = self.engine.lora_request(adapter)
            await asyncio.gather(*(self._one(i, ids, params, lora, job, out) for i, ids in enumerate(job.prompts)))
            out.close()
        except Exception as exc:  # handed to the caller, who reports it
            log.exception("vLLM generation failed")
            out.close(exc)

    async def _one(self, index: int, ids: list[int], params: Any, lora: Any, job: GenerationJob,
                   out: ChunkQueue) -> None:
        request_id = f"{uuid.uuid4().hex}-{index}"
        want = job.sampling.return_logprobs
        streams = {s: SequenceStream(self.tokenizer, index, s, job.stops, want) for s in range(job.num_samples)}
        finished = False
        try:
            async for output in self.engine.generate({"prompt_token_ids": ids}, request_id, params, lora):
                if out.cancelled.is_set():
                    return
                for completion in output.outputs:
                    seq = streams[completion.index]
                    for j, token in enumerate(completion.token_ids):
                        lp = completion.logprobs[j][token].logprob if want and completion.logprobs else 0.0
                        chunk = seq.push(int(token), float(lp))
                        if chunk is not None:
                            out.put(chunk)
                    if completion.finish_reason is not None:
                        out.put(seq.finish())
            finished = True
        finally:
            if not finished:
                await self.engine.abort(request_id)

    def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, gpu_memory_utilization: float = 0.9, max_loras: int = 8, max_lora_rank: int = 64) -> None:
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank

    def open(self, location: ModelLocation) -> VLLMBase:
        require_vllm()
        if location.gguf_file:
            raise FailedPrecondition("the vllm backend serves safetensors model directories, not GGUF files: "
                                     "convert the model first (python -m tensafe.common.models)")
        config = TenSafeVLLMConfig(model=str(location.path), gpu_memory_utilization=self.gpu_memory_utilization,
                                   max_loras=self.max_loras, max_lora_rank=self.max_lora_rank)
        return VLLMBase(location, config)
