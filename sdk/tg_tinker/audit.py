"""Your tenant's audit trail, each entry proven to be in the signed, append-only log."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensafe.api.ledger.v1 import ledger_pb2

from .errors import ValidationError
from .transparency import LogVerifier, leaf_hash

if TYPE_CHECKING:
    from ._transport import Transport

DEFAULT_ORIGIN = "tensafe.local/ledger"


@dataclass(frozen=True)
class AuditRecord:
    """One verified ledger entry."""

    index: int
    time: float
    tenant_id: str
    actor: str
    service: str
    action: str
    resource_id: str
    outcome: str            # "success", "denied" or "failed"
    request_id: str
    trace_id: str
    details: dict[str, str] = field(default_factory=dict)
    key_id: str = ""
    leaf_hash: bytes = b""  # SHA-256(0x00 || canonical entry): what the inclusion proof proved

    @classmethod
    def from_proto(cls, index: int, e: ledger_pb2.AuditEntry, leaf: bytes = b"") -> AuditRecord:
        return cls(index, e.time.ToNanoseconds() / 1e9, e.tenant_id, e.actor, e.service, e.action, e.resource_id,
                   ledger_pb2.AuditOutcome.Name(e.outcome).removeprefix("AUDIT_OUTCOME_").lower(), e.request_id,
                   e.trace_id, dict(e.details), e.key_id, leaf)


class AuditTrail:
    """Reads entries and checks each one's inclusion proof against a signed checkpoint that is
    consistent with every checkpoint this client saw before (a rolled-back or forked log raises
    :class:`~tg_tinker.transparency.VerificationError`)."""

    def __init__(self, transport: Transport, vkey: str | None = None, origin: str | None = None) -> None:
        vkey = vkey or os.environ.get("TS_LEDGER_VKEY")
        if not vkey:
            raise ValidationError("the ledger's verifier key is needed to check its signatures: pass vkey= or set "
                                  "TS_LEDGER_VKEY (an operator prints it with `tensafe ledger vkey`)",
                                  field="vkey", code="INVALID_ARGUMENT")
        self._t = transport
        self.verifier = LogVerifier(origin or os.environ.get("TS_LEDGER_ORIGIN", DEFAULT_ORIGIN), [vkey])

    def _consistency(self, first: int, second: int) -> list[bytes]:
        resp = self._t.unary("ledger", "GetConsistencyProof", ledger_pb2.GetConsistencyProofRequest(
            first_tree_size=first, second_tree_size=second))
        return list(resp.hashes)

    def refresh(self) -> Any:
        """Fetch, verify and remember the latest checkpoint."""
        note = self._t.unary("ledger", "GetLatestCheckpoint", ledger_pb2.GetLatestCheckpointRequest()).checkpoint
        return self.verifier.check(note.signed_note, self._consistency)

    def entries(self, *, action: str = "", resource_id: str = "", service: str = "",
                limit: int = 1000) -> list[AuditRecord]:
        checkpoint = self.refresh()
        out: list[AuditRecord] = []
        token = ""
        while len(out) < limit:
            resp = self._t.unary("ledger", "ListEntries", ledger_pb2.ListEntriesRequest(
                action=action, resource_id=resource_id, service=service, page_token=token,
                page_size=min(1000, limit - len(out))))
            for item in resp.entries:
                if item.index >= checkpoint.size:
                    return out  # newer than the verified checkpoint: the next call covers it
                leaf = leaf_hash(item.entry.SerializeToString(deterministic=True))
                proof = self._t.unary("ledger", "GetInclusionProof", ledger_pb2.GetInclusionProofRequest(
                    leaf_index=item.index, tree_size=checkpoint.size))
                self.verifier.verify_inclusion(leaf, item.index, list(proof.hashes), checkpoint)
                out.append(AuditRecord.from_proto(item.index, item.entry, leaf))
            token = resp.next_page_token
            if not token:
                break
        return out
