"""Tenants and API keys.

An API key is a signed token: ``ts-<claims>.<signature>``, where the claims
(key id, tenant, issue time and, for a key created with ``--expires-in``, its expiry)
are signed with the issuer's Ed25519 private key.
A service verifies a key with the issuer's public key alone, so no call to
another service is made per request. The registry stores the key id, tenant,
a description, the creation, expiry and revocation times: nothing secret, nothing
from which a key could be rebuilt. A key past its expiry (in its claims or in the
registry) is refused with UNAUTHENTICATED, reason API_KEY_EXPIRED.
Services reload the registry every ``TENSAFE_AUTH_REFRESH_SECONDS`` (and at
once when they meet a key id they have not seen), so a revoked key stops
working within that interval.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .config import ServerConfig
from .db import IDENTITY_VERSIONS, create_engine, migrate
from .errors import InvalidArgument, NotFound, Unauthenticated

KEY_PREFIX = "ts-"
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

_metadata = sa.MetaData()
tenants = sa.Table(
    "tenants",
    _metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
api_keys = sa.Table(
    "api_keys",
    _metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(128), sa.ForeignKey("tenants.tenant_id"), nullable=False),
    sa.Column("description", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("expires_at", sa.Float, nullable=True),
)
# Created by the migrations too; declared here so that migrations == tables (tests/test_migrations.py).
sa.Index("ix_api_keys_tenant", api_keys.c.tenant_id)
# The longest lifetime ``--expires-in`` accepts (ten years); no expiry at all stays possible.
MAX_KEY_LIFETIME_SECONDS = 10 * 366 * 86400


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the key it used."""

    tenant_id: str
    key_id: str
    expires_at: float | None = None


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    description: str
    created_at: float
    revoked_at: float | None
    expires_at: float | None = None


def _expired(expires_at: float | None, now: float | None = None) -> bool:
    return expires_at is not None and (time.time() if now is None else now) >= expires_at


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class KeyIssuer:
    """Holds the issuer's Ed25519 private key; used by ``tensafe keys create`` only."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def load_or_create(cls, key_path: Path, public_path: Path) -> KeyIssuer:
        if key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{key_path} is not an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_private(key_path, pem)
        if not public_path.exists():
            public_path.parent.mkdir(parents=True, exist_ok=True)
            public_path.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return cls(key)

    def issue(self, key_id: str, tenant_id: str, expires_at: float | None = None) -> str:
        body: dict[str, object] = {"v": 1, "kid": key_id, "tid": tenant_id, "iat": int(time.time())}
        if expires_at is not None:
            body["exp"] = int(expires_at)
        claims = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return KEY_PREFIX + _b64(claims) + "." + _b64(self._key.sign(claims))


def load_public_key(path: Path) -> Ed25519PublicKey:
    if not path.exists():
        raise FileNotFoundError(
            f"API key verification key {path} is missing: run `tensafe up` once, or set TENSAFE_AUTH_PUBLIC_KEY_FILE"
        )
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def parse_api_key(api_key: str, public_key: Ed25519PublicKey) -> Principal:
    """Check the signature and the expiry in the claims; return the claimed principal (revocation is
    checked by the caller, against the registry)."""
    if not api_key:
        raise Unauthenticated("missing API key: send it as 'authorization: Bearer <key>'", reason="API_KEY_MISSING")
    try:
        if not api_key.startswith(KEY_PREFIX):
            raise ValueError("prefix")
        claims_b64, sig_b64 = api_key[len(KEY_PREFIX):].split(".", 1)
        claims_raw, sig = _unb64(claims_b64), _unb64(sig_b64)
        public_key.verify(sig, claims_raw)
        claims = json.loads(claims_raw)
        exp = claims.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int)):
            raise ValueError("exp")
        principal = Principal(tenant_id=str(claims["tid"]), key_id=str(claims["kid"]),
                              expires_at=float(exp) if exp is not None else None)
    except (ValueError, KeyError, InvalidSignature, TypeError, AttributeError):
        raise Unauthenticated("invalid API key", reason="API_KEY_INVALID") from None
    if _expired(principal.expires_at):
        raise Unauthenticated(f"API key {principal.key_id} expired at {_utc(principal.expires_at)}",
                              reason="API_KEY_EXPIRED", key_id=principal.key_id)
    return principal


def _utc(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts is not None else "-"


class KeyRegistry:
    """The identity database: tenants and key records, revocations included."""

    def __init__(self, url: str, schema: str = "tensafe_identity") -> None:
        self.engine = create_engine(url, schema=schema)
        migrate(self.engine, [IDENTITY_VERSIONS], version_table="alembic_version_identity")

    def ensure_tenant(self, tenant_id: str) -> None:
        if not TENANT_RE.match(tenant_id):
            raise InvalidArgument(
                "tenant", "use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit")
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)).first()
            if not exists:
                conn.execute(tenants.insert().values(tenant_id=tenant_id, created_at=time.time()))

    def create_key(self, issuer: KeyIssuer, tenant_id: str, description: str = "",
                   expires_in: float | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key for ``tenant_id``; with ``expires_in`` (seconds) it is refused after that long."""
        if expires_in is not None and not 1 <= expires_in <= MAX_KEY_LIFETIME_SECONDS:
            raise InvalidArgument("expires_in", f"must be between 1 second and {MAX_KEY_LIFETIME_SECONDS // 86400} "
                                                "days")
        if len(description) > 256:
            raise InvalidArgument("description", "must be at most 256 characters")
        self.ensure_tenant(tenant_id)
        key_id = "key_" + secrets.token_hex(8)
        now = time.time()
        # Whole seconds, as in the signed claims, so that the registry and the key agree exactly.
        expires_at = float(int(now + expires_in)) if expires_in is not None else None
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, tenant_id=tenant_id, description=description, created_at=now, revoked_at=None,
                expires_at=expires_at))
            self._audit(conn, "identity.CreateKey", tenant_id, key_id,
                        {"expires_at": _utc(expires_at)} if expires_at is not None else None)
        return (ApiKeyRecord(key_id, tenant_id, description, now, None, expires_at),
                issuer.issue(key_id, tenant_id, expires_at))

    def revoke(self, key_id: str) -> ApiKeyRecord:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
            if row is None:
                raise NotFound("api key", key_id)
            if row.revoked_at is None:
                conn.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(revoked_at=time.time()))
                self._audit(conn, "identity.RevokeKey", row.tenant_id, key_id)
        return self.get(key_id)

    @staticmethod
    def _audit(conn: sa.Connection, action: str, tenant_id: str, key_id: str,
               details: dict[str, str] | None = None) -> None:
        """Queue the ledger entry in the same transaction as the change (delivered by the server)."""
        from .audit import SUCCESS, build_entry, outbox

        entry = build_entry(service="identity", action=action, tenant_id=tenant_id, key_id="", outcome=SUCCESS,
                            request_id="cli", resource=key_id, details={"via": "tensafe keys", **(details or {})})
        entry.actor = "operator:cli"
        conn.execute(outbox.insert().values(entry_id=entry.entry_id, payload=entry.SerializeToString(),
                                            created_at=time.time()))

    def get(self, key_id: str) -> ApiKeyRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise NotFound("api key", key_id)
        return ApiKeyRecord(row.key_id, row.tenant_id, row.description, row.created_at, row.revoked_at,
                            row.expires_at)

    def list(self, tenant_id: str | None = None) -> list[ApiKeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at)
        if tenant_id:
            query = query.where(api_keys.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return [ApiKeyRecord(r.key_id, r.tenant_id, r.description, r.created_at, r.revoked_at, r.expires_at)
                    for r in conn.execute(query)]

    @classmethod
    def from_config(cls, config: ServerConfig) -> KeyRegistry:
        return cls(config.identity_url(), schema=f"{config.db_schema_prefix}identity")

    def snapshot(self) -> dict[str, tuple[str, bool, float | None]]:
        """key id -> (tenant, revoked, expires_at), the whole registry (it is small: one row per key)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(api_keys.c.key_id, api_keys.c.tenant_id, api_keys.c.revoked_at,
                                          api_keys.c.expires_at))
            return {r.key_id: (r.tenant_id, r.revoked_at is not None, r.expires_at) for r in rows}


class KeyVerifier:
    """Verifies keys locally: signature and expiry with the public key, revocation (and the registry's
    expiry) from a cached registry snapshot."""

    def __init__(self, public_key: Ed25519PublicKey, registry: KeyRegistry, refresh_seconds: float) -> None:
        self._public_key = public_key
        self._registry = registry
        self._refresh = refresh_seconds
        self._lock = threading.Lock()
        self._known: dict[str, tuple[str, bool, float | None]] = {}
        self._loaded_at = float("-inf")
        self._miss_reload_at = float("-inf")

    def _reload(self) -> None:
        self._known = self._registry.snapshot()
        self._loaded_at = time.monotonic()

    def verify(self, api_key: str) -> Principal:
        principal = parse_api_key(api_key, self._public_key)
        with self._lock:
            now = time.monotonic()
            if now - self._loaded_at >= self._refresh:
                self._reload()
            entry = self._known.get(principal.key_id)
            # A key issued after our last load: reload once, but at most every 100 ms so that
            # forged-but-signed ids cannot turn every request into a database read.
            if entry is None and now - self._miss_reload_at >= 0.1:
                self._miss_reload_at = now
                self._reload()
                entry = self._known.get(principal.key_id)
        if entry is None:
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        tenant_id, revoked, expires_at = entry
        if revoked:
            raise Unauthenticated(f"API key {principal.key_id} has been revoked", reason="API_KEY_REVOKED")
        if tenant_id != principal.tenant_id:
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        if _expired(expires_at):
            raise Unauthenticated(f"API key {principal.key_id} expired at {_utc(expires_at)}",
                                  reason="API_KEY_EXPIRED", key_id=principal.key_id)
        return principal

    def claims(self, api_key: str) -> Principal | None:
        """The signed claims of ``api_key`` (signature and expiry checked, no registry lookup), or None.

        Cheap enough for gRPC's dispatch thread, where capacity is assigned before a call runs; the call
        itself is verified in full (revocation included) by :meth:`verify`."""
        try:
            return parse_api_key(api_key, self._public_key)
        except Unauthenticated:
            return None
