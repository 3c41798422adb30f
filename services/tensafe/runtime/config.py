"""Server settings from ``TENSAFE_*`` environment variables and a ``.env`` file.

Precedence, highest first: explicit overrides passed by the CLI (``--port``,
``--data-dir``), the process environment, the ``.env`` file in the working
directory (or the file named by ``TENSAFE_ENV_FILE``), the defaults below.
Every setting is listed in ``SETTINGS`` so that the README's configuration
table and this module cannot drift apart (a test compares them).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

# One component of a model name (a name may have up to MODEL_NAME_PARTS of them, joined by "/").
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MODEL_NAME_MAX = 128
# TENSAFE_DEVICE / TENSAFE_DTYPE as written; tensafe.common.devices resolves them against what torch sees.
DEVICE = re.compile(r"auto|cpu|cuda(?::\d{1,3})?")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
# The vault's S3 blob store (TENSAFE_BLOB_BUCKET, TENSAFE_BLOB_PREFIX).
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
S3_PREFIX = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?")


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    field: str
    kind: type
    default: Any
    doc: str


# One line per setting: environment variable, field, type, default, meaning.
SETTINGS: tuple[Setting, ...] = (
    Setting("TENSAFE_DATA_DIR", "data_dir", Path, Path(".tensafe"), "Data directory: SQLite files, keys, artifact blobs."),
    Setting("TENSAFE_MODEL_DIR", "model_dir", str, "", "Where the trainer and inference services look up model names; empty means `models` in the data dir."),
    Setting("TENSAFE_MODELS", "models", str, "", "Operator-registered base models outside the model dir: `name=/path` pairs, comma-separated. Tenants name models only by name (these, or directories in the model dir), never by path."),
    Setting("TENSAFE_QUOTA_SESSIONS", "quota_sessions", int, 8, "Open training sessions per tenant (trainer); 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_PRIVATE_COPIES", "quota_private_copies", int, 2, "Open training sessions per tenant that hold their own copy of the base model (LoRA bias `all` or `lora_only`); 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_ADAPTERS", "quota_adapters", int, 8, "Adapters loaded at once per tenant (inference); 0 turns the quota off."),
    Setting("TENSAFE_MAX_SAMPLE_TOKENS", "max_sample_tokens", int, 8192, "Largest Sample/Generate call: prompts x samples x max_tokens; 0 turns the cap off."),
    Setting("TENSAFE_MAX_BATCH_TOKENS", "max_batch_tokens", int, 32768, "Largest batch of a forward, forward_backward or forward_custom call: rows x sequence length; 0 turns the cap off."),
    Setting("TENSAFE_QUOTA_PENDING_OPS", "quota_pending_ops", int, 256, "Operations queued or running per training session; past it a new one is refused until some finish; 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_STORED_MB", "quota_stored_mb", int, 10240, "Encrypted artifact bytes stored per tenant in the vault, in MiB; a put past it is refused while it streams and leaves nothing stored. 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_ARTIFACTS", "quota_artifacts", int, 1000, "Artifacts stored per tenant in the vault; 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_HE_COMPUTATIONS", "quota_he_computations", int, 32, "Unfinished HE computations per tenant (he); finished ones give way to new ones. 0 turns the quota off."),
    Setting("TENSAFE_QUOTA_CALIBRATIONS", "quota_calibrations", int, 2, "Distinct noise calibrations running at once per tenant (accountant); 0 turns the quota off."),
    Setting("TENSAFE_HE_MAX_RANK", "he_max_rank", int, 64, "Largest LoRA rank of a layer the he service loads; 0 turns the cap off."),
    Setting("TENSAFE_HE_MAX_DIM", "he_max_dim", int, 16384, "Largest input or output width of a layer the he service loads; 0 turns the cap off."),
    Setting("TENSAFE_HE_MAX_LAYERS", "he_max_layers", int, 256, "Most layers of one adapter the he service loads; 0 turns the cap off."),
    Setting("TENSAFE_INFERENCE_BACKEND", "inference_backend", str, "hf", "Backend of the inference service when a call names none: `hf` (transformers, CPU) or `vllm` (GPU; needs the `vllm` extra)."),
    Setting("TENSAFE_DEVICE", "device", str, "auto", "Where the trainer and the inference `hf` backend put base models: `auto` (the first CUDA device when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`. A CUDA device this process cannot see stops the service at start (never a silent CPU fallback)."),
    Setting("TENSAFE_DTYPE", "dtype", str, "auto", "dtype of the frozen base weights: `auto` (bfloat16 on a CUDA device that supports it, else float16 on CUDA, float32 on the CPU), `float32`, `bfloat16` or `float16` (CUDA only). LoRA factors, optimizer state and every DP quantity stay float32."),
    Setting("TENSAFE_VLLM_GPU_MEMORY_UTILIZATION", "vllm_gpu_memory_utilization", float, 0.9, "vllm backend: share of GPU memory vLLM may take."),
    Setting("TENSAFE_VLLM_MAX_LORAS", "vllm_max_loras", int, 8, "vllm backend: adapters served at once per base model."),
    Setting("TENSAFE_VLLM_MAX_LORA_RANK", "vllm_max_lora_rank", int, 64, "vllm backend: largest adapter rank accepted."),
    Setting("TENSAFE_MASTER_KEY_FILE", "master_key_file", str, "", "Vault master key: a file of 32 random bytes, mode 0600; empty means `master.key` in the data dir (created by `tensafe up`)."),
    Setting("TENSAFE_MASTER_KEY", "master_key", str, "", "Vault master key as base64 (32 bytes), instead of a file; wins over the file."),
    Setting("TENSAFE_BLOB_DIR", "blob_dir", str, "", "Where the vault keeps encrypted artifact blobs (local blob store); empty means `blobs` in the data dir."),
    Setting("TENSAFE_BLOB_STORE", "blob_store", str, "local", "Where the vault's blobs live: `local` (the blob dir) or `s3` (an S3-compatible bucket, shared by vault replicas; needs the `s3` extra)."),
    Setting("TENSAFE_BLOB_BUCKET", "blob_bucket", str, "", "`s3` blob store: the bucket (required); it must exist."),
    Setting("TENSAFE_BLOB_PREFIX", "blob_prefix", str, "blobs/", "`s3` blob store: key prefix of the vault's objects in the bucket."),
    Setting("TENSAFE_BLOB_ENDPOINT_URL", "blob_endpoint_url", str, "", "`s3` blob store: endpoint of an S3-compatible server (MinIO, Ceph, ...); empty means AWS S3. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance role, ...)."),
    Setting("TENSAFE_BLOB_REGION", "blob_region", str, "", "`s3` blob store: region; empty means the AWS chain's (AWS_REGION, the profile)."),
    Setting("TENSAFE_LEDGER_KEY_FILE", "ledger_key_file", str, "", "Ed25519 key(s) that sign ledger checkpoints (comma-separated to rotate: every key signs); empty means `keys/ledger.key` in the data dir."),
    Setting("TENSAFE_LEDGER_ORIGIN", "ledger_origin", str, "tensafe.local/ledger", "Origin line (log name) of the ledger's signed checkpoints."),
    Setting("TENSAFE_SERVICE_API_KEY", "service_api_key", str, "", "The services' own API key for writing audit entries; empty means the `service_key` file in the data dir."),
    Setting("TENSAFE_HOST", "host", str, "127.0.0.1", "Address the gRPC server binds to."),
    Setting("TENSAFE_PORT", "port", int, 50051, "gRPC port (`tensafe up`, or the service of `tensafe serve`)."),
    Setting("TENSAFE_METRICS_PORT", "metrics_port", int, 9090, "Prometheus metrics port; 0 turns the endpoint off."),
    Setting("TENSAFE_OPENAI_PORT", "openai_port", int, 8001, "OpenAI-compatible HTTP API port (`tensafe up`, `tensafe serve openai`; docs/openai.md); 0 turns it off in `tensafe up`."),
    Setting("TENSAFE_TINKER_PORT", "tinker_port", int, 8000, "Tinker-compatible HTTP API port (`tensafe up`, `tensafe serve tinker`; docs/tinker.md); 0 turns it off in `tensafe up`."),
    Setting("TENSAFE_TINKER_MODELS", "tinker_models", str, "", "Base-model names `tinker` clients may ask for, mapped to local models: `hub/name=local-name,...` (e.g. `meta-llama/Llama-3.2-1B=smollm2`); local names as for TENSAFE_MODELS / TENSAFE_MODEL_DIR."),
    Setting("TENSAFE_TINKER_POLICY_FILE", "tinker_policy_file", str, "", "JSON file of per-tenant (or per-API-key) policies of the Tinker-compatible API, e.g. DP for every model a tenant creates; see docs/tinker.md."),
    Setting("TENSAFE_DB_URL", "db_url", str, "", "SQLAlchemy URL for every service; empty means one SQLite file per service in the data dir. `TENSAFE_<SERVICE>_DB_URL` overrides it per service."),
    Setting("TENSAFE_DB_SCHEMA_PREFIX", "db_schema_prefix", str, "tensafe_", "PostgreSQL only: each service keeps its tables in schema `<prefix><service>`."),
    Setting("TENSAFE_IDENTITY_DB_URL", "identity_db_url", str, "", "Where API key records live; empty means TENSAFE_DB_URL, else `identity.db` in the data dir."),
    Setting("TENSAFE_AUTH_PUBLIC_KEY_FILE", "auth_public_key_file", str, "", "Ed25519 public key that verifies API keys; empty means `keys/issuer.pub` in the data dir."),
    Setting("TENSAFE_AUTH_REFRESH_SECONDS", "auth_refresh_seconds", float, 5.0, "How often a service reloads the key registry (revocations take effect within this time)."),
    Setting("TENSAFE_RATE_LIMIT_RPS", "rate_limit_rps", float, 100.0, "Requests per second allowed per tenant and service (token bucket refill); 0 turns limiting off."),
    Setting("TENSAFE_RATE_LIMIT_BURST", "rate_limit_burst", int, 200, "Token bucket size per tenant and service."),
    Setting("TENSAFE_MAX_MESSAGE_MB", "max_message_mb", int, 64, "Largest gRPC message accepted or sent, in MiB."),
    Setting("TENSAFE_MAX_ARTIFACT_MB", "max_artifact_mb", int, 2048, "Largest artifact (checkpoint or adapter tar, decrypted) the trainer, he and inference services read, in MiB; members of the tar count towards it by their real size."),
    Setting("TENSAFE_WORKERS", "workers", int, 64, "Threads serving tenants' unary calls in one server (streams and calls between services have their own, below)."),
    Setting("TENSAFE_QUOTA_CALLS_PER_TENANT", "quota_calls_per_tenant", int, 16, "Unary calls one tenant may have in flight at once in one server; past it RESOURCE_EXHAUSTED, reason RATE_LIMITED, naming this setting."),
    Setting("TENSAFE_MAX_STREAMS", "max_streams", int, 64, "Streaming calls (a training client's result stream, Generate, artifact uploads and downloads) open at once in one server, all tenants together; each has its own thread, apart from TENSAFE_WORKERS. Past it: RESOURCE_EXHAUSTED naming this setting."),
    Setting("TENSAFE_QUOTA_STREAMS_PER_TENANT", "quota_streams_per_tenant", int, 16, "Streaming calls one tenant may have open at once in one server (each TrainingClient holds one while open). Past it: RESOURCE_EXHAUSTED naming this setting."),
    Setting("TENSAFE_INTERNAL_WORKERS", "internal_workers", int, 16, "Threads reserved for calls between TenSafe's own services (trainer to vault and accountant, audit delivery), so that tenants' calls and streams cannot starve them."),
    Setting("TENSAFE_IDEMPOTENCY_LEASE_SECONDS", "idempotency_lease_seconds", float, 30.0, "A process heartbeats its running idempotent calls; when another process (a replica) stops for this long, its running calls' keys are released so that retries run. A restart on the same address releases its previous run's keys at once."),
    Setting("TENSAFE_GRACE_SECONDS", "grace_seconds", float, 30.0, "On SIGTERM/SIGINT, how long calls in flight may run before they are cancelled."),
    Setting("TENSAFE_KEEPALIVE_SECONDS", "keepalive_seconds", int, 30, "Server keepalive ping interval."),
    Setting("TENSAFE_TLS_CERT_FILE", "tls_cert_file", str, "", "Server certificate (PEM); with the key file it turns TLS on."),
    Setting("TENSAFE_TLS_KEY_FILE", "tls_key_file", str, "", "Server private key (PEM)."),
    Setting("TENSAFE_TLS_CLIENT_CA_FILE", "tls_client_ca_file", str, "", "The mesh CA: set, clients must present a certificate chaining to it (mTLS), and services verify each other against it."),
    Setting("TENSAFE_TRACE_EXPORTER", "trace_exporter", str, "none", "Where spans go: `none`, `console` or `otlp` (needs opentelemetry-exporter-otlp)."),
    Setting("TENSAFE_LOG_LEVEL", "log_level", str, "INFO", "Python log level of the server."),
    Setting("TENSAFE_ACCESS_LOG", "access_log", bool, True, "Log one line per call (method, tenant, code, milliseconds, request id)."),
)

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _parse(setting: Setting, raw: str) -> Any:
    try:
        if setting.kind is bool:
            low = raw.strip().lower()
            if low in _BOOL_TRUE:
                return True
            if low in _BOOL_FALSE:
                return False
            raise ValueError(raw)
        if setting.kind is Path:
            return Path(raw).expanduser()
        return setting.kind(raw)
    except ValueError:
        raise ConfigError(
            f"{setting.env}={raw!r} is not a valid {setting.kind.__name__}"
        ) from None


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    model_dir: str
    models: str
    quota_sessions: int
    quota_private_copies: int
    quota_adapters: int
    max_sample_tokens: int
    max_batch_tokens: int
    quota_pending_ops: int
    quota_stored_mb: int
    quota_artifacts: int
    quota_he_computations: int
    quota_calibrations: int
    he_max_rank: int
    he_max_dim: int
    he_max_layers: int
    inference_backend: str
    device: str
    dtype: str
    vllm_gpu_memory_utilization: float
    vllm_max_loras: int
    vllm_max_lora_rank: int
    master_key_file: str
    master_key: str
    blob_dir: str
    blob_store: str
    blob_bucket: str
    blob_prefix: str
    blob_endpoint_url: str
    blob_region: str
    ledger_key_file: str
    ledger_origin: str
    service_api_key: str
    host: str
    port: int
    metrics_port: int
    openai_port: int
    tinker_port: int
    tinker_models: str
    tinker_policy_file: str
    db_url: str
    db_schema_prefix: str
    identity_db_url: str
    auth_public_key_file: str
    auth_refresh_seconds: float
    rate_limit_rps: float
    rate_limit_burst: int
    max_message_mb: int
    max_artifact_mb: int
    workers: int
    quota_calls_per_tenant: int
    max_streams: int
    quota_streams_per_tenant: int
    internal_workers: int
    idempotency_lease_seconds: float
    grace_seconds: float
    keepalive_seconds: int
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    trace_exporter: str
    log_level: str
    access_log: bool
    # Per-service values that have no single default: DB URLs and peer endpoints.
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict[str, str])

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> ServerConfig:
        """Build the configuration; ``overrides`` (non-None values) win over everything."""
        env = dict(os.environ if environ is None else environ)
        file_name = env_file or env.get("TENSAFE_ENV_FILE") or ".env"
        merged: dict[str, str] = {}
        if Path(file_name).is_file():
            merged.update({k: v for k, v in dotenv_values(file_name).items() if v is not None})
        merged.update(env)
        values: dict[str, Any] = {}
        for s in SETTINGS:
            values[s.field] = _parse(s, merged[s.env]) if s.env in merged else s.default
        for key, val in overrides.items():
            if val is not None:
                values[key] = val
        extra = {
            k: v
            for k, v in merged.items()
            if k.startswith("TENSAFE_") and (k.endswith("_DB_URL") or k.endswith("_ENDPOINT"))
        }
        cfg = cls(**values, extra=extra)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not (0 <= self.port < 65536):
            raise ConfigError(f"TENSAFE_PORT={self.port} must be between 0 (any free port) and 65535")
        if not (0 <= self.metrics_port < 65536):
            raise ConfigError(f"TENSAFE_METRICS_PORT={self.metrics_port} must be between 0 and 65535")
        if not (0 <= self.openai_port < 65536):
            raise ConfigError(f"TENSAFE_OPENAI_PORT={self.openai_port} must be between 0 (off) and 65535")
        if not (0 <= self.tinker_port < 65536):
            raise ConfigError(f"TENSAFE_TINKER_PORT={self.tinker_port} must be between 0 (off) and 65535")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 1:
            raise ConfigError("TENSAFE_RATE_LIMIT_RPS must be >= 0 and TENSAFE_RATE_LIMIT_BURST >= 1")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("TENSAFE_TLS_CERT_FILE and TENSAFE_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("TENSAFE_TLS_CLIENT_CA_FILE (mTLS) needs TENSAFE_TLS_CERT_FILE and TENSAFE_TLS_KEY_FILE")
        if self.trace_exporter not in ("none", "console", "otlp"):
            raise ConfigError(f"TENSAFE_TRACE_EXPORTER={self.trace_exporter!r}: use none, console or otlp")
        if not DEVICE.fullmatch(self.device.strip().lower()):
            raise ConfigError(f"TENSAFE_DEVICE={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype.strip().lower() not in DTYPE_NAMES:
            raise ConfigError(f"TENSAFE_DTYPE={self.dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        if self.inference_backend not in ("hf", "vllm"):
            raise ConfigError(f"TENSAFE_INFERENCE_BACKEND={self.inference_backend!r}: use hf or vllm")
        if self.max_artifact_mb < 1:
            raise ConfigError(f"TENSAFE_MAX_ARTIFACT_MB={self.max_artifact_mb} must be at least 1")
        if self.workers < 2:
            raise ConfigError("TENSAFE_WORKERS must be at least 2")
        for env, value in (("TENSAFE_QUOTA_CALLS_PER_TENANT", self.quota_calls_per_tenant),
                           ("TENSAFE_MAX_STREAMS", self.max_streams),
                           ("TENSAFE_QUOTA_STREAMS_PER_TENANT", self.quota_streams_per_tenant),
                           ("TENSAFE_INTERNAL_WORKERS", self.internal_workers)):
            if value < 1:
                raise ConfigError(f"{env}={value} must be at least 1")
        if self.idempotency_lease_seconds < 1:
            raise ConfigError("TENSAFE_IDEMPOTENCY_LEASE_SECONDS must be at least 1")
        for env, value in (("TENSAFE_QUOTA_SESSIONS", self.quota_sessions),
                           ("TENSAFE_QUOTA_PRIVATE_COPIES", self.quota_private_copies),
                           ("TENSAFE_QUOTA_ADAPTERS", self.quota_adapters),
                           ("TENSAFE_MAX_SAMPLE_TOKENS", self.max_sample_tokens),
                           ("TENSAFE_MAX_BATCH_TOKENS", self.max_batch_tokens),
                           ("TENSAFE_QUOTA_PENDING_OPS", self.quota_pending_ops),
                           ("TENSAFE_QUOTA_STORED_MB", self.quota_stored_mb),
                           ("TENSAFE_QUOTA_ARTIFACTS", self.quota_artifacts),
                           ("TENSAFE_QUOTA_HE_COMPUTATIONS", self.quota_he_computations),
                           ("TENSAFE_QUOTA_CALIBRATIONS", self.quota_calibrations),
                           ("TENSAFE_HE_MAX_RANK", self.he_max_rank),
                           ("TENSAFE_HE_MAX_DIM", self.he_max_dim),
                           ("TENSAFE_HE_MAX_LAYERS", self.he_max_layers)):
            if value < 0:
                raise ConfigError(f"{env}={value} must be >= 0 (0 turns it off)")
        self._validate_blob_store()
        self.registered_models()  # raises ConfigError naming TENSAFE_MODELS when malformed

    def _validate_blob_store(self) -> None:
        """The blob store's settings, from the server's settings only (never from a tenant's request)."""
        if self.blob_store not in ("local", "s3"):
            raise ConfigError(f"TENSAFE_BLOB_STORE={self.blob_store!r}: use local or s3")
        s3_settings = (("TENSAFE_BLOB_BUCKET", self.blob_bucket),
                       ("TENSAFE_BLOB_ENDPOINT_URL", self.blob_endpoint_url),
                       ("TENSAFE_BLOB_REGION", self.blob_region))
        if self.blob_store == "local":  # (with s3, TENSAFE_BLOB_DIR is unused: a chart may set it anyway)
            named = [env for env, value in s3_settings if value]
            if named:
                raise ConfigError(f"{', '.join(named)} set but TENSAFE_BLOB_STORE=local: set TENSAFE_BLOB_STORE=s3 "
                                  "to keep the vault's blobs in S3, or unset them")
            return
        bucket = self.blob_bucket
        if not bucket:
            raise ConfigError("TENSAFE_BLOB_STORE=s3 needs TENSAFE_BLOB_BUCKET")
        if not S3_BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
            raise ConfigError(f"TENSAFE_BLOB_BUCKET={bucket!r} is not a bucket name (3 to 63 lower-case letters, "
                              "digits, '.' and '-', starting and ending with a letter or digit)")
        prefix = self.blob_prefix
        if prefix and (len(prefix) > 512 or not S3_PREFIX.fullmatch(prefix)
                       or any(part in (".", "..") for part in prefix.split("/"))):
            raise ConfigError(f"TENSAFE_BLOB_PREFIX={prefix!r}: use letters, digits, '.', '_', '-' and '/' "
                              "between non-empty parts (not '.' or '..'), at most 512 characters, no leading '/'")
        url = self.blob_endpoint_url
        if url:
            parsed = urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or "@" in parsed.netloc \
                    or parsed.query or parsed.fragment:
                raise ConfigError(f"TENSAFE_BLOB_ENDPOINT_URL={url!r}: use http(s)://host[:port] (credentials "
                                  "come from the AWS credential chain, never from the URL)")
            try:
                _ = parsed.port
            except ValueError:
                raise ConfigError(f"TENSAFE_BLOB_ENDPOINT_URL={url!r}: the port is not a number") from None
        if self.blob_region and not re.fullmatch(r"[a-z0-9-]{1,64}", self.blob_region):
            raise ConfigError(f"TENSAFE_BLOB_REGION={self.blob_region!r} is not a region name")

    def blob_key_prefix(self) -> str:
        """TENSAFE_BLOB_PREFIX with its trailing '/' (empty: the bucket's root)."""
        prefix = self.blob_prefix
        return prefix if not prefix or prefix.endswith("/") else prefix + "/"

    # -- derived values -------------------------------------------------
    def service_db_url(self, service: str) -> str:
        specific = self.extra.get(f"TENSAFE_{service.upper()}_DB_URL")
        if specific:
            return specific
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def registered_models(self) -> dict[str, Path]:
        """TENSAFE_MODELS as {name: absolute path}; the names obey the model-name rules of the trainer."""
        out: dict[str, Path] = {}
        for item in filter(None, (part.strip() for part in self.models.split(","))):
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError(f"TENSAFE_MODELS: {item!r} is not name=/path")
            if not MODEL_NAME.fullmatch(name) or len(name) > MODEL_NAME_MAX:
                raise ConfigError(f"TENSAFE_MODELS: {name!r} is not a model name (letters, digits, '.', '_', '-', "
                                  f"up to {MODEL_NAME_MAX} characters, not starting with '.' or '-')")
            if name in out:
                raise ConfigError(f"TENSAFE_MODELS: {name!r} is registered twice")
            resolved = Path(path).expanduser()
            if not resolved.is_absolute():
                raise ConfigError(f"TENSAFE_MODELS: the path of {name!r} must be absolute")
            out[name] = resolved
        return out

    def identity_url(self) -> str:
        return self.identity_db_url or self.db_url or f"sqlite:///{(self.data_dir / 'identity.db').resolve()}"

    def public_key_path(self) -> Path:
        return Path(self.auth_public_key_file) if self.auth_public_key_file else self.data_dir / "keys" / "issuer.pub"

    def ledger_key_path(self) -> Path:
        """The current (first) ledger signing key."""
        first = self.ledger_key_file.split(",")[0].strip()
        return Path(first) if first else self.data_dir / "keys" / "ledger.key"

    def service_key(self) -> str:
        """The API key services use to append audit entries (tenant ``tensafe-system``)."""
        if self.service_api_key:
            return self.service_api_key
        path = self.data_dir / "service_key"
        return path.read_text().strip() if path.exists() else ""

    def signing_key_path(self) -> Path:
        return self.data_dir / "keys" / "issuer.key"

    def peer_endpoint(self, service: str) -> str | None:
        """Where another service listens in the split form (``TENSAFE_<SERVICE>_ENDPOINT``)."""
        return self.extra.get(f"TENSAFE_{service.upper()}_ENDPOINT")
