"""The layering of the source tree, from its import graph (tests/import_graph.py, read with ``ast``):
no package imports itself in a circle, no service borrows from another service's folder (shared code
lives in tensafe.runtime or tensafe.common), the runtime and the SDK stay light, and the SDK never
reaches into the server."""

from __future__ import annotations

import pytest

from import_graph import find_cycle, import_graph, imported_names, modules
from tg_tinker.services import SERVICE_NAMES as SERVICES

PACKAGES = ["tg_tinker", "tensafe.runtime", "tensafe.common", "tensafe.cli", *(f"tensafe.{s}" for s in SERVICES)]
HEAVY = ("torch", "transformers", "peft", "opacus", "tenseal", "vllm")


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_really_read(tmp_path) -> None:
    graph = import_graph()
    assert "tensafe.trainer.session" in graph["tensafe.trainer.service"]
    assert "tensafe.trainer.base" in graph["tensafe.trainer.session"]
    assert {"tg_tinker.training", "tg_tinker.sampling", "tg_tinker._transport"} <= graph["tg_tinker.client"]
    assert "tensafe.runtime.vault_client" in graph["tensafe.inference.service"]
    assert "tg_tinker.errors" in graph["tg_tinker._transport"]  # `from . import errors`: the module
    # Imports under TYPE_CHECKING and inside functions count, relative ones resolved from the package.
    probe = tmp_path / "base.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .session import X\n"
                     "def f():\n    from ..runtime import errors\n")
    names = imported_names("tensafe.trainer.base", probe, known={"tensafe.runtime.errors"})
    assert {"tensafe.trainer.session", "tensafe.runtime.errors"} <= names


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_itself_in_a_circle(package: str) -> None:
    graph = import_graph(within=package)
    assert graph, f"{package} has no modules: the walk is broken"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_service_imports_another_service() -> None:
    wrong = []
    for name, path in modules().items():
        parts = name.split(".")
        if parts[0] != "tensafe" or parts[1] not in SERVICES:
            continue
        for target in imported_names(name, path):
            tparts = target.split(".")
            if tparts[0] == "tensafe" and len(tparts) > 1 and tparts[1] in SERVICES and tparts[1] != parts[1]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_runtime_stays_light() -> None:
    """Every service imports the runtime, the light ones (vault, ledger, accountant) included: no ML library
    in it, not even lazily, and nothing from a service's folder."""
    wrong = []
    for name, path in modules().items():
        if not name.startswith("tensafe.runtime"):
            continue
        for target in imported_names(name, path):
            top = target.split(".")
            if top[0] in HEAVY or (top[0] == "tensafe" and len(top) > 1 and top[1] in (*SERVICES, "common", "cli")):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_sdk_never_reaches_into_the_server() -> None:
    """tg_tinker ships alone (the tg-tinker wheel): of the tensafe namespace it may use only the stubs."""
    wrong = [f"{name} imports {target}" for name, path in modules().items() if name.startswith("tg_tinker")
             for target in imported_names(name, path)
             if target.split(".")[0] == "tensafe" and not (target == "tensafe" or target.startswith("tensafe.api"))]
    assert not wrong, "\n".join(sorted(wrong))
