"""Moved to :mod:`tensafe.runtime.vault_client` (#14); kept until every importer has moved."""

from tensafe.runtime.vault_client import VaultClient

__all__ = ["VaultClient"]
