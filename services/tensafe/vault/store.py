"""The vault's SQL records: tenants' KEK versions and artifact metadata (with wrapped DEKs only)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tensafe.runtime.pagination import after_clause

metadata = sa.MetaData()
tenants = sa.Table(
    "vault_tenants", metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("current_version", sa.Integer, nullable=False),
    sa.Column("shredded_at", sa.Float, nullable=True),
)
keks = sa.Table(
    "vault_keks", metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("wrapped_kek", sa.LargeBinary, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("destroyed_at", sa.Float, nullable=True),
)
artifacts = sa.Table(
    "vault_artifacts", metadata,
    sa.Column("artifact_id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("kind", sa.Integer, nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("content_type", sa.String(128), nullable=False),
    sa.Column("session_id", sa.String(64), nullable=False),
    sa.Column("metadata_json", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("plaintext_sha256", sa.LargeBinary, nullable=False),
    sa.Column("stored_size", sa.BigInteger, nullable=False),
    sa.Column("format_version", sa.Integer, nullable=False),
    sa.Column("segment_size", sa.Integer, nullable=False),
    sa.Column("kek_version", sa.Integer, nullable=False),
    sa.Column("wrapped_dek", sa.LargeBinary, nullable=True),
    sa.Column("blob_key", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # The lineage the trainer wrote (JSON of tensafe.api.common.v1.Lineage, MAC-verified at put); NULL for an
    # artifact a tenant uploaded. Only the vault writes this column.
    sa.Column("lineage_json", sa.Text, nullable=True),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_vault_artifacts_tenant", artifacts.c.tenant_id, artifacts.c.created_at)

ACTIVE, RETIRED, DESTROYED = "active", "retired", "destroyed"
AVAILABLE, SHREDDED = "available", "shredded"


@dataclass
class ArtifactRecord:
    artifact_id: str
    tenant_id: str
    kind: int
    name: str
    content_type: str
    session_id: str
    metadata: dict[str, Any]
    size_bytes: int
    plaintext_sha256: bytes
    stored_size: int
    format_version: int
    segment_size: int
    kek_version: int
    wrapped_dek: bytes | None
    blob_key: str
    state: str
    created_at: float
    lineage_json: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> ArtifactRecord:
        m = row._mapping
        return cls(**{k: m[k] for k in m.keys() if k != "metadata_json"}, metadata=json.loads(m["metadata_json"]))

    def values(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "metadata"}
        out["metadata_json"] = json.dumps(self.metadata, sort_keys=True)
        return out


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    key_id: str
    current_version: int
    shredded_at: float | None


@dataclass(frozen=True)
class KekRecord:
    version: int
    state: str
    wrapped_kek: bytes | None
    created_at: float
    wrapped_count: int  # data keys it wraps now


class VaultStore:
    """Every read and write of the vault's tables; each method is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- tenants and KEKs --------------------------------------------------------------------------
    @staticmethod
    def _tenant(conn: Connection, tenant_id: str) -> TenantRecord | None:
        row = conn.execute(sa.select(tenants).where(tenants.c.tenant_id == tenant_id)).first()
        return TenantRecord(**row._mapping) if row else None

    def tenant(self, tenant_id: str) -> TenantRecord | None:
        with self.engine.connect() as conn:
            return self._tenant(conn, tenant_id)

    @staticmethod
    def _insert_tenant(conn: Connection, tenant_id: str, key_id: str, wrapped_kek: bytes) -> None:
        conn.execute(tenants.insert().values(tenant_id=tenant_id, key_id=key_id, current_version=1, shredded_at=None))
        conn.execute(keks.insert().values(tenant_id=tenant_id, version=1, wrapped_kek=wrapped_kek, state=ACTIVE,
                                          created_at=time.time(), destroyed_at=None))

    def add_tenant(self, tenant_id: str, key_id: str, wrapped_kek: bytes) -> TenantRecord:
        """The tenant with its first KEK (version 1, active); IntegrityError if it exists."""
        with self.engine.begin() as conn:
            self._insert_tenant(conn, tenant_id, key_id, wrapped_kek)
            record = self._tenant(conn, tenant_id)
        assert record is not None
        return record

    def wrapped_kek(self, tenant_id: str, version: int) -> bytes | None:
        """The KEK version as the master key wrapped it; None once destroyed (or if it never existed)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(keks.c.wrapped_kek).where(sa.and_(
                keks.c.tenant_id == tenant_id, keks.c.version == version))).scalar_one_or_none()

    @staticmethod
    def _wrapped_counts(conn: Connection, tenant_id: str) -> dict[int, int]:
        query = (sa.select(artifacts.c.kek_version, sa.func.count())
                 .where(sa.and_(artifacts.c.tenant_id == tenant_id, artifacts.c.wrapped_dek.is_not(None)))
                 .group_by(artifacts.c.kek_version))
        return {int(v): int(n) for v, n in conn.execute(query)}

    def keks(self, tenant_id: str) -> list[KekRecord]:
        """Every KEK version of the tenant, oldest first, with how many data keys each wraps."""
        with self.engine.connect() as conn:
            counts = self._wrapped_counts(conn, tenant_id)
            rows = conn.execute(sa.select(keks).where(keks.c.tenant_id == tenant_id).order_by(keks.c.version))
            return [KekRecord(r.version, r.state, r.wrapped_kek, r.created_at, counts.get(r.version, 0))
                    for r in rows]

    def wrapped_deks(self, tenant_id: str) -> list[tuple[str, int, bytes]]:
        """(artifact id, KEK version, wrapped DEK) of every artifact of the tenant that still has its key."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(artifacts.c.artifact_id, artifacts.c.kek_version, artifacts.c.wrapped_dek)
                                .where(sa.and_(artifacts.c.tenant_id == tenant_id,
                                               artifacts.c.wrapped_dek.is_not(None)))
                                .order_by(artifacts.c.artifact_id))
            return [(a, int(v), w) for a, v, w in rows]

    def rotate(self, tenant_id: str, new_version: int, wrapped_kek: bytes,
               rewrapped: dict[str, tuple[int, bytes]]) -> None:
        """One transaction: ``new_version`` becomes the active KEK (the others retired), each artifact in
        ``rewrapped`` (id -> (its KEK version when read, its DEK wrapped under the new KEK)) takes its new
        wrapped DEK, and every older version that then wraps no data key is destroyed."""
        with self.engine.begin() as conn:
            conn.execute(keks.update().where(sa.and_(keks.c.tenant_id == tenant_id, keks.c.state == ACTIVE))
                         .values(state=RETIRED))
            conn.execute(keks.insert().values(tenant_id=tenant_id, version=new_version, wrapped_kek=wrapped_kek,
                                              state=ACTIVE, created_at=time.time(), destroyed_at=None))
            conn.execute(tenants.update().where(tenants.c.tenant_id == tenant_id)
                         .values(current_version=new_version))
            for artifact_id, (old_version, wrapped_dek) in rewrapped.items():
                conn.execute(artifacts.update().where(sa.and_(
                    artifacts.c.artifact_id == artifact_id, artifacts.c.tenant_id == tenant_id,
                    artifacts.c.kek_version == old_version)).values(kek_version=new_version, wrapped_dek=wrapped_dek))
            counts = self._wrapped_counts(conn, tenant_id)
            versions = conn.execute(sa.select(keks.c.version).where(sa.and_(
                keks.c.tenant_id == tenant_id, keks.c.version != new_version,
                keks.c.state != DESTROYED))).scalars().all()
            for version in versions:
                if counts.get(version, 0) == 0:
                    self._destroy_kek(conn, tenant_id, version)

    @staticmethod
    def _destroy_kek(conn: Connection, tenant_id: str, version: int) -> None:
        conn.execute(keks.update().where(sa.and_(keks.c.tenant_id == tenant_id, keks.c.version == version))
                     .values(wrapped_kek=None, state=DESTROYED, destroyed_at=time.time()))

    def shred(self, tenant_id: str, key_id: str) -> int:
        """One transaction: every KEK version destroyed, every artifact's wrapped DEK dropped (state
        shredded), the tenant marked shredded (created first, under ``key_id``, if it had no record).
        The number of artifacts made unreadable."""
        with self.engine.begin() as conn:
            if self._tenant(conn, tenant_id) is None:
                self._insert_tenant(conn, tenant_id, key_id, b"")
            versions = conn.execute(sa.select(keks.c.version).where(sa.and_(
                keks.c.tenant_id == tenant_id, keks.c.state != DESTROYED))).scalars().all()
            for version in versions:
                self._destroy_kek(conn, tenant_id, version)
            conn.execute(tenants.update().where(tenants.c.tenant_id == tenant_id).values(shredded_at=time.time()))
            res = conn.execute(artifacts.update().where(artifacts.c.tenant_id == tenant_id)
                               .values(wrapped_dek=None, state=SHREDDED))
            return res.rowcount or 0

    # -- artifacts ---------------------------------------------------------------------------------
    def insert_artifact(self, record: ArtifactRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(artifacts.insert().values(**record.values()))

    def get_artifact(self, tenant_id: str, artifact_id: str) -> ArtifactRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(artifacts).where(sa.and_(
                artifacts.c.artifact_id == artifact_id, artifacts.c.tenant_id == tenant_id))).first()
        return ArtifactRecord.from_row(row) if row else None

    def list_artifacts(self, tenant_id: str, kind: int, session_id: str, after: tuple[float, str] | None,
                       limit: int) -> list[ArtifactRecord]:
        query = sa.select(artifacts).where(artifacts.c.tenant_id == tenant_id)
        if kind:
            query = query.where(artifacts.c.kind == kind)
        if session_id:
            query = query.where(artifacts.c.session_id == session_id)
        if after is not None:
            query = query.where(after_clause((artifacts.c.created_at, artifacts.c.artifact_id), after))
        query = query.order_by(artifacts.c.created_at, artifacts.c.artifact_id).limit(limit)
        with self.engine.connect() as conn:
            return [ArtifactRecord.from_row(r) for r in conn.execute(query)]

    def usage(self, tenant_id: str) -> tuple[int, int]:
        """The tenant's stored bytes (containers as stored) and artifact count, shredded ones included."""
        with self.engine.connect() as conn:
            stored, count = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(artifacts.c.stored_size), 0),
                                                   sa.func.count()).where(artifacts.c.tenant_id == tenant_id)).one()
        return int(stored), int(count)

    def delete_artifact(self, tenant_id: str, artifact_id: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(artifacts.delete().where(sa.and_(
                artifacts.c.artifact_id == artifact_id, artifacts.c.tenant_id == tenant_id)))
            return bool(res.rowcount)
