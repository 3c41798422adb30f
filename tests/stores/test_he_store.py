"""HeStore below the stack: one class, run on SQLite and PostgreSQL (conftest.BACKENDS).

The store keeps tenants' public contexts and the adapters loaded under them; every read is by tenant.
(The he service's quota, unfinished computations per tenant, is kept in memory by the service, not here:
see test_he_service.py.)
"""

from __future__ import annotations

import hashlib
import os

import pytest
import sqlalchemy as sa

from conftest import BACKENDS
from stores.backends import service_engine
from tensafe.he.store import AdapterRecord, ContextRecord, HeStore


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> HeStore:
    return HeStore(service_engine(request, "he", tmp_path))


def context(tenant: str, key_id: str, *, created_at: float = 1.0, size: int = 3000) -> ContextRecord:
    data = os.urandom(size)
    return ContextRecord(tenant_id=tenant, key_id=key_id, public_context=data, sha256=hashlib.sha256(data).digest(),
                         poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40,
                         security_level=128, has_relin_keys=False, created_at=created_at)


def adapter(tenant: str, adapter_id: str, key_id: str, *, created_at: float = 1.0,
            layers: tuple[str, ...] = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
            ) -> AdapterRecord:
    return AdapterRecord(adapter_id=adapter_id, tenant_id=tenant, artifact_id=f"art_{adapter_id}", key_id=key_id,
                         layers=layers, created_at=created_at)


class TestHeStore:
    # -- contexts ------------------------------------------------------------------------------------
    def test_a_context_round_trips_byte_for_byte(self, store: HeStore) -> None:
        rec = context("t1", "k1", size=1 << 20, created_at=12.5)
        store.insert_context(rec)
        got = store.get_context("t1", "k1")
        assert got == rec
        assert isinstance(got.public_context, bytes) and isinstance(got.sha256, bytes)
        assert got.coeff_mod_bit_sizes == (60, 40, 40, 60)  # a tuple again, in order

    def test_a_key_id_is_registered_once_per_tenant(self, store: HeStore) -> None:
        store.insert_context(context("t1", "k1"))
        with pytest.raises(sa.exc.IntegrityError):
            store.insert_context(context("t1", "k1"))
        store.insert_context(context("t2", "k1"))  # the same key id under another tenant is another context
        assert store.get_context("t1", "k1").sha256 != store.get_context("t2", "k1").sha256

    def test_another_tenants_context_does_not_exist(self, store: HeStore) -> None:
        store.insert_context(context("t1", "k1"))
        assert store.get_context("t2", "k1") is None
        assert store.list_contexts("t2", None, 100) == []
        assert store.delete_context("t2", "k1") is False
        assert store.get_context("t1", "k1") is not None

    def test_contexts_are_listed_in_creation_order_after_a_key(self, store: HeStore) -> None:
        for i, t in enumerate((5.0, 1.0, 3.0, 3.0)):
            store.insert_context(context("t1", f"k{i}", created_at=t))
        store.insert_context(context("t2", "other", created_at=0.5))
        assert [c.key_id for c in store.list_contexts("t1", None, 100)] == ["k1", "k2", "k3", "k0"]
        assert [c.key_id for c in store.list_contexts("t1", None, 2)] == ["k1", "k2"]
        assert [c.key_id for c in store.list_contexts("t1", (3.0, "k2"), 100)] == ["k3", "k0"]
        assert store.list_contexts("t1", (5.0, "k0"), 100) == []

    def test_deleting_a_context_deletes_its_adapters_only(self, store: HeStore) -> None:
        store.insert_context(context("t1", "k1"))
        store.insert_context(context("t1", "k2"))
        store.insert_context(context("t2", "k1"))
        store.insert_adapter(adapter("t1", "hea_a", "k1"))
        store.insert_adapter(adapter("t1", "hea_b", "k2"))
        store.insert_adapter(adapter("t2", "hea_c", "k1"))
        assert store.delete_context("t1", "k1") is True
        assert store.get_context("t1", "k1") is None and store.get_adapter("t1", "hea_a") is None
        assert store.get_adapter("t1", "hea_b") is not None  # another key id's adapter stays
        assert store.get_context("t2", "k1") is not None and store.get_adapter("t2", "hea_c") is not None
        assert store.delete_context("t1", "k1") is False

    # -- adapters ------------------------------------------------------------------------------------
    def test_an_adapter_round_trips_with_its_layers_in_order(self, store: HeStore) -> None:
        rec = adapter("t1", "hea_a", "k1", layers=("z.v_proj", "a.q_proj", "m.o_proj"), created_at=7.25)
        store.insert_adapter(rec)
        got = store.get_adapter("t1", "hea_a")
        assert got == rec and got.layers == ("z.v_proj", "a.q_proj", "m.o_proj")
        with pytest.raises(sa.exc.IntegrityError):
            store.insert_adapter(rec)

    def test_another_tenants_adapter_does_not_exist(self, store: HeStore) -> None:
        store.insert_adapter(adapter("t1", "hea_a", "k1"))
        assert store.get_adapter("t2", "hea_a") is None
        assert store.list_adapters("t2", None, 100) == []
        assert store.delete_adapter("t2", "hea_a") is False
        assert store.get_adapter("t1", "hea_a") is not None
        assert store.get_adapter("t1", "") is None

    def test_adapters_are_listed_per_tenant_in_creation_order(self, store: HeStore) -> None:
        for i, t in enumerate((2.0, 1.0, 2.0)):
            store.insert_adapter(adapter("t1", f"hea_{i}", "k1", created_at=t))
        store.insert_adapter(adapter("t2", "hea_x", "k1", created_at=1.5))
        assert [a.adapter_id for a in store.list_adapters("t1", None, 100)] == ["hea_1", "hea_0", "hea_2"]
        assert [a.adapter_id for a in store.list_adapters("t1", (1.0, "hea_1"), 1)] == ["hea_0"]
        assert [a.adapter_id for a in store.list_adapters("t1", (2.0, "hea_0"), 100)] == ["hea_2"]

    def test_unloading_an_adapter_removes_that_row_only(self, store: HeStore) -> None:
        store.insert_context(context("t1", "k1"))
        store.insert_adapter(adapter("t1", "hea_a", "k1"))
        store.insert_adapter(adapter("t1", "hea_b", "k1"))
        assert store.delete_adapter("t1", "hea_a") is True
        assert store.delete_adapter("t1", "hea_a") is False
        assert [a.adapter_id for a in store.list_adapters("t1", None, 100)] == ["hea_b"]
        assert store.get_context("t1", "k1") is not None  # the context stays
