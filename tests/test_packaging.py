"""pyproject lists every package directory, and the plain install stays SDK-only."""

from __future__ import annotations

import tomllib

from conftest import REPO


def test_every_package_directory_is_listed() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = setuptools["package-dir"]
    found = set()
    for pkg, root in roots.items():
        base = REPO / root
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base).parts
            found.add(".".join((pkg, *rel)))
    assert found == listed


def test_plain_install_has_no_heavy_dependencies() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert not names & {"torch", "transformers", "tenseal", "sqlalchemy", "opacus", "peft"}
