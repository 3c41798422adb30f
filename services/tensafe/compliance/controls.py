"""Control families the report's evidence bears on.

Worded as evidence for an assessor, never as a claim of compliance or certification: TenSafe records what
happened; whether an organisation meets a control depends on much that TenSafe cannot see.
"""

from __future__ import annotations

# evidence_kind selects the report's facts for the row: ledger | crypto | access | privacy
CONTROLS: list[dict[str, str]] = [
    {"framework": "HIPAA Security Rule", "control": "45 CFR 164.312(b) Audit controls",
     "evidence_kind": "ledger",
     "how": "Every state-changing call, sensitive read and refused request is an entry in an append-only Merkle "
            "log with signed checkpoints; this report re-verified them."},
    {"framework": "HIPAA Security Rule", "control": "45 CFR 164.312(c)(1) Integrity",
     "evidence_kind": "ledger",
     "how": "Entries are covered by signed tree heads; an altered or removed entry fails verification and is "
            "reported, not used."},
    {"framework": "HIPAA Security Rule", "control": "45 CFR 164.312(a)(2)(iv) Encryption and decryption",
     "evidence_kind": "crypto",
     "how": "Artifacts (checkpoints, adapters) are recorded with their cipher and tenant key version."},
    {"framework": "HIPAA Security Rule", "control": "45 CFR 164.312(d) Person or entity authentication",
     "evidence_kind": "access",
     "how": "API keys created and revoked, and requests refused for authentication or permission."},
    {"framework": "ISO/IEC 27001:2022 Annex A", "control": "A.8.15 Logging", "evidence_kind": "ledger",
     "how": "Tamper-evident log of activities, exceptions and faults, verifiable by the tenant."},
    {"framework": "ISO/IEC 27001:2022 Annex A", "control": "A.8.24 Use of cryptography", "evidence_kind": "crypto",
     "how": "Encryption of stored artifacts, key versions, rotations and crypto-shredding as recorded."},
    {"framework": "ISO/IEC 27001:2022 Annex A", "control": "A.5.15 / A.8.5 Access control, secure authentication",
     "evidence_kind": "access", "how": "Per-tenant API keys and the refusals of other access."},
    {"framework": "ISO/IEC 27001:2022 Annex A", "control": "A.5.34 Privacy and protection of PII",
     "evidence_kind": "privacy",
     "how": "Differentially private training: settings, epsilon over steps and budget refusals per session."},
    {"framework": "SOC 2 (TSC 2017)", "control": "CC6.1 Logical access security", "evidence_kind": "access",
     "how": "Authentication of every call; refused requests by reason."},
    {"framework": "SOC 2 (TSC 2017)", "control": "CC6.7 Restricted transmission and storage",
     "evidence_kind": "crypto", "how": "Encrypted artifacts and tenant key management events."},
    {"framework": "SOC 2 (TSC 2017)", "control": "CC7.2 Monitoring of system components", "evidence_kind": "ledger",
     "how": "Signed, verifiable audit log of system activity and anomalies (refusals, failures)."},
]
