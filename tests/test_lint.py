"""The code passes the linter configured in pyproject.toml ([tool.ruff]): pyflakes (unused imports and
names, undefined names), pycodestyle (line length 120), bugbear, pyupgrade and sorted imports. Fix what it
reports with `ruff check --fix src stages tests benchmarks` (the safe fixes) and by hand; the code is not
run through `ruff format`. Reads the source only; a second or so."""

import subprocess
import sys

from conftest import REPO

FOLDERS = ["src", "stages", "tests", "benchmarks", "harness.py"]


def test_ruff_check_passes():
    # --no-cache: no .ruff_cache written into the repository by the tests.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *FOLDERS],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, (f"`ruff check {' '.join(FOLDERS)}` failed ({result.returncode}):\n"
                                    f"{result.stdout}\n{result.stderr}")
