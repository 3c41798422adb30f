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
masks are fresh Gaussians projected to the block-sum constraint, added as a fresh public-key encryption
so that every output is re-randomised. Both packings run on SEAL directly (SealEngine); for one token
everything but the products is prepared ahead (TokenBlinding, masks.py, prepare.py). See docs/he.md for what this hides.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from tensafe.runtime.errors import InvalidArgument

# Standard deviation of the masks on each slot and of the blinding rho of the rank projections. Real
# masks hide statistically: the larger, the better they hide and the more precision they cost (the
# key holder sums them in float64); with the masks' encryption noise (mask_key.py) the delta stays within
# about 1e-5 relative of the plaintext one.
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
    encryptions: int = 0            # public-key encryptions made in the call (masks not prepared ahead)
    prepared_encryptions: int = 0   # mask encryptions taken ready-made

    def add(self, other: Counts) -> None:
        self.plaintext_multiplies += other.plaintext_multiplies
        self.additions += other.additions
        self.rotations += other.rotations
        self.rescales += other.rescales
        self.encryptions += other.encryptions
        self.prepared_encryptions += other.prepared_encryptions
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


# -- column packing ------------------------------------------------------------------------------------
# On SEAL too: the key holder encrypts each column symmetrically (seeded) at the top level; the service
# multiplies by scalars (encoded at scale 2^scale_bits) twice without rescaling, then rescales each
# output twice, to the last level, where it is a third of the size and decrypts in one prime.
class ColumnProjection:
    """The encrypted rank projections u_k = sum_j A[k, j] * ct_j of one layer, filled chunk by chunk."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer
        self.acc: list[object | None] = [None] * layer.rank

    def fold(self, engine: SealEngine, cts: list[object], offset: int, counts: Counts) -> None:
        from tenseal import sealapi

        A = self.layer.A
        for k in range(self.layer.rank):
            acc = self.acc[k]
            for j, ct in enumerate(cts, start=offset):
                a = float(A[k, j])
                if abs(a) < _ZERO:
                    continue
                term = sealapi.Ciphertext()
                engine.evaluator.multiply_plain(ct, engine.scalar(a), term)
                counts.plaintext_multiplies += 1
                if acc is None:
                    acc = term
                else:
                    engine.evaluator.add_inplace(acc, term)
                    counts.additions += 1
            self.acc[k] = acc
        counts.multiplicative_depth = max(counts.multiplicative_depth, 1)


def column_outputs(engine: SealEngine, proj: ColumnProjection, start: int, stop: int,
                   counts: Counts) -> list[object]:
    """out_i = sum_k (s * B[i, k]) * u_k for i in [start, stop), rescaled twice to the last level."""
    from tenseal import sealapi

    layer = proj.layer
    weights = layer.scaling * layer.B
    outs = []
    for i in range(start, stop):
        out = None
        for k in range(layer.rank):
            b = float(weights[i, k])
            if abs(b) < _ZERO or proj.acc[k] is None:
                continue
            term = sealapi.Ciphertext()
            engine.evaluator.multiply_plain(proj.acc[k], engine.scalar(b), term)
            counts.plaintext_multiplies += 1
            if out is None:
                out = term
            else:
                engine.evaluator.add_inplace(out, term)
                counts.additions += 1
        if out is None:  # this output is exactly zero (an untrained B row): a fresh encryption of zeros
            outs.append(engine.zeros())
            continue
        while out.parms_id() != engine.output_level:
            engine.evaluator.rescale_to_next_inplace(out)
            counts.rescales += 1
        outs.append(out)
    counts.multiplicative_depth = max(counts.multiplicative_depth, 2)
    return outs


# -- replicated packing ----------------------------------------------------------------------------------
# One token runs on SEAL directly (tenseal.sealapi): the key holder encrypts x symmetrically at the level
# with two data primes; each output is one plaintext multiplication, one rescale (to the last level) and
# the addition of a fresh public-key encryption of its masks, which re-randomises the whole ciphertext:
# without it the output's second component would be the key holder's own one times the weights.
BLIND = "blind"   # masks whose block sums are fresh Gaussians (round 1: they are rho)
ZERO = "zero"     # masks whose block sums are zero (round 2)


class SealEngine:
    """SEAL objects of one tenant's public context, for both packings."""

    def __init__(self, ctx: ts.Context, scale: float) -> None:
        from tenseal import sealapi

        from tg_tinker.he.seal import levels

        from .mask_key import output_level_encryptor

        self.seal_context = ctx.seal_context().data
        self.scale = scale
        self.encoder = sealapi.CKKSEncoder(self.seal_context)
        self.evaluator = sealapi.Evaluator(self.seal_context)
        self.encryptor = sealapi.Encryptor(self.seal_context, ctx.public_key().data)
        self.input_level, self.output_level = levels(self.seal_context)
        # Masks and zeros at the output level: under the key's residues mod that level's prime (mask_key.py).
        self._mask_context, self.mask_encryptor = output_level_encryptor(self.seal_context, ctx.public_key().data)
        self.top_level = self.seal_context.first_parms_id()
        self.slots = self.encoder.slot_count()
        self.weight_scale = self._rescale_prime()

    def _rescale_prime(self) -> float:
        """The prime a rescale at the input level divides by. Weights are encoded at this scale, so a
        product rescales back to exactly 2^scale_bits and the masks can be prepared ahead at that scale."""
        from tenseal import sealapi

        plain, ct = sealapi.Plaintext(), sealapi.Ciphertext()
        self.encoder.encode(1.0, self.input_level, self.scale, plain)
        self.encryptor.encrypt(plain, ct)
        self.evaluator.multiply_plain_inplace(ct, plain)
        self.evaluator.rescale_to_next_inplace(ct)
        return float(round(self.scale * self.scale / ct.scale))

    def plaintext(self, values: np.ndarray, scale: float) -> Any:  # a tenseal sealapi.Plaintext (untyped)
        from tenseal import sealapi

        plain = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), self.input_level, scale, plain)
        return plain

    def scalar(self, value: float) -> object:
        """A constant plaintext at the top level, scale 2^scale_bits (a column path factor)."""
        from tenseal import sealapi

        plain = sealapi.Plaintext()
        self.encoder.encode(value, self.top_level, self.scale, plain)
        return plain

    def zeros(self) -> object:
        """A fresh public-key encryption of zeros at the output level, scale 2^scale_bits."""
        from tenseal import sealapi

        plain, ct = sealapi.Plaintext(), sealapi.Ciphertext()
        self.encoder.encode(0.0, self.output_level, self.scale, plain)
        self.mask_encryptor.encrypt(plain, ct)
        return ct

    def masks(self, block: int, kind: str) -> tuple[object, np.ndarray]:
        """A fresh public-key encryption, at the output level, of masks over every slot whose blocks of
        ``block`` slots sum to fresh Gaussians (BLIND) or to zero (ZERO); and those sums."""
        from tenseal import sealapi

        per = self.slots // block
        sums = secure_normal(per, BLIND_STD) if kind == BLIND else np.zeros(per)
        plain, ct = sealapi.Plaintext(), sealapi.Ciphertext()
        self.encoder.encode(block_masks(self.slots, block, per, sums).tolist(), self.output_level, self.scale, plain)
        self.mask_encryptor.encrypt(plain, ct)
        return ct, sums

    def load_input(self, data: bytes, field_name: str, *, column: bool = False) -> object:
        """A key holder's fresh ciphertext: one token's at the level with two data primes, a column's
        (``column``) at the top level; scale 2^scale_bits. Anything else is INVALID_ARGUMENT."""
        from tg_tinker.he.seal import load_ciphertext

        how = "encrypt_column" if column else "encrypt_token"
        try:
            ct = load_ciphertext(self.seal_context, data)
        except ValueError:
            raise InvalidArgument(field_name, f"is not a SEAL ciphertext under this adapter's context (the SDK "
                                              f"encrypts with {how})") from None
        level = self.top_level if column else self.input_level
        if ct.size() != 2 or ct.parms_id() != level or ct.scale != self.scale or not ct.is_ntt_form():
            where = "the top level" if column else "the level with two data primes"
            raise InvalidArgument(field_name, f"must be a fresh encryption at {where} and scale 2^scale_bits (the "
                                              f"SDK's {how})")
        return ct


def blocks_per_ciphertext(block: int, slots: int, field_name: str) -> int:
    if block > slots:
        raise InvalidArgument(field_name, f"a block of {block} slots does not fit {slots} slots; use a context with "
                                          f"poly_modulus_degree >= {2 * block} or column packing")
    return slots // block


def ciphertexts_needed(rows: int, block: int, slots: int) -> int:
    """Output ciphertexts for ``rows`` rows of ``block`` products each."""
    return -(-rows // (slots // block))


# (block, kind, count, counts) -> count fresh encrypted masks with their block sums; counts the encryptions.
MaskSource = Callable[[int, str, int, "Counts"], list[tuple[object, np.ndarray]]]


@dataclass
class TokenBlinding:
    """Everything of one single-token computation on one layer that does not depend on x: the rotation
    Q, the blinding rho (the block sums of round 1's masks), and for each round the encoded weight rows
    of every output ciphertext (None where they are all zero) and its encrypted masks. Fresh for each
    computation; the he service prepares them between requests, and round 2 needs round 1's."""

    layer: LoraLayer = field(repr=False)
    Q: np.ndarray = field(repr=False)
    rho: np.ndarray = field(repr=False)
    first: list = field(repr=False)
    first_masks: list = field(repr=False)
    second: list = field(repr=False)
    second_masks: list = field(repr=False)
    unblind: object = field(repr=False)
    prepared_ahead: bool = False     # by the he service between requests (its masks counted when used)

    @property
    def nbytes(self) -> int:
        """About what it holds in memory (plaintexts at two primes, masks at one; 8 bytes a coefficient)."""
        n = 2 * self.first_masks[0].poly_modulus_degree() * 8 if self.first_masks else 0
        return n * (len(self.first) + len(self.second) + 1 + len(self.first_masks) + len(self.second_masks))


def encoded_rows(engine: SealEngine, rows: np.ndarray, block: int, pause: Callable[[], None]) -> list:
    per = engine.slots // block
    out = []
    for start in range(0, rows.shape[0], per):
        chunk = rows[start:start + per]
        values = np.zeros(per * block)
        values[: chunk.size] = chunk.ravel()
        pause()
        plain = engine.plaintext(values, engine.weight_scale)
        out.append(None if plain.is_zero() else plain)
    return out


def prepare_token(engine: SealEngine, layer: LoraLayer, take_masks: MaskSource, counts: Counts,
                  pause: Callable[[], None] = lambda: None) -> TokenBlinding:
    """A fresh blinding for one token on ``layer``; ``pause`` is called between the encodings."""
    d, r = layer.in_features, layer.rank
    blocks_per_ciphertext(d, engine.slots, "ciphertexts")
    per_r = blocks_per_ciphertext(r, engine.slots, "layer_inputs")
    first_masks = take_masks(d, BLIND, ciphertexts_needed(r, d, engine.slots), counts)
    second_masks = take_masks(r, ZERO, ciphertexts_needed(layer.out_features, r, engine.slots), counts)
    rho = np.concatenate([sums for _, sums in first_masks])[:r]
    Q = random_orthogonal(r)
    first = encoded_rows(engine, Q @ layer.A, d, pause)
    second = encoded_rows(engine, layer.scaling * (layer.B @ Q.T), r, pause)
    pause()
    unblind = engine.plaintext(np.tile(-rho, per_r), engine.scale)
    return TokenBlinding(layer, Q, rho, first, [m for m, _ in first_masks], second, [m for m, _ in second_masks],
                         unblind)


def masked_products(engine: SealEngine, ct: object, plains: list, masks: list, counts: Counts) -> list[object]:
    """For each output ciphertext: rescale(ct * plaintext) + Enc_pk(masks); the masks alone where the
    weights are all zero (e.g. an untrained B), still a fresh encryption."""
    from tenseal import sealapi

    outs = []
    for plain, mask_ct in zip(plains, masks, strict=True):
        if plain is None:
            outs.append(mask_ct)
            continue
        out = sealapi.Ciphertext()
        engine.evaluator.multiply_plain(ct, plain, out)
        engine.evaluator.rescale_to_next_inplace(out)
        engine.evaluator.add_inplace(out, mask_ct)
        counts.plaintext_multiplies += 1
        counts.rescales += 1
        counts.additions += 1
        outs.append(out)
    counts.multiplicative_depth = max(counts.multiplicative_depth, 1)
    return outs


def project_token(engine: SealEngine, blinding: TokenBlinding, ct: object, counts: Counts) -> list[object]:
    """Round 1: masked products whose block sums (block = d_in) are Q A x + rho."""
    return masked_products(engine, ct, blinding.first, blinding.first_masks, counts)


def expand_token(engine: SealEngine, blinding: TokenBlinding, ct: object, counts: Counts) -> list[object]:
    """Round 2: masked products whose block sums (block = r) are s B Q^T (u' - rho) = the delta. ``ct``
    is this call's own input: rho comes off it in place, before the multiplication."""
    engine.evaluator.add_plain_inplace(ct, blinding.unblind)
    counts.additions += 1
    return masked_products(engine, ct, blinding.second, blinding.second_masks, counts)


def serialize_seal(cts: list[object], timer: Timer) -> list[bytes]:
    from tg_tinker.he.seal import to_bytes

    t0 = time.perf_counter()
    out = [to_bytes(c) for c in cts]
    timer.serialize += time.perf_counter() - t0
    return out
