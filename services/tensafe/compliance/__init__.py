"""Compliance evidence from the verified audit ledger: ``tensafe compliance report`` (see docs/compliance.md)."""
