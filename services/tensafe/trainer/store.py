"""The trainer's SQL. The trainer has no table of its own (its sessions live in memory, its checkpoints
in the vault); what it writes is the ledger entries of ops that run after their RPC answered, into its
service's audit outbox (``tensafe.runtime.audit.outbox``), from where the service's deliverer sends
them to the ledger with the pipeline's own entries."""

from __future__ import annotations

import time

from sqlalchemy.engine import Engine

from tensafe.runtime.audit import outbox


class TrainerStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def queue_audit_entry(self, entry_id: str, payload: bytes) -> None:
        """One serialized ``AuditEntry`` into the outbox, committed before this returns."""
        with self.engine.begin() as conn:
            conn.execute(outbox.insert().values(entry_id=entry_id, payload=payload, created_at=time.time()))
