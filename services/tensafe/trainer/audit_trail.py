"""Ledger entries for what an op does when it runs, after its RPC has answered with a future.

The request pipeline writes one entry per call when the call ends; for the trainer's ops that is
when the future is created, before the op runs. What only the run knows (a DP step refused or
spent without its update, the lineage of a saved checkpoint) is written here, into the same
durable outbox the pipeline uses (delivered to the ledger by the service's own deliverer), with
the call's tenant, key and request id, so that the entry sits beside the call's own. The insert
itself is ``store.TrainerStore``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy.engine import Engine

from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.audit import DENIED, FAILED, SUCCESS, build_entry
from tensafe.runtime.context import CallContext

from .store import TrainerStore

log = logging.getLogger("tensafe.trainer")

__all__ = ["DENIED", "FAILED", "SUCCESS", "OpAudit"]


class OpAudit:
    def __init__(self, engine: Engine | None) -> None:
        self.store = TrainerStore(engine) if engine is not None else None  # None: entries are not kept

    def record(self, caller: CallContext | None, tenant_id: str, action: str, outcome: ledger_pb2.AuditOutcome,
               resource: str, details: Mapping[str, object]) -> None:
        if self.store is None:
            return
        entry = build_entry(service="trainer", action=action, tenant_id=tenant_id,
                            key_id=caller.principal.key_id if caller else "", outcome=outcome,
                            request_id=caller.request_id if caller else "", resource=resource,
                            details={"phase": "run", **{k: str(v) for k, v in details.items()}})  # bounded there
        try:
            self.store.queue_audit_entry(entry.entry_id, entry.SerializeToString())
        except Exception:  # as the pipeline: never fail the op because of the audit trail
            log.exception("could not record the audit entry of %s (%s)", action, resource)
