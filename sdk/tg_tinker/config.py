"""Client settings: arguments win over the environment, which wins over ``.env``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

from .errors import ValidationError

SERVICES = ("trainer", "accountant", "he", "vault", "ledger", "inference")
DEFAULT_BASE_URL = "localhost:50051"


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """How calls are retried: ``count`` extra attempts with exponential backoff and jitter."""

    count: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a service listens: ``host:port`` and whether to use TLS."""

    target: str
    tls: bool = False

    @classmethod
    def parse(cls, url: str, field: str = "base_url") -> Endpoint:
        url = url.strip()
        tls = False
        for scheme, secure in (("grpcs://", True), ("https://", True), ("grpc://", False), ("http://", False)):
            if url.startswith(scheme):
                url, tls = url[len(scheme):], secure
                break
        url = url.rstrip("/")
        host, sep, port = url.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
            raise ValidationError(f"{field}={url!r}: expected host:port (optionally grpc:// or grpcs://)",
                                  field=field, code="INVALID_ARGUMENT")
        return cls(url, tls)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Everything a :class:`~tg_tinker.ServiceClient` needs to reach the services."""

    api_key: str | None
    base_url: str
    tenant_id: str | None
    timeout: float
    retry: RetryConfig
    endpoints: Mapping[str, str]
    # TLS: the CA that verifies the server (TS_CA_FILE), and a client certificate for mTLS.
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @classmethod
    def resolve(cls, *, api_key: str | None = None, base_url: str | None = None, tenant_id: str | None = None,
                timeout: float | None = None, retry_count: int | None = None,
                endpoints: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env",
                environ: Mapping[str, str] | None = None) -> ClientConfig:
        env: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            env.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        env.update(os.environ if environ is None else environ)

        def pick(arg, name):  # noqa: ANN001, ANN202
            return arg if arg is not None else (env.get(name) or None)

        raw_timeout = pick(timeout, "TS_TIMEOUT")
        raw_retries = pick(retry_count, "TS_RETRY_COUNT")
        try:
            timeout_s = float(raw_timeout) if raw_timeout is not None else 300.0
        except ValueError:
            raise ValidationError(f"TS_TIMEOUT={raw_timeout!r} is not a number", field="timeout",
                                  code="INVALID_ARGUMENT") from None
        try:
            retries = int(raw_retries) if raw_retries is not None else 3
        except ValueError:
            raise ValidationError(f"TS_RETRY_COUNT={raw_retries!r} is not an integer", field="retry_count",
                                  code="INVALID_ARGUMENT") from None
        if timeout_s <= 0:
            raise ValidationError("timeout must be positive", field="timeout", code="INVALID_ARGUMENT")
        if retries < 0:
            raise ValidationError("retry_count must be >= 0", field="retry_count", code="INVALID_ARGUMENT")
        overrides = {s: env[f"TS_{s.upper()}_URL"] for s in SERVICES if env.get(f"TS_{s.upper()}_URL")}
        for name, url in (endpoints or {}).items():
            if name not in SERVICES:
                raise ValidationError(f"endpoints: unknown service {name!r}; use one of {', '.join(SERVICES)}",
                                      field="endpoints", code="INVALID_ARGUMENT")
            overrides[name] = url
        base = pick(base_url, "TS_BASE_URL") or DEFAULT_BASE_URL
        Endpoint.parse(base)
        for name, url in overrides.items():
            Endpoint.parse(url, field=f"endpoints.{name}")
        return cls(api_key=pick(api_key, "TS_API_KEY"), base_url=base, tenant_id=pick(tenant_id, "TS_TENANT_ID"),
                   timeout=timeout_s, retry=RetryConfig(count=retries), endpoints=overrides,
                   ca_file=env.get("TS_CA_FILE") or None, client_cert_file=env.get("TS_CLIENT_CERT_FILE") or None,
                   client_key_file=env.get("TS_CLIENT_KEY_FILE") or None)

    def endpoint(self, service: str) -> Endpoint:
        return Endpoint.parse(self.endpoints.get(service, self.base_url))
