"""The project's own files: ruff-clean code, a Dockerfile that installs with the constraints, the two
README commands, and a CI script that runs the test command."""
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_reports_no_problems():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed in the test environment (it is a dev dependency)")
    run = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_installs_the_package_with_the_pinned_constraints():
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if line.startswith("RUN") and "pip install" in line]
    pinned = [line for line in installs if "-c constraints.txt" in line and re.search(r"install[^&]* \.(\s|$)", line)]
    assert pinned, installs
    assert re.search(r"^COPY .*constraints\.txt", text, re.M)
    assert re.search(r'^CMD \["--help"\]', text, re.M)
    assert re.search(r'^ENTRYPOINT \["htc-lightning"\]', text, re.M)


def test_constraints_pin_torch_and_torchvision():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_console_script_points_at_the_cli():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["htc-lightning"] == "htc_lightning.cli:main"


def test_readme_commands_are_the_makefile_targets_and_ci_runs_the_tests():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
