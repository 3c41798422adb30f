"""The encrypted LoRA delta, delta = (alpha / r) * B * A * x, on CKKS ciphertexts of x. No rotations.

Column packing (many tokens): one ciphertext per input dimension j holding x[:, j] across tokens.
The rank projections u_k = sum_j A[k, j] * ct_j and the outputs out_i = sum_k s * B[i, k] * u_k are
ciphertext-scalar multiply-adds without rescaling (depth 2: scale S -> S^2 -> S^3).

Replicated packing (one token), two rounds; the key holder sums blocks of slots after decrypting:
  round 1: x is tiled in blocks of d slots; block b of output ciphertext p holds (Q A)[k] * x for
           k = p * blocks + b, plus masks summing to rho_k over the block. Block sums: Q A x + rho.
  round 2: the key holder re-encrypts those sums u' tiled in blocks of r slots; the service takes rho
           off, and block b of output ciphertext p holds (s B Q^T)[i] * (u' - rho) for
           i = p * blocks + b, plus masks summing to zero over the block. Block sums: the delta.
Q is a random orthogonal r x r matrix and rho a random vector, both fresh per computation; the
masks are fresh Gaussians projected to the block-sum constraint. See docs/he.md for what this hides.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from tensafe.runtime.errors import InvalidArgument

# Standard deviation of the masks on each slot and of the blinding rho of the rank projections. Real
# masks hide statistically: the larger, the better they hide and the more precision they cost (the
# key holder sums them in float64); 2^14 keeps the delta within 1e-7 of the plaintext one.
MASK_STD = 2.0 ** 14
BLIND_STD = 2.0 ** 14
# A scalar that encodes to zero at scale 2^40 would make a transparent ciphertext: skip it.
_ZERO = 2.0 ** -40


@dataclass
class Counts:
    plaintext_multiplies: int = 0
    additions: int = 0
    rotations: int = 0
    multiplicative_depth: int = 0
    rescales: int = 0

    def add(self, other: Counts) -> None:
        self.plaintext_multiplies += other.plaintext_multiplies
        self.additions += other.additions
        self.rotations += other.rotations
        self.rescales += other.rescales
        self.multiplicative_depth = max(self.multiplicative_depth, other.multiplicative_depth)


@dataclass
class Timer:
    deserialize: float = 0.0
    compute: float = 0.0
    serialize: float = 0.0

    def ms(self) -> dict[str, float]:
        return {"deserialize_ms": self.deserialize * 1e3, "compute_ms": self.compute * 1e3,
                "serialize_ms": self.serialize * 1e3}


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA module of an adapter: A is r x d_in, B is d_out x r, both float64."""

    name: str
    A: np.ndarray
    B: np.ndarray
    alpha: float
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]


def secure_normal(shape: int | tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian samples from the OS CSPRNG (Box-Muller), never from a seedable generator."""
    n = int(np.prod(shape))
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0 ** 53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])[:n]
    return (z * std).reshape(shape)


def random_orthogonal(r: int) -> np.ndarray:
    q, upper = np.linalg.qr(secure_normal((r, r), 1.0))
    return q * np.sign(np.diag(upper))


def block_masks(slots: int, block: int, blocks: int, block_sums: np.ndarray) -> np.ndarray:
    """Fresh masks over ``slots``: each of the first ``blocks`` blocks sums to ``block_sums[b]``."""
    m = secure_normal(slots, MASK_STD)
    used = m[: blocks * block].reshape(blocks, block)
    used -= used.mean(axis=1, keepdims=True)
    used += (block_sums / block)[:, None]
    return m


def _load(ctx: ts.Context, data: bytes, field_name: str) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception:  # noqa: BLE001 - TenSEAL raises plain exceptions for any malformed input
        raise InvalidArgument(field_name, "is not a CKKS ciphertext under this adapter's context") from None


def _encrypt_constant(ctx: ts.Context, values: np.ndarray, scale: float | None = None) -> ts.CKKSVector:
    """A fresh encryption (public key) of known values, for an output whose plaintext factor is all zero."""
    return ts.ckks_vector(ctx, values.tolist(), scale) if scale else ts.ckks_vector(ctx, values.tolist())


# -- column packing ------------------------------------------------------------------------------------
class ColumnProjection:
    """The encrypted rank projections u_k = sum_j A[k, j] * ct_j of one layer, filled chunk by chunk."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer
        self.acc: list[ts.CKKSVector | None] = [None] * layer.rank

    def fold(self, cts: list[ts.CKKSVector], offset: int, counts: Counts) -> None:
        A = self.layer.A
        for k in range(self.layer.rank):
            acc = self.acc[k]
            for j, ct in enumerate(cts, start=offset):
                a = float(A[k, j])
                if abs(a) < _ZERO:
                    continue
                term = ct.mul(a)
                counts.plaintext_multiplies += 1
                if acc is None:
                    acc = term
                else:
                    acc.add_(term)
                    counts.additions += 1
            self.acc[k] = acc
        counts.multiplicative_depth = max(counts.multiplicative_depth, 1)


def column_outputs(ctx: ts.Context, proj: ColumnProjection, start: int, stop: int, num_tokens: int,
                   scale: float, counts: Counts) -> list[ts.CKKSVector]:
    """out_i = sum_k (s * B[i, k]) * u_k for i in [start, stop)."""
    layer = proj.layer
    weights = layer.scaling * layer.B
    outs = []
    for i in range(start, stop):
        out = None
        for k in range(layer.rank):
            b = float(weights[i, k])
            if abs(b) < _ZERO or proj.acc[k] is None:
                continue
            term = proj.acc[k].mul(b)
            counts.plaintext_multiplies += 1
            if out is None:
                out = term
            else:
                out.add_(term)
                counts.additions += 1
        if out is None:  # this output is exactly zero (an untrained B row): a fresh encryption of zeros
            out = _encrypt_constant(ctx, np.zeros(num_tokens), scale ** 3)
        outs.append(out)
    counts.multiplicative_depth = max(counts.multiplicative_depth, 2)
    return outs


# -- replicated packing ----------------------------------------------------------------------------------
@dataclass
class TokenBlinding:
    """Per layer and computation: the rotation Q and blinding rho of round 1, needed by round 2."""

    Q: np.ndarray
    rho: np.ndarray
    layer: LoraLayer = field(repr=False)


def blocks_per_ciphertext(block: int, slots: int, field_name: str) -> int:
    if block > slots:
        raise InvalidArgument(field_name, f"a block of {block} slots does not fit {slots} slots; use a context with "
                                          f"poly_modulus_degree >= {2 * block} or column packing")
    return slots // block


def _masked_products(ctx: ts.Context, ct: ts.CKKSVector, rows: np.ndarray, block: int, slots: int,
                     sums: np.ndarray, counts: Counts) -> list[ts.CKKSVector]:
    """For each ciphertext of blocks: ct * [rows of the blocks] + masks whose block sums are ``sums``."""
    per = slots // block
    width = ct.size()  # the input is tiled exactly `per` times: TenSEAL multiplies vectors of one size
    outs = []
    for start in range(0, rows.shape[0], per):
        chunk = rows[start:start + per]
        plain = np.zeros(width)
        plain[: chunk.size] = chunk.ravel()
        masks = block_masks(width, block, chunk.shape[0], sums[start:start + per])
        if np.any(np.abs(plain) >= _ZERO):
            out = ct.mul(plain.tolist())  # rescales: masks are then added at the input's scale
            out.add_(masks.tolist())
            counts.plaintext_multiplies += 1
            counts.additions += 1
            counts.rescales += 1
        else:  # all-zero weights (e.g. an untrained B): the products are zero, the masks alone remain
            out = _encrypt_constant(ctx, masks)
        outs.append(out)
    counts.multiplicative_depth = max(counts.multiplicative_depth, 1)
    return outs


def project_token(ctx: ts.Context, layer: LoraLayer, ct: ts.CKKSVector, slots: int,
                  counts: Counts) -> tuple[list[ts.CKKSVector], TokenBlinding]:
    """Round 1: masked products whose block sums (block = d_in) are Q A x + rho."""
    blocks_per_ciphertext(layer.in_features, slots, "ciphertexts")
    Q = random_orthogonal(layer.rank)
    rho = secure_normal(layer.rank, BLIND_STD)
    outs = _masked_products(ctx, ct, Q @ layer.A, layer.in_features, slots, rho, counts)
    return outs, TokenBlinding(Q=Q, rho=rho, layer=layer)


def expand_token(ctx: ts.Context, blinding: TokenBlinding, ct: ts.CKKSVector, slots: int,
                 counts: Counts) -> list[ts.CKKSVector]:
    """Round 2: masked products whose block sums (block = r) are s B Q^T (u' - rho) = the delta."""
    layer = blinding.layer
    per = blocks_per_ciphertext(layer.rank, slots, "layer_inputs")
    # rho comes off before the multiplication: TenSEAL's rescale leaves a relative error of about 1e-6
    # in products, which on the large u' would swamp the delta.
    unblinded = ct.add(np.tile(-blinding.rho, per).tolist())
    counts.additions += 1
    rows = layer.scaling * (layer.B @ blinding.Q.T)
    return _masked_products(ctx, unblinded, rows, layer.rank, slots, np.zeros(rows.shape[0]), counts)


def serialize(vectors: list[ts.CKKSVector], timer: Timer) -> list[bytes]:
    t0 = time.perf_counter()
    out = [v.serialize() for v in vectors]
    timer.serialize += time.perf_counter() - t0
    return out


def deserialize(ctx: ts.Context, data: list[bytes], field_name: str, timer: Timer) -> list[ts.CKKSVector]:
    t0 = time.perf_counter()
    out = [_load(ctx, d, f"{field_name}[{i}]") for i, d in enumerate(data)]
    timer.deserialize += time.perf_counter() - t0
    return out
