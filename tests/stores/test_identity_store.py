"""KeyRegistry (tensafe.runtime.identity, the identity database) below the stack, on SQLite and PostgreSQL."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import BACKENDS, drop_schemas
from tensafe.api.ledger.v1 import ledger_pb2
from tensafe.runtime.audit import outbox
from tensafe.runtime.errors import InvalidArgument, NotFound, Unauthenticated
from tensafe.runtime.identity import KeyIssuer, KeyRegistry, KeyVerifier, load_public_key, parse_api_key


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> KeyRegistry:
    if request.param == "sqlite":
        registry = KeyRegistry(f"sqlite:///{tmp_path / 'identity.db'}")
    else:
        prefix = f"st{secrets.token_hex(4)}_"
        request.addfinalizer(lambda: drop_schemas(prefix))
        registry = KeyRegistry(request.getfixturevalue("pg_url"), schema=f"{prefix}identity")
    request.addfinalizer(registry.engine.dispose)
    return registry


@pytest.fixture(scope="module")
def issuer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("issuer")


@pytest.fixture(scope="module")
def issuer(issuer_dir) -> KeyIssuer:
    return KeyIssuer.load_or_create(issuer_dir / "signing.key", issuer_dir / "signing.pub")


@pytest.fixture(scope="module")
def public_key(issuer, issuer_dir) -> Ed25519PublicKey:
    return load_public_key(issuer_dir / "signing.pub")


def audited(registry: KeyRegistry) -> list[tuple[str, str, str]]:
    with registry.engine.connect() as conn:
        payloads = conn.execute(sa.select(outbox.c.payload).order_by(outbox.c.seq)).scalars().all()
    entries = [ledger_pb2.AuditEntry.FromString(p) for p in payloads]
    return [(e.action, e.tenant_id, e.resource_id) for e in entries]


class TestKeyRegistry:
    def test_a_key_round_trip(self, store: KeyRegistry, issuer: KeyIssuer, public_key: Ed25519PublicKey) -> None:
        record, api_key = store.create_key(issuer, "acme", "ci key", expires_in=3600)
        assert store.get(record.key_id) == record
        assert (record.tenant_id, record.description, record.revoked_at) == ("acme", "ci key", None)
        assert record.expires_at == int(record.expires_at) and 3590 < record.expires_at - record.created_at <= 3600
        principal = parse_api_key(api_key, public_key)
        assert (principal.tenant_id, principal.key_id, principal.expires_at) == ("acme", record.key_id,
                                                                                 record.expires_at)
        assert store.snapshot() == {record.key_id: ("acme", False, record.expires_at)}
        assert audited(store) == [("identity.CreateKey", "acme", record.key_id)]

    def test_bad_values_store_nothing(self, store: KeyRegistry, issuer: KeyIssuer) -> None:
        for tenant in ("", "Acme", "-acme", "a" * 64, "a b"):
            with pytest.raises(InvalidArgument):
                store.create_key(issuer, tenant)
        with pytest.raises(InvalidArgument):
            store.create_key(issuer, "acme", "d" * 257)
        for seconds in (0, 11 * 366 * 86400):
            with pytest.raises(InvalidArgument):
                store.create_key(issuer, "acme", expires_in=seconds)
        assert store.list() == [] and audited(store) == []
        with pytest.raises(NotFound):
            store.get("key_missing")

    def test_keys_are_listed_per_tenant_in_creation_order(self, store: KeyRegistry, issuer: KeyIssuer) -> None:
        made = [store.create_key(issuer, tenant)[0] for tenant in ("acme", "globex", "acme", "acme")]
        assert store.list() == made
        assert store.list("acme") == [made[0], made[2], made[3]]
        assert store.list("globex") == [made[1]]
        assert store.list("initech") == []
        assert len({r.key_id for r in made}) == 4

    def test_revoke_once_and_audited_once(self, store: KeyRegistry, issuer: KeyIssuer) -> None:
        record, _ = store.create_key(issuer, "acme")
        kept, _ = store.create_key(issuer, "acme")
        revoked = store.revoke(record.key_id)
        assert revoked.revoked_at is not None and revoked.key_id == record.key_id
        assert store.revoke(record.key_id).revoked_at == revoked.revoked_at  # a second revoke changes nothing
        assert store.get(kept.key_id).revoked_at is None
        with pytest.raises(NotFound):
            store.revoke("key_missing")
        assert store.snapshot()[record.key_id] == ("acme", True, None)
        assert [a for a, _, k in audited(store) if k == record.key_id] == ["identity.CreateKey", "identity.RevokeKey"]

    def test_the_verifier_follows_the_registry(self, store: KeyRegistry, issuer: KeyIssuer,
                                               public_key: Ed25519PublicKey) -> None:
        verifier = KeyVerifier(public_key, store, refresh_seconds=0)
        record, api_key = store.create_key(issuer, "acme")
        assert verifier.verify(api_key).key_id == record.key_id
        store.revoke(record.key_id)
        with pytest.raises(Unauthenticated, match="revoked"):
            verifier.verify(api_key)
        # Signed by the issuer but not in the registry (e.g. the registry was restored from a backup).
        with pytest.raises(Unauthenticated, match="unknown"):
            verifier.verify(issuer.issue("key_unregistered", "acme"))
        # Claims naming another tenant than the record are refused.
        other, _ = store.create_key(issuer, "globex")
        with pytest.raises(Unauthenticated, match="invalid"):
            verifier.verify(issuer.issue(other.key_id, "acme"))
