"""The package as users install it: a wheel holding every module and template, installed non-editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import MAILSETUP, run_cli

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "setuptools" in proc.stderr:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [wheel] = out.glob("mailsetup-*.whl")
    return wheel


def test_the_wheel_ships_every_module_and_template(tmp_path: Path):
    """A module or template left out of the wheel breaks every real install (`pip install .`, pipx)."""
    names = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "mailsetup").rglob("*.py")}
    templates = {f"mailsetup/templates/{p.name}" for p in (ROOT / "templates").glob("*.j2")}
    assert "mailsetup/mta/server.py" in sources
    assert sources | templates <= names, sorted((sources | templates) - names)


def test_the_command_under_test_is_the_installed_wheel_not_the_checkout():
    """The CLI tests prove nothing about a real install if `mailsetup` imports from this tree."""
    python = Path(MAILSETUP).with_name("python")
    proc = subprocess.run([str(python), "-c", "import mailsetup, mailsetup.mta.server as s; print(s.__file__)"],
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 0, proc.stderr
    where = Path(proc.stdout.strip())
    assert "site-packages" in where.parts
    assert ROOT / "mailsetup" not in where.parents
    assert not list(where.parents[2].glob("__editable__*mailsetup*")), "an editable install hides missing files"


def test_smoke_runs_from_the_installed_package(tmp_path: Path):
    """`smoke` imports the embedded MTA (mailsetup.mta): the part a wheel once left out."""
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", tmp_path / "root",
                "--admin", "alice")
    assert r.code == 0, r.err
    assert "ModuleNotFoundError" not in r.err
    assert "✓" in r.out
