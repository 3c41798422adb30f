"""Artifact lineage: how an artifact's weights were made, written by the trainer, kept by the vault.

A lineage (``tensafe.api.common.v1.Lineage``) names the artifact a session last loaded, every DP
budget whose steps shaped the weights (with the epsilon spent when saved), and the private and
non-private optimizer steps of the whole ancestry. Tenants must not be able to write one: a
checkpoint that claims "no DP budget, no non-private steps" would launder spent privacy.

How the vault tells the trainer's put from a tenant's: the trainer calls the vault AS the tenant
(the tenant's own API key travels with the call, so no service-to-service escalation), and adds
``lineage_mac``, an HMAC-SHA256 over (tenant, plaintext SHA-256, lineage) under a key derived from
the services' own secret (``TENSAFE_SERVICE_API_KEY`` or ``<data dir>/service_key``, the key the
services already use to append to the ledger; tenants never hold it). The vault recomputes the
MAC over the bytes it actually received and refuses a lineage whose MAC does not verify
(PERMISSION_DENIED), so a tenant can neither forge one nor move a real one onto other bytes. The
vault then stores the lineage in its own table, which only the vault writes; an artifact put
without a lineage is "unattested" (``attested = false``).

Nothing here imports torch: the vault uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct

from google.protobuf import json_format

from tensafe.api.common.v1 import common_pb2

from .errors import InvalidArgument

_LABEL = b"tensafe/artifact-lineage/v1"
MAX_BUDGETS = 32          # distinct DP budgets one lineage may name
MAX_ID = 64               # artifact, session and budget ids
_ID_RE = re.compile(r"^[A-Za-z0-9_:.-]*$")


class LineageKeyMissing(RuntimeError):
    """No services' key is configured, so no lineage can be attested."""


def derive_key(service_key: str) -> bytes:
    """The lineage MAC key, derived from the services' own API key (never the key itself)."""
    if not service_key:
        raise LineageKeyMissing("no services' key (TENSAFE_SERVICE_API_KEY or <data dir>/service_key): artifact "
                                "lineage cannot be attested")
    return hmac.new(service_key.encode(), _LABEL, hashlib.sha256).digest()


def _message(tenant_id: str, plaintext_sha256: bytes, lineage: common_pb2.Lineage) -> bytes:
    parts = [_LABEL, tenant_id.encode(), plaintext_sha256, lineage.SerializeToString(deterministic=True)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def mac(key: bytes, tenant_id: str, plaintext_sha256: bytes, lineage: common_pb2.Lineage) -> bytes:
    return hmac.new(key, _message(tenant_id, plaintext_sha256, lineage), hashlib.sha256).digest()


def verify(key: bytes, tenant_id: str, plaintext_sha256: bytes, lineage: common_pb2.Lineage, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, tenant_id, plaintext_sha256, lineage), tag)


def check_bounds(lineage: common_pb2.Lineage, field: str) -> None:
    """Bounded sizes and id formats (a lineage is small by construction; this keeps it so)."""
    ids = [("parent_artifact_id", lineage.parent_artifact_id), ("session_id", lineage.session_id)]
    ids += [(f"budgets[{i}].budget_id", b.budget_id) for i, b in enumerate(lineage.budgets)]
    for name, value in ids:
        if len(value) > MAX_ID or not _ID_RE.match(value):
            raise InvalidArgument(f"{field}.{name}", f"must be at most {MAX_ID} letters, digits or _:.-")
    if len(lineage.budgets) > MAX_BUDGETS:
        raise InvalidArgument(f"{field}.budgets", f"at most {MAX_BUDGETS} budgets")
    if lineage.non_private_steps < 0 or lineage.private_steps < 0:
        raise InvalidArgument(f"{field}", "step counts must be >= 0")


def to_json(lineage: common_pb2.Lineage) -> str:
    return json_format.MessageToJson(lineage, preserving_proto_field_name=True, indent=None, sort_keys=True)


def from_json(text: str | None) -> common_pb2.Lineage:
    """The stored lineage; none stored means an unattested (tenant-uploaded) artifact."""
    if not text:
        return common_pb2.Lineage(attested=False)
    return json_format.Parse(text, common_pb2.Lineage())


def summary(lineage: common_pb2.Lineage) -> dict[str, str]:
    """The lineage as audit entry details (string values, bounded by check_bounds)."""
    return {
        "lineage_attested": str(lineage.attested).lower(),
        "parent_artifact_id": lineage.parent_artifact_id,
        "budgets": ",".join(f"{b.budget_id}:{b.epsilon:.6g}" for b in lineage.budgets),
        "budget_count": str(len(lineage.budgets)),
        "non_private_steps": str(lineage.non_private_steps),
        "private_steps": str(lineage.private_steps),
        "external_ancestry": str(lineage.external_ancestry).lower(),
    }
