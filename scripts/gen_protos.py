#!/usr/bin/env python3
"""Generate the Python gRPC stubs in sdk/tensafe/api from protos/.

Usage:
    python scripts/gen_protos.py           # regenerate sdk/tensafe/api
    python scripts/gen_protos.py --check   # exit 1 if sdk/tensafe/api is stale

For every .proto under protos/ this writes ``*_pb2.py``, ``*_pb2.pyi``
(protoc's own stubs), ``*_pb2_grpc.py`` (grpcio-tools) and
``*_pb2_grpc.pyi`` (mypy-protobuf's ``protoc-gen-mypy_grpc`` plugin), plus an
empty ``__init__.py`` in every generated package directory below
``tensafe/api``. ``sdk/tensafe/__init__.py`` is never written: ``tensafe`` is a
namespace package shared by sdk/ and services/.

Output depends only on the .proto files and the versions of grpcio-tools and
mypy-protobuf, so the committed stubs can be checked in CI with ``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUT_ROOT = REPO_ROOT / "sdk"
# Generated tree, relative to OUT_ROOT.
GENERATED_PACKAGE = Path("tensafe") / "api"
# Never generated nor compared.
IGNORED_NAMES = {"__pycache__"}


def _proto_files() -> list[str]:
    files = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    if not files:
        sys.exit(f"gen_protos: no .proto files under {PROTO_ROOT}")
    return files


def _grpc_tools_include() -> str:
    import grpc_tools  # only needed here

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def _mypy_grpc_plugin() -> str:
    """Path of mypy-protobuf's protoc-gen-mypy_grpc (next to this Python first)."""
    name = "protoc-gen-mypy_grpc"
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    sys.exit(f"gen_protos: {name} not found; install mypy-protobuf in this environment")


def generate(out_dir: Path) -> None:
    """Generate all stubs (and package __init__.py files) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{_grpc_tools_include()}",
        f"--plugin=protoc-gen-mypy_grpc={_mypy_grpc_plugin()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *_proto_files(),
    ]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        sys.exit(f"gen_protos: protoc failed with exit code {result.returncode}")

    package_root = out_dir / GENERATED_PACKAGE
    if not package_root.is_dir():
        sys.exit(f"gen_protos: protoc wrote nothing under {package_root}")
    init_dirs = {package_root}
    for path in package_root.rglob("*.py"):
        parent = path.parent
        while parent != package_root and package_root in parent.parents:
            init_dirs.add(parent)
            parent = parent.parent
    for directory in sorted(init_dirs):
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")


def _tree(root: Path) -> dict[str, Path]:
    """Relative path -> file for every file under root, ignoring __pycache__."""
    files: dict[str, Path] = {}
    if not root.is_dir():
        return files
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part in IGNORED_NAMES for part in rel.parts) or not path.is_file():
            continue
        files[rel.as_posix()] = path
    return files


def check() -> int:
    """Compare a fresh generation with the committed stubs; 0 when identical."""
    with tempfile.TemporaryDirectory(prefix="tensafe-protos-") as tmp:
        tmp_out = Path(tmp)
        generate(tmp_out)
        fresh = _tree(tmp_out / GENERATED_PACKAGE)
        committed = _tree(OUT_ROOT / GENERATED_PACKAGE)
        problems: list[str] = []
        for rel in sorted(fresh.keys() | committed.keys()):
            shown = (OUT_ROOT / GENERATED_PACKAGE / rel).relative_to(REPO_ROOT).as_posix()
            if rel not in committed:
                problems.append(f"missing: {shown}")
            elif rel not in fresh:
                problems.append(f"extra:   {shown}")
            elif not filecmp.cmp(fresh[rel], committed[rel], shallow=False):
                problems.append(f"differs: {shown}")
    if problems:
        print("Generated stubs are stale; run `python scripts/gen_protos.py`:")
        for line in problems:
            print(f"  {line}")
        return 1
    print(f"Generated stubs are up to date ({len(fresh)} files).")
    return 0


def regenerate() -> int:
    """Replace sdk/tensafe/api with a fresh generation."""
    target = OUT_ROOT / GENERATED_PACKAGE
    with tempfile.TemporaryDirectory(prefix="tensafe-protos-") as tmp:
        tmp_out = Path(tmp)
        generate(tmp_out)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp_out / GENERATED_PACKAGE, target)
    count = len(_tree(target))
    print(f"Wrote {count} files to {target.relative_to(REPO_ROOT).as_posix()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and fail if sdk/tensafe/api differs",
    )
    args = parser.parse_args(argv)
    return check() if args.check else regenerate()


if __name__ == "__main__":
    sys.exit(main())
