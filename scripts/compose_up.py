#!/usr/bin/env python3
"""Start a compose stack with podman-compose in dependency order, honouring depends_on conditions.

podman-compose 1.6 starts services in order but does not wait for ``condition: service_healthy`` or
``service_completed_successfully``; this script does: it starts each service once the services it depends on
meet their condition (running a container's healthcheck itself: podman's healthcheck timers need systemd),
then waits until every service with a healthcheck is healthy.

    scripts/compose_up.py [-p PROJECT] [-f FILE]... [--profile NAME]... [--timeout SECONDS]

Prints each service's start and ready time (seconds since the script began). Docker Compose users need none of
this: `docker compose up -d --wait` does the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--project")
    ap.add_argument("-f", "--file", action="append", default=[])
    ap.add_argument("--profile", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    files = args.file or [str(ROOT / "docker-compose.yml")]
    services = merged_services(files)
    project = args.project or load(files[0]).get("name") or Path(files[0]).resolve().parent.name
    base = ["podman-compose", "-p", project, *(a for f in files for a in ("-f", f))]
    base += [a for p in args.profile for a in ("--profile", p)]
    active = {n: s for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & set(args.profile)}
    start = time.monotonic()
    deadline = start + args.timeout
    started: set[str] = set()
    met: set[tuple[str, str]] = set()
    while len(started) < len(active):
        ready = [n for n, s in active.items() if n not in started
                 and all(d in started and (d, c) in met for d, c in deps(s).items())]
        if ready:
            run([*base, "up", "-d", "--no-deps", *ready])
            started.update(ready)
            for n in ready:
                print(f"{time.monotonic() - start:6.1f} s  started {n}", flush=True)
        # Check the conditions the remaining services wait for.
        for s in active.values():
            for d, c in deps(s).items():
                if d in started and (d, c) not in met and condition_met(project, d, c):
                    met.add((d, c))
                    print(f"{time.monotonic() - start:6.1f} s  {d}: {c}", flush=True)
        if not ready:
            if time.monotonic() > deadline:
                print(f"timed out waiting for {sorted(set(active) - started)}", file=sys.stderr)
                return 1
            time.sleep(1)
    waiting = {n for n, s in active.items() if has_healthcheck(s)}
    while waiting:
        for n in sorted(waiting):
            if condition_met(project, n, "service_healthy"):
                waiting.discard(n)
                print(f"{time.monotonic() - start:6.1f} s  {n}: healthy", flush=True)
        if waiting and time.monotonic() > deadline:
            print(f"timed out: not healthy: {sorted(waiting)}", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"{time.monotonic() - start:6.1f} s  all up", flush=True)
    return 0


def load(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def merged_services(files: list[str]) -> dict[str, dict]:
    """The services of the compose files, later files overriding earlier ones key by key (depends_on merged)."""
    out: dict[str, dict] = {}
    for f in files:
        for name, svc in (load(f).get("services") or {}).items():
            cur = out.setdefault(name, {})
            for key, value in (svc or {}).items():
                if key == "depends_on":
                    merged = {**deps(cur), **deps({"depends_on": value})}
                    cur["depends_on"] = {n: {"condition": c} for n, c in merged.items()}
                else:
                    cur[key] = value
    return out


def deps(svc: dict) -> dict[str, str]:
    d = svc.get("depends_on") or {}
    if isinstance(d, list):
        return {n: "service_started" for n in d}
    return {n: (v or {}).get("condition", "service_started") for n, v in d.items()}


def has_healthcheck(svc: dict) -> bool:
    hc = svc.get("healthcheck")
    return bool(hc) and not hc.get("disable") and hc.get("test") not in (["NONE"], "NONE")


def container(project: str, service: str) -> str:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                          "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] if out else ""


def condition_met(project: str, service: str, condition: str) -> bool:
    name = container(project, service)
    if not name:
        return False
    state = subprocess.run(["podman", "inspect", name, "--format", "{{.State.Status}} {{.State.ExitCode}}"],
                           capture_output=True, text=True).stdout.split()
    if condition == "service_completed_successfully":
        return state == ["exited", "0"]
    if state[:1] != ["running"]:
        return False
    if condition == "service_healthy":
        return subprocess.run(["podman", "healthcheck", "run", name], capture_output=True).returncode == 0
    return True


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


if __name__ == "__main__":
    sys.exit(main())
