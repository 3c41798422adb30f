"""The he service's SQL records: tenants' public contexts and the adapters loaded under them.

A context row holds the serialized *public* TenSEAL context (checked to hold no secret key before
it is written). Adapter rows name the vault artifact and layers; the weights themselves stay in the
vault and in memory only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tensafe.runtime.pagination import after_clause

metadata = sa.MetaData()
contexts = sa.Table(
    "he_contexts", metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("key_id", sa.String(128), primary_key=True),
    sa.Column("public_context", sa.LargeBinary, nullable=False),
    sa.Column("sha256", sa.LargeBinary(32), nullable=False),
    sa.Column("poly_modulus_degree", sa.Integer, nullable=False),
    sa.Column("coeff_mod_bit_sizes", sa.String(256), nullable=False),
    sa.Column("scale_bits", sa.Integer, nullable=False),
    sa.Column("security_level", sa.Integer, nullable=False),
    sa.Column("has_relin_keys", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
adapters = sa.Table(
    "he_adapters", metadata,
    sa.Column("adapter_id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("artifact_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=False),
    sa.Column("layers", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_he_adapters_tenant", adapters.c.tenant_id, adapters.c.created_at)


@dataclass(frozen=True)
class ContextRecord:
    tenant_id: str
    key_id: str
    public_context: bytes
    sha256: bytes
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    security_level: int
    has_relin_keys: bool
    created_at: float

    @classmethod
    def from_row(cls, row: Any) -> ContextRecord:
        d = dict(row._mapping)
        d["coeff_mod_bit_sizes"] = tuple(json.loads(d["coeff_mod_bit_sizes"]))
        d["public_context"] = bytes(d["public_context"])
        d["sha256"] = bytes(d["sha256"])
        return cls(**d)


@dataclass(frozen=True)
class AdapterRecord:
    adapter_id: str
    tenant_id: str
    artifact_id: str
    key_id: str
    layers: tuple[str, ...]
    created_at: float

    @classmethod
    def from_row(cls, row: Any) -> AdapterRecord:
        d = dict(row._mapping)
        d["layers"] = tuple(json.loads(d["layers"]))
        return cls(**d)


class HeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- contexts ---------------------------------------------------------------------------------------
    def insert_context(self, rec: ContextRecord) -> None:
        values = {**rec.__dict__, "coeff_mod_bit_sizes": json.dumps(list(rec.coeff_mod_bit_sizes))}
        with self.engine.begin() as conn:
            conn.execute(contexts.insert().values(**values))

    def get_context(self, tenant_id: str, key_id: str) -> ContextRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(contexts).where(sa.and_(
                contexts.c.tenant_id == tenant_id, contexts.c.key_id == key_id))).first()
        return ContextRecord.from_row(row) if row else None

    def list_contexts(self, tenant_id: str, after: tuple[float, str] | None, limit: int) -> list[ContextRecord]:
        query = sa.select(contexts).where(contexts.c.tenant_id == tenant_id)
        if after is not None:
            query = query.where(after_clause((contexts.c.created_at, contexts.c.key_id), after))
        query = query.order_by(contexts.c.created_at, contexts.c.key_id).limit(limit)
        with self.engine.connect() as conn:
            return [ContextRecord.from_row(r) for r in conn.execute(query)]

    def delete_context(self, tenant_id: str, key_id: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(adapters.delete().where(sa.and_(adapters.c.tenant_id == tenant_id,
                                                         adapters.c.key_id == key_id)))
            res = conn.execute(contexts.delete().where(sa.and_(contexts.c.tenant_id == tenant_id,
                                                               contexts.c.key_id == key_id)))
        return res.rowcount == 1

    # -- adapters ---------------------------------------------------------------------------------------
    def insert_adapter(self, rec: AdapterRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(adapters.insert().values(**{**rec.__dict__, "layers": json.dumps(list(rec.layers))}))

    def get_adapter(self, tenant_id: str, adapter_id: str) -> AdapterRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(adapters).where(sa.and_(
                adapters.c.tenant_id == tenant_id, adapters.c.adapter_id == adapter_id))).first()
        return AdapterRecord.from_row(row) if row else None

    def list_adapters(self, tenant_id: str, after: tuple[float, str] | None, limit: int) -> list[AdapterRecord]:
        query = sa.select(adapters).where(adapters.c.tenant_id == tenant_id)
        if after is not None:
            query = query.where(after_clause((adapters.c.created_at, adapters.c.adapter_id), after))
        query = query.order_by(adapters.c.created_at, adapters.c.adapter_id).limit(limit)
        with self.engine.connect() as conn:
            return [AdapterRecord.from_row(r) for r in conn.execute(query)]

    def delete_adapter(self, tenant_id: str, adapter_id: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(adapters.delete().where(sa.and_(adapters.c.tenant_id == tenant_id,
                                                               adapters.c.adapter_id == adapter_id)))
        return res.rowcount == 1
