"""Fuzzing the decoders that read bytes someone else made: the artifact container (a pulled blob, read by the
SDK and by the vault), a tenant's public CKKS context and its SEAL ciphertexts (read by the he service).

Each decoder must answer malformed input with its own documented error (IntegrityError for containers,
INVALID_ARGUMENT naming the field for HE inputs) and never with anything else: no other exception, no
crash, no secret-key context accepted. Mutations start from valid encodings (flipped bytes, truncations,
extensions, overwritten headers), which reach much deeper than random bytes. The tensor decoder and the
artifact readers have their own fuzzers (test_tensor_decoder.py, test_artifact_fuzz.py).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.runtime.errors import InvalidArgument
from tg_tinker.container import decrypt_bytes, encrypt_chunks, read_header
from tg_tinker.errors import IntegrityError

FUZZ = settings(max_examples=int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few byte flips, a truncation, an extension or a splice."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "duplicate"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite" and data:
            i = draw(st.integers(0, len(data) - 1))
            patch = draw(st.binary(min_size=1, max_size=16))
            data[i:i + len(patch)] = patch
        elif kind == "duplicate" and data:
            i = draw(st.integers(0, len(data) - 1))
            j = draw(st.integers(i, min(len(data), i + 4096)))
            data[i:i] = data[i:j]
    return bytes(data)


# -- the artifact container -------------------------------------------------------------------------------
KEY = bytes(range(32))
PLAIN = os.urandom(3 * 64 + 17)
CONTAINER = b"".join(encrypt_chunks([PLAIN], KEY, "tnt_a", "art_1", segment_size=64))


@FUZZ
@given(mutated(CONTAINER))
def test_a_mutated_container_is_refused_with_an_integrity_error(blob: bytes) -> None:
    try:
        out = decrypt_bytes(blob, KEY, "tnt_a", "art_1")
    except IntegrityError:
        return
    assert out == PLAIN  # the only container that decrypts is one whose plaintext is the original


@FUZZ
@given(st.one_of(mutated(CONTAINER[:80]), st.binary(max_size=200)))
def test_read_header_answers_integrity_error_or_a_header(prefix: bytes) -> None:
    try:
        header, length = read_header(prefix)
    except IntegrityError:
        return
    assert 0 < length <= len(prefix) and header.version == 1 and 1 <= header.segment_size <= 1 << 24


# -- HE: public contexts and ciphertexts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_material():
    from tensafe.he.compute import SealEngine
    from tensafe.he.service import inspect_context
    from tg_tinker.he import HEKeyManager, HESchemeParams

    bundle = HEKeyManager(tenant_id="fuzz").generate_key_bundle(HESchemeParams(), key_id="fuzz")
    public = bundle.public_context()
    ctx = inspect_context(public, bundle.params)
    engine = SealEngine(ctx, bundle.params.global_scale)
    import numpy as np

    token = bundle.encrypt_token(np.ones(bundle.slot_count))
    return {"bundle": bundle, "public": public, "engine": engine, "token": token}


def test_the_unmutated_inputs_are_accepted(he_material) -> None:
    """The fuzz below is meaningful only if the originals pass."""
    from tensafe.he.service import inspect_context

    inspect_context(he_material["public"], he_material["bundle"].params)
    assert he_material["engine"].load_input(he_material["token"], "ciphertexts[0]").size() == 2


def test_a_context_with_the_secret_key_is_refused(he_material) -> None:
    from tensafe.he.service import inspect_context

    full = he_material["bundle"].context.serialize(save_secret_key=True)
    with pytest.raises(InvalidArgument) as err:
        inspect_context(full, he_material["bundle"].params)
    assert err.value.field == "public_context" and err.value.reason == "SECRET_KEY_REFUSED"


@settings(max_examples=int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_public_context_is_refused_by_field(he_material, data) -> None:
    from tensafe.he.service import inspect_context

    blob = data.draw(mutated(he_material["public"]))
    try:
        ctx = inspect_context(blob, he_material["bundle"].params)
    except InvalidArgument as err:
        assert err.field in {"public_context", "params.poly_modulus_degree", "params.coeff_mod_bit_sizes",
                             "params.global_scale"}
        return
    assert not ctx.has_secret_key() and not ctx.has_galois_keys()  # what was accepted is a valid public context


@FUZZ
@given(data=st.data())
def test_a_mutated_ciphertext_is_refused_by_field(he_material, data) -> None:
    blob = data.draw(st.one_of(mutated(he_material["token"]), st.binary(max_size=256)))
    try:
        ct = he_material["engine"].load_input(blob, "ciphertexts[3]")
    except InvalidArgument as err:
        assert err.field == "ciphertexts[3]"
        return
    assert ct.size() == 2  # accepted only as a well-formed ciphertext at the expected level and scale
