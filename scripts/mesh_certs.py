"""Mint the service mesh's CA and one SPIFFE-style certificate per identity.

    python scripts/mesh_certs.py OUT_DIR [--policy deploy/mesh/policy.yaml] [--identity NAME ...]
                                 [--dns NAME ...] [--ip ADDRESS ...] [--days 30]

The identities are the callers of the policy table (deploy/mesh/policy.yaml: the six services and the
edge proxy), plus any ``--identity``. Each certificate carries the URI SAN
``spiffe://<trust_domain>/ns/<namespace>/sa/<name>`` (what the sidecars' RBAC filters match), the DNS
name ``<name>`` and any ``--dns``/``--ip`` given, and serves both as a server and as a client
certificate. Written: ``ca.pem`` (the trust bundle), ``ca.key``, ``<name>.pem`` and ``<name>.key``
(keys mode 0600). An existing ``ca.pem``/``ca.key`` in OUT_DIR is reused, so that identities can be
added later; certificates are always minted anew.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "deploy" / "mesh" / "policy.yaml"


def spiffe_id(trust_domain: str, namespace: str, name: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}"


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_or_create_ca(out: Path, trust_domain: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), "ca.key must be an EC key"
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TenSafe"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} mesh CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_path, _key_pem(key), secret=True)
    return cert, key


def mint(out: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, uri: str,
         dns: list[str], ips: list[str], days: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), x509.DNSName(name)]
    sans += [x509.DNSName(d) for d in dns if d != name]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TenSafe"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / f"{name}.key", _key_pem(key), secret=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for the CA, certificates and keys")
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="the mesh policy table")
    parser.add_argument("--identity", action="append", default=[], help="an extra identity (repeatable)")
    parser.add_argument("--dns", action="append", default=[], help="an extra DNS SAN on every certificate")
    parser.add_argument("--ip", action="append", default=[], help="an extra IP SAN on every certificate")
    parser.add_argument("--days", type=int, default=30, help="validity of new certificates (default 30)")
    args = parser.parse_args(argv)
    policy = yaml.safe_load(args.policy.read_text())
    td, ns = policy["trust_domain"], policy["namespace"]
    names = list(dict.fromkeys([*policy["callers"], *args.identity]))
    args.out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = load_or_create_ca(args.out, td, max(args.days, 1) * 2)
    for name in names:
        mint(args.out, ca, ca_key, name, spiffe_id(td, ns, name), args.dns, args.ip, args.days)
    print(f"minted {len(names)} certificates under {args.out} ({', '.join(names)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
