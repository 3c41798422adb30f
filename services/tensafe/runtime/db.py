"""SQLAlchemy engines per service and Alembic migrations.

Each service owns its own database: by default one SQLite file per service in
the data dir; with a PostgreSQL URL, each service keeps its tables in its own
schema (``<prefix><service>``) so that several services may share one server
and one database without seeing each other's tables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

_MIGRATIONS_ENV = Path(__file__).parent / "migrations"
# Alembic narrates every migration at INFO; a server start should not.
logging.getLogger("alembic").setLevel(logging.WARNING)


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def create_engine(url: str, schema: str | None = None, sqlite_synchronous: str = "NORMAL") -> Engine:
    """An engine for ``url``; ``schema`` (PostgreSQL only) is created and put first on the search path.

    SQLite runs in WAL mode; ``sqlite_synchronous`` FULL makes each commit durable against power loss
    (NORMAL: against a process crash)."""
    url = normalise_url(url)
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if parsed.get_backend_name() == "postgresql" and schema:
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema name {schema!r} must be letters, digits and underscores")
        bootstrap = sa.create_engine(url, pool_pre_ping=True)
        with bootstrap.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        bootstrap.dispose()
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _search_path(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f'SET search_path TO "{schema}"')
            cur.close()
            dbapi_conn.commit()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine, version_dirs: Iterable[Path], version_table: str = "alembic_version") -> None:
    """Bring the schema to the newest revision found in ``version_dirs``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS_ENV))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(str(d) for d in version_dirs))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = version_table
        command.upgrade(cfg, "heads")


RUNTIME_VERSIONS = _MIGRATIONS_ENV / "versions"
IDENTITY_VERSIONS = Path(__file__).parent / "identity_migrations"
