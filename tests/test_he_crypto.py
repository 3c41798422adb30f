"""HE-LoRA without a server: parameters against the security table, key files, the CKKS arithmetic of
both packings, and what the single-token masks hide. Real TenSEAL throughout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from tensafe.he import compute, group
from tensafe.he.compute import Counts, LoraLayer, SealEngine, Timer
from tensafe.he.masks import MaskPool
from tensafe.he.service import check_params, inspect_context
from tensafe.runtime.errors import InvalidArgument
from tg_tinker import IntegrityError, ValidationError
from tg_tinker.he import HEKeyManager, HEScheme, HESchemeParams
from tg_tinker.he.seal import to_bytes


@pytest.fixture(scope="module")
def bundle():
    return HEKeyManager("tenant-a").generate_key_bundle(key_id="k1")


def _layer(rng: np.random.Generator, d: int, r: int, d_out: int) -> LoraLayer:
    return LoraLayer("m", rng.uniform(-1, 1, (r, d)) / np.sqrt(d), rng.normal(0, 5e-3, (d_out, r)), 2.0 * r, 2.0)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# -- parameters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "bits", "level", "limit"), [
    (8192, (60, 60, 60, 60), 128, 218),      # 240 bits
    (8192, (60, 40, 40, 60), 192, 152),      # the default primes are not 192-bit secure at N = 8192
    (8192, (60, 40, 40, 60), 256, 118),
    (4096, (40, 30, 40), 128, 109),
    (16384, (60,) * 8, 128, 438),           # 480 bits
])
def test_insecure_parameters_are_refused_naming_the_limit(n: int, bits: tuple, level: int, limit: int) -> None:
    with pytest.raises(ValidationError) as err:
        HESchemeParams(poly_modulus_degree=n, coeff_mod_bit_sizes=bits, security_level=level)
    assert err.value.code == "INSECURE_PARAMETERS"
    assert f"{limit} bits" in str(err.value) and f"{level}-bit" in str(err.value)
    assert err.value.field == "params.coeff_mod_bit_sizes"
    with pytest.raises(InvalidArgument) as server:
        check_params("ckks", n, list(bits), 2.0 ** 40, level)
    assert server.value.reason == "INSECURE_PARAMETERS" and str(limit) in server.value.metadata["limit"]


def test_secure_parameters_pass_and_shallow_ones_are_refused() -> None:
    assert HESchemeParams().max_modulus_bits() == 218
    HESchemeParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 40, 60), security_level=192)
    with pytest.raises(ValidationError) as err:  # secure, but 2 multiplications at scale 2^40 do not fit
        HESchemeParams(coeff_mod_bit_sizes=(60, 40, 60))
    assert err.value.field == "params.coeff_mod_bit_sizes" and "3 x scale_bits" in str(err.value)
    with pytest.raises(ValidationError) as err:  # deep enough, but one token's rescale would overflow the first prime
        HESchemeParams(coeff_mod_bit_sizes=(50, 50, 50, 50))
    assert err.value.field == "params.coeff_mod_bit_sizes" and "single-token" in str(err.value)
    with pytest.raises(ValidationError) as err:
        HESchemeParams(poly_modulus_degree=3000)
    assert err.value.code == "INSECURE_PARAMETERS"
    with pytest.raises(ValidationError):
        HESchemeParams(scheme="bfv")  # type: ignore[arg-type]
    assert HESchemeParams(scheme=HEScheme.CKKS).slot_count == 4096


def test_the_service_inspects_the_context_itself(bundle) -> None:
    params = bundle.params
    ctx = inspect_context(bundle.public_context(), params)
    assert not ctx.has_secret_key() and not ctx.has_galois_keys()
    private = bundle.context.serialize(save_secret_key=True)
    with pytest.raises(InvalidArgument) as err:
        inspect_context(private, params)
    assert err.value.reason == "SECRET_KEY_REFUSED" and err.value.field == "public_context"
    galois = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])  # small: keys of N=8192 are 35 MB
    galois.generate_galois_keys()
    galois.make_context_public()
    with pytest.raises(InvalidArgument, match="Galois"):
        inspect_context(galois.serialize(save_galois_keys=True), params)
    # The claimed parameters must be the context's own: a claim cannot smuggle a weaker context through.
    with pytest.raises(InvalidArgument) as err:
        inspect_context(bundle.public_context(), HESchemeParams(coeff_mod_bit_sizes=(60, 40, 40, 40, 30)))
    assert err.value.field == "params.coeff_mod_bit_sizes"
    with pytest.raises(InvalidArgument) as err:
        inspect_context(b"junk", params)
    assert err.value.field == "public_context"


# -- keys ----------------------------------------------------------------------------------------------------
def test_key_bundle_file_is_encrypted_and_round_trips(bundle, tmp_path) -> None:
    path = bundle.save(tmp_path / "k.bundle", passphrase="correct horse battery")
    raw = path.read_bytes()
    secret = bundle.context.serialize(save_secret_key=True)
    sk_file = tmp_path / "sk"
    bundle.context.secret_key().data.save(str(sk_file))
    sk = sk_file.read_bytes()
    for probe in (secret[len(secret) // 2:len(secret) // 2 + 32], sk[len(sk) // 2:len(sk) // 2 + 32]):
        assert probe not in raw
    assert (path.stat().st_mode & 0o777) == 0o600
    keys = HEKeyManager("tenant-a")
    loaded = keys.load_key_bundle(path, passphrase="correct horse battery")
    assert loaded.key_id == "k1" and loaded.params == bundle.params
    ct = bundle.encrypt([1.5, -2.0]).serialize()
    assert np.allclose(loaded.decrypt(ct), [1.5, -2.0], atol=1e-6)
    with pytest.raises(IntegrityError):
        keys.load_key_bundle(path, passphrase="wrong horse battery")
    tampered = tmp_path / "t.bundle"
    tampered.write_bytes(raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:])
    with pytest.raises(IntegrityError):
        keys.load_key_bundle(tampered, passphrase="correct horse battery")
    key = bytes(range(32))
    other = bundle.save(tmp_path / "key.bundle", key=key)
    assert keys.load_key_bundle(other, key=key).key_id == "k1"
    with pytest.raises(IntegrityError):
        keys.load_key_bundle(other, key=bytes(32))
    with pytest.raises(TypeError):
        pickle.dumps(bundle)
    assert "secret" not in repr(bundle).lower() and "context" not in repr(bundle)


# -- the arithmetic --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "r", "d_out", "tokens"), [(64, 8, 32, 7), (128, 4, 64, 1000), (96, 16, 200, 2)])
def test_column_packing_is_the_lora_delta_with_depth_two_and_no_rotation(bundle, d, r, d_out, tokens) -> None:
    rng = np.random.default_rng(d + r)
    layer = _layer(rng, d, r, d_out)
    x = rng.normal(0, 1, (tokens, d))
    engine = _engine(bundle)
    cts = [engine.load_input(bundle.encrypt_column(x[:, j]), f"ciphertexts[{j}]", column=True) for j in range(d)]
    proj, counts = compute.ColumnProjection(layer), Counts()
    proj.fold(engine, cts[:d // 3], 0, counts)
    proj.fold(engine, cts[d // 3:], d // 3, counts)
    outs = compute.column_outputs(engine, proj, 0, d_out, counts)
    assert all(o.parms_id() == engine.output_level for o in outs)  # rescaled twice: one prime to send back
    got = np.stack([bundle.decrypt_token(o)[:tokens] for o in compute.serialize_seal(outs, Timer())], axis=1)
    assert _rel(got, layer.scaling * x @ layer.A.T @ layer.B.T) < 1e-4
    assert counts.rotations == 0 and counts.multiplicative_depth == 2 and counts.rescales == 2 * d_out
    assert counts.plaintext_multiplies == d * r + d_out * r


def _engine(bundle) -> SealEngine:
    return SealEngine(ts.context_from(bundle.public_context()), bundle.params.global_scale)


def _fresh_masks(engine: SealEngine):
    def make(block: int, kind: str, count: int, counts: Counts | None = None) -> list:
        if counts is not None:
            counts.encryptions += count
        return [engine.masks(block, kind) for _ in range(count)]
    return make


def _token(bundle, layer: LoraLayer, x: np.ndarray):
    """Both rounds of one token as the SDK runs them; returns (round 1 slots, round 2 slots, delta, counts)."""
    engine = _engine(bundle)
    slots, d, r = bundle.slot_count, layer.in_features, layer.rank
    per = slots // d
    counts = Counts()
    ct = engine.load_input(bundle.encrypt_token(np.tile(x, per)), "x")
    blinding = compute.prepare_token(engine, layer, _fresh_masks(engine), counts)
    first = compute.project_token(engine, blinding, ct, counts)
    slots1 = np.concatenate([bundle.decrypt_token(c) for c in compute.serialize_seal(first, Timer())])
    sums = np.concatenate([np.reshape(v[: per * d], (-1, d)).sum(1) for v in slots1.reshape(len(first), -1)])[:r]
    ct2 = engine.load_input(bundle.encrypt_token(np.tile(sums, slots // r)), "u")
    second = compute.expand_token(engine, blinding, ct2, counts)
    slots2 = np.concatenate([bundle.decrypt_token(c) for c in compute.serialize_seal(second, Timer())])
    delta = slots2.reshape(-1, r).sum(1)[: layer.out_features]
    return slots1, slots2, sums, blinding, delta, counts


@pytest.mark.parametrize(("d", "r", "d_out"), [(64, 8, 32), (576, 16, 576), (100, 4, 300)])
def test_replicated_packing_is_the_lora_delta(bundle, d, r, d_out) -> None:
    rng = np.random.default_rng(d * r)
    layer = _layer(rng, d, r, d_out)
    x = rng.normal(0, 1, d)
    *_, delta, counts = _token(bundle, layer, x)
    assert _rel(delta, layer.scaling * layer.B @ layer.A @ x) < 1e-4
    assert counts.rotations == 0 and counts.multiplicative_depth == 1


def test_single_token_masks_cancel_in_block_sums_and_hide_the_products(bundle) -> None:
    rng = np.random.default_rng(5)
    layer = _layer(rng, 64, 8, 32)
    x = rng.normal(0, 1, 64)
    slots1, slots2, sums, blinding, delta, _ = _token(bundle, layer, x)
    # Round 1: the block sums are the blinded projections Q A x + rho, not A x ...
    projections = blinding.Q @ layer.A @ x
    assert np.allclose(sums, projections + blinding.rho, atol=1e-5)
    assert np.abs(sums - layer.A @ x).min() > 1.0  # rho is of order 2^14
    # ... and no slot is one of the products (Q A)[k, j] x_j it sums: each is off by a mask of order 2^14.
    products = ((blinding.Q @ layer.A) * x).ravel()
    assert np.abs(slots1[: products.size] - products).min() > 1e-3
    assert np.std(slots1[: products.size] - products) > 1000
    # Round 2: the masks cancel in every block of r slots, and the slots are not the products either.
    blocks = slots2.reshape(-1, layer.rank)[: layer.out_features]
    products2 = layer.scaling * (layer.B @ blinding.Q.T) * projections
    assert np.allclose(blocks.sum(1), products2.sum(1), atol=1e-5)
    assert np.abs(blocks - products2).min() > 1e-3
    # A second call on the same x draws fresh Q, rho and masks: same delta, different everything else.
    slots1b, slots2b, sums_b, _, delta_b, _ = _token(bundle, layer, x)
    assert _rel(delta_b, delta) < 1e-5
    assert np.abs(sums - sums_b).min() > 1e-2 and np.abs(slots2 - slots2b).min() > 1e-3


def _group(bundle, layers: list[LoraLayer], x: np.ndarray):
    """Both rounds of one token through ``layers`` as the SDK's process_tokens runs them."""
    engine = _engine(bundle)
    slots = bundle.slot_count
    layout = group.group_layout(layers, slots, "layers")
    counts = Counts()
    ct = engine.load_input(bundle.encrypt_token(np.tile(x, layout.per)), "x")
    blinding = group.prepare_group(engine, layout, _fresh_masks(engine), counts)
    first = compute.serialize_seal(group.project_group(engine, blinding, ct, counts), Timer())
    sums = np.concatenate([bundle.decrypt_token(c)[: layout.per * layout.block].reshape(layout.per, -1).sum(1)
                           for c in first])
    values = np.zeros((layout.per2, layout.block2))
    for ly, row, start, span in zip(layers, layout.rows, layout.starts, layout.spans, strict=True):
        values[start:start + span, : ly.rank] = sums[row:row + ly.rank]
    ct2 = engine.load_input(bundle.encrypt_token(values.ravel()), "u")
    second = compute.serialize_seal(group.expand_group(engine, blinding, ct2, counts), Timer())
    blocks = np.stack([bundle.decrypt_token(c).reshape(layout.per2, -1).sum(1) for c in second])
    deltas = [blocks[:, start:start + span].reshape(-1)[: ly.out_features]
              for ly, start, span in zip(layers, layout.starts, layout.spans, strict=True)]
    return layout, sums, deltas, counts, first, second


def test_layers_sharing_an_input_share_each_tokens_ciphertexts(bundle) -> None:
    """q_proj (576 -> 576) and v_proj (576 -> 192) of SmolLM2 at r = 16, and layers of other ranks: their
    rows share one token's outputs (5 + 3 at d = 576, against 6 + 4 one layer at a time), each layer keeps
    its own Q and rho, the deltas are the LoRA deltas, and a second token gets fresh everything."""
    rng = np.random.default_rng(11)
    q, v = _layer(rng, 576, 16, 576), _layer(rng, 576, 16, 192)
    x = rng.normal(0, 1, 576)
    layout, sums, deltas, counts, first, second = _group(bundle, [q, v], x)
    assert (layout.first, layout.second, layout.spans) == (5, 3, (192, 64))
    assert counts.encryptions == 8 and counts.rotations == 0 and counts.multiplicative_depth == 1
    for layer, delta in zip((q, v), deltas, strict=True):
        assert _rel(delta, layer.scaling * layer.B @ layer.A @ x) < 1e-4
    assert np.abs(sums[:16] - q.A @ x).min() > 1.0  # blinded (rho of order 2^14)
    _, sums_b, deltas_b, _, first_b, second_b = _group(bundle, [q, v], x)
    assert _rel(deltas_b[1], deltas[1]) < 1e-5
    assert np.abs(sums - sums_b).min() > 1e-2
    assert all(a != b for a, b in zip(first + second, first_b + second_b, strict=True))
    rng = np.random.default_rng(12)
    mixed = [_layer(rng, 100, 4, 300), _layer(rng, 100, 8, 40), _layer(rng, 100, 2, 7)]
    x = rng.normal(0, 1, 100)
    layout, _, deltas, *_ = _group(bundle, mixed, x)
    assert layout.block2 == 8 and sum(layout.spans) <= layout.per2
    for layer, delta in zip(mixed, deltas, strict=True):
        assert _rel(delta, layer.scaling * layer.B @ layer.A @ x) < 1e-4
    with pytest.raises(InvalidArgument) as err:  # more layers than round 2 has blocks
        group.group_layout([_layer(rng, 8, 64, 8)] * 65, bundle.slot_count, "layers")
    assert err.value.field == "layers"


def test_block_masks_sum_exactly_and_are_fresh() -> None:
    sums = np.array([3.0, -1.0, 0.0])
    m = compute.block_masks(40, 10, 3, sums)
    assert np.allclose(m[:30].reshape(3, 10).sum(1), sums, atol=1e-9)
    assert m.std() > 1000
    assert not np.allclose(m, compute.block_masks(40, 10, 3, sums))
    q = compute.random_orthogonal(16)
    assert np.allclose(q @ q.T, np.eye(16), atol=1e-12)


def test_a_token_wider_than_the_slots_is_refused(bundle) -> None:
    layer = _layer(np.random.default_rng(0), 8192, 4, 8)
    engine = _engine(bundle)
    with pytest.raises(InvalidArgument) as err:
        compute.prepare_token(engine, layer, _fresh_masks(engine), Counts())
    assert "poly_modulus_degree" in str(err.value)


def _second_component(ct) -> np.ndarray:
    """c1 of a SEAL ciphertext (NTT form, every prime of its level)."""
    arr = ct.dyn_array()
    n = arr.size() // 2
    return np.array([arr.at(i) for i in range(n, 2 * n)], dtype=np.uint64)


def test_single_token_outputs_are_rerandomised(bundle) -> None:
    """Without a fresh encryption in each output, its second component would be rescale(c1 * w): the key
    holder, who made c1, could divide the weights out of it. With one, two outputs of the same input,
    weights and level share no component with that product or with each other."""

    engine = _engine(bundle)
    ct = engine.load_input(bundle.encrypt_token(np.random.default_rng(1).normal(0, 1, 4096)), "x")
    rows = np.random.default_rng(2).normal(0, 1, (7, 576))
    bare = sealapi.Ciphertext()
    engine.evaluator.multiply_plain(ct, engine.plaintext(rows.ravel(), engine.weight_scale), bare)
    engine.evaluator.rescale_to_next_inplace(bare)
    plains = compute.encoded_rows(engine, rows, 576, lambda: None)
    outs = [compute.masked_products(engine, ct, plains, [_fresh_masks(engine)(576, compute.ZERO, 1)[0][0]],
                                     Counts())[0] for _ in range(2)]
    c1_bare, c1_a, c1_b = (_second_component(c) for c in (bare, *outs))
    assert outs[0].parms_id() == engine.output_level and outs[0].scale == engine.scale
    assert np.mean(c1_a == c1_bare) < 0.01 and np.mean(c1_a == c1_b) < 0.01
    # ... and an all-zero weight block (an untrained B) still returns a fresh encryption, of the masks.
    zeros = compute.encoded_rows(engine, np.zeros((7, 576)), 576, lambda: None)
    assert zeros == [None]
    zero = compute.masked_products(engine, ct, zeros, [_fresh_masks(engine)(576, compute.ZERO, 1)[0][0]], Counts())[0]
    values = bundle.decrypt_token(compute.serialize_seal([zero], Timer())[0])
    # (block sums of 576 slots carry the one-prime encryption's noise, about 1e-7 a slot: mask_key.py)
    assert np.allclose(values[:4032].reshape(7, 576).sum(1), 0, atol=1e-5) and values.std() > 1000


def test_a_token_input_must_be_a_fresh_encryption_at_the_token_level(bundle) -> None:


    engine = _engine(bundle)
    top = sealapi.Ciphertext()
    plain = sealapi.Plaintext()
    engine.encoder.encode([1.0] * 8, bundle.params.global_scale, plain)  # the top level, not the token level
    engine.encryptor.encrypt(plain, top)
    for data in (bundle.encrypt([1.0]).serialize(), b"junk", to_bytes(top)):
        with pytest.raises(InvalidArgument) as err:
            engine.load_input(data, "ciphertexts[0]")
        assert err.value.field == "ciphertexts[0]"
    other = HEKeyManager("tenant-a").generate_key_bundle(params=HESchemeParams(poly_modulus_degree=16384,
                                                                            coeff_mod_bit_sizes=(60, 40, 40, 60)))
    with pytest.raises(InvalidArgument):  # another N: not a ciphertext of this context
        engine.load_input(other.encrypt_token([1.0]), "ciphertexts[0]")


def test_the_mask_pool_prepares_masks_in_a_worker_and_each_is_used_once(bundle) -> None:
    import hashlib
    import time

    engine = _engine(bundle)
    public = bundle.public_context()
    args = (hashlib.sha256(public).digest(), public, bundle.params.global_scale)
    key = ("tenant-a", "k1", args[0])
    pool = MaskPool(workers=1)
    try:
        pool.expect(key, args, 100, compute.BLIND, 3, 1 << 17)
        deadline = time.monotonic() + 60
        while pool.ready(key, 100, compute.BLIND) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.ready(key, 100, compute.BLIND) == 6
        got = pool.take(key, engine, args, 100, compute.BLIND, 8)  # 6 ready, 2 made here
        assert (pool.taken_ready, pool.made_inline) == (6, 2)
        values = [bundle.decrypt_token(compute.serialize_seal([ct], Timer())[0]) for ct, _ in got]
        for v, (_, sums) in zip(values, got, strict=True):
            assert np.allclose(v[:4000].reshape(40, 100).sum(1), sums, atol=1e-5)
            assert np.abs(sums).max() > 100  # rho: Gaussian of sigma 2^14
        firsts = {round(float(v[0]), 3) for v in values}
        assert len(firsts) == 8  # every mask is fresh: none is handed out twice
        pool.forget("tenant-a", "k1")
        assert pool.ready(key, 100, compute.BLIND) == 0
        workers = list(pool._workers)
        assert len(workers) == 1
    finally:
        pool.close()
    assert all(w.proc.poll() is not None for w in workers)  # closing the pool ends its workers


def test_without_workers_masks_are_made_in_the_request(bundle) -> None:
    engine = _engine(bundle)
    pool = MaskPool(workers=0)
    public = bundle.public_context()
    args = (b"d", public, bundle.params.global_scale)
    got = pool.take(("t", "k", b"d"), engine, args, 64, compute.ZERO, 2)
    assert len(got) == 2 and pool.made_inline == 2 and not np.any(got[0][1])


def test_blindings_are_prepared_between_requests_and_used_once(bundle) -> None:
    import hashlib
    import time

    from tensafe.he.prepare import Activity, Preparer

    engine = _engine(bundle)
    public = bundle.public_context()
    args = (hashlib.sha256(public).digest(), public, bundle.params.global_scale)
    key = ("tenant-a", "k1", args[0])
    layer = _layer(np.random.default_rng(9), 64, 8, 32)
    pool, activity = MaskPool(workers=1), Activity()
    preparer = Preparer(pool, activity)
    try:
        pool.expect(key, args, 64, compute.BLIND, 1, 1 << 17)
        pool.expect(key, args, 8, compute.ZERO, 1, 1 << 17)
        with activity.request():  # nothing is prepared while a request runs
            preparer.want("hea_1", key, engine, args, layer)
            time.sleep(1.0)
            assert preparer.ready("hea_1", "m") == 0
        deadline = time.monotonic() + 60
        while preparer.ready("hea_1", "m") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert preparer.ready("hea_1", "m") == 2
        a, b = preparer.take("hea_1", "m"), preparer.take("hea_1", "m")
        assert a.prepared_ahead and b.prepared_ahead and not np.allclose(a.Q, b.Q)
        assert not np.allclose(a.rho, b.rho) and preparer.ready("hea_1", "m") == 0
        # A prepared blinding computes the same delta as one made in the request.
        x = np.random.default_rng(3).normal(0, 1, 64)
        counts = Counts()
        ct = engine.load_input(bundle.encrypt_token(np.tile(x, 64)), "x")
        first = compute.serialize_seal(compute.project_token(engine, a, ct, counts), Timer())
        sums = bundle.decrypt_token(first[0])[:4096].reshape(64, 64).sum(1)[:8]
        ct2 = engine.load_input(bundle.encrypt_token(np.tile(sums, 512)), "u")
        second = compute.serialize_seal(compute.expand_token(engine, a, ct2, counts), Timer())
        delta = bundle.decrypt_token(second[0]).reshape(-1, 8).sum(1)[:32]
        assert _rel(delta, layer.scaling * layer.B @ layer.A @ x) < 1e-4
        preparer.forget(lambda adapter, _key: adapter == "hea_1")
        assert preparer.ready("hea_1", "m") == 0 and preparer.take("hea_1", "m") is None
    finally:
        preparer.close()
        pool.close()


def test_activity_waits_for_a_token_between_its_rounds() -> None:
    import threading
    import time

    from tensafe.he.prepare import Activity

    activity = Activity()
    activity.between_rounds("hec_1")
    done = threading.Event()
    threading.Thread(target=lambda: (activity.wait_idle(), done.set()), daemon=True).start()
    assert not done.wait(0.2)
    activity.round_two("hec_1")
    assert done.wait(2)
    activity.between_rounds("hec_2")  # a second round that never comes stops blocking after ROUND_GAP_S
    t0 = time.monotonic()
    activity.wait_idle()
    assert time.monotonic() - t0 < 2
