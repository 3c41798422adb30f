"""CKKS parameters and the HomomorphicEncryption.org security table they are checked against.

Imports nothing heavy: the he service checks registered contexts with the same table.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ..errors import ValidationError

# Largest total coefficient modulus (log2 q, all primes including the special one) for a ternary
# secret, per ring dimension N and security level: HomomorphicEncryption.org security standard
# (Albrecht et al., 2018, Table 1, classical attacks); SEAL enforces the same 128-bit row.
SECURITY_TABLE: dict[int, dict[int, int]] = {
    1024: {128: 27, 192: 19, 256: 14},
    2048: {128: 54, 192: 37, 256: 29},
    4096: {128: 109, 192: 75, 256: 58},
    8192: {128: 218, 192: 152, 256: 118},
    16384: {128: 438, 192: 305, 256: 237},
    32768: {128: 881, 192: 611, 256: 476},
}
SECURITY_LEVELS = (128, 192, 256)
# The computation multiplies twice without rescaling (x at scale S, then S^2, then S^3), so the data
# primes must hold 3 * log2(S) bits plus room for the values themselves.
MULTIPLICATIONS = 2
VALUE_BITS = 18


class HEScheme(enum.Enum):
    """The homomorphic scheme. Only CKKS (approximate arithmetic on real vectors) is offered."""

    CKKS = "ckks"


def _insecure(message: str, limit: str, field_name: str) -> ValidationError:
    return ValidationError(message, field=field_name, code="INSECURE_PARAMETERS",
                           details={"field": field_name, "limit": limit})


@dataclass(frozen=True)
class HESchemeParams:
    """CKKS parameters: ring dimension ``poly_modulus_degree`` (N, slots = N / 2), the bit sizes of
    the coefficient modulus primes (the last one is the special prime used only for key switching),
    the scale as ``2 ** scale_bits`` and the claimed ``security_level`` (128, 192 or 256 bits).

    Construction checks them against the HomomorphicEncryption.org table and raises
    :class:`~tg_tinker.ValidationError` (code ``INSECURE_PARAMETERS``) naming the limit.
    """

    scheme: HEScheme = HEScheme.CKKS
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(60, 40, 40, 60))
    scale_bits: int = 40
    security_level: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        check_params(self)

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def global_scale(self) -> float:
        return float(2 ** self.scale_bits)

    @property
    def total_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def max_modulus_bits(self) -> int:
        return SECURITY_TABLE[self.poly_modulus_degree][self.security_level]


def check_params(p: HESchemeParams) -> None:
    """Raise ValidationError unless ``p`` is secure at its level and deep enough for the LoRA delta."""
    if not isinstance(p.scheme, HEScheme):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
        raise ValidationError(f"unknown scheme {p.scheme!r}; only HEScheme.CKKS", field="params.scheme",
                              code="INVALID_ARGUMENT")
    if p.security_level not in SECURITY_LEVELS:
        raise ValidationError(f"security_level must be one of {SECURITY_LEVELS}, got {p.security_level}",
                              field="params.security_level", code="INVALID_ARGUMENT")
    if p.poly_modulus_degree not in SECURITY_TABLE:
        raise _insecure(f"poly_modulus_degree {p.poly_modulus_degree} is not in the HomomorphicEncryption.org "
                        f"table ({', '.join(map(str, SECURITY_TABLE))})", "N in {1024, ..., 32768}",
                        "params.poly_modulus_degree")
    sizes = p.coeff_mod_bit_sizes
    if len(sizes) < 2 or any(not 1 <= b <= 60 for b in sizes):
        raise ValidationError("coeff_mod_bit_sizes needs at least 2 primes of 1 to 60 bits each",
                              field="params.coeff_mod_bit_sizes", code="INVALID_ARGUMENT")
    limit = p.max_modulus_bits()
    if sum(sizes) > limit:
        raise _insecure(f"coefficient modulus of {sum(sizes)} bits exceeds {limit} bits, the HomomorphicEncryption.org "
                        f"limit for N = {p.poly_modulus_degree} at {p.security_level}-bit security",
                        f"log2(q) <= {limit} for N={p.poly_modulus_degree} at {p.security_level} bits",
                        "params.coeff_mod_bit_sizes")
    if not 20 <= p.scale_bits <= 60:
        raise ValidationError(f"scale_bits must be in [20, 60], got {p.scale_bits}", field="params.scale_bits",
                              code="INVALID_ARGUMENT")
    data_bits = sum(sizes[:-1])
    need = (MULTIPLICATIONS + 1) * p.scale_bits + VALUE_BITS
    if data_bits < need:
        raise ValidationError(
            f"the data primes {list(sizes[:-1])} hold {data_bits} bits; the LoRA delta multiplies twice without "
            f"rescaling and needs {MULTIPLICATIONS + 1} x scale_bits + {VALUE_BITS} = {need}",
            field="params.coeff_mod_bit_sizes", code="INVALID_ARGUMENT")
    # One token: encrypted at the level of the first two data primes, multiplied by weights encoded at
    # the second prime's scale and rescaled by it, so values at scale 2^scale_bits remain in the first.
    if sizes[0] < p.scale_bits + VALUE_BITS + 1 or sizes[1] < p.scale_bits:
        raise ValidationError(
            f"the single-token path rescales once, by the second prime, into the first: the first prime needs "
            f"scale_bits + {VALUE_BITS + 1} = {p.scale_bits + VALUE_BITS + 1} bits and the second at least "
            f"scale_bits = {p.scale_bits}; got {list(sizes[:2])}", field="params.coeff_mod_bit_sizes",
            code="INVALID_ARGUMENT")


def scale_bits_of(global_scale: float) -> int:
    bits = math.log2(global_scale)
    if bits != int(bits):
        raise ValidationError(f"global_scale must be a power of two, got {global_scale}", field="params.global_scale",
                              code="INVALID_ARGUMENT")
    return int(bits)


__all__ = ["HEScheme", "HESchemeParams", "SECURITY_TABLE", "check_params", "scale_bits_of"]
