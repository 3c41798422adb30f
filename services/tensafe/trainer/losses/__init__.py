"""Server-side losses, chosen by name: ``resolve_loss("ppo", clip_epsilon=0.1)``.

Every loss is a function ``fn(inputs: LossInputs, **kwargs) -> LossOutput`` registered with
:func:`register_loss`. Token positions follow the Hugging Face convention: ``labels`` are aligned
with ``input_ids`` and the logits at position ``t-1`` predict ``labels[:, t]``; positions whose label
is ``ignore_index`` contribute nothing. Operators add losses without touching this package through
the entry point group ``tensafe.losses`` (loaded on the first request for an unknown name); an
entry point can never replace a built-in loss. Client-defined losses never run here.

- :mod:`.registry`: the types (``LossInputs``, ``LossOutput``, ``Loss``), ``register_loss``,
  ``resolve_loss`` / ``available_losses`` and the checks of a loss's name and kwargs, entry points.
- :mod:`.builtin`: the built-in losses and the token helpers they share with plugins.

See docs/losses.md.
"""

from __future__ import annotations

from . import builtin, registry
from .builtin import (
    contrastive,
    importance_sampling,
    margin_ranking,
    mse,
    ppo,
    sequence_scores,
    token_ce,
    token_logprobs,
)
from .registry import (
    DEFAULT_LOSS,
    ENTRY_POINT_GROUP,
    BatchCheck,
    Loss,
    LossInputs,
    LossOutput,
    ResolvedLoss,
    available_losses,
    register_loss,
    resolve_loss,
)

registry.seal_builtins()  # after builtin's registrations: from here on none of them can be replaced

__all__ = [
    "DEFAULT_LOSS", "ENTRY_POINT_GROUP", "BatchCheck", "Loss", "LossInputs", "LossOutput", "ResolvedLoss",
    "available_losses", "builtin", "contrastive", "importance_sampling", "margin_ranking", "mse", "ppo",
    "register_loss", "registry", "resolve_loss", "sequence_scores", "token_ce", "token_logprobs",
]
