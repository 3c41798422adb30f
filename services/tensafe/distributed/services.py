"""The services a distributed run uses, as its tenant: the vault, the accountant and the ledger.

A run is a platform job (like the trainer service, it runs where the operator's settings are: the model
directory, the services' endpoints and the services' own key) started for one tenant with that tenant's
API key. Every call to the vault and the accountant is made AS the tenant (their key travels with the call,
exactly as the trainer's calls do: ``tensafe.runtime.peers``), so a run can do nothing its tenant could
not. The services' key is used for the two things the trainer uses it for: attesting a checkpoint's
lineage to the vault (``tensafe.runtime.lineage``) and appending audit entries to the ledger
(``tensafe.runtime.audit``). Ledger entries of a run have ids derived from the run id and the global
step, so an entry written again after a worker restart is the same entry (the ledger keeps one per id).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from tensafe.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tensafe.runtime import lineage as lineage_mac
from tensafe.runtime.accountant_client import AccountantClient
from tensafe.runtime.audit import SUCCESS, build_entry
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.context import CallContext
from tensafe.runtime.errors import FailedPrecondition, Unauthenticated
from tensafe.runtime.identity import load_public_key, parse_api_key
from tensafe.runtime.peers import PeerChannels
from tensafe.runtime.vault_client import VaultClient

SERVICE = "distributed"  # the ledger entries' service
API_KEY_ENV = "TS_API_KEY"      # the tenant's key, as the SDK reads it
BASE_URL_ENV = "TS_BASE_URL"    # the combined server (`tensafe up`); TENSAFE_<SERVICE>_ENDPOINT win per service
LEDGER_ATTEMPTS = 5


@dataclass(frozen=True)
class Access:
    """What a worker needs to reach the services as the tenant (picklable: sent to each Ray worker)."""

    api_key: str
    base_url: str
    environ: Mapping[str, str] = field(default_factory=dict)  # the operator's TENSAFE_* settings

    @classmethod
    def resolve(cls, api_key: str | None, base_url: str | None,
                environ: Mapping[str, str] | None = None) -> Access:
        env = dict(os.environ if environ is None else environ)
        key = api_key if api_key is not None else env.get(API_KEY_ENV, "")
        if not key:
            raise Unauthenticated(f"a distributed run acts as its tenant: pass api_key= or set {API_KEY_ENV}",
                                  reason="API_KEY_MISSING")
        url = base_url if base_url is not None else env.get(BASE_URL_ENV, "")
        return cls(key, url, {k: v for k, v in env.items() if k.startswith("TENSAFE_")})


class TenantServices:
    """Clients of the vault, accountant and ledger for one run, made as its tenant."""

    def __init__(self, access: Access, run_id: str) -> None:
        self.config = ServerConfig.load(environ=dict(access.environ))
        self.run_id = run_id
        self.peers = PeerChannels(self.config, "distributed trainer", access.base_url or None,
                                  frozenset({"vault", "accountant", "ledger"}))
        public = self.config.public_key_path()
        if not public.is_file():
            raise FailedPrecondition(f"the API key verification key {public} is missing: set TENSAFE_DATA_DIR or "
                                     "TENSAFE_AUTH_PUBLIC_KEY_FILE as the services have them")
        principal = parse_api_key(access.api_key, load_public_key(public))
        self.caller = CallContext(principal=principal, request_id=f"{run_id}", api_key=access.api_key,
                                  method="/tensafe.distributed/Fit")
        self.tenant_id = principal.tenant_id
        self.vault = VaultClient(self.peers, self.config.max_artifact_mb << 20)
        self.accountant = AccountantClient(self.peers)

    def close(self) -> None:
        self.peers.close()

    def lineage_key(self) -> bytes:
        try:
            return lineage_mac.derive_key(self.config.service_key())
        except lineage_mac.LineageKeyMissing as exc:
            raise FailedPrecondition(f"{exc}; a distributed run does not save checkpoints without their lineage") \
                from None

    def entry_id(self, *parts: object) -> str:
        """A ledger entry id fixed by the run and what the entry is about (the same after a restart)."""
        return hashlib.sha256("/".join([self.run_id, *map(str, parts)]).encode()).hexdigest()[:32]

    def audit(self, action: str, resource: str, details: Mapping[str, object], *id_parts: object) -> None:
        """Append one entry to the ledger now (retried while the ledger is unavailable; the same id each time)."""
        entry = build_entry(service=SERVICE, action=action, tenant_id=self.tenant_id,
                            key_id=self.caller.principal.key_id, outcome=SUCCESS, request_id=self.run_id,
                            resource=resource, details={"run_id": self.run_id,
                                                        **{k: str(v) for k, v in details.items()}})
        entry.entry_id = self.entry_id(action, *id_parts) if id_parts else uuid.uuid4().hex
        key = self.config.service_key()
        if not key:
            raise FailedPrecondition("no services' key (TENSAFE_SERVICE_API_KEY or <data dir>/service_key): the run's "
                                     "ledger entries cannot be written")
        stub = ledger_pb2_grpc.LedgerServiceStub(self.peers.channel("ledger"))
        delay = 0.2
        for attempt in range(LEDGER_ATTEMPTS):
            try:
                stub.AppendEntries(ledger_pb2.AppendEntriesRequest(entries=[entry]), timeout=10,
                                   metadata=(("authorization", f"Bearer {key}"),))
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == LEDGER_ATTEMPTS - 1:
                    raise
                time.sleep(delay)
                delay *= 2
