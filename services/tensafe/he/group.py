"""One token through several layers that share their input (ComputeTokens): the layout of their rows in the
ciphertexts' blocks and the blinding of each token, built from ``compute``'s single-token pieces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tensafe.runtime.errors import InvalidArgument

from .compute import (
    BLIND,
    ZERO,
    Counts,
    LoraLayer,
    MaskSource,
    SealEngine,
    blocks_per_ciphertext,
    encoded_rows,
    masked_products,
    random_orthogonal,
)


# -- one token through several layers sharing their input (ComputeTokens) --------------------------------
# Round 1 puts the rank rows of every layer one after another into blocks of d slots (one row a block);
# round 2 gives each layer its own blocks of every ciphertext (blocks of the largest rank), as many as
# its share of the outputs needs, so that q_proj and v_proj of a block together need no more output
# ciphertexts than their products fill. Each layer keeps its own fresh Q and rho.
@dataclass(frozen=True)
class GroupLayout:
    """Where each layer's values go in one token's ciphertexts (see ComputeTokens in he.proto)."""

    layers: tuple[LoraLayer, ...] = field(repr=False)
    slots: int
    block: int                       # round 1: in_features
    rows: tuple[int, ...]            # round 1: the first row of each layer
    first: int                       # round 1: output ciphertexts
    block2: int                      # round 2: the largest rank
    starts: tuple[int, ...]          # round 2: each layer's first block
    spans: tuple[int, ...]           # round 2: each layer's blocks per ciphertext
    second: int                      # round 2: output ciphertexts

    @property
    def per(self) -> int:
        return self.slots // self.block

    @property
    def per2(self) -> int:
        return self.slots // self.block2

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(ly.name for ly in self.layers)


def group_layout(layers: list[LoraLayer], slots: int, field_name: str) -> GroupLayout:
    """The layout of ``layers`` (sharing in_features) in ``slots``; InvalidArgument(field_name) when
    they do not fit one ciphertext per token and round."""
    d = layers[0].in_features
    per = blocks_per_ciphertext(d, slots, field_name)
    block2 = max(ly.rank for ly in layers)
    per2 = blocks_per_ciphertext(block2, slots, field_name)
    if len(layers) > per2:
        raise InvalidArgument(field_name, f"{len(layers)} layers of rank up to {block2} do not fit one ciphertext "
                                          f"of {slots} slots ({per2} blocks); send fewer layers per call")
    rows, at = [], 0
    for ly in layers:
        rows.append(at)
        at += ly.rank
    # The fewest round-2 ciphertexts: the smallest P with sum(ceil(out / P)) blocks fitting one ciphertext.
    outs = [ly.out_features for ly in layers]
    second = max(1, -(-sum(outs) // per2))
    while sum(-(-o // second) for o in outs) > per2:
        second += 1
    spans = tuple(-(-o // second) for o in outs)
    starts = tuple(int(sum(spans[:i])) for i in range(len(spans)))
    return GroupLayout(tuple(layers), slots, d, tuple(rows), -(-at // per), block2, starts, spans, second)


@dataclass
class GroupBlinding:
    """Everything of one token's computation on a group of layers that does not depend on x: per layer a
    fresh Q and rho (inside the encodings only), round 1's encoded rows and masks, round 2's encoded rows
    and masks, and the encoded -rho laid out as round 2's input. Used by one token, once."""

    layout: GroupLayout = field(repr=False)
    first: list = field(repr=False)
    first_masks: list = field(repr=False)
    second: list = field(repr=False)
    second_masks: list = field(repr=False)
    unblind: object = field(repr=False)
    prepared_ahead: bool = False

    @property
    def nbytes(self) -> int:
        n = 2 * self.first_masks[0].poly_modulus_degree() * 8 if self.first_masks else 0
        return n * (len(self.first) + len(self.second) + 1 + len(self.first_masks) + len(self.second_masks))


def prepare_group(engine: SealEngine, layout: GroupLayout, take_masks: MaskSource, counts: Counts,
                  pause: Callable[[], None] = lambda: None) -> GroupBlinding:
    """A fresh blinding for one token on ``layout``'s layers; ``pause`` is called between the encodings."""
    first_masks = take_masks(layout.block, BLIND, layout.first, counts)
    second_masks = take_masks(layout.block2, ZERO, layout.second, counts)
    sums = np.concatenate([s for _, s in first_masks])
    per2, block2 = layout.per2, layout.block2
    rows1 = []
    weights2 = np.zeros((layout.second, per2, block2))
    unblind = np.zeros((per2, block2))
    for ly, row, start, span in zip(layout.layers, layout.rows, layout.starts, layout.spans, strict=True):
        r = ly.rank
        Q = random_orthogonal(r)
        rows1.append(Q @ ly.A)
        w = np.zeros((layout.second * span, block2))
        w[: ly.out_features, :r] = ly.scaling * (ly.B @ Q.T)
        weights2[:, start:start + span, :] = w.reshape(layout.second, span, block2)
        unblind[start:start + span, :r] = -sums[row:row + r]
    first = encoded_rows(engine, np.concatenate(rows1), layout.block, pause)
    second = []
    for p in range(layout.second):
        pause()
        plain = engine.plaintext(weights2[p].ravel(), engine.weight_scale)
        second.append(None if plain.is_zero() else plain)
    pause()
    return GroupBlinding(layout, first, [m for m, _ in first_masks], second, [m for m, _ in second_masks],
                         engine.plaintext(unblind.ravel(), engine.scale))


def project_group(engine: SealEngine, blinding: GroupBlinding, ct: object, counts: Counts) -> list[object]:
    """Round 1: masked products whose block sums are every layer's Q A x + rho, rows one after another."""
    return masked_products(engine, ct, blinding.first, blinding.first_masks, counts)


def expand_group(engine: SealEngine, blinding: GroupBlinding, ct: object, counts: Counts) -> list[object]:
    """Round 2: masked products whose block sums are every layer's delta, in the layout's blocks."""
    engine.evaluator.add_plain_inplace(ct, blinding.unblind)
    counts.additions += 1
    return masked_products(engine, ct, blinding.second, blinding.second_masks, counts)
