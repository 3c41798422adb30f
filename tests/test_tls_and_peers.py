"""TLS, mTLS, and a call from one service to another carrying identity and trace."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tensafe.runtime import context as call_context
from tensafe.runtime.bootstrap import initialise_data_dir
from tensafe.runtime.config import ServerConfig
from tensafe.runtime.peers import PeerChannels, forward_metadata
from tensafe.runtime.server import TensafeServer
from tg_tinker import ServiceClient


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def make_pki(tmp: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1, and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tensafe test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, san: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False).sign(ca_key, hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    server_cert, server_key = leaf("localhost", [x509.DNSName("localhost"),
                                                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("tenant-client", [x509.DNSName("client")])
    return {
        "ca": _write(tmp / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "server_cert": _write(tmp / "server.pem", server_cert), "server_key": _write(tmp / "server.key", server_key),
        "client_cert": _write(tmp / "client.pem", client_cert), "client_key": _write(tmp / "client.key", client_key),
    }


def tls_server(tmp: Path, pki: dict[str, str], mutual: bool) -> tuple[TensafeServer, str]:
    config = ServerConfig.load(environ={}, env_file=tmp / "none.env", data_dir=tmp / "data", port=0,
                               metrics_port=0)
    api_key, _ = initialise_data_dir(config)
    config = dataclasses.replace(config, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                 tls_client_ca_file=pki["ca"] if mutual else "")
    server = TensafeServer(config, ["vault"])
    return server, api_key


def test_tls_server_and_sdk(tmp_path, monkeypatch) -> None:
    pki = make_pki(tmp_path)
    server, api_key = tls_server(tmp_path, pki, mutual=False)
    server.start()
    try:
        monkeypatch.setenv("TS_CA_FILE", pki["ca"])
        # The forms users paste: https:// and grpcs:// both mean TLS.
        for scheme in ("https", "grpcs"):
            with ServiceClient(api_key=api_key, base_url=f"{scheme}://localhost:{server.port}", retry_count=0) as c:
                assert c.check_health(timeout=5)["vault"] == "SERVING"
                assert c.config.endpoint("vault").tls
        # A plaintext client cannot talk to a TLS server.
        with ServiceClient(api_key=api_key, base_url=f"localhost:{server.port}", retry_count=0) as c:
            assert c.check_health(timeout=2)["vault"] != "SERVING"
    finally:
        server.stop(0)


def test_mtls_requires_a_client_certificate(tmp_path, monkeypatch) -> None:
    pki = make_pki(tmp_path)
    server, api_key = tls_server(tmp_path, pki, mutual=True)
    server.start()
    try:
        monkeypatch.setenv("TS_CA_FILE", pki["ca"])
        url = f"grpcs://localhost:{server.port}"
        with ServiceClient(api_key=api_key, base_url=url, retry_count=0) as c:
            assert c.check_health(timeout=2)["vault"] != "SERVING"
        monkeypatch.setenv("TS_CLIENT_CERT_FILE", pki["client_cert"])
        monkeypatch.setenv("TS_CLIENT_KEY_FILE", pki["client_key"])
        with ServiceClient(api_key=api_key, base_url=url, retry_count=0) as c:
            assert c.check_health(timeout=5)["vault"] == "SERVING"
    finally:
        server.stop(0)


@pytest.mark.parametrize("mutual", [False, True], ids=["plaintext", "mtls"])
def test_peer_call_carries_tenant_request_id_and_trace(tmp_path, mutual) -> None:
    """Service A calls service B for the caller: B sees the caller's tenant, request id and trace."""
    from opentelemetry import trace

    pki = make_pki(tmp_path)
    if mutual:
        server, api_key = tls_server(tmp_path, pki, mutual=True)
    else:
        config = ServerConfig.load(environ={}, env_file=tmp_path / "none.env", data_dir=tmp_path / "data",
                                   port=0, metrics_port=0)
        api_key, _ = initialise_data_dir(config)
        server = TensafeServer(config, [])
    local = f"{'localhost' if mutual else '127.0.0.1'}:{server.port}"
    peers = PeerChannels(server.config, "a", local, frozenset({"b"}))
    seen: dict[str, str] = {}

    def handle_b(request: bytes, context) -> bytes:
        ctx = call_context.current()
        seen.update(tenant=ctx.principal.tenant_id, request_id=ctx.request_id,
                    trace=format(trace.get_current_span().get_span_context().trace_id, "032x"))
        return b"b-ok"

    def handle_a(request: bytes, context) -> bytes:
        seen["a_trace"] = format(trace.get_current_span().get_span_context().trace_id, "032x")
        return peers.channel("b").unary_unary("/tensafe.test.B/Run")(b"", metadata=forward_metadata(), timeout=5)

    server.grpc_server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("tensafe.test.A", {"Run": grpc.unary_unary_rpc_method_handler(handle_a)}),
        grpc.method_handlers_generic_handler("tensafe.test.B", {"Run": grpc.unary_unary_rpc_method_handler(handle_b)}),
    ))
    server.start()
    try:
        if mutual:
            creds = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes(), Path(pki["client_key"]).read_bytes(),
                                                 Path(pki["client_cert"]).read_bytes())
            channel = grpc.secure_channel(local, creds)
        else:
            channel = grpc.insecure_channel(local)
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        out = channel.unary_unary("/tensafe.test.A/Run")(b"", timeout=10, metadata=(
            ("authorization", f"Bearer {api_key}"), ("x-request-id", "req-42"),
            ("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")))
        channel.close()
        assert out == b"b-ok"
        assert seen == {"a_trace": trace_id, "tenant": "default", "request_id": "req-42", "trace": trace_id}
    finally:
        peers.close()
        server.stop(0)


def test_missing_peer_endpoint_is_a_clear_error(tmp_path) -> None:
    config = ServerConfig.load(environ={}, env_file=tmp_path / "none.env", data_dir=tmp_path)
    peers = PeerChannels(config, "trainer", "127.0.0.1:1", frozenset({"trainer"}))
    with pytest.raises(RuntimeError, match="TENSAFE_VAULT_ENDPOINT"):
        peers.channel("vault")
