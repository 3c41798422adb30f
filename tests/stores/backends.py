"""A service's database as its server opens it (migrated, own schema), on SQLite or PostgreSQL, in-process.

For the ``store`` fixtures of the store and service tests (Flower's StateTest pattern): one class of
tests per store, its fixture parametrized over ``conftest.BACKENDS``, built with :func:`service_engine`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import drop_schemas
from tensafe.runtime.db import RUNTIME_VERSIONS, create_engine, migrate
from tensafe.runtime.registry import SPECS


def service_engine(request: pytest.FixtureRequest, service: str, tmp_path: Path) -> sa.Engine:
    """``service``'s engine on the backend ``request.param`` names, with its migrations run; disposed (and
    its PostgreSQL schema dropped) at the end of the test."""
    synchronous = "FULL" if service in ("ledger", "accountant") else "NORMAL"
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / service}.db", sqlite_synchronous=synchronous)
    else:
        url = request.getfixturevalue("pg_url")
        prefix = f"st{secrets.token_hex(4)}_"
        request.addfinalizer(lambda: drop_schemas(prefix))
        engine = create_engine(url, schema=f"{prefix}{service}")
    request.addfinalizer(engine.dispose)
    spec = SPECS[service]
    dirs = [RUNTIME_VERSIONS] + ([spec.migrations] if spec.migrations.is_dir() else [])
    migrate(engine, dirs, version_table=f"alembic_version_{service}")
    return engine
