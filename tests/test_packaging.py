"""The project's own files: ruff-clean code, every dependency pinned, the console script, the two README
commands, and a CI script that runs the test command."""
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


def test_every_dependency_is_pinned_in_the_constraints():
    # a fresh clone installs with -c constraints.txt (README, Dockerfile): an unpinned dependency would float
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = meta["dependencies"] + [d for extra in meta["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in wanted}
    pins = {line.split("==")[0].strip().lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.lstrip().startswith("#")}
    assert names - pins == set(), f"pin these in constraints.txt: {sorted(names - pins)}"


def test_console_script_points_at_the_cli():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["htc-lightning"] == "htc_lightning.cli:main"


def test_readme_commands_are_the_makefile_targets_and_ci_runs_the_tests():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
