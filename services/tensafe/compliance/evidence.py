"""The facts a compliance report may use: one tenant's ledger entries, each proven to be in the signed log.

Two sources, both trusting nothing they read:

- ``from_data_dir``: the ledger's database (the operator's, or an auditor's copy). Every leaf is re-hashed, the
  tree recomputed and every signed checkpoint checked with the verifier key (``ledger.verify.verify_log``).
  Entries covered by the last checkpoint that verifies are evidence; entries past it are not used, and
  when the log fails verification the report says where.
- ``from_url``: a running deployment, as the tenant (its API key). Entries come with inclusion proofs against
  a signed checkpoint (``tg_tinker.audit.AuditTrail``); those past that checkpoint are left for the next run.

Either way the verifier key comes from the caller (``--vkey`` / ``TS_LEDGER_VKEY``) or, for a data dir, from
its own signing key, and the report names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.errors import InvalidArgument

TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_ENTRIES = 1_000_000  # a report reads at most this many of a tenant's entries


def check_tenant(tenant_id: str) -> str:
    if not TENANT_ID.fullmatch(tenant_id or ""):
        raise InvalidArgument("tenant", "must be 1-128 characters of letters, digits, '_', '.', '-'")
    return tenant_id


@dataclass(frozen=True)
class Entry:
    """One ledger entry, as evidence."""

    index: int
    time: float
    tenant_id: str
    actor: str
    key_id: str
    service: str
    action: str
    resource_id: str
    outcome: str          # success | denied | failed
    request_id: str
    details: dict[str, str]
    leaf_hash: str        # hex

    @property
    def reason(self) -> str:
        return self.details.get("reason", "")

    @classmethod
    def from_proto(cls, index: int, e: ledger_pb2.AuditEntry, leaf: bytes) -> Entry:
        outcome = ledger_pb2.AuditOutcome.Name(e.outcome).removeprefix("AUDIT_OUTCOME_").lower()
        return cls(index, e.time.ToNanoseconds() / 1e9, e.tenant_id, e.actor, e.key_id, e.service, e.action,
                   e.resource_id, outcome, e.request_id, dict(e.details), leaf.hex())

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "time": self.time, "tenant_id": self.tenant_id, "actor": self.actor,
                "key_id": self.key_id, "service": self.service, "action": self.action,
                "resource_id": self.resource_id, "outcome": self.outcome, "request_id": self.request_id,
                "details": dict(sorted(self.details.items())), "leaf_hash": self.leaf_hash}


@dataclass
class Evidence:
    tenant_id: str
    source: str                  # what was read, in words
    origin: str                  # the log's origin line
    verifier_key: str            # "<name>+<key id>" of the key the checkpoints were checked with
    tree_size: int               # entries read (all tenants)
    verified_size: int           # entries [0, verified_size) are covered by a signed checkpoint that verifies
    root_hash: str               # hex root of that checkpoint
    problem: str | None          # why verification stopped, or None
    entries: list[Entry] = field(default_factory=list[Entry])  # this tenant's verified entries, ascending
    excluded: int = 0            # this tenant's entries past verified_size: not used

    @property
    def verified(self) -> bool:
        return self.problem is None


def from_data_dir(config: Any, tenant_id: str, vkey: str | None = None, db_url: str | None = None) -> Evidence:
    """``config``: a ``runtime.config.ServerConfig`` (its data dir holds the ledger's database and key)."""
    from tensafe.ledger.service import load_signer
    from tensafe.ledger.verify import verify_log
    from tensafe.runtime.db import create_engine
    from tg_tinker.transparency import NoteVerifier

    check_tenant(tenant_id)
    verifier = NoteVerifier.from_vkey(vkey) if vkey else load_signer(config).verifier()
    url = db_url or config.service_db_url("ledger")
    engine = create_engine(url, schema=f"{config.db_schema_prefix}ledger")
    mine: list[tuple[int, ledger_pb2.AuditEntry, bytes]] = []

    def keep(index: int, data: bytes, leaf: bytes) -> None:
        entry = ledger_pb2.AuditEntry.FromString(data)
        if entry.tenant_id == tenant_id and len(mine) < MAX_ENTRIES:
            mine.append((index, entry, leaf))

    try:
        report = verify_log(engine, verifier, config.ledger_origin, on_leaf=keep)
    finally:
        engine.dispose()
    verified = [Entry.from_proto(i, e, leaf) for i, e, leaf in mine if i < report.verified]
    return Evidence(tenant_id, f"ledger database {_redact(url)} (every leaf re-hashed, every checkpoint checked)",
                    config.ledger_origin, f"{verifier.name}+{verifier.key_id.hex()}", report.entries, report.verified,
                    report.root_hash.hex(), report.problem, verified, len(mine) - len(verified))


def from_url(base_url: str, api_key: str, tenant_id: str, vkey: str | None = None) -> Evidence:
    """As the tenant of ``api_key``, through the ledger service: inclusion proofs against a signed checkpoint."""
    from tg_tinker import ServiceClient
    from tg_tinker.audit import AuditTrail

    check_tenant(tenant_id)
    client = ServiceClient(api_key=api_key, base_url=base_url)
    try:
        trail = AuditTrail(client._transport, vkey)  # pyright: ignore[reportPrivateUsage] - the SDK's own reader
        records = trail.entries(limit=MAX_ENTRIES)
        checkpoint = trail.verifier.checkpoint
    finally:
        client.close()
    others = {r.tenant_id for r in records} - {tenant_id}
    if others:
        raise InvalidArgument("tenant", f"the API key belongs to tenant {sorted(others)[0]!r}, not {tenant_id!r}")
    verifier = trail.verifier.verifiers[0]
    entries = [Entry(r.index, r.time, r.tenant_id, r.actor, r.key_id, r.service, r.action, r.resource_id, r.outcome,
                     r.request_id, dict(r.details), r.leaf_hash.hex()) for r in records]
    size = checkpoint.size if checkpoint is not None else 0
    return Evidence(tenant_id, f"ledger service at {base_url} as the tenant (each entry's inclusion proof checked)",
                    trail.verifier.origin, f"{verifier.name}+{verifier.key_id.hex()}", size, size,
                    checkpoint.root.hex() if checkpoint is not None else "", None, entries, 0)


def _redact(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
