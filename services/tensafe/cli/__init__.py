"""The ``tensafe`` command: run the stack, run one service, manage API keys."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning threads starve the
# gRPC and worker threads whenever the CPU is shared (measured on 2 cores: a queue of 60 tiny training ops
# took 20-25 s with spinning threads and 0.2 s without). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tensafe.runtime.config import ConfigError, ServerConfig
from tg_tinker.services import SERVICE_NAMES

# Top-level modules the `server` extra of pyproject.toml installs: a command that finds one missing says what to
# install instead of tracing back.
SERVER_EXTRA_MODULES = frozenset({
    "alembic", "cryptography", "dp_accounting", "fastapi", "grpc_reflection", "opacus", "opentelemetry", "peft",
    "prometheus_client", "psycopg", "pydantic", "safetensors", "sqlalchemy", "starlette", "tenseal", "tokenizers",
    "torch", "tqdm", "transformers", "uvicorn",
})
SERVER_EXTRA_HINT = "pip install 'tensafe[server]'"
# HTTP edges `tensafe serve` runs besides the six services, and the services each one calls.
HTTP_EDGES = {"openai": ("inference", "ledger"), "tinker": ("trainer", "inference", "vault", "ledger")}


def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.load(
        data_dir=Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        port=getattr(args, "port", None),
        host=getattr(args, "host", None),
        metrics_port=getattr(args, "metrics_port", None),
    )


def _logging(config: ServerConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_up(args: argparse.Namespace) -> int:
    from tensafe.runtime.bootstrap import DEFAULT_TENANT, initialise_data_dir
    from tensafe.runtime.server import TensafeServer

    config = _config(args)
    _logging(config)
    api_key, created = initialise_data_dir(config)
    server = TensafeServer(config, SERVICE_NAMES)
    word = "created" if created else "reusing"
    print(f"TenSafe is up on {config.host}:{server.port} (data dir {config.data_dir.resolve()})")
    print(f"services: {', '.join(SERVICE_NAMES)}")
    if config.openai_port:
        from tensafe.openai import openai_server

        front = openai_server(config, local_endpoint=server.local_endpoint, local_services=frozenset(SERVICE_NAMES))
        server.add_edge(front)
        print(f"OpenAI-compatible API: {front.url}/v1 (docs/openai.md)")
    if config.tinker_port:
        from tensafe.tinker import TinkerServer

        tinker = TinkerServer(config, local_endpoint=server.local_endpoint)
        server.add_edge(tinker)
        print(f"Tinker-compatible API: {tinker.url} (TINKER_BASE_URL; API key tml-<key>; docs/tinker.md)")
    print(f"{word} API key of tenant '{DEFAULT_TENANT}', stored in {config.data_dir / 'api_key'}:")
    print(api_key, flush=True)
    server.serve_until_signal()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tensafe.runtime.server import TensafeServer

    config = _config(args)
    _logging(config)
    if args.service == "tinker":
        return _serve_tinker(args, config)
    if args.service in HTTP_EDGES:
        return _serve_edge(args, config)
    server = TensafeServer(config, [args.service])
    print(f"tensafe {args.service} serving on {config.host}:{server.port}", flush=True)
    server.serve_until_signal()
    return 0


def _serve_edge(args: argparse.Namespace, config: ServerConfig) -> int:
    """`tensafe serve openai`: the HTTP edge alone, on --port (default its TENSAFE_*_PORT), calling the services
    at their TENSAFE_<SERVICE>_ENDPOINT."""
    missing = [f"TENSAFE_{s.upper()}_ENDPOINT" for s in HTTP_EDGES[args.service] if not config.peer_endpoint(s)]
    if missing:
        print(f"error: `tensafe serve {args.service}` needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    from tensafe.openai import openai_server

    port = args.port if args.port is not None else config.openai_port
    front = openai_server(config, port=port)
    print(f"tensafe {args.service} serving on {front.url}/v1", flush=True)
    front.serve_until_signal()
    return 0


def _serve_tinker(args: argparse.Namespace, config: ServerConfig) -> int:
    """`tensafe serve tinker`: the Tinker-compatible API alone, on --port (default TENSAFE_TINKER_PORT), calling
    the services at their TENSAFE_<SERVICE>_ENDPOINT, else a stack on TENSAFE_PORT of this host."""
    from tensafe.tinker import TinkerServer

    port = args.port if args.port is not None else config.tinker_port
    server = TinkerServer(config, local_endpoint=f"127.0.0.1:{ServerConfig.load().port}", port=port)
    print(f"tensafe tinker serving on {server.url}", flush=True)
    server.serve_until_signal()
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from tensafe.runtime.bootstrap import initialise_data_dir

    config = _config(args)
    api_key, created = initialise_data_dir(config)
    print(f"data dir {config.data_dir.resolve()} {'initialised' if created else 'already initialised'}")
    print(api_key)
    return 0


def _registry(config: ServerConfig):
    from tensafe.runtime.identity import KeyRegistry

    return KeyRegistry.from_config(config)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tensafe.runtime.identity import KeyIssuer

    config = _config(args)
    if not config.signing_key_path().exists():
        print(f"error: no key issuer in {config.data_dir}: run `tensafe init` or `tensafe up` first", file=sys.stderr)
        return 2
    try:
        expires_in = parse_duration(args.expires_in) if args.expires_in else None
    except ValueError as exc:
        print(f"error: --expires-in: {exc}", file=sys.stderr)
        return 2
    issuer = KeyIssuer.load_or_create(config.signing_key_path(), config.public_key_path())
    record, api_key = _registry(config).create_key(issuer, args.tenant, args.description or "", expires_in)
    until = f", expires {_when(record.expires_at)} UTC" if record.expires_at else ""
    print(f"created key {record.key_id} for tenant {record.tenant_id}{until}; it is shown once, store it safely:")
    print(api_key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    record = _registry(_config(args)).revoke(args.key_id)
    print(f"revoked key {record.key_id} of tenant {record.tenant_id}")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90`` (seconds), ``30m``, ``1h``, ``7d`` -> seconds."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use a positive number of seconds, or 30m, 1h, 7d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_keys_list(args: argparse.Namespace) -> int:
    records = _registry(_config(args)).list(args.tenant)
    now = time.time()
    print(f"{'KEY ID':22} {'TENANT':20} {'CREATED (UTC)':20} {'EXPIRES (UTC)':30} {'REVOKED (UTC)':20} DESCRIPTION")
    for r in records:
        expires = _when(r.expires_at) + (" (expired)" if r.expires_at and r.expires_at <= now else "")
        print(f"{r.key_id:22} {r.tenant_id:20} {_when(r.created_at):20} {expires:30} {_when(r.revoked_at):20} "
              f"{r.description}")
    return 0


def cmd_ledger_vkey(args: argparse.Namespace) -> int:
    from tensafe.ledger.service import load_signer

    print(load_signer(_config(args)).vkey)
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from tensafe.ledger.service import load_signer
    from tensafe.ledger.verify import verify_log
    from tensafe.runtime.db import create_engine
    from tg_tinker.transparency import NoteVerifier

    config = _config(args)
    verifier = NoteVerifier.from_vkey(args.vkey) if args.vkey else load_signer(config).verifier()
    url = args.url or config.service_db_url("ledger")
    engine = create_engine(url, schema=f"{config.db_schema_prefix}ledger")
    report = verify_log(engine, verifier, config.ledger_origin)
    engine.dispose()
    if not report.ok:
        print(f"FAILED after {report.entries} entries: {report.problem}", file=sys.stderr)
        return 1
    print(f"ok: {report.entries} entries, {report.checkpoints} signed checkpoints, all consistent")
    return 0


def cmd_compliance_report(args: argparse.Namespace) -> int:
    from tensafe.compliance import evidence, render
    from tensafe.compliance.report import build_report

    if args.url:
        api_key = os.environ.get("TS_API_KEY", "")
        if not api_key:
            print("error: --url reads the ledger as the tenant: set TS_API_KEY to one of its API keys",
                  file=sys.stderr)
            return 2
        ev = evidence.from_url(args.url, api_key, args.tenant, args.vkey or os.environ.get("TS_LEDGER_VKEY"))
    else:
        ev = evidence.from_data_dir(_config(args), args.tenant, args.vkey)
    report = build_report(ev)
    files = render.write(report, Path(args.out), pdf=not args.no_pdf)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    v = report.verification
    if not v["ok"]:
        print(f"LEDGER NOT VERIFIED: {v['problem']}; the report uses only the first {v['verified_size']} entries "
              f"and marks {v['excluded_entries']} of this tenant's as unverifiable", file=sys.stderr)
        return 1
    print(f"verified: {v['tenant_entries']} entries of tenant {args.tenant} ({len(report.sessions)} sessions, "
          f"{len(report.budget_refusals)} budget refusals, {len(report.artifacts)} artifacts)")
    return 0


def cmd_audit_privacy(args: argparse.Namespace) -> int:
    from tensafe.privacy_audit.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", help="data directory (default: $TENSAFE_DATA_DIR or ./.tensafe)")
        return p

    def with_server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_data_dir(p)
        p.add_argument("--port", type=int, help="gRPC port (default: $TENSAFE_PORT or 50051)")
        p.add_argument("--host", help="bind address (default: $TENSAFE_HOST or 127.0.0.1)")
        p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (default: 9090)")
        return p

    with_server(sub.add_parser("up", help="run all six services in one process (the embedded default)")
                ).set_defaults(func=cmd_up)
    serve = with_server(sub.add_parser("serve", help="run one service (the split form)"))
    serve.add_argument("service", choices=[*SERVICE_NAMES, *HTTP_EDGES])
    serve.set_defaults(func=cmd_serve)
    with_data_dir(sub.add_parser("init", help="create the data dir, keys and the default tenant, then exit")
                  ).set_defaults(func=cmd_init)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = with_data_dir(keys.add_parser("create", help="create an API key for a tenant (printed last)"))
    create.add_argument("--tenant", required=True)
    create.add_argument("--description", default="")
    create.add_argument("--expires-in", metavar="DURATION",
                        help="refuse the key after this long: seconds, or 30m, 1h, 7d (default: never)")
    create.set_defaults(func=cmd_keys_create)
    revoke = with_data_dir(keys.add_parser("revoke", help="revoke an API key by its id"))
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)
    lst = with_data_dir(keys.add_parser("list", help="list API keys"))
    lst.add_argument("--tenant")
    lst.set_defaults(func=cmd_keys_list)

    ledger = sub.add_parser("ledger", help="the audit ledger").add_subparsers(dest="ledger_command", required=True)
    verify = with_data_dir(ledger.add_parser("verify", help="recompute the log and check every signed checkpoint"))
    verify.add_argument("--url", help="the ledger's database URL (default: from the data dir / configuration)")
    verify.add_argument("--vkey", help="the log's verifier key (default: derived from the data dir's signing key)")
    verify.set_defaults(func=cmd_ledger_verify)
    with_data_dir(ledger.add_parser("vkey", help="print the verifier key that checks the ledger's checkpoints")
                  ).set_defaults(func=cmd_ledger_vkey)

    compliance = sub.add_parser("compliance", help="evidence from the verified audit ledger").add_subparsers(
        dest="compliance_command", required=True)
    rep = with_data_dir(compliance.add_parser(
        "report", help="a tenant's evidence report (HTML, JSON, and PDF when Chromium is installed)"))
    rep.add_argument("--tenant", required=True)
    rep.add_argument("--url", help="read a running deployment as the tenant (TS_API_KEY) instead of the data dir")
    rep.add_argument("--vkey", help="the ledger's verifier key (default: the data dir's, or $TS_LEDGER_VKEY)")
    rep.add_argument("--out", default="compliance-report", help="output directory (default: ./compliance-report)")
    rep.add_argument("--no-pdf", action="store_true", help="do not print a PDF even if Chromium is installed")
    rep.set_defaults(func=cmd_compliance_report)

    from tensafe.privacy_audit.cli import add_arguments as audit_arguments

    audit_arguments(sub.add_parser(
        "audit-privacy", help="canary audit of a configuration on a running stack: empirical vs claimed epsilon "
        "(docs/privacy.md)")).set_defaults(func=cmd_audit_privacy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in SERVER_EXTRA_MODULES:
            raise
        print(f"error: `tensafe {args.command}` needs the server dependencies, and '{missing}' is not installed; "
              f"install them with: {SERVER_EXTRA_HINT}", file=sys.stderr)
        return 2
    except Exception as exc:  # the CLI reports, it does not trace back
        from tensafe.runtime.errors import TensafeError

        if isinstance(exc, (TensafeError, FileNotFoundError, OSError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
