"""The six services, once: the short name each is called by and its service name in the protos.

The SDK (endpoints, channels), the server (registry, CLI) and the tests all read this table, so a
seventh service is added in one place; ``tests/test_contracts.py`` checks it against the protos.
"""

from __future__ import annotations

__all__ = ["GRPC_SERVICES", "SERVICE_NAMES", "full_name", "proto_module"]

# short name -> the service's name in tensafe/api/<name>/v1/<name>.proto, in start order.
GRPC_SERVICES: dict[str, str] = {
    "trainer": "TrainerService",
    "accountant": "AccountantService",
    "he": "HeService",
    "vault": "VaultService",
    "ledger": "LedgerService",
    "inference": "InferenceService",
}
SERVICE_NAMES: tuple[str, ...] = tuple(GRPC_SERVICES)


def full_name(name: str) -> str:
    """``tensafe.api.vault.v1.VaultService`` for ``vault``."""
    return f"tensafe.api.{name}.v1.{GRPC_SERVICES[name]}"


def proto_module(name: str) -> str:
    """The generated module holding ``name``'s messages: ``tensafe.api.vault.v1.vault_pb2``."""
    return f"tensafe.api.{name}.v1.{name}_pb2"
