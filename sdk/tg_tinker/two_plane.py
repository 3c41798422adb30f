"""Two-plane HE-LoRA generation: the base model runs here, each LoRA delta under CKKS on the he service.

The plaintext plane is this process: it loads the base model (transformers, from a local
path) and generates. At every LoRA layer of the adapter a forward hook encrypts the layer's
input under the tenant's public key, has the he service compute the delta (alpha / r) B A x on
the ciphertexts (``tg_tinker.he``), decrypts it with the tenant's secret key, which never
leaves this process, and adds it to the base layer's output. The he service sees neither
the activations nor the deltas; this process never holds the adapter's weights.

Sequences end with the same rules as every other plane (``tg_tinker.decoding``).
"""

from __future__ import annotations

import importlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tensafe.api.common.v1 import common_pb2

from .decoding import Chunk, SequenceStream, Tokenizer
from .errors import ValidationError
from .sampling_rules import SamplingParamError, check_sampling

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

    from ._transport import Transport
    from .he.keys import HEKeyBundle

# Sequences generated together (one row each of one generate call).
MAX_BATCH = 8


def _batches(jobs: list[tuple[int, int, list[int]]]) -> list[list[tuple[int, int, list[int]]]]:
    """Jobs (prompt index, sample index, token ids) in batches of one prompt length, in order of first
    appearance, at most MAX_BATCH each."""
    by_length: dict[int, list[tuple[int, int, list[int]]]] = {}
    for job in jobs:
        by_length.setdefault(len(job[2]), []).append(job)
    return [group[i:i + MAX_BATCH] for group in by_length.values() for i in range(0, len(group), MAX_BATCH)]


class _Halt(Exception):
    pass


class _HFTokenizer(Tokenizer, Protocol):
    """What generation here needs of the base model's (Hugging Face) tokenizer."""

    eos_token_id: int | None
    pad_token_id: int | None
    pad_token: str | None
    eos_token: str | None

    def encode(self, text: str) -> list[int]: ...


class _CausalLM(Protocol):
    """What generation here needs of the base model (a transformers causal LM)."""

    def eval(self) -> object: ...

    def requires_grad_(self, requires_grad: bool = ...) -> object: ...

    def get_submodule(self, target: str) -> torch.nn.Module: ...

    def __call__(self, **kwargs: Any) -> object: ...

    def generate(self, **kwargs: Any) -> object: ...


def _load_base_model(path: str) -> tuple[_HFTokenizer, _CausalLM]:
    """The tokenizer and model at ``path`` (local files only), in float32 for the HE plane's arithmetic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers leaves from_pretrained unannotated; the Protocols above are what is used of the results.
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)  # pyright: ignore[reportUnknownMemberType]
    # and its own model class fails the self-type of its generate() (GenerativePreTrainedModel).
    return tokenizer, model  # pyright: ignore[reportReturnType, reportUnknownVariableType]


def _check(sp: common_pb2.SamplingParams) -> None:
    """The rules every plane applies (``tg_tinker.sampling_rules``), for the plane that runs here."""
    try:
        check_sampling(sp)
    except SamplingParamError as err:
        raise ValidationError(str(err), field=err.field, code="INVALID_ARGUMENT") from None


def _shared_inputs(model: _CausalLM, modules: dict[str, torch.nn.Module]) -> dict[str, tuple[str, ...]]:
    """Which of ``modules`` read the very same input tensor (q_proj, k_proj and v_proj of a Llama block
    do), from one forward pass of the base model on one token: name -> its group, in call order."""
    import torch

    seen: list[tuple[torch.Tensor, str]] = []

    def record(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        return lambda _module, inputs: seen.append((inputs[0], name))

    handles = [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for x, name in seen:
        group = next((g for g in groups if g[0] is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group[1]:
            group[1].append(name)
    return {name: tuple(names) for _, names in groups for name in names}


class TwoPlaneGenerator:
    """Generation with ``artifact_id``'s adapter computed under HE; made by
    ``service.create_sampling_client(artifact_id, enable_he_lora=True, key_bundle=..., base_model_ref=PATH)``."""

    def __init__(self, transport: Transport, artifact_id: str, key_bundle: HEKeyBundle | None,
                 base_model_path: str) -> None:
        try:
            for needed in ("torch", "transformers"):  # say so now, not at the first token
                importlib.import_module(needed)
            from .he import AdapterEncryptionConfig, EncryptedLoRARuntime, HeClient, create_private_inference_mode
        except ImportError as exc:
            raise ValidationError(f"two-plane HE-LoRA generation runs the base model here: it needs torch, "
                                  f"transformers and the `he` extra ({exc})", field="enable_he_lora",
                                  code="FAILED_PRECONDITION") from None
        if key_bundle is None:
            raise ValidationError("enable_he_lora needs key_bundle (tg_tinker.he.HEKeyManager(...)"
                                  ".generate_key_bundle())", field="key_bundle", code="INVALID_ARGUMENT")
        if not base_model_path:
            raise ValidationError("enable_he_lora runs the base model in this process: give base_model_ref, the "
                                  "local path of the base model", field="base_model_ref", code="INVALID_ARGUMENT")
        try:
            self.tokenizer, self.model = _load_base_model(base_model_path)
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot load the base model from {base_model_path}: {exc}",
                                  field="base_model_ref", code="INVALID_ARGUMENT") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.model.requires_grad_(False)
        # Every LoRA layer of the adapter runs encrypted: this process has no plaintext adapter weights.
        inference = create_private_inference_mode(key_bundle, client=HeClient(transport), adapter=artifact_id)
        self.runtime = EncryptedLoRARuntime(inference, AdapterEncryptionConfig(
            rank=inference.layers[0].rank, encrypted_layers=tuple(ly.name for ly in inference.layers)))
        self.he = inference.he
        self.he_adapter_id = inference.adapter.adapter_id
        self.lock = threading.Lock()
        modules: dict[str, torch.nn.Module] = {}
        for layer in inference.layers:
            try:
                modules[layer.name] = self.model.get_submodule(layer.name)
            except AttributeError:
                raise ValidationError(f"the base model at {base_model_path} has no module {layer.name} of the adapter",
                                      field="base_model_ref", code="INVALID_ARGUMENT") from None
        self.groups = _shared_inputs(self.model, modules)
        # A group's deltas computed at its first layer's hook wait here for the others: name -> (input, delta).
        self._ready: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list[RemovableHandle] = [module.register_forward_hook(self._hook(name))
                                              for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        def add_delta(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            ready = self._ready.pop(name, None)
            if ready is not None and ready[0] is x:  # computed with the group's first layer, on this very input
                delta = ready[1]
            else:
                # The layers reading this input (q_proj and v_proj of a block) in one call per round, all
                # the tokens of x together; the others' deltas wait for their hooks.
                group = self.groups.get(name, (name,))
                deltas = self.runtime.forward_group(x, group)
                for other in group:
                    if other != name:
                        self._ready[other] = (x, deltas[other])
                delta = deltas[name]
            return output + delta.to(output.dtype)

        return add_delta

    @property
    def layers(self) -> tuple[str, ...]:
        return self.runtime.layers

    def stream(self, prompts: Sequence[str | Sequence[int]], params: common_pb2.SamplingParams,
               cancelled: threading.Event) -> Iterator[Chunk]:
        """Increments of each prompt's samples. Sequences whose prompts have the same length generate
        together (up to MAX_BATCH, in order), so their chunks interleave; the others one batch after another."""
        _check(params)
        out: queue.Queue[Chunk | BaseException | None] = queue.Queue()  # None: the end
        threading.Thread(target=self._run, args=(prompts, params, cancelled, out), daemon=True,
                         name="two-plane").start()
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self, prompts: Sequence[str | Sequence[int]], params: common_pb2.SamplingParams,
             cancelled: threading.Event, out: queue.Queue[Chunk | BaseException | None]) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        tok = self.tokenizer
        temperature = params.temperature if params.HasField("temperature") else 1.0
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_tokens, do_sample=temperature > 0,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=params.top_p if params.HasField("top_p") else 1.0,
                          top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)

        class Sink(BaseStreamer):
            """The tokens of a batch of sequences (one row each), as generate picks them."""

            def __init__(self, seqs: list[SequenceStream]) -> None:
                self.seqs, self.prompt_seen = seqs, False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                if cancelled.is_set():
                    raise _Halt
                tokens: list[int] = value.reshape(-1).tolist()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
                for seq, token in zip(self.seqs, tokens, strict=True):
                    if seq.stopped:
                        continue  # this row is done; generate goes on for the others
                    chunk = seq.push(token)
                    if chunk is not None:
                        out.put(chunk)
                if all(seq.stopped for seq in self.seqs):
                    raise _Halt

            def end(self) -> None:
                pass

        try:
            # torch leaves fork_rng's devices and manual_seed's seed unannotated.
            with self.lock, torch.no_grad(), torch.random.fork_rng(devices=[]):  # pyright: ignore[reportUnknownMemberType]
                if params.HasField("seed"):
                    torch.manual_seed(params.seed)  # pyright: ignore[reportUnknownMemberType]
                jobs = [(index, sample_index, tok.encode(prompt) if isinstance(prompt, str) else list(prompt))
                        for index, prompt in enumerate(prompts) for sample_index in range(max(1, params.num_samples))]
                for batch in _batches(jobs):
                    seqs = [SequenceStream(tok, index, sample_index, [s for s in params.stop if s], False)
                            for index, sample_index, _ in batch]
                    # Sequences of one prompt length generate together, without padding: every block's
                    # HE call carries all their tokens (one ComputeTokens call per round).
                    x = torch.tensor([ids for _, _, ids in batch], dtype=torch.long)
                    try:
                        self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=Sink(seqs),
                                            **kwargs)
                    except _Halt:
                        pass
                    finally:
                        self._ready.clear()  # nothing of one batch's pass is used in another's
                    if cancelled.is_set():
                        return
                    for seq in seqs:
                        out.put(seq.finish())
        except BaseException as exc:  # noqa: BLE001 - raised to the reader
            out.put(exc)
        finally:
            out.put(None)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.he.unload_adapter(self.he_adapter_id)
