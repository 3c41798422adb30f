"""Moved to :mod:`tensafe.runtime.accountant_client` (#14); kept until every importer has moved."""

from tensafe.runtime.accountant_client import AccountantClient

__all__ = ["AccountantClient"]
