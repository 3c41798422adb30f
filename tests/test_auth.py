"""API keys against a running `tensafe up`: missing, bad, forged, revoked, other tenant."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import eventually
from tensafe.api.vault.v1 import vault_pb2
from tensafe.runtime.identity import KeyIssuer
from tg_tinker import AuthenticationError, PermissionDeniedError


def call(client):
    """An authenticated, tenant-scoped call."""
    return client._call("vault", "ListArtifacts", vault_pb2.ListArtifactsRequest())


def assert_admitted(client, tenant: str = "default") -> None:
    """Admitted as `tenant`: a write it makes is listed back to it, and nothing of another tenant's is."""
    art = client.artifacts.put(b"admitted", name="admitted")
    listed = call(client).artifacts
    assert art.artifact_id in {a.artifact_id for a in listed}
    assert {a.tenant_id for a in listed} == {tenant}


def test_valid_key_is_admitted(stack) -> None:
    with stack.client() as client:
        assert_admitted(client)


def test_missing_key(stack) -> None:
    with stack.client(api_key=None) as client:
        with pytest.raises(AuthenticationError) as info:
            call(client)
    assert info.value.code == "API_KEY_MISSING"
    assert info.value.request_id


@pytest.mark.parametrize("bad", ["ts-garbage", "not-a-key", "ts-abc.def"])
def test_malformed_key(stack, bad) -> None:
    with stack.client(api_key=bad) as client, pytest.raises(AuthenticationError) as info:
        call(client)
    assert info.value.code == "API_KEY_INVALID"


def test_key_signed_by_another_issuer_is_refused(stack) -> None:
    forged = KeyIssuer(Ed25519PrivateKey.generate()).issue(key_id="key_0000000000000000", tenant_id="default")
    with stack.client(api_key=forged) as client, pytest.raises(AuthenticationError):
        call(client)


def test_tampered_claims_are_refused(stack) -> None:
    import base64
    import json

    claims_b64, sig = stack.api_key[3:].split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
    claims["tid"] = "other"
    evil = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with stack.client(api_key=f"ts-{evil}.{sig}") as client, pytest.raises(AuthenticationError):
        call(client)


def test_new_key_works_at_once_and_revoked_key_stops(stack) -> None:
    created = stack.cli("keys", "create", "--tenant", "acme", "--description", "ci")
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip().splitlines()[-1]
    assert api_key.startswith("ts-")
    with stack.client(api_key=api_key) as client:
        assert_admitted(client, "acme")  # issued after the server started: found by the reload-on-miss
        listed = stack.cli("keys", "list", "--tenant", "acme")
        key_id = next(ln.split()[0] for ln in listed.stdout.splitlines() if "acme" in ln)
        assert api_key not in listed.stdout  # the registry holds no key material
        revoked = stack.cli("keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr

        def refusal() -> AuthenticationError | None:
            try:
                call(client)
            except AuthenticationError as exc:
                return exc
            return None

        assert eventually(refusal, 5, message="revoked key refused").code == "API_KEY_REVOKED"
    # The default tenant's key is untouched.
    with stack.client() as client:
        assert_admitted(client)


def test_revoking_unknown_key_fails_clearly(stack) -> None:
    out = stack.cli("keys", "revoke", "key_doesnotexist")
    assert out.returncode == 1
    assert "key_doesnotexist" in out.stderr and "not found" in out.stderr


def test_tenant_id_must_match_the_key(stack) -> None:
    with stack.client(tenant_id="someone-else") as client, pytest.raises(PermissionDeniedError) as info:
        call(client)
    assert info.value.code == "TENANT_MISMATCH"
    with stack.client(tenant_id="default") as client:
        assert_admitted(client)


def test_health_needs_no_key(stack) -> None:
    with stack.client(api_key=None) as client:
        assert set(client.check_health().values()) == {"SERVING"}


def test_bad_tenant_name_is_refused(stack) -> None:
    out = stack.cli("keys", "create", "--tenant", "Bad Name!")
    assert out.returncode == 1
    assert "tenant" in out.stderr
