"""The tenant's public key at the output level, for the masks' encryptions.

Every single-token output carries a fresh public-key encryption of its masks at the output level (one
prime, q0). SEAL encrypts a ciphertext for a level below the top at the level above it and divides the
extra prime away (less noise), which costs the NTTs and samples of two primes. The masks need no less
noise: they are far larger than any encryption noise. So the he service encrypts them in a SEAL context
whose only prime is q0 (its parms_id is the output level's: same degree, same modulus), under the
residues mod q0 of the tenant's own public key. Those are a public key for the same secret key mod q0
(pk0 = -a*s + e holds mod every prime of the key), derived from public data; an encryption under them
is an RLWE encryption mod q0 like any other, with fresh u, e0, e1 from SEAL's CSPRNG. It costs about
half a top-down one and decrypts under the key holder's secret key as before (docs/he.md).
"""

from __future__ import annotations

import struct
from typing import Any

from tg_tinker.he.seal import load_into, to_bytes

_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")       # SEAL's SEALHeader: magic, header size, version, compr mode, size
_MEMBERS = struct.Struct("<4QBQQQdQ")     # a Ciphertext: parms_id, NTT form, size, degree, primes, scale, factor


def _serialised(version: bytes, parms_id: list[int], degree: int, coeffs: list[int]) -> bytes:
    """SEAL's uncompressed serialisation of a two-polynomial, one-prime NTT-form ciphertext (a PublicKey)."""
    data = struct.pack(f"<Q{len(coeffs)}Q", len(coeffs), *coeffs)
    inner = _HEADER.pack(_MAGIC, _HEADER.size, version[0], version[1], 0, 0, _HEADER.size + len(data)) + data
    members = _MEMBERS.pack(*parms_id, 1, 2, degree, 1, 1.0, 1) + inner
    return _HEADER.pack(_MAGIC, _HEADER.size, version[0], version[1], 0, 0, _HEADER.size + len(members)) + members


def output_level_encryptor(seal_context: Any, public_key: Any) -> tuple[Any, Any]:
    """(context, Encryptor) encrypting at ``seal_context``'s output level under the residues of
    ``public_key`` (a SEAL PublicKey of that context) mod the output level's prime."""
    from tenseal import sealapi

    last = seal_context.get_context_data(seal_context.last_parms_id())
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(last.parms().poly_modulus_degree())
    parms.set_coeff_modulus(last.parms().coeff_modulus())
    one = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not one.parameters_set() or list(one.first_parms_id()) != list(seal_context.last_parms_id()):
        raise ValueError(f"no one-prime context matches the output level ({one.parameters_error_message()})")
    key = public_key.data()
    n, primes = key.poly_modulus_degree(), key.coeff_modulus_size()
    if key.size() != 2 or not key.is_ntt_form() or last.parms().coeff_modulus()[0].value() != \
            seal_context.key_context_data().parms().coeff_modulus()[0].value():
        raise ValueError("the public key is not a two-polynomial NTT-form key whose first prime is the output level's")
    # Flattened as polynomial, prime, coefficient: the first prime's residues of both polynomials.
    coeffs = [key[i] for i in range(n)] + [key[primes * n + i] for i in range(n)]
    version = to_bytes(key)[3:5]
    pk = sealapi.PublicKey()
    load_into(pk, one, _serialised(version, list(one.first_parms_id()), n, coeffs))
    return one, sealapi.Encryptor(one, pk)


__all__ = ["output_level_encryptor"]
