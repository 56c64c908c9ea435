"""Start-up stays near `import typer` (issue 17): no command imports a heavy library before it needs
it. aiosmtpd (serve, smoke), cryptography's x509 and hazmat (cert, init, doctor), jinja2 and
questionary (the init wizard) each cost milliseconds to tens of milliseconds on every start, so a
module-level import of any of them in cli.py, options.py or a module they reach would slow `--help`
and `keygen` for everyone. benchmarks/startup.py measures the time; this test names the culprit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MAILSETUP, init_args, run_cli

HEAVY = ("aiosmtpd", "cryptography.x509", "cryptography.hazmat", "jinja2", "questionary")
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def imported_by(*args: object) -> list[str]:
    """Every module the installed `mailsetup ARGS` imports, from `python -X importtime` (which
    reports each module once, nested imports included, on stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-X", "importtime", MAILSETUP, *map(str, args)], capture_output=True,
                          text=True, env=dict(env, NO_COLOR="1"), stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = [m.group(1) for line in proc.stderr.splitlines() if (m := _IMPORT_LINE.match(line))]
    # Parsing sanity: if -X importtime's format changed, the test must not pass on an empty list.
    assert "mailsetup.cli" in modules and "typer" in modules, proc.stderr[-2000:]
    return modules


def heavy(modules: list[str]) -> list[str]:
    """Which of HEAVY the modules include (a package counts by any of its submodules)."""
    return sorted({h for m in modules for h in HEAVY if m == h or m.startswith(h + ".")})


@pytest.fixture(scope="module")
def set_up_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup") / "root"
    r = run_cli(*init_args(root, "--no-smoke", "--user", "bob", "--password-stdin"), input="a-long-password\n")
    assert r.code == 0, r.err
    return root


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("init", "--help"), ("keygen",)],
                         ids=lambda a: " ".join(a))
def test_light_commands_import_no_heavy_library(args: tuple[str, ...]):
    found = heavy(imported_by(*args))
    assert not found, f"`mailsetup {' '.join(args)}` imports {found} before it needs them"


def test_keygen_out_imports_no_heavy_library(tmp_path: Path):
    out = tmp_path / "queue.key"
    found = heavy(imported_by("keygen", "--out", out))
    assert not found, f"`mailsetup keygen --out` imports {found} before it needs them"
    assert out.stat().st_size == 33  # the key was really written: the command ran its whole path


def test_user_list_imports_no_heavy_library(set_up_root: Path):
    assert run_cli("user", "list", "--root", set_up_root).out.split() == ["bob"]
    found = heavy(imported_by("user", "list", "--root", set_up_root))
    assert not found, f"`mailsetup user list` imports {found} before it needs them"


def test_a_command_run_alone_reads_as_in_the_whole_app():
    """cli.main builds only the command argv names, or stand-ins that list the commands (start-up);
    usage lines, errors and the command list must read as they do when Typer builds every command."""
    r = run_cli("keygen", "--bogus")
    assert r.code == 2 and "Usage: mailsetup keygen [OPTIONS]" in r.err and "No such option: --bogus" in r.err
    r = run_cli("keyge")
    assert r.code == 2 and "No such command 'keyge'. Did you mean 'keygen'?" in r.err
    r = run_cli("user", "bogus")
    assert r.code == 2 and "Usage: mailsetup user [OPTIONS] COMMAND" in r.err
    listed = run_cli("--help", env={"COLUMNS": "200"}).out
    for name in ("init", "import", "render", "cert", "keygen", "aliases", "serve", "smoke", "doctor", "dns", "user"):
        assert f"  {name} " in listed, name
    user_help = run_cli("user", "--help").out
    assert all(f"  {name} " in user_help for name in ("add", "list", "remove")), user_help
    assert run_cli("--version").out.startswith("mailsetup ")
    r = run_cli("--", "keygen")  # after `--` a command runs though argv starts with no command name
    assert r.code == 0 and len(r.out.strip()) == 32, r.err
