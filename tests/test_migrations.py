"""Every service's Alembic migrations, run from an empty database, give exactly the tables the code defines.

A migration that forgets a column, an index or a constraint the live ``sa.Table`` has (or the other way
round) would pass every test that starts from a fresh database built by the same migrations, and then
break on the first upgrade in the field. So the schema the migrations build is compared with the live
definitions by Alembic's autogenerate comparison, on SQLite and on PostgreSQL: no difference is allowed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tensafe.runtime import audit, idempotency, identity
from tensafe.runtime.db import IDENTITY_VERSIONS, RUNTIME_VERSIONS, create_engine, migrate
from tensafe.runtime.registry import SPECS

# Where each service's own tables are defined (services without a store hold only the runtime tables).
STORE_METADATA = {
    "accountant": "tensafe.accountant.store:metadata",
    "he": "tensafe.he.store:metadata",
    "vault": "tensafe.vault.store:metadata",
    "ledger": "tensafe.ledger.store:metadata",
}
RUNTIME_METADATA = (idempotency._metadata, audit._metadata)


def _combined(*metadatas: sa.MetaData) -> sa.MetaData:
    out = sa.MetaData()
    for md in metadatas:
        for table in md.tables.values():
            table.to_metadata(out)
    return out


def _live(service: str) -> sa.MetaData:
    extra = []
    if service in STORE_METADATA:
        module, name = STORE_METADATA[service].split(":")
        extra.append(getattr(importlib.import_module(module), name))
    return _combined(*RUNTIME_METADATA, *extra)


def _diff(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        diffs = compare_metadata(ctx, metadata)
    return [d for d in diffs if "alembic_version" not in repr(d)]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def make_engine(request, tmp_path):
    engines = []

    def make(name: str) -> sa.Engine:
        if request.param == "sqlite":
            engine = create_engine(f"sqlite:///{tmp_path / name}.db")
        else:
            from conftest import drop_schemas

            pg_url = request.getfixturevalue("pg_url")
            prefix = f"mig{abs(hash(tmp_path)) % 10**8}_"
            request.addfinalizer(lambda: drop_schemas(prefix))
            engine = create_engine(pg_url, schema=f"{prefix}{name}")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def test_every_service_has_its_store_metadata_listed() -> None:
    """A new service with a store must be added to STORE_METADATA, or its tables go unchecked."""
    with_migrations = {name for name, spec in SPECS.items() if Path(spec.migrations).is_dir()
                       and any(Path(spec.migrations).glob("*.py"))}
    assert with_migrations == set(STORE_METADATA)


@pytest.mark.parametrize("service", list(SPECS))
def test_migrations_build_exactly_the_live_tables(make_engine, service: str) -> None:
    spec = SPECS[service]
    engine = make_engine(service)
    dirs = [RUNTIME_VERSIONS] + ([spec.migrations] if Path(spec.migrations).is_dir() else [])
    migrate(engine, dirs, version_table=f"alembic_version_{service}")
    assert _diff(engine, _live(service)) == []


def test_identity_migrations_build_exactly_the_live_tables(make_engine) -> None:
    engine = make_engine("identity")
    migrate(engine, [IDENTITY_VERSIONS], version_table="alembic_version_identity")
    assert _diff(engine, _combined(identity._metadata, audit._metadata)) == []
