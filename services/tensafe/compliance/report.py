"""A tenant's compliance report, built from verified ledger entries only (``evidence.Evidence``).

Every figure carries the ledger indices it came from, so a reader can find each entry in the appendix and,
with the verifier key, prove it is in the signed log. Nothing here reads a service's own tables: what the
ledger does not say, the report does not claim.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from .controls import CONTROLS
from .evidence import Entry, Evidence

REPORT_VERSION = 1
DP_REFUSALS = ("DP_BUDGET_EXCEEDED", "DP_BATCH_IMPLAUSIBLE")
ARTIFACT_KINDS = {"1": "checkpoint", "2": "adapter", "3": "other"}  # vault.v1.ArtifactKind, as the entry holds it


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass
class EpsilonPoint:
    step: int             # accounted steps so far (the accountant's steps, counted in the order recorded)
    epsilon: float
    time: float
    entry: int            # ledger index of the accountant.RecordStep entry


@dataclass
class SessionEvidence:
    session_id: str
    created: float
    entry: int                    # trainer.CreateSession
    model_ref: str
    lora_rank: str
    dp: bool
    dp_settings: dict[str, str] = field(default_factory=dict[str, str])
    sampling: str = ""            # "attested" (server-sampled) | "declared" (client-sampled) | "" (no DP)
    budget_id: str = ""
    epsilon: list[EpsilonPoint] = field(default_factory=list[EpsilonPoint])
    refusals: list[int] = field(default_factory=list[int])       # ledger indices
    checkpoints: list[dict[str, str]] = field(default_factory=list[dict[str, str]])  # SaveState run entries
    closed_entry: int | None = None

    @property
    def final_epsilon(self) -> float:
        return self.epsilon[-1].epsilon if self.epsilon else 0.0


@dataclass
class Report:
    tenant_id: str
    generated_at: float
    verification: dict[str, Any]
    sessions: list[SessionEvidence]
    budget_refusals: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    artifact_reads: list[dict[str, Any]]
    key_events: list[dict[str, Any]]
    refused_requests: list[dict[str, Any]]
    api_keys: list[dict[str, Any]]
    controls: list[dict[str, Any]]
    entries: list[Entry]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["entries"] = [e.as_dict() for e in self.entries]
        out["report_version"] = REPORT_VERSION
        return out


def build_report(evidence: Evidence, now: float | None = None) -> Report:
    entries = evidence.entries
    sessions: dict[str, SessionEvidence] = {}
    by_budget: dict[str, SessionEvidence] = {}
    for e in entries:
        if e.action == "trainer.CreateSession" and e.outcome == "success":
            sid = e.details.get("session_id") or e.resource_id
            dp = e.details.get("dp") == "true"
            settings = {k: e.details[k] for k in ("noise_multiplier", "max_grad_norm", "sample_rate",
                                                 "expected_batch_size", "target_epsilon", "target_delta",
                                                 "dataset_size") if e.details.get(k)}
            s = SessionEvidence(sid, e.time, e.index, e.details.get("model_ref", ""), e.details.get("lora_rank", ""),
                                dp, settings, _sampling(e.details.get("sampling", "")) if dp else "",
                                e.details.get("budget_id", ""))
            sessions[sid] = s
            if s.budget_id:
                by_budget[s.budget_id] = s

    def session_of(e: Entry) -> SessionEvidence | None:
        sid = e.details.get("session_id", "")
        return sessions.get(sid) or by_budget.get(e.resource_id) or sessions.get(e.resource_id)

    budget_refusals: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    reads: dict[tuple[str, str], list[int]] = defaultdict(list)
    key_events: list[dict[str, Any]] = []
    refused: dict[tuple[str, str], list[int]] = defaultdict(list)
    api_keys: list[dict[str, Any]] = []
    for e in entries:
        s = session_of(e)
        if e.action == "accountant.CreateBudget" and e.outcome == "success" and s is not None:
            s.budget_id = s.budget_id or e.resource_id
            by_budget.setdefault(e.resource_id, s)
            s.dp_settings.setdefault("accountant", e.details.get("accountant", ""))
        elif e.action == "accountant.RecordStep" and e.outcome == "success" and s is not None:
            eps = _float(e.details.get("epsilon_after"))
            if eps is not None and e.details.get("duplicate") != "true":
                steps = int(e.details.get("num_steps", "1") or 1)
                done = (s.epsilon[-1].step if s.epsilon else 0) + steps
                s.epsilon.append(EpsilonPoint(done, eps, e.time, e.index))
        elif e.action == "trainer.SaveState" and e.details.get("phase") == "run" and s is not None:
            s.checkpoints.append({"artifact_id": e.resource_id, "entry": str(e.index),
                                  **{k: v for k, v in e.details.items() if k != "phase"}})
        elif e.action == "trainer.CloseSession" and e.outcome == "success" and s is not None:
            s.closed_entry = e.index
        if e.reason in DP_REFUSALS:
            if s is not None:
                s.refusals.append(e.index)
            budget_refusals.append({"entry": e.index, "time": e.time, "action": e.action, "reason": e.reason,
                                    "session_id": s.session_id if s else "", "resource_id": e.resource_id,
                                    "epsilon_with_step": e.details.get("epsilon_after", ""),
                                    "target_epsilon": e.details.get("target_epsilon", "")})
        if e.action == "vault.PutArtifact" and e.outcome == "success":
            artifacts.append({"entry": e.index, "time": e.time, "artifact_id": e.resource_id,
                              **{k: e.details.get(k, "") for k in ("kind", "session_id", "cipher", "kek_version",
                                                                   "format_version", "size_bytes", "plaintext_sha256",
                                                                   "lineage_attested")}})
            kind = e.details.get("kind", "")
            artifacts[-1]["kind"] = ARTIFACT_KINDS.get(kind, kind)
        elif e.action == "vault.DeleteArtifact" and e.outcome == "success":
            artifacts.append({"entry": e.index, "time": e.time, "artifact_id": e.resource_id, "kind": "(deleted)"})
        elif e.action in ("vault.GetArtifact", "vault.PullArtifact", "vault.UnwrapDataKey") and e.outcome == "success":
            reads[(e.action, e.actor)].append(e.index)
        elif e.action in ("vault.RotateTenantKey", "vault.ShredTenant") and e.outcome == "success":
            key_events.append({"entry": e.index, "time": e.time, "action": e.action,
                               **{k: v for k, v in e.details.items() if k not in ("code",)}})
        elif e.action in ("identity.CreateKey", "identity.RevokeKey"):
            api_keys.append({"entry": e.index, "time": e.time, "action": e.action, "key_id": e.resource_id,
                             "expires_at": e.details.get("expires_at", "")})
        if e.outcome == "denied":
            refused[(e.action, e.reason or e.details.get("code", ""))].append(e.index)

    verification = {
        "ok": evidence.verified, "problem": evidence.problem, "source": evidence.source, "origin": evidence.origin,
        "verifier_key": evidence.verifier_key, "log_size": evidence.tree_size,
        "verified_size": evidence.verified_size, "root_hash": evidence.root_hash,
        "tenant_entries": len(entries), "excluded_entries": evidence.excluded,
        "first_time": entries[0].time if entries else None, "last_time": entries[-1].time if entries else None,
    }
    return Report(
        tenant_id=evidence.tenant_id, generated_at=time.time() if now is None else now, verification=verification,
        sessions=sorted(sessions.values(), key=lambda s: s.entry), budget_refusals=budget_refusals,
        artifacts=artifacts,
        artifact_reads=[{"action": a, "actor": actor, "count": len(ix), "entries": ix}
                        for (a, actor), ix in sorted(reads.items())],
        key_events=key_events,
        refused_requests=[{"action": a, "reason": r, "count": len(ix), "entries": ix}
                          for (a, r), ix in sorted(refused.items())],
        api_keys=api_keys, controls=[_control(c, evidence, sessions, artifacts, key_events, refused, api_keys)
                                     for c in CONTROLS],
        entries=entries)


def _sampling(value: str) -> str:
    return {"server": "attested", "client": "declared"}.get(value, "declared")


def _control(control: dict[str, str], ev: Evidence, sessions: dict[str, SessionEvidence],
             artifacts: list[dict[str, Any]], key_events: list[dict[str, Any]],
             refused: dict[tuple[str, str], list[int]], api_keys: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the control mapping: what this report holds that bears on the control, in counts."""
    dp_sessions = [s for s in sessions.values() if s.dp]
    facts = {
        "ledger": f"{len(ev.entries)} verified entries of this tenant in a signed log of {ev.verified_size}",
        "crypto": f"{sum(1 for a in artifacts if a.get('cipher'))} artifacts stored encrypted "
                  f"({', '.join(sorted({a['cipher'] for a in artifacts if a.get('cipher')})) or 'none'}); "
                  f"{len(key_events)} key rotations/shreds",
        "access": f"{sum(len(v) for v in refused.values())} refused requests; {len(api_keys)} API key events",
        "privacy": f"{len(dp_sessions)} DP sessions, max epsilon "
                   f"{max((s.final_epsilon for s in dp_sessions), default=0.0):.4g}",
    }
    return {**control, "evidence": facts[control["evidence_kind"]]}
