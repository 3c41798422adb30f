"""Without the server extra, the `tensafe` command says what to install instead of tracing back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, base_env

# Runs the CLI as `tensafe` does, with `module` made unimportable as if the server extra were not installed.
LAUNCH = "import sys; sys.modules[{module!r}] = None; from tensafe.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("module", ["torch", "sqlalchemy"])
def test_up_without_the_server_extra_names_what_to_install(tmp_path, module) -> None:
    out = subprocess.run([sys.executable, "-c", LAUNCH.format(module=module), "up", "--data-dir",
                          str(tmp_path / "data"), "--port", "0"], env=base_env(), capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "pip install 'tensafe[server]'" in out.stderr and f"'{module}' is not installed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
