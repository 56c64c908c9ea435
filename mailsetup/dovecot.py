"""The real Dovecot, when installed: every call of dovecot, doveconf and doveadm (version, `doveconf -n`,
`doveadm reload`), and the logins' passwd-file Dovecot's passdb reads (the credentials table's hashes).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mailsetup.opensmtpd import find_binary


def _run(binary: str, args: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    """Run a Dovecot tool; None when it is not installed (or cannot be run at all)."""
    path = find_binary(binary)
    if not path:
        return None
    try:
        return subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


def installed() -> bool:
    return find_binary("doveconf") is not None


def dovecot_version() -> tuple[int, int] | None:
    """(major, minor) from `dovecot --version` ("2.3.19.1 (9b53102964)"), or None when absent."""
    proc = _run("dovecot", ["--version"], 10)
    found = re.match(r"\s*(\d+)\.(\d+)", proc.stdout) if proc is not None and proc.returncode == 0 else None
    return (int(found.group(1)), int(found.group(2))) if found else None


@dataclass(frozen=True)
class DoveconfCheck:
    ok: bool
    output: str


def check_config(conf: Path) -> DoveconfCheck | None:
    """`doveconf -n -c CONF`: Dovecot's own parser on the file; None when Dovecot is not installed."""
    proc = _run("doveconf", ["-n", "-c", str(conf)])
    if proc is None:
        return None
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    # Never the output itself: `doveconf -n` prints every setting (the key's path, not the key; still ours).
    return DoveconfCheck(proc.returncode == 0, "; ".join(errors[-2:]) or f"doveconf exited {proc.returncode}")


def reload_running() -> str | None:
    """Tell a running Dovecot to re-read its configuration (`doveadm reload`); None when none runs.
    Dovecot re-reads the passwd-file on each login by itself; the reload also drops its auth cache."""
    if not find_binary("doveadm"):
        return None
    proc = _run("doveadm", ["reload"], 15)
    if proc is None or proc.returncode != 0:
        return None  # no master socket: no Dovecot running with the default base_dir
    return "told the running Dovecot to reload (doveadm reload)"


def imap_users_access(dovecot_user: str) -> tuple[int, tuple[int, int] | None]:
    """(mode, owner) of the passwd-file: root and the group of Dovecot's auth user, never world-readable;
    0600 root's alone where that user does not exist here (or we are not root)."""
    from mailsetup.credentials import table_access

    return table_access(dovecot_user)


# crypt(3) hashes smtpd checks, by their prefix, and Dovecot's name for each: bcrypt (what `mailsetup
# user add` writes), and the SHA-512 and SHA-256 crypt an imported auth table may carry.
_SCHEMES = (("$2", "BLF-CRYPT"), ("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"))


def render_imap_users(creds: list) -> bytes:
    """passwd-file lines `user:{SCHEME}HASH` from the credentials table (table(5) `user hash`): the
    same hash, so a password works for submission and IMAP alike; the prefix tells Dovecot its scheme."""
    head = "# Dovecot passdb (passwd-file), derived from the credentials table by `mailsetup user`: edit that.\n"
    lines = [f"{c.user}:{{{scheme}}}{c.hash}\n" for c in creds
             for prefix, scheme in _SCHEMES if c.hash.startswith(prefix)]
    return (head + "".join(lines)).encode()

