"""First start in a data directory: keys and the default tenant."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .config import ServerConfig
from .identity import KeyIssuer, KeyRegistry

DEFAULT_TENANT = "default"
# The services' own identity: the only tenant allowed to append audit entries.
SYSTEM_TENANT = "tensafe-system"


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def master_key_path(config: ServerConfig) -> Path:
    return config.data_dir / "master.key"


def initialise_data_dir(config: ServerConfig) -> tuple[str, bool]:
    """Create what a development stack needs, once; return (default tenant's API key, created now?).

    The development master key is 32 random bytes in ``master.key`` (mode 0600);
    production deployments supply theirs through the vault's configuration instead.
    """
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if not master_key_path(config).exists():
        _write_secret(master_key_path(config), secrets.token_bytes(32))
    issuer = KeyIssuer.load_or_create(config.signing_key_path(), config.public_key_path())
    if not config.ledger_key_path().exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        config.ledger_key_path().parent.mkdir(parents=True, exist_ok=True)
        _write_secret(config.ledger_key_path(), Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    service_key_file = data_dir / "service_key"
    if not service_key_file.exists():
        registry = KeyRegistry.from_config(config)
        _, service_key = registry.create_key(issuer, SYSTEM_TENANT, "services: audit delivery")
        registry.engine.dispose()
        _write_secret(service_key_file, (service_key + "\n").encode())
    key_file = data_dir / "api_key"
    if key_file.exists():
        return key_file.read_text().strip(), False
    registry = KeyRegistry.from_config(config)
    _, api_key = registry.create_key(issuer, DEFAULT_TENANT, "created by tensafe up")
    registry.engine.dispose()
    _write_secret(key_file, (api_key + "\n").encode())
    return api_key, True
