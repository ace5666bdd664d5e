"""The package's shape: imports run one way (the contract in pyproject.toml) and modules stay
small enough to read in one sitting."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 420  # "about 400"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(exe.parent), "PYTHONPATH": str(cwd)})


def test_import_layers_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is not vacuous: a shared layer importing a stage (a cycle in the making) fails it."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "edgepack", copy / "edgepack", ignore=shutil.ignore_patterns("__pycache__", "_data"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    data_init = copy / "edgepack" / "data" / "__init__.py"
    data_init.write_text(data_init.read_text() + "\nfrom ..stages import load as _cycle  # noqa\n")
    proc = _lint(copy)
    assert proc.returncode != 0 and "edgepack.data is not allowed to import edgepack.stages" in proc.stdout


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "edgepack").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
