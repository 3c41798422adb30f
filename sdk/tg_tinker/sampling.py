"""``SamplingClient``: text generation from a trained adapter, served by the inference service.

>>> sc = service.create_sampling_client(artifact_id=ckpt.artifact_id)
>>> for piece in sc.stream(["Once upon a time"], max_tokens=64):
...     print(piece.text, end="", flush=True)
>>> sc.sample(["Once upon a time"], max_tokens=64, temperature=0).samples[0].completion

The adapter is decrypted only in the inference service's memory and served only to your
tenant. Leaving a stream early (``break``, :meth:`TokenStream.cancel`, closing it) cancels
the call, and the server stops generating.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensafe.api.common.v1 import common_pb2
from tensafe.api.inference.v1 import inference_pb2

from .errors import ValidationError
from .results import Sample, SampleResult

if TYPE_CHECKING:
    from ._transport import Transport
    from .he.keys import HEKeyBundle
    from .two_plane import TwoPlaneGenerator

_BACKENDS = {None: inference_pb2.BACKEND_UNSPECIFIED, "hf": inference_pb2.BACKEND_HF,
             "vllm": inference_pb2.BACKEND_VLLM}


def _finish_name(value: int) -> str:
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


@dataclass(frozen=True)
class GenerationChunk:
    """An increment of one sequence: new ``text``, its ``token_ids`` and ``logprobs`` (when asked for).

    ``finish_reason`` is None until the sequence's last increment, then ``"stop"`` (EOS or a
    stop string), ``"length"`` (max_tokens) or ``"cancelled"``.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class TokenStream:
    """Iterator over the :class:`GenerationChunk` of one generate call; cancel it to stop the generation."""

    def __init__(self, chunks: Iterator[GenerationChunk], cancel: Callable[[], None]) -> None:
        self._chunks = chunks
        self._cancel = cancel

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._chunks)

    def cancel(self) -> None:
        """Cancel the call: generation stops (on the server, or in the two-plane loop here); iteration ends."""
        self._cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


def _chunk(msg: Any) -> GenerationChunk:
    return GenerationChunk(msg.prompt_index, msg.sample_index, msg.text, list(msg.token_ids), list(msg.logprobs),
                           _finish_name(msg.finish_reason) if msg.finish_reason else None)


def _remote_stream(responses: Iterator[Any]) -> TokenStream:
    return TokenStream((_chunk(m) for m in responses), getattr(responses, "close", lambda: None))


def _local_stream(chunks: Iterator[Any], cancelled: threading.Event) -> TokenStream:
    def run() -> Iterator[GenerationChunk]:
        for chunk in chunks:
            if cancelled.is_set():
                return
            yield _chunk(chunk)

    return TokenStream(run(), cancelled.set)


Prompts = Sequence[str] | Sequence[Sequence[int]]
"""Text prompts, or prompts as token ids; one string is one prompt."""


def split_prompts(prompts: Prompts | str) -> tuple[list[str], list[common_pb2.TokenSequence]]:
    """The request fields for ``prompts``: ``prompts`` (all text) or ``prompt_token_ids`` (all token ids)."""
    items: list[str | Sequence[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [p for p in items if isinstance(p, str)]
    if len(texts) == len(items):
        return texts, []
    if texts:
        raise ValidationError("prompts: give text prompts or token-id prompts, not both", field="prompts",
                              code="INVALID_ARGUMENT")
    return [], [common_pb2.TokenSequence(token_ids=list(p)) for p in items if not isinstance(p, str)]


def sampling_params(max_tokens: int, temperature: float, top_p: float, top_k: int, stop: Sequence[str] | str | None,
                    seed: int | None, num_samples: int, return_logprobs: bool) -> common_pb2.SamplingParams:
    """The wire form of the sampling arguments; the server validates them (INVALID_ARGUMENT naming the field)."""
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop=[stop] if isinstance(stop, str) else list(stop or []),
                                       num_samples=num_samples, return_logprobs=return_logprobs)
    if seed is not None:
        params.seed = seed
    return params


class SamplingClient:
    """Generation with one loaded adapter (or, with ``model_ref``, the base model alone).

    Made by :meth:`ServiceClient.create_sampling_client`. ``adapter_id`` names the adapter
    in the inference service; it is valid for your tenant only.
    """

    def __init__(self, transport: Transport, adapter: inference_pb2.Adapter | None = None, *,
                 adapter_id: str = "", model_ref: str = "", backend: str | None = None,
                 two_plane: TwoPlaneGenerator | None = None) -> None:
        self._transport = transport
        self._two_plane = two_plane
        self.adapter = adapter
        self.adapter_id = adapter.adapter_id if adapter is not None else adapter_id
        self.model_ref = adapter.base_model_ref if adapter is not None else model_ref
        self._backend = _BACKENDS[backend]

    @property
    def artifact_id(self) -> str | None:
        return self.adapter.artifact_id if self.adapter is not None else None

    def _request(self, prompts: Prompts | str, params: common_pb2.SamplingParams) -> inference_pb2.GenerateRequest:
        texts, token_ids = split_prompts(prompts)
        req = inference_pb2.GenerateRequest(adapter_id=self.adapter_id, sampling=params, backend=self._backend,
                                            prompts=texts, prompt_token_ids=token_ids)
        if not self.adapter_id:
            req.model_ref = self.model_ref
        return req

    def stream(self, prompts: Prompts | str, max_tokens: int = 128, *,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | str | None = None,
               seed: int | None = None, num_samples: int = 1, return_logprobs: bool = False,
               timeout: float | None = None) -> TokenStream:
        """Generate, yielding increments as the server produces them (temperature 0: greedy)."""
        params = sampling_params(max_tokens, temperature, top_p, top_k, stop, seed, num_samples, return_logprobs)
        if self._two_plane is not None:
            if return_logprobs:
                raise ValidationError("two-plane HE-LoRA generation returns no log-probabilities",
                                      field="sampling.return_logprobs", code="INVALID_ARGUMENT")
            cancelled = threading.Event()
            items: list[str | Sequence[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
            return _local_stream(self._two_plane.stream(items, params, cancelled), cancelled)
        responses = self._transport.server_stream("inference", "Generate", self._request(prompts, params),
                                                  timeout=timeout)
        return _remote_stream(responses)

    def sample(self, prompts: Prompts | str, max_tokens: int = 128,
               **kwargs: Any) -> SampleResult:
        """Generate and return the whole result, shaped like ``TrainingClient.sample``'s."""
        items: list[str | Sequence[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
        pieces: dict[tuple[int, int], list[GenerationChunk]] = {}
        for chunk in self.stream(prompts, max_tokens, **kwargs):
            pieces.setdefault((chunk.prompt_index, chunk.sample_index), []).append(chunk)
        samples: list[Sample] = []
        for (p, s), chunks in sorted(pieces.items()):
            item = items[p]
            prompt = item if isinstance(item, str) else ""
            samples.append(Sample(prompt, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                                  [lp for c in chunks for lp in c.logprobs], chunks[-1].finish_reason or "cancelled",
                                  p, s))
        return SampleResult(samples)

    def unload(self) -> None:
        """Remove the adapter from the inference service (its memory is released); two-plane: from the he
        service, and the base model's hooks here."""
        if self._two_plane is not None:
            self._two_plane.close()
        elif self.adapter_id:
            self._transport.unary("inference", "UnloadAdapter",
                                  inference_pb2.UnloadAdapterRequest(adapter_id=self.adapter_id))

    def __enter__(self) -> SamplingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unload()


def create_sampling_client(transport: Transport, artifact_id: str | None, model_ref: str | None,
                           base_model_ref: str | None, backend: str | None, enable_he_lora: bool,
                           key_bundle: HEKeyBundle | None = None) -> SamplingClient:
    """What ``ServiceClient.create_sampling_client`` does (kept here, beside the client it makes)."""
    if backend not in _BACKENDS:
        raise ValidationError(f"backend must be 'hf' or 'vllm', not {backend!r}", field="backend",
                              code="INVALID_ARGUMENT")
    if enable_he_lora:
        # Two-plane HE-LoRA: the base model runs in this process, the adapter's deltas under CKKS on the he service.
        if not artifact_id:
            raise ValidationError("enable_he_lora needs artifact_id (the adapter)", field="artifact_id",
                                  code="INVALID_ARGUMENT")
        from .two_plane import TwoPlaneGenerator

        generator = TwoPlaneGenerator(transport, artifact_id, key_bundle, base_model_ref or "")
        return SamplingClient(transport, model_ref=base_model_ref or "", two_plane=generator)
    if artifact_id and model_ref:
        raise ValidationError("give artifact_id (an adapter) or model_ref (the base model alone), not both",
                              field="model_ref", code="INVALID_ARGUMENT")
    if not artifact_id:
        if not model_ref:
            raise ValidationError("give artifact_id (an adapter) or model_ref (the base model alone)",
                                  field="artifact_id", code="INVALID_ARGUMENT")
        return SamplingClient(transport, model_ref=model_ref, backend=backend)
    resp = transport.unary("inference", "LoadAdapter", inference_pb2.LoadAdapterRequest(
        artifact_id=artifact_id, base_model_ref=base_model_ref or "", backend=_BACKENDS[backend]))
    return SamplingClient(transport, resp.adapter, backend=backend)
