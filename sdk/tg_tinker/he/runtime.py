"""The guide's runtime API over :class:`~tg_tinker.he.inference.PrivateInference`: ``create_private_inference_mode``
(the tenant's keys and the he service's adapter), ``EncryptedLoRARuntime`` (adds the decrypted delta to a
layer's output) and ``create_encrypted_runtime``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..errors import ValidationError
from .inference import PrivateInference, as_matrix
from .keys import HEKeyBundle
from .params import HESchemeParams
from .remote import HeClient, HELayerInfo


class HasHeClient(Protocol):
    """A client with the he service's calls: a :class:`~tg_tinker.ServiceClient`."""

    @property
    def he(self) -> HeClient: ...


def create_private_inference_mode(key_bundle: HEKeyBundle, params: HESchemeParams | None = None, *,
                                  client: HasHeClient | HeClient, adapter: str,
                                  layers: list[str] | None = None) -> PrivateInference:
    """Register ``key_bundle``'s public context with the he service of ``client`` (a
    :class:`~tg_tinker.ServiceClient`, or its :class:`HeClient`) and have it load ``adapter`` (a vault
    artifact id of a trainer checkpoint) for ``layers`` (module names or suffixes; default all).
    ``params``, if given, must be the bundle's own."""
    if params is not None and params != key_bundle.params:
        raise ValidationError("params differ from the key bundle's parameters", field="params",
                              code="INVALID_ARGUMENT")
    he = client if isinstance(client, HeClient) else client.he
    he.register_context(key_bundle.key_id, key_bundle.public_context(), key_bundle.params)
    info = he.load_adapter(adapter, key_bundle.key_id, layers)
    return PrivateInference(key_bundle, he, info)


@dataclass(frozen=True)
class AdapterEncryptionConfig:
    """Which layers of an adapter run encrypted: ``encrypted_layers`` are module names or suffixes
    ("q_proj"); ``rank`` is the adapter's LoRA rank, checked against the adapter the service loads."""

    rank: int
    encrypted_layers: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "encrypted_layers", tuple(self.encrypted_layers))
        if self.rank < 1:
            raise ValidationError("rank must be >= 1", field="config.rank", code="INVALID_ARGUMENT")
        if not self.encrypted_layers:
            raise ValidationError("name at least one layer", field="config.encrypted_layers",
                                  code="INVALID_ARGUMENT")


class EncryptedLoRARuntime:
    """The HE-LoRA side of a plaintext forward pass: :meth:`forward` returns the LoRA delta of one
    encrypted layer for given hidden states, computed by the he service on their encryption."""

    def __init__(self, inference: PrivateInference, config: AdapterEncryptionConfig) -> None:
        self.inference = inference
        self.config = config

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(ly.name for ly in self.inference.layers)

    def forward(self, hidden_states: Any, layer: str) -> Any:
        """The delta (alpha / r) * B A x of ``layer`` (PEFT module name such as
        "model.layers.0.self_attn.q_proj", or a suffix naming one layer) for ``hidden_states`` of shape
        [tokens, d] or [batch, tokens, d]: same leading shape, last dimension d_out. A torch tensor comes
        back as a torch tensor (input dtype and device), anything else as a float64 numpy array."""
        info = self.inference.adapter.layer(layer)
        enc = self.inference.encrypt_input(hidden_states)
        out = self.inference.process(enc, layers=[info.name])
        return _like(self.inference.decrypt_output(out)[info.name], hidden_states)

    __call__ = forward

    def forward_group(self, hidden_states: Any, layers: Sequence[str]) -> dict[str, Any]:
        """The deltas of several encrypted ``layers`` that share their input (q_proj and v_proj of one
        block) for ``hidden_states`` of shape [tokens, d] or [batch, tokens, d], computed together: up to
        ``replicated_up_to(...)`` tokens with the single-token protocol batched (one ComputeTokens call
        per round for all tokens and layers), more with column packing. Layer name -> delta, shaped and
        typed as :meth:`forward`'s."""
        names = [self.inference.adapter.layer(n).name for n in layers]
        x, _ = as_matrix(hidden_states)
        if x.shape[0] <= replicated_up_to(self.inference.layers_named(names), self.inference.bundle.slot_count):
            deltas = self.inference.process_tokens(hidden_states, layers=names)
        else:
            out = self.inference.process(self.inference.encrypt_input(hidden_states, packing="column"), layers=names)
            deltas = self.inference.decrypt_output(out)
        return {n: _like(d, hidden_states) for n, d in deltas.items()}


def _like(delta: NDArray[np.float64], hidden_states: Any) -> Any:
    """A torch tensor of the input's dtype and device for a torch input, else the float64 array."""
    if hasattr(hidden_states, "detach"):
        import torch

        return torch.as_tensor(delta, dtype=hidden_states.dtype, device=hidden_states.device)
    return delta


def replicated_up_to(layers: Sequence[HELayerInfo], slots: int) -> int:
    """Up to how many tokens the batched single-token protocol costs less than column packing for these
    layers (sharing their input). Counted in ciphertexts made or taken apart, the dominant costs: per
    token one input and one round-2 encryption here plus the output ciphertexts of both rounds (each a
    fresh public-key encryption of masks there, a decryption here); column packing encrypts one
    ciphertext per input dimension and returns one per output dimension, whatever the tokens (up to
    N/2). 0 when one token's input does not fit the slots."""
    d = layers[0].in_features
    if d > slots:
        return 0
    rows = sum(ly.rank for ly in layers)
    block2 = max(ly.rank for ly in layers)
    per_token = 2 + -(-rows // (slots // d)) + -(-sum(ly.out_features for ly in layers) // (slots // block2))
    column = d + sum(ly.out_features for ly in layers)
    return max(1, column // per_token)


def create_encrypted_runtime(config: AdapterEncryptionConfig, key_bundle: HEKeyBundle, *,
                             client: HasHeClient | HeClient, adapter: str) -> EncryptedLoRARuntime:
    """Load ``adapter`` (vault artifact id) on the he service of ``client`` for ``config.encrypted_layers``
    and return the runtime computing their deltas under ``key_bundle``. The encrypted part runs on the
    he service; there is no local or simulated mode."""
    inference = create_private_inference_mode(key_bundle, client=client, adapter=adapter,
                                              layers=list(config.encrypted_layers))
    wrong = [ly.name for ly in inference.layers if ly.rank != config.rank]
    if wrong:
        raise ValidationError(f"config.rank is {config.rank}; the adapter's layers {wrong[:3]} have rank "
                              f"{inference.adapter.layer(wrong[0]).rank}", field="config.rank",
                              code="INVALID_ARGUMENT")
    return EncryptedLoRARuntime(inference, config)
