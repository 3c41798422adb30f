"""The masks' one-prime public key (tensafe.he.mask_key): fresh encryptions at the output level under the
residues of the tenant's key, which the key holder decrypts as before. Real TenSEAL."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from tensafe.he import compute, mask_key
from tensafe.he.compute import SealEngine
from tensafe.he.mask_key import output_level_encryptor
from tg_tinker.he import HEKeyManager
from tg_tinker.he.seal import load_into, to_bytes


@pytest.fixture(scope="module")
def bundle():
    return HEKeyManager("tenant-a").generate_key_bundle(key_id="k1")


def _engine(bundle) -> SealEngine:
    return SealEngine(ts.context_from(bundle.public_context()), bundle.params.global_scale)


def test_masks_are_fresh_encryptions_under_the_keys_residues_at_the_output_level(bundle) -> None:
    engine = _engine(bundle)
    key = ts.context_from(bundle.public_context()).public_key().data
    one, encryptor = output_level_encryptor(engine.seal_context, key)
    assert list(one.first_parms_id()) == list(engine.output_level) and one.first_parms_id() == one.last_parms_id()
    assert engine.mask_encryptor is not engine.encryptor  # masks and zeros come from the one-prime key
    ct, sums = engine.masks(64, compute.BLIND)
    assert ct.parms_id() == engine.output_level and ct.coeff_modulus_size() == 1
    slots = bundle.decrypt_token(to_bytes(ct))  # the key holder's secret key decrypts it as before
    assert np.allclose(slots.reshape(-1, 64).sum(1), sums, atol=1e-5) and np.std(slots) > 1000
    assert np.abs(bundle.decrypt_token(to_bytes(engine.zeros()))).max() < 1e-5
    again, _ = engine.masks(64, compute.BLIND)
    assert to_bytes(again) != to_bytes(ct)
    # The key is the full key's first-prime residues: a key whose residues were altered does not decrypt.
    n = key.data().poly_modulus_degree()
    coeffs = [key.data()[i] for i in range(n)] + [key.data()[key.data().coeff_modulus_size() * n + i] for i in range(n)]
    coeffs[0] = (coeffs[0] + 1) % engine.seal_context.last_context_data().parms().coeff_modulus()[0].value()
    version = to_bytes(key.data())[3:5]
    bad = mask_key._serialised(version, list(one.first_parms_id()), n, coeffs)
    wrong = sealapi.PublicKey()
    load_into(wrong, one, bad)
    plain, out = sealapi.Plaintext(), sealapi.Ciphertext()
    engine.encoder.encode(0.0, engine.output_level, engine.scale, plain)
    sealapi.Encryptor(one, wrong).encrypt(plain, out)
    assert np.abs(bundle.decrypt_token(to_bytes(out))).max() > 1.0
