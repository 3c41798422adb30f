"""Configuration precedence and validation, server and SDK, and the README's reference table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from tensafe.runtime.config import SETTINGS, ConfigError, ServerConfig
from tg_tinker import ValidationError
from tg_tinker.config import ClientConfig, Endpoint


def test_server_precedence_override_env_file_default(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("TENSAFE_PORT=6000\nTENSAFE_RATE_LIMIT_RPS=7\nTENSAFE_HOST=0.0.0.0\n")
    cfg = ServerConfig.load(environ={"TENSAFE_PORT": "6001", "TENSAFE_RATE_LIMIT_RPS": "8"}, env_file=env_file,
                            port=6002)
    assert cfg.port == 6002                 # explicit override (CLI flag)
    assert cfg.rate_limit_rps == 8.0        # environment beats .env
    assert cfg.host == "0.0.0.0"            # .env beats the default
    assert cfg.metrics_port == 9090         # default
    assert cfg.access_log is True


def test_server_rejects_bad_values_naming_the_variable(tmp_path: Path) -> None:
    none = tmp_path / "none.env"
    with pytest.raises(ConfigError, match="TENSAFE_PORT"):
        ServerConfig.load(environ={"TENSAFE_PORT": "abc"}, env_file=none)
    with pytest.raises(ConfigError, match="TENSAFE_PORT"):
        ServerConfig.load(environ={"TENSAFE_PORT": "70000"}, env_file=none)
    with pytest.raises(ConfigError, match="TENSAFE_ACCESS_LOG"):
        ServerConfig.load(environ={"TENSAFE_ACCESS_LOG": "maybe"}, env_file=none)
    with pytest.raises(ConfigError, match="TENSAFE_TLS_KEY_FILE"):
        ServerConfig.load(environ={"TENSAFE_TLS_CERT_FILE": "/x.pem"}, env_file=none)
    with pytest.raises(ConfigError, match="TENSAFE_TRACE_EXPORTER"):
        ServerConfig.load(environ={"TENSAFE_TRACE_EXPORTER": "jaeger"}, env_file=none)


def test_service_database_urls(tmp_path: Path) -> None:
    none = tmp_path / "none.env"
    cfg = ServerConfig.load(environ={}, env_file=none, data_dir=tmp_path)
    assert cfg.service_db_url("vault") == f"sqlite:///{(tmp_path / 'vault.db').resolve()}"
    assert cfg.identity_url() == f"sqlite:///{(tmp_path / 'identity.db').resolve()}"
    cfg = ServerConfig.load(environ={"TENSAFE_DB_URL": "postgresql://h/db",
                                     "TENSAFE_LEDGER_DB_URL": "postgresql://h/ledger",
                                     "TENSAFE_VAULT_ENDPOINT": "vault:50051"}, env_file=none)
    assert cfg.service_db_url("vault") == "postgresql://h/db"
    assert cfg.service_db_url("ledger") == "postgresql://h/ledger"
    assert cfg.identity_url() == "postgresql://h/db"
    assert cfg.peer_endpoint("vault") == "vault:50051"
    assert cfg.peer_endpoint("ledger") is None


def test_readme_configuration_table_matches_settings() -> None:
    readme = (REPO / "README.md").read_text()
    rows = [re.match(r"\| `(TENSAFE_[A-Z_]+)` \| `([^`]*)` \|", ln) for ln in readme.splitlines()
            if ln.startswith("| `TENSAFE_")]
    assert all(rows), "every configuration row must be | `VAR` | `default` | meaning |"
    assert [m.group(1) for m in rows] == [s.env for s in SETTINGS]


def test_client_precedence_argument_env_dotenv_default(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("TS_API_KEY=from-file\nTS_BASE_URL=file-host:1\nTS_TENANT_ID=file-tenant\nTS_TIMEOUT=11\n")
    cfg = ClientConfig.resolve(api_key="from-arg", environ={"TS_BASE_URL": "env-host:2", "TS_TIMEOUT": "12"},
                               env_file=env_file)
    assert cfg.api_key == "from-arg"
    assert cfg.base_url == "env-host:2"
    assert cfg.tenant_id == "file-tenant"
    assert cfg.timeout == 12.0
    assert cfg.retry.count == 3
    default = ClientConfig.resolve(environ={}, env_file=tmp_path / "missing.env")
    assert default.base_url == "localhost:50051" and default.api_key is None and default.timeout == 300.0


def test_client_per_service_endpoints(tmp_path: Path) -> None:
    cfg = ClientConfig.resolve(environ={"TS_VAULT_URL": "grpcs://vault.example:443", "TS_LEDGER_URL": "l:1"},
                               endpoints={"ledger": "l:2"}, env_file=None)
    assert cfg.endpoint("vault") == Endpoint("vault.example:443", tls=True)
    assert cfg.endpoint("ledger") == Endpoint("l:2", tls=False)
    assert cfg.endpoint("trainer") == Endpoint("localhost:50051", tls=False)


@pytest.mark.parametrize("kwargs,field", [
    ({"base_url": "no-port"}, "base_url"),
    ({"timeout": -1}, "timeout"),
    ({"retry_count": -1}, "retry_count"),
    ({"endpoints": {"bogus": "h:1"}}, "endpoints"),
    ({"endpoints": {"vault": "h:notaport"}}, "endpoints.vault"),
])
def test_client_rejects_bad_settings(kwargs, field) -> None:
    with pytest.raises(ValidationError) as info:
        ClientConfig.resolve(environ={}, env_file=None, **kwargs)
    assert info.value.field == field
