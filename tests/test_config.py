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


# Every form users paste, through the one parser (base_url, TS_BASE_URL and each override): url -> (target, tls).
ACCEPTED_URLS = [
    ("localhost:50051", "localhost:50051", False),
    ("127.0.0.1:50051", "127.0.0.1:50051", False),
    ("[::1]:50051", "[::1]:50051", False),
    ("trainer.svc.cluster.local:443", "trainer.svc.cluster.local:443", False),
    ("  host:1  ", "host:1", False),                       # surrounding whitespace is trimmed
    ("host:1/", "host:1", False),
    ("http:8080", "http:8080", False),                       # a host named "http" (as before)
    ("host:1\n", "host:1", False),                          # a newline from `cat file` is trimmed too
    ("https://api.example.com", "api.example.com:443", True),
    ("https://api.example.com/", "api.example.com:443", True),
    ("https://api.example.com:8443", "api.example.com:8443", True),
    ("HTTPS://api.example.com", "api.example.com:443", True),
    ("https://[2001:db8::1]", "[2001:db8::1]:443", True),
    ("grpcs://vault.example", "vault.example:443", True),
    ("grpcs://vault.example:443", "vault.example:443", True),
    ("http://127.0.0.1:50051", "127.0.0.1:50051", False),
    ("http://gateway", "gateway:80", False),
    ("http://[::1]:50051/", "[::1]:50051", False),
    ("grpc://host:50051", "host:50051", False),
]

REFUSED_URLS = [
    ("", "empty URL"),
    ("   ", "empty URL"),
    ("no-port", "no port"),
    ("localhost:", "empty port"),
    ("host:abc", "not a number"),
    ("host:0", "out of range"),
    ("host:65536", "out of range"),
    ("host:99999999999999999999", "out of range"),
    ("https://host:-1", "not a number"),
    ("host:\u00b9\u00b2", "not a number"),                 # unicode digits are not a port
    ("https://host/v1", "path"),
    ("http://host:80/api/", "path"),
    ("https://host?x=1", "query"),
    ("https://host#frag", "fragment"),
    ("https://user:secret@host", "user-info"),
    ("user@host:1", "user-info"),
    ("ftp://host:21", "unknown scheme"),
    ("unix:///tmp/tensafe.sock", "unknown scheme"),
    ("https://", "no host"),
    ("http://:8080", "no host"),
    ("grpc://host", "needs a port"),
    ("ho st:1", "whitespace"),
    ("https://host :443", "whitespace"),
    ("host\t:1", "whitespace"),
    ("::1:50051", "brackets"),
    ("[::1:50051", "unclosed"),
    ("[not-ipv6]:1", "not an IPv6 address"),
    ("[::1]50051", "after ']'"),
    ("bad_host!:1", "not a host name"),
    ("a..b:1", "not a host name"),
    ("https:/host", "'://'"),
    ("http:host:80", "'://'"),
    ("https:host", "'://'"),
]


@pytest.mark.parametrize("url,target,tls", ACCEPTED_URLS)
def test_endpoint_accepts_the_forms_users_paste(url, target, tls) -> None:
    assert Endpoint.parse(url) == Endpoint(target, tls=tls)
    for kwargs in ({"base_url": url}, {"endpoints": {"he": url}}):   # argument, per-service argument
        cfg = ClientConfig.resolve(environ={}, env_file=None, **kwargs)
        service = "he" if "endpoints" in kwargs else "trainer"
        assert cfg.endpoint(service) == Endpoint(target, tls=tls)
    for var, service in (("TS_BASE_URL", "vault"), ("TS_LEDGER_URL", "ledger")):  # environment
        cfg = ClientConfig.resolve(environ={var: url}, env_file=None)
        assert cfg.endpoint(service) == Endpoint(target, tls=tls)


@pytest.mark.parametrize("url,reason", REFUSED_URLS)
def test_endpoint_refuses_other_forms_naming_the_field(url, reason) -> None:
    with pytest.raises(ValidationError) as info:
        Endpoint.parse(url)
    assert info.value.field == "base_url"
    message = str(info.value)
    assert reason in message and "https://host[:port]" in message and "host:port" in message, message
    assert "secret" not in message                                     # a pasted password is not echoed


@pytest.mark.parametrize("url", ["https://host/v1", "ftp://host:21", "host:abc", "user@host:1"])
def test_every_url_setting_names_its_own_field(tmp_path: Path, url) -> None:
    """The same refusal for the argument, TS_BASE_URL (environment or .env), endpoints= and TS_<SERVICE>_URL."""
    cases = [({"base_url": url}, {}, "base_url"),
             ({}, {"TS_BASE_URL": url}, "TS_BASE_URL"),
             ({"endpoints": {"inference": url}}, {}, "endpoints.inference"),
             ({}, {"TS_TRAINER_URL": url}, "TS_TRAINER_URL")]
    for kwargs, environ, field in cases:
        with pytest.raises(ValidationError) as info:
            ClientConfig.resolve(environ=environ, env_file=None, **kwargs)
        assert info.value.field == field and field in str(info.value)
    env_file = tmp_path / ".env"
    env_file.write_text(f"TS_BASE_URL={url}\n")
    with pytest.raises(ValidationError) as info:
        ClientConfig.resolve(environ={}, env_file=env_file)
    assert info.value.field == "TS_BASE_URL"


def test_the_base_url_argument_wins_over_the_environment() -> None:
    cfg = ClientConfig.resolve(base_url="https://api.example.com", environ={"TS_BASE_URL": "ftp://ignored"},
                               env_file=None)
    assert cfg.endpoint("accountant") == Endpoint("api.example.com:443", tls=True)   # the argument wins


def test_http_url_reaches_a_live_stack(stack) -> None:
    """``http://127.0.0.1:<port>`` as pasted from a browser or a proxy config connects in plaintext."""
    with stack.client(base_url=f"http://127.0.0.1:{stack.port}/") as client:
        assert set(client.check_health().values()) == {"SERVING"}
