"""The ledger service. Its RPCs are filled in by issue #5 (audit ledger)."""
