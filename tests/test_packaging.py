"""The two distributions: `tg-tinker` (the SDK) and `tensafe` (the services), built as wheels and checked.

The wheels are built from a copy of the sources (so no build/ or egg-info lands in the working tree) with the
build tool's own package discovery; what each must hold is read from the source tree, so a new module or
migration that the discovery misses fails here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SDK_ROOT = REPO / "sdk"
SERVICES_ROOT = REPO / "services"
HEAVY = {"torch", "transformers", "tenseal", "sqlalchemy", "alembic", "opacus", "peft", "psycopg", "dp-accounting"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _source_version() -> str:
    tree = ast.parse((SDK_ROOT / "tg_tinker" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("sdk/tg_tinker/_version.py defines no __version__")


def _shipped_sources(root: Path, package: str, suffixes: tuple[str, ...]) -> set[str]:
    """Wheel paths of every file with one of `suffixes` under root/package (what the wheel must contain)."""
    return {p.relative_to(root).as_posix() for p in (root / package).rglob("*")
            if p.is_file() and p.name.endswith(suffixes) and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the two distributions are built from, copied without build leftovers."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("services", "sdk"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    return src


def _build_wheels(out: Path, *projects: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(out), *map(str, projects)],
                           capture_output=True, text=True, timeout=300, cwd=out)
    assert build.returncode == 0, build.stdout + build.stderr


@pytest.fixture(scope="module")
def wheels(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    _build_wheels(out, source, source / "sdk")
    found = {w.name.split("-")[0]: w for w in out.glob("*.whl")}
    assert set(found) == {"tensafe", "tg_tinker"}, found
    return found


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _dist_file(wheel: Path, name: str) -> str | None:
    with zipfile.ZipFile(wheel) as z:
        hits = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(hits[0]).decode() if hits else None


def _metadata(wheel: Path, field: str) -> list[str]:
    text = _dist_file(wheel, "METADATA") or ""
    headers = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith(f"{field}:")]


def test_tensafe_is_a_namespace_split_across_both_roots() -> None:
    assert not (SDK_ROOT / "tensafe" / "__init__.py").exists()
    assert not (SERVICES_ROOT / "tensafe" / "__init__.py").exists()
    for pyproject in (REPO / "pyproject.toml", SDK_ROOT / "pyproject.toml"):
        setuptools = _pyproject(pyproject)["tool"]["setuptools"]
        assert "find" in setuptools["packages"] and setuptools["packages"]["find"]["namespaces"], pyproject


def test_sdk_wheel_holds_the_sdk_and_its_stubs_only(wheels) -> None:
    names = _names(wheels["tg_tinker"])
    expected = (_shipped_sources(SDK_ROOT, "tg_tinker", (".py",))
                | _shipped_sources(SDK_ROOT, "tensafe/api", (".py", ".pyi"))
                | _shipped_sources(SDK_ROOT, "tensafe/rlvr", (".py",)))
    assert expected - names == set()
    assert "tg_tinker/py.typed" in names
    assert {"tensafe/api/trainer/v1/trainer_pb2.py", "tensafe/api/trainer/v1/trainer_pb2.pyi",
            "tensafe/api/trainer/v1/trainer_pb2_grpc.py"} <= names
    modules = {n for n in names if ".dist-info/" not in n}
    assert {n for n in modules if not n.startswith(("tg_tinker/", "tensafe/api/", "tensafe/rlvr/"))} == set()
    assert "tensafe/rlvr/algorithms.py" in names  # tensafe.rlvr: client-side RL, part of the SDK
    for server_part in ("tensafe/trainer/", "tensafe/runtime/", "tensafe/cli/", "tensafe/vault/"):
        assert not any(n.startswith(server_part) for n in names), server_part
    assert "tensafe/__init__.py" not in names
    assert "console_scripts" not in (_dist_file(wheels["tg_tinker"], "entry_points.txt") or "")


def test_sdk_wheel_depends_on_no_server_part(wheels) -> None:
    base = {_name(r) for r in _metadata(wheels["tg_tinker"], "Requires-Dist") if "extra ==" not in r}
    assert base, "no dependencies read from the SDK wheel"
    assert base & HEAVY == set() and "tensafe" not in base
    assert {"grpcio", "protobuf", "grpcio-status"} <= base
    he = {_name(r) for r in _metadata(wheels["tg_tinker"], "Requires-Dist") if 'extra == "he"' in r}
    assert "tenseal" in he


def test_server_wheel_holds_every_service_and_its_migrations(wheels) -> None:
    names = _names(wheels["tensafe"])
    expected = _shipped_sources(SERVICES_ROOT, "tensafe", (".py", ".mako"))
    assert expected - names == set()
    services = {p.name for p in (SERVICES_ROOT / "tensafe").iterdir() if (p / "__init__.py").exists()}
    assert {"cli", "runtime", "trainer", "accountant", "he", "vault", "ledger", "inference"} <= services
    for service in services:
        assert f"tensafe/{service}/__init__.py" in names, service
    migrations = {n for n in expected if "migrations/" in n}
    assert "tensafe/runtime/migrations/script.py.mako" in migrations
    assert {m.split("/")[1] for m in migrations} >= {"runtime", "accountant", "he", "vault", "ledger"}
    assert not any(n.startswith(("tg_tinker/", "tensafe/api/")) for n in names)
    assert "tensafe/__init__.py" not in names
    assert re.search(r"^tensafe\s*=\s*tensafe\.cli:main$", _dist_file(wheels["tensafe"], "entry_points.txt") or "",
                     re.MULTILINE)


def test_one_version_for_both_distributions(wheels) -> None:
    version = _source_version()
    assert _metadata(wheels["tg_tinker"], "Version") == [version]
    assert _metadata(wheels["tensafe"], "Version") == [version]
    pins = [r for r in _metadata(wheels["tensafe"], "Requires-Dist") if _name(r) == "tg-tinker"]
    assert pins and all(re.search(rf"==\s*{re.escape(version)}(?:\s|;|$)", r) for r in pins), pins
    declared = _pyproject(REPO / "pyproject.toml")["project"]["dependencies"]
    assert f"tg-tinker=={version}" in declared


def test_server_install_has_the_server_dependencies(wheels) -> None:
    base = {_name(r) for r in _metadata(wheels["tensafe"], "Requires-Dist") if "extra ==" not in r}
    assert {"tg-tinker", "torch", "sqlalchemy", "alembic", "tenseal", "opacus"} <= base
    extras = set(_metadata(wheels["tensafe"], "Provides-Extra"))
    assert {"vllm", "ray", "mlops", "all", "dev", "demo"} <= extras


def test_server_sdist_builds_the_same_wheel(source: Path, wheels, tmp_path: Path) -> None:
    """The version source lives in the SDK's tree: the tensafe sdist must carry it (MANIFEST.in)."""
    script = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    build = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=source)
    assert build.returncode == 0, build.stdout + build.stderr
    sdist = tmp_path / build.stdout.strip().splitlines()[-1]
    shutil.unpack_archive(sdist, tmp_path / "unpacked")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    _build_wheels(tmp_path, unpacked)
    (rebuilt,) = tmp_path.glob("tensafe-*.whl")
    assert _names(rebuilt) == _names(wheels["tensafe"])


@pytest.mark.slow
def test_sdk_wheel_installs_and_imports_with_only_its_own_dependencies(wheels, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheels["tg_tinker"])], env=env,
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    script = (
        "import importlib, json, tg_tinker\n"
        "from tg_tinker import ServiceClient\n"
        "ServiceClient(api_key='x', base_url='localhost:50051')\n"
        "import tensafe.api.trainer.v1.trainer_pb2\n"
        "out = {'file': tg_tinker.__file__, 'version': tg_tinker.__version__}\n"
        "for m in ('torch', 'tensafe.trainer', 'tensafe.runtime', 'sqlalchemy', 'transformers'):\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "        out[m] = 'imported'\n"
        "    except ImportError:\n"
        "        out[m] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([str(py), "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert Path(out.pop("file")).is_relative_to(venv)
    assert out.pop("version") == _source_version()
    assert out == dict.fromkeys(("torch", "tensafe.trainer", "tensafe.runtime", "sqlalchemy", "transformers"),
                                "missing")
