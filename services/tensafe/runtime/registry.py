"""The six services, and how one is built from configuration.

Service modules are imported only when that service is started, so that a
process serving only the light services (vault, ledger, accountant) never
imports torch, transformers or tenseal.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy.engine import Engine

from tg_tinker.services import GRPC_SERVICES

from .audit import AuditOutbox
from .config import ServerConfig
from .db import RUNTIME_VERSIONS, create_engine, migrate
from .idempotency import IdempotencyStore
from .peers import PeerChannels

_SERVICES_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServiceSpec:
    name: str                 # short name: trainer, vault, ...
    grpc_service: str         # the service's name in its proto
    servicer_factory: str     # "module:function" returning the servicer, given a ServiceEnvironment

    @property
    def proto_module(self) -> str:
        return f"tensafe.api.{self.name}.v1.{self.name}_pb2"

    @property
    def full_name(self) -> str:
        return f"tensafe.api.{self.name}.v1.{self.grpc_service}"

    @property
    def migrations(self) -> Path:
        return _SERVICES_ROOT / self.name / "migrations"


# One spec a service, from the one table of services (tg_tinker.services); each builds itself in
# tensafe.<name>.servicer:create.
SPECS: dict[str, ServiceSpec] = {
    name: ServiceSpec(name, grpc_service, f"tensafe.{name}.servicer:create")
    for name, grpc_service in GRPC_SERVICES.items()
}


@dataclass
class ServiceEnvironment:
    """What a service is given to build itself: its settings, its own database, and its peers."""

    name: str
    config: ServerConfig
    db: Engine
    # Channels to the other services (embedded form: the same server, over loopback).
    peers: PeerChannels
    closers: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class ServiceUnit:
    spec: ServiceSpec
    servicer: Any
    env: ServiceEnvironment
    idempotency: IdempotencyStore
    audit: AuditOutbox

    def register(self, server: grpc.Server) -> None:
        grpc_module = importlib.import_module(self.spec.proto_module + "_grpc")
        getattr(grpc_module, f"add_{self.spec.grpc_service}Servicer_to_server")(self.servicer, server)

    def close(self) -> None:
        self.audit.stop()
        for close in reversed(self.env.closers):
            close()
        self.idempotency.close()
        self.env.peers.close()
        self.env.db.dispose()


def open_service_db(config: ServerConfig, spec: ServiceSpec) -> Engine:
    # The ledger acknowledges an append, and the accountant a DP step, only once it is on disk: SQLite syncs
    # every commit there.
    engine = create_engine(config.service_db_url(spec.name), schema=f"{config.db_schema_prefix}{spec.name}",
                           sqlite_synchronous="FULL" if spec.name in ("ledger", "accountant") else "NORMAL")
    dirs = [RUNTIME_VERSIONS]
    if spec.migrations.is_dir():
        dirs.append(spec.migrations)
    migrate(engine, dirs, version_table=f"alembic_version_{spec.name}")
    return engine


def build_unit(name: str, config: ServerConfig, local_endpoint: str | None = None,
               local_services: frozenset[str] = frozenset()) -> ServiceUnit:
    if name not in SPECS:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(SPECS)}")
    spec = SPECS[name]
    env = ServiceEnvironment(name, config, open_service_db(config, spec),
                             PeerChannels(config, name, local_endpoint, local_services))
    module_name, func = spec.servicer_factory.split(":")
    servicer = getattr(importlib.import_module(module_name), func)(env)
    # The instance: what a restart of this same process has in common with it (a bound address is held
    # by one live process at a time), so that the restart releases the keys its previous run held.
    instance = f"{socket.gethostname()}|{local_endpoint}|{name}" if local_endpoint else ""
    store = IdempotencyStore(env.db, instance=instance, lease_seconds=config.idempotency_lease_seconds)
    store.purge_expired()
    audit = AuditOutbox(env.db, lambda: env.peers.channel("ledger"), config.service_key)
    return ServiceUnit(spec, servicer, env, store, audit)
