"""Client settings: arguments win over the environment, which wins over ``.env``."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

from .errors import ValidationError
from .services import SERVICE_NAMES as SERVICES

DEFAULT_BASE_URL = "localhost:50051"
_V = TypeVar("_V")


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """How calls are retried: ``count`` extra attempts with exponential backoff and jitter."""

    count: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0


# scheme -> (TLS, default port; None: the URL must give one)
_SCHEMES: dict[str, tuple[bool, int | None]] = {
    "grpc": (False, None), "http": (False, 80), "grpcs": (True, 443), "https": (True, 443)}
ACCEPTED_FORMS = ("host:port, [ipv6]:port, http://host[:port] (plaintext, port 80), "
                  "https://host[:port] (TLS, port 443), grpc://host:port, grpcs://host[:port] (TLS, port 443)")
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_PORT = re.compile(r"[0-9]+")


def _shown(url: str) -> str:
    """The value as an error may show it: user-info (a password, perhaps) masked, long values cut."""
    _, at, tail = url.rpartition("@")
    shown = f"***@{tail}" if at else url
    return repr(shown if len(shown) <= 120 else shown[:120] + "...")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a service listens: the gRPC target ``host:port`` and whether to use TLS."""

    target: str
    tls: bool = False

    @classmethod
    def parse(cls, url: str, field: str = "base_url") -> Endpoint:
        """Parse a URL as users paste it; the one parser for ``base_url``, ``TS_BASE_URL`` and every override.

        Accepted: ``host:port`` and ``[ipv6]:port`` (plaintext), ``http://host[:port]``
        (plaintext, port 80), ``https://host[:port]`` (TLS, port 443), ``grpc://host:port``
        and ``grpcs://host[:port]`` (TLS, port 443); a trailing ``/`` is ignored. Anything
        else (a path, query, fragment, user-info, another scheme, no host, a bad port,
        whitespace inside) raises :class:`ValidationError` naming ``field``.
        """

        def refuse(reason: str) -> ValidationError:
            return ValidationError(f"{field}={_shown(str(url))}: {reason}; accepted forms: {ACCEPTED_FORMS}",
                                   field=field, code="INVALID_ARGUMENT")

        if not isinstance(url, str):  # pyright: ignore[reportUnnecessaryIsInstance] - checked for callers without a type checker
            raise refuse(f"expected a string, not {type(url).__name__}")
        rest = url.strip()
        if not rest:
            raise refuse("empty URL")
        if any(c.isspace() or not c.isprintable() for c in rest):
            raise refuse("whitespace or control characters inside the URL")
        tls, default_port = False, None
        scheme, sep, after = rest.partition("://")
        if sep:
            if not _SCHEME.fullmatch(scheme) or scheme.lower() not in _SCHEMES:
                raise refuse(f"unknown scheme {scheme!r}")
            tls, default_port = _SCHEMES[scheme.lower()]
            rest = after
        elif rest.partition(":")[0].lower() in _SCHEMES and not _PORT.fullmatch(rest.partition(":")[2]):
            raise refuse("a scheme is written with '://', e.g. https://host")   # https:host, http:/host
        rest = rest.rstrip("/")
        for char, what in (("@", "user-info (user@ or user:password@) is not accepted"),
                           ("/", "a path is not accepted"), ("?", "a query is not accepted"),
                           ("#", "a fragment is not accepted")):
            if char in rest:
                raise refuse(what)
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise refuse("unclosed '[' in an IPv6 address")
            host, tail = rest[1:close], rest[close + 1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise refuse(f"{host!r} is not an IPv6 address") from None
            if tail and not tail.startswith(":"):
                raise refuse("expected :port after ']'")
            port = tail[1:] if tail else None
            target_host = f"[{host}]"
        else:
            if rest.count(":") > 1:
                raise refuse("an IPv6 address needs brackets, e.g. [::1]:50051")
            host, colon, port_text = rest.partition(":")
            port = port_text if colon else None
            if not host:
                raise refuse("no host")
            labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
            if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
                raise refuse(f"{host!r} is not a host name or IPv4 address")
            target_host = host
        if port is None:
            if default_port is None:
                raise refuse("no port" if not sep else f"{scheme}:// needs a port")
            number = default_port
        elif not _PORT.fullmatch(port):
            raise refuse(f"port {port!r} is not a number" if port else "empty port")
        elif len(port) > 5 or not 0 < int(port) < 65536:
            raise refuse(f"port {port[:12]} is out of range (1-65535)")
        else:
            number = int(port)
        return cls(f"{target_host}:{number}", tls)


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

        def pick(arg: _V | None, name: str) -> _V | str | None:
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
        # Every URL goes through Endpoint.parse; an error names where the value came from.
        overrides: dict[str, str] = {}
        sources: dict[str, str] = {}
        for s in SERVICES:
            if env.get(f"TS_{s.upper()}_URL"):
                overrides[s], sources[s] = env[f"TS_{s.upper()}_URL"], f"TS_{s.upper()}_URL"
        for name, url in (endpoints or {}).items():
            if name not in SERVICES:
                raise ValidationError(f"endpoints: unknown service {name!r}; use one of {', '.join(SERVICES)}",
                                      field="endpoints", code="INVALID_ARGUMENT")
            overrides[name], sources[name] = url, f"endpoints.{name}"
        if base_url is not None:
            base, base_field = base_url, "base_url"
        else:
            base, base_field = env.get("TS_BASE_URL") or DEFAULT_BASE_URL, "TS_BASE_URL"
        Endpoint.parse(base, field=base_field)
        for name, url in overrides.items():
            Endpoint.parse(url, field=sources[name])
        return cls(api_key=pick(api_key, "TS_API_KEY"), base_url=base, tenant_id=pick(tenant_id, "TS_TENANT_ID"),
                   timeout=timeout_s, retry=RetryConfig(count=retries), endpoints=overrides,
                   ca_file=env.get("TS_CA_FILE") or None, client_cert_file=env.get("TS_CLIENT_CERT_FILE") or None,
                   client_key_file=env.get("TS_CLIENT_KEY_FILE") or None)

    def endpoint(self, service: str) -> Endpoint:
        return Endpoint.parse(self.endpoints.get(service, self.base_url))
