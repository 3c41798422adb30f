"""The he service's logic below the stack: HeService in-process on its store (SQLite and PostgreSQL), real CKKS
(TenSEAL) with the SDK's key bundle, adapters read from real LoRA artifacts by the one adapter-artifact reader.

Each delta is decrypted with the tenant's secret key and compared with the plaintext LoRA delta
``scaling * B A x`` within CKKS tolerance; another tenant's context, adapter and computation do not exist.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.he.adapter_cache import HeLimits
from tensafe.he.service import HeService, check_params
from tensafe.he.store import HeStore
from tensafe.runtime.adapter_artifact import read_adapter_artifact
from tensafe.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from tg_tinker.he import HEKeyManager

D, RANK, ALPHA = 64, 4, 8.0
OUT = {"q_proj": 32, "v_proj": 48}
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
TOL = 1e-4  # relative, CKKS at scale 2^40


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def lora_artifact(seed: int, **config_changes: object) -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A PEFT LoRA adapter (rank 4 on layer 0's q_proj and v_proj) as a tar, and its factors in float64."""
    rng = np.random.default_rng(seed)
    tensors, factors = {}, {}
    for module, width in OUT.items():
        a = (rng.uniform(-1, 1, (RANK, D)) / np.sqrt(D)).astype(np.float32)
        b = rng.normal(0, 0.05, (width, RANK)).astype(np.float32)
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        factors[f"model.layers.0.self_attn.{module}"] = (a.astype(np.float64), b.astype(np.float64))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(OUT), "bias": "none",
              "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", **config_changes}
    return tar_of({"adapter_config.json": json.dumps(config).encode(),
                   "adapter_model.safetensors": st_save(tensors)}), factors


def plain_delta(factors: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    a, b = factors
    return (ALPHA / RANK) * x @ a.T @ b.T


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def bundle():
    return HEKeyManager("t1").generate_key_bundle(key_id="k1")


@pytest.fixture(scope="module")
def params(bundle):
    p = bundle.params
    return check_params("ckks", p.poly_modulus_degree, list(p.coeff_mod_bit_sizes), p.global_scale, p.security_level)


class Vault:
    """Artifacts by id, each readable by its owner only (the vault's rule), read by the one reader."""

    def __init__(self) -> None:
        self.artifacts: dict[str, tuple[str, bytes]] = {}
        self.caller = ""
        self.reads = 0

    def put(self, tenant: str, artifact_id: str, data: bytes) -> str:
        self.artifacts[artifact_id] = (tenant, data)
        return artifact_id

    def read(self, artifact_id: str):
        owner, data = self.artifacts.get(artifact_id, ("", b""))
        if owner != self.caller:
            raise NotFound("artifact", artifact_id)
        self.reads += 1
        return read_adapter_artifact(data, 1 << 20)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> HeStore:
    return HeStore(service_engine(request, "he", tmp_path))


@pytest.fixture
def vault() -> Vault:
    return Vault()


@pytest.fixture
def service(store, vault):
    svc = HeService(store, vault.read, 64 << 20, mask_workers=0, limits=HeLimits(computations=2))
    yield svc
    svc.close()


def as_tenant(vault: Vault, tenant: str) -> str:
    vault.caller = tenant
    return tenant


def loaded(service: HeService, vault: Vault, bundle, params, seed: int = 1, layers: list[str] | None = None):
    t1 = as_tenant(vault, "t1")
    service.register_context(t1, "k1", bundle.public_context(), params)
    data, factors = lora_artifact(seed)
    record, _ = service.load_adapter(t1, vault.put(t1, f"art{seed}", data), "k1", layers or [])
    return record, factors


def column_delta(service: HeService, bundle, tenant: str, adapter_id: str, x: np.ndarray,
                 layers: list[str]) -> dict[str, np.ndarray]:
    cts = [bundle.encrypt_column(x[:, j]) for j in range(x.shape[1])]
    comp, _, _ = service.append_input(tenant, "", adapter_id, layers, x.shape[0], 0, cts[:20])
    comp, _, _ = service.append_input(tenant, comp.computation_id, adapter_id, layers, x.shape[0], 20, cts[20:])
    assert comp.complete
    got: dict[str, list[np.ndarray]] = {}
    offset, width = 0, max(OUT.values())
    while offset < width:
        result = service.compute_delta(tenant, adapter_id, layers, "column", [], 0, comp.computation_id, [], offset, 0)
        for d in result.deltas:
            got.setdefault(d.layer, []).extend(bundle.decrypt_token(c)[: x.shape[0]] for c in d.ciphertexts)
        offset += max(len(d.ciphertexts) for d in result.deltas)
    return {name: np.stack(cols, axis=1) for name, cols in got.items()}


class TestHeService:
    # -- contexts --------------------------------------------------------------------------------------
    def test_a_public_context_is_registered_once_and_a_secret_key_never(self, service, vault, bundle, params) -> None:
        first = service.register_context("t1", "k1", bundle.public_context(), params)
        assert first.has_relin_keys is False and first.poly_modulus_degree == params.poly_modulus_degree
        assert service.register_context("t1", "k1", bundle.public_context(), params) == first
        with pytest.raises(InvalidArgument) as err:
            service.register_context("t1", "k2", bundle.context.serialize(save_secret_key=True), params)
        assert err.value.reason == "SECRET_KEY_REFUSED"
        other = HEKeyManager("t1").generate_key_bundle(key_id="k1")
        with pytest.raises(AlreadyExists):
            service.register_context("t1", "k1", other.public_context(), params)
        with pytest.raises(InvalidArgument) as err:
            service.register_context("t1", "../k", bundle.public_context(), params)
        assert err.value.field == "key_id"
        assert [c.key_id for c in service.list_contexts("t1", None, 10)] == ["k1"]

    # -- adapters and deltas -------------------------------------------------------------------------------
    def test_column_packed_deltas_equal_the_plaintext_lora_delta(self, service, vault, bundle, params) -> None:
        record, factors = loaded(service, vault, bundle, params)
        assert record.layers == (Q, V)
        shapes = [(ly.rank, ly.in_features, ly.out_features, ly.scaling)
                  for ly in service.layer_info("t1", record.adapter_id)]
        assert shapes == [(RANK, D, 32, ALPHA / RANK), (RANK, D, 48, ALPHA / RANK)]
        x = np.random.default_rng(7).normal(0, 1, (5, D))
        got = column_delta(service, bundle, "t1", record.adapter_id, x, [])
        for name in (Q, V):
            assert got[name].shape == (5, OUT[name.rsplit(".", 1)[1]])
            assert rel(got[name], plain_delta(factors[name], x)) < TOL

    def test_a_single_token_in_two_rounds_equals_the_plaintext_delta(self, service, vault, bundle, params) -> None:
        record, factors = loaded(service, vault, bundle, params, layers=["q_proj"])
        assert record.layers == (Q,)
        x = np.random.default_rng(3).normal(0, 1, D)
        slots = bundle.slot_count
        per = slots // D
        x_ct = bundle.encrypt_token(np.tile(x, per))
        first = service.compute_delta("t1", record.adapter_id, [], "replicated", [x_ct], 1, "", [], 0, 0)
        [d1] = first.deltas
        assert (d1.layer, d1.round, first.counts.rotations) == (Q, 1, 0)
        slots1 = np.concatenate([bundle.decrypt_token(c) for c in d1.ciphertexts])
        sums = np.concatenate([np.reshape(v[: per * D], (-1, D)).sum(1)
                               for v in slots1.reshape(len(d1.ciphertexts), -1)])[:RANK]
        assert np.abs(sums - factors[Q][0] @ x).min() > 1.0  # round 1 shows blinded projections, not A x
        u = bundle.encrypt_token(np.tile(sums, slots // RANK))
        second = service.compute_delta("t1", record.adapter_id, [], "replicated", [], 0, first.computation_id,
                                       [("q_proj", [u])], 0, 0)
        [d2] = second.deltas
        slots2 = np.concatenate([bundle.decrypt_token(c) for c in d2.ciphertexts])
        delta = slots2.reshape(-1, RANK).sum(1)[: OUT["q_proj"]]
        assert d2.round == 2 and rel(delta, plain_delta(factors[Q], x)) < TOL
        with pytest.raises(FailedPrecondition, match="already run"):  # round 2 runs once
            service.compute_delta("t1", record.adapter_id, [], "replicated", [], 0, first.computation_id,
                                  [("q_proj", [u])], 0, 0)

    def test_weights_are_read_again_after_a_restart(self, service, store, vault, bundle, params) -> None:
        record, factors = loaded(service, vault, bundle, params, layers=["v_proj"])
        assert vault.reads == 1
        restarted = HeService(store, vault.read, 64 << 20, mask_workers=0)
        try:
            x = np.random.default_rng(11).normal(0, 1, (3, D))
            got = column_delta(restarted, bundle, "t1", record.adapter_id, x, [])
            assert vault.reads == 2 and set(got) == {V}
            assert rel(got[V], plain_delta(factors[V], x)) < TOL
        finally:
            restarted.close()

    def test_an_adapter_is_refused_by_the_one_reader_and_by_the_work_caps(self, service, store, vault, bundle,
                                                                           params) -> None:
        t1 = as_tenant(vault, "t1")
        service.register_context(t1, "k1", bundle.public_context(), params)
        pissa, _ = lora_artifact(2, init_lora_weights="pissa")
        with pytest.raises(InvalidArgument) as err:
            service.load_adapter(t1, vault.put(t1, "pissa", pissa), "k1", [])
        assert err.value.field == "adapter_config.init_lora_weights"
        good, _ = lora_artifact(2)
        with pytest.raises(InvalidArgument) as err:
            service.load_adapter(t1, vault.put(t1, "good", good), "k1", ["o_proj"])
        assert err.value.field == "layers"
        capped = HeService(store, vault.read, 64 << 20, mask_workers=0, limits=HeLimits(max_rank=2))
        try:
            with pytest.raises(QuotaExceeded) as quota:
                capped.load_adapter(t1, "good", "k1", [])
            assert quota.value.quota == "TENSAFE_HE_MAX_RANK"
        finally:
            capped.close()
        assert service.list_adapters(t1, None, 10) == []  # nothing refused was recorded

    # -- tenants ----------------------------------------------------------------------------------------------
    def test_another_tenants_context_adapter_and_computation_do_not_exist(self, service, vault, bundle,
                                                                          params) -> None:
        record, _ = loaded(service, vault, bundle, params)
        x = np.random.default_rng(5).normal(0, 1, (2, D))
        comp, _, _ = service.append_input("t1", "", record.adapter_id, [], 2, 0,
                                          [bundle.encrypt_column(x[:, 0])])
        t2 = as_tenant(vault, "t2")
        refused = [
            lambda: service.get_context(t2, "k1"),
            lambda: service.delete_context(t2, "k1"),
            lambda: service.load_adapter(t2, "art1", "k1", []),        # t1's key id
            lambda: service.get_adapter(t2, record.adapter_id),
            lambda: service.unload_adapter(t2, record.adapter_id),
            lambda: service.append_input(t2, "", record.adapter_id, [], 2, 0, [bundle.encrypt_column(x[:, 0])]),
            lambda: service.append_input(t2, comp.computation_id, record.adapter_id, [], 2, 1,
                                         [bundle.encrypt_column(x[:, 1])]),
            lambda: service.compute_delta(t2, record.adapter_id, [], "column", [], 0, comp.computation_id, [], 0, 0),
        ]
        for call in refused:
            with pytest.raises(NotFound):
                call()
        assert service.list_contexts(t2, None, 10) == [] and service.list_adapters(t2, None, 10) == []
        # t2's own context under the same key id cannot load t1's artifact: the vault refuses it as t2.
        service.register_context(t2, "k1", HEKeyManager("t2").generate_key_bundle().public_context(), params)
        with pytest.raises(NotFound):
            service.load_adapter(t2, "art1", "k1", [])
        # t1's computation and adapter are untouched.
        assert service.append_input("t1", comp.computation_id, record.adapter_id, [], 2, 1,
                                    [bundle.encrypt_column(x[:, 1])])[0].received == 2

    def test_unfinished_computations_are_counted_per_tenant(self, service, vault, bundle, params) -> None:
        record, _ = loaded(service, vault, bundle, params, layers=["q_proj"])
        x = np.random.default_rng(9).normal(0, 1, (2, D))
        col = bundle.encrypt_column(x[:, 0])
        comps = [service.append_input("t1", "", record.adapter_id, [], 2, 0, [col])[0] for _ in range(2)]
        with pytest.raises(QuotaExceeded) as quota:
            service.append_input("t1", "", record.adapter_id, [], 2, 0, [col])
        assert quota.value.quota == "TENSAFE_QUOTA_HE_COMPUTATIONS"
        # Finishing one (all inputs in, all outputs read) makes room for the next.
        rest = [bundle.encrypt_column(x[:, j]) for j in range(1, D)]
        service.append_input("t1", comps[0].computation_id, record.adapter_id, [], 2, 1, rest)
        service.compute_delta("t1", record.adapter_id, [], "column", [], 0, comps[0].computation_id, [], 0, 0)
        assert comps[0].finished and not comps[1].finished
        third, _, _ = service.append_input("t1", "", record.adapter_id, [], 2, 0, [col])
        with pytest.raises(NotFound):  # the finished one gave way
            service.compute_delta("t1", record.adapter_id, [], "column", [], 0, comps[0].computation_id, [], 0, 0)
        assert service.append_input("t1", third.computation_id, record.adapter_id, [], 2, 1, rest[:1])[0].received == 2

    def test_deleting_a_context_unloads_its_adapters(self, service, vault, bundle, params) -> None:
        record, _ = loaded(service, vault, bundle, params)
        service.delete_context("t1", "k1")
        with pytest.raises(NotFound):
            service.get_adapter("t1", record.adapter_id)
        with pytest.raises(NotFound):
            service.compute_delta("t1", record.adapter_id, [], "replicated", [b"x"], 1, "", [], 0, 0)
        with pytest.raises(NotFound):
            service.get_context("t1", "k1")
