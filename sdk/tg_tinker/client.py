"""``ServiceClient``: the entry point of the SDK."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

import grpc
from grpc_health.v1 import health_pb2

from ._transport import Transport
from .config import SERVICES, ClientConfig
from .errors import ConflictError, TGTinkerError, ValidationError
from .services import full_name

if TYPE_CHECKING:
    from .artifacts import ArtifactInfo, Artifacts
    from .audit import AuditRecord, AuditTrail
    from .configs import TrainingConfig
    from .he.keys import HEKeyBundle
    from .he.remote import HeClient
    from .sampling import SamplingClient
    from .training import TrainingClient


class SessionSummary(TypedDict):
    """An entry of :meth:`ServiceClient.list_training_clients`; ``state`` is "active" or "closed"."""

    session_id: str
    model_ref: str
    step: int
    state: str


class ServiceClient:
    """A connection to TenSafe.

    Settings come from the arguments, else ``TS_API_KEY``, ``TS_BASE_URL``
    (default ``localhost:50051``), ``TS_TENANT_ID``, ``TS_TIMEOUT`` (seconds,
    default 300), ``TS_RETRY_COUNT`` (default 3) in the environment, else a
    ``.env`` file in the working directory. ``endpoints`` (or ``TS_<SERVICE>_URL``)
    sends one service elsewhere than ``base_url``, for the split deployment.
    URLs may be ``host:port``, ``[::1]:50051``, ``http://host[:port]`` (plaintext,
    port 80), ``https://host[:port]`` or ``grpcs://host[:port]`` (TLS, port 443) or
    ``grpc://host:port``; anything else raises :class:`ValidationError` naming the setting.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None, tenant_id: str | None = None,
                 timeout: float | None = None, retry_count: int | None = None, *,
                 endpoints: Mapping[str, str] | None = None) -> None:
        self.config = ClientConfig.resolve(api_key=api_key, base_url=base_url, tenant_id=tenant_id,
                                           timeout=timeout, retry_count=retry_count, endpoints=endpoints)
        self._transport = Transport(self.config)
        self._audit: AuditTrail | None = None

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; the client cannot be used afterwards."""
        self._transport.close()

    def check_health(self, timeout: float = 5.0) -> dict[str, str]:
        """Ask each of the six services for its health; returns service -> status name.

        A service that cannot be reached reports ``UNREACHABLE`` rather than raising,
        so one call shows the state of the whole deployment.
        """
        report: dict[str, str] = {}
        for service in SERVICES:
            # grpc_health ships no types for its stub; this is its Check method, typed.
            check = self._transport.channel(service).unary_unary(
                "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString)
            try:
                resp = check(health_pb2.HealthCheckRequest(service=full_name(service)), timeout=timeout)
                report[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                report[service] = "UNREACHABLE" if err.code() in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else err.code().name
        return report

    # -- training ---------------------------------------------------------------------------
    def create_training_client(self, config: TrainingConfig) -> TrainingClient:
        """Start a training session (loads the base model on first use) and return its client.

        The call's timeout (``timeout``, ``TS_TIMEOUT``: 300 s by default) travels to the services: a DP
        session without ``noise_multiplier`` waits within it for its noise calibration. One that cannot
        fit raises :class:`DeadlineTooShortError` at once, with the estimate and what to do (raise the
        timeout or give ``noise_multiplier``); the calibration goes on, and the same call again joins it
        or gets its result at once."""
        from tensafe.api.trainer.v1 import trainer_pb2

        from .configs import TrainingConfig
        from .training import TrainingClient

        if not isinstance(config, TrainingConfig):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise ValidationError("config must be a tg_tinker.TrainingConfig", field="config",
                                  code="INVALID_ARGUMENT")
        resp = self._call("trainer", "CreateSession", trainer_pb2.CreateSessionRequest(config=config.to_proto()))
        try:
            return TrainingClient(self._transport, resp.session)
        except TGTinkerError:
            # Its result stream was refused (e.g. QuotaExceededError, TENSAFE_QUOTA_STREAMS_PER_TENANT): the
            # session would be unusable, so it is closed rather than left holding a session place.
            with contextlib.suppress(TGTinkerError):  # the refusal is what the caller must see
                self._call("trainer", "CloseSession",
                           trainer_pb2.CloseSessionRequest(session_id=resp.session.session_id))
            raise

    def get_training_client(self, session_id: str) -> TrainingClient:
        """Reattach to an open session of your tenant."""
        from tensafe.api.trainer.v1 import trainer_pb2

        from .training import TrainingClient

        session = self._call("trainer", "GetSession", trainer_pb2.GetSessionRequest(session_id=session_id)).session
        if session.state != trainer_pb2.SESSION_STATE_ACTIVE:
            raise ConflictError(f"session {session_id} is closed", code="FAILED_PRECONDITION")
        return TrainingClient(self._transport, session)

    def list_training_clients(self, include_closed: bool = False) -> list[SessionSummary]:
        """Your tenant's sessions: id, model, step and state of each."""
        from tensafe.api.trainer.v1 import trainer_pb2

        out: list[SessionSummary] = []
        token = ""
        while True:
            resp = self._call("trainer", "ListSessions", trainer_pb2.ListSessionsRequest(
                include_closed=include_closed, page_token=token))
            out.extend(SessionSummary(session_id=s.session_id, model_ref=s.config.model_ref, step=s.step,
                                      state=trainer_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower())
                       for s in resp.sessions)
            token = resp.next_page_token
            if not token:
                return out

    # -- generation (the inference service) ------------------------------------------------------
    def create_sampling_client(self, artifact_id: str | None = None, *, model_ref: str | None = None,
                               base_model_ref: str | None = None, backend: str | None = None,
                               enable_he_lora: bool = False, key_bundle: HEKeyBundle | None = None) -> SamplingClient:
        """Load an adapter artifact (a checkpoint from ``save_state``) into the inference service and return
        a client generating with it; ``model_ref`` instead: the base model alone. With ``enable_he_lora``
        the base model (``base_model_ref``, a local path) runs here and the adapter under HE on the he
        service, with ``key_bundle``'s keys. See ``tg_tinker.sampling`` and ``tg_tinker.two_plane``."""
        from .sampling import create_sampling_client

        return create_sampling_client(self._transport, artifact_id, model_ref, base_model_ref, backend, enable_he_lora,
                                      key_bundle)

    # -- artifacts (the vault) ------------------------------------------------------------------
    @property
    def artifacts(self) -> Artifacts:
        """Vault calls: put, describe, list, pull, decrypt, delete, key rotation and shredding."""
        from .artifacts import Artifacts

        return Artifacts(self._transport)

    def pull_artifact(self, artifact_id: str) -> bytes:
        """The artifact's encrypted container, as stored; decrypt it with :meth:`decrypt_artifact`."""
        return self.artifacts.pull(artifact_id)

    def decrypt_artifact(self, container: bytes) -> bytes:
        """Decrypt a pulled container here: the vault unwraps its data key for its owner only."""
        return self.artifacts.decrypt(container)

    def get_artifact(self, artifact_id: str) -> bytes:
        """The plaintext, decrypted and verified by the vault and sent to its owner."""
        return b"".join(self.artifacts.iter_plaintext(artifact_id))

    def describe_artifact(self, artifact_id: str) -> ArtifactInfo:
        return self.artifacts.describe(artifact_id)

    def list_artifacts(self, kind: str | None = None, session_id: str | None = None) -> list[ArtifactInfo]:
        return self.artifacts.list(kind, session_id)

    def delete_artifact(self, artifact_id: str) -> None:
        self.artifacts.delete(artifact_id)

    # -- HE-LoRA (the he service) ----------------------------------------------------------------
    @property
    def he(self) -> HeClient:
        """The he service's calls; HE-LoRA itself is in :mod:`tg_tinker.he`."""
        from .he.remote import HeClient

        return HeClient(self._transport)

    # -- the audit ledger ---------------------------------------------------------------------------
    def get_audit_logs(self, *, action: str = "", resource_id: str = "", service: str = "", limit: int = 1000,
                       vkey: str | None = None) -> list[AuditRecord]:
        """Your tenant's audit entries, each verified by its inclusion proof against a signed checkpoint;
        the client remembers the last checkpoint and checks that the next one extends it.
        ``vkey`` (or TS_LEDGER_VKEY) is the ledger's verifier key, from `tensafe ledger vkey`."""
        from .audit import AuditTrail

        if self._audit is None or (vkey and vkey not in [v.vkey for v in self._audit.verifier.verifiers]):
            self._audit = AuditTrail(self._transport, vkey)
        return self._audit.entries(action=action, resource_id=resource_id, service=service, limit=limit)

    # Used by the higher-level clients (training, sampling, artifacts) in this package.
    def _call(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        return self._transport.unary(service, method, request, timeout=timeout)


__all__ = ["ServiceClient"]
