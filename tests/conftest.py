"""Shared test kit: run the installed `mailsetup` command, find the real OpenSMTPD and openssl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every test imports mailsetup as users get it, from the wheel installed in this venv: `python -m
# pytest` puts the checkout first on sys.path, where a module or template the wheel leaves out would
# still be found.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
if "mailsetup" in sys.modules:
    raise RuntimeError("mailsetup was imported from the checkout before the tests' conftest ran")

MAILSETUP = str(Path(sys.executable).with_name("mailsetup"))


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(*args: object, input: str | None = None, env: dict | None = None, timeout: int = 120) -> Run:
    full_env = dict(os.environ, NO_COLOR="1")
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [MAILSETUP, *map(str, args)], capture_output=True, text=True, input=input, env=full_env,
        timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)), None
    )


SMTPD = find("smtpd")
OPENSSL = find("openssl")
IS_ROOT = os.geteuid() == 0

needs_smtpd = pytest.mark.skipif(
    not (SMTPD and IS_ROOT), reason="needs OpenSMTPD installed and root (smtpd -n checks the key's owner)"
)
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def smtpd_check(conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SMTPD, "-n", "-f", str(conf)], capture_output=True, text=True, timeout=30)


def own_var(upper: str, work: str) -> str:
    """A shell step for a private mount namespace: /var under an overlay whose writes land in `upper`
    (the test's own folder), so what a real-host init writes there (the MTA-STS policy under
    /var/www) never reaches this machine's /var."""
    return (f'mkdir -p "{upper}" "{work}" && '
            f'mount -t overlay overlay -o "lowerdir=/var,upperdir={upper},workdir={work}" /var')


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: for 'nothing was written / changed' assertions."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    return tmp_path / "root"


def init_args(sandbox: Path, *extra: object, domain: str = "example.test") -> list[object]:
    admin = [] if "--admin" in extra or "--aliases" in extra else ["--admin", "alice"]
    return ["init", "--yes", "--domain", domain, "--os", "debian", "--root", sandbox, *admin, *extra]


# CI runs the whole suite twice, on Debian 12 and in a Debian 13 root (scripts/test-trixie sets
# MAILSETUP_SECOND_RUN=1 there). A test marked `once` is slow and proves only our own code and
# PyPI's libraries, the same in both: it runs in the first suite only, to keep .ci/run in its budget.
def pytest_collection_modifyitems(config, items):
    if os.environ.get("MAILSETUP_SECOND_RUN") != "1":
        return
    skip = pytest.mark.skip(reason="run once, in the first release's suite (marked `once`: slow, release-independent)")
    for item in items:
        if "once" in item.keywords:
            item.add_marker(skip)
