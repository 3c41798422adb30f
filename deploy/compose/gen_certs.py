"""One-shot certificate generator of the compose TLS overlay (deploy/compose/tls.yml).

Writes into OUT (default /certs): ca.pem (the mesh CA), and for each of the six services and for `client` (the
SDK) NAME.pem + NAME.key, signed by the CA. Server certificates name the service (its compose host name),
localhost and 127.0.0.1, and a SPIFFE-style identity URI spiffe://tensafe.local/service/NAME. Keys are mode
0600, owned by uid 10001 (the images' user) so that the services can read them as compose secrets. Run twice, it
keeps what is there (delete OUT to rotate).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("trainer", "accountant", "he", "vault", "ledger", "inference")
OWNER = int(os.environ.get("CERT_OWNER_UID", "10001"))
DAYS = int(os.environ.get("CERT_DAYS", "30"))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TenSafe compose"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    if os.geteuid() == 0:
        os.chown(tmp, OWNER, OWNER)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").exists() and all((out / f"{n}.key").exists() for n in (*SERVICES, "client")):
        print(f"certificates in {out} already there")
        return 0
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("TenSafe compose CA")).issuer_name(_name("TenSafe compose CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    for name in (*SERVICES, "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"spiffe://tensafe.local/service/{name}")]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if name != "client":
            sans += [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        _write(out / f"{name}.key", _key_pem(key), 0o600)
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    print(f"wrote ca.pem and {len(SERVICES) + 1} certificates to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")))
