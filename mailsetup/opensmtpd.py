"""The real OpenSMTPD, when installed: find it, read its version, run `smtpd -n`, and the open-relay
check that `smtpd -n` does not do (it accepts `match from any for any action "relay"`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin", "/usr/bin")


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def smtpd_version(smtpd: str | None = None) -> tuple[int, int, str] | None:
    """(major, minor, full text) from `smtpd -h`, or None when smtpd is absent."""
    smtpd = smtpd or find_binary("smtpd")
    if not smtpd:
        return None
    try:
        proc = subprocess.run([smtpd, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"OpenSMTPD\s+(\d+)\.(\d+)(\S*)", proc.stdout + proc.stderr)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), f"{m.group(1)}.{m.group(2)}{m.group(3)}"


@dataclass(frozen=True)
class ConfigCheck:
    ok: bool
    output: str
    command: str


def check_config(conf: Path, smtpd: str | None = None) -> ConfigCheck | None:
    """Run `smtpd -n -f CONF`; None when smtpd is not installed."""
    smtpd = smtpd or find_binary("smtpd")
    if not smtpd:
        return None
    cmd = [smtpd, "-n", "-f", str(conf)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ConfigCheck(False, "smtpd -n did not finish in 30 s", shlex.join(cmd))
    output = (proc.stdout + proc.stderr).strip()
    return ConfigCheck(proc.returncode == 0, output, shlex.join(cmd))


def openssl_major() -> int | None:
    """The major version of the system's OpenSSL, for the 6.8 + OpenSSL 3 TLS defect."""
    openssl = find_binary("openssl")
    if not openssl:
        return None
    try:
        out = subprocess.run([openssl, "version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.match(r"OpenSSL (\d+)\.", out)
    return int(m.group(1)) if m else None


def tls_defect(version: tuple[int, int] | None, openssl: int | None) -> str | None:
    """Name the known defect of smtpd < 7.3 linked to OpenSSL 3 (every STARTTLS fails), if present."""
    if version is None or openssl is None:
        return None
    if version < (7, 3) and openssl >= 3:
        return (
            f"OpenSMTPD {version[0]}.{version[1]} with OpenSSL {openssl} fails every STARTTLS handshake "
            "(upstream OpenSMTPD issues #1171, #1239); install 7.x (Debian 12: "
            "apt-get install -t bookworm-backports opensmtpd)"
        )
    return None


# --- open relay ---------------------------------------------------------------------------------

_TOKEN = re.compile(r'"[^"]*"|<[^>]*>|\S+')


def _tokens(line: str) -> list[str]:
    """Words of one smtpd.conf line, quoted strings kept whole, a trailing comment dropped."""
    out = []
    for tok in _TOKEN.findall(line):
        if tok.startswith("#"):
            break
        out.append(tok)
    return out


@dataclass(frozen=True)
class RelayFinding:
    line: int
    text: str
    why: str


def open_relay_rules(conf_text: str) -> list[RelayFinding]:
    """Rules that would relay mail from an unauthenticated, non-local sender to any destination."""
    lines = conf_text.splitlines()
    relay_actions: set[str] = set()
    for raw in lines:
        toks = _tokens(raw)
        if len(toks) >= 3 and toks[0] == "action" and toks[2] == "relay":
            relay_actions.add(toks[1].strip('"'))
    findings: list[RelayFinding] = []
    for number, raw in enumerate(lines, 1):
        toks = _tokens(raw)
        if not toks:
            continue
        if toks[0] == "match" and "action" in toks:
            action = toks[toks.index("action") + 1].strip('"') if toks.index("action") + 1 < len(toks) else ""
            if action not in relay_actions:
                continue
            conds = toks[1 : toks.index("action")]
        elif toks[0] == "accept" and "relay" in toks:
            conds = toks[1 : toks.index("relay")]
        else:
            continue
        why = _open_relay_reason(conds)
        if why:
            findings.append(RelayFinding(number, raw.strip(), why))
    return findings


def _clause(conds: list[str], word: str) -> list[str] | None:
    """The first words of a `from …` or `for …` clause (a leading `!` kept), or None when absent."""
    if word not in conds:
        return None
    rest = conds[conds.index(word) + 1 :]
    if rest[:1] == ["!"]:
        return ["!"] + rest[1:3]
    return rest[:2]


def _open_relay_reason(conds: list[str]) -> str | None:
    # An authenticated session may relay; `auth` as a filter or `from auth` as an origin.
    if "auth" in conds:
        idx = conds.index("auth")
        if idx == 0 or conds[idx - 1] != "!":
            return None
    origin = _clause(conds, "from")
    if origin is None or origin[:1] in (["local"], ["socket"], ["auth"]):
        return None  # no `from` means `from local`
    dest = _clause(conds, "for")
    if dest is None:
        return None  # no `for` means `for local`
    if dest[:1] == ["any"] or dest[:2] == ["!", "local"]:
        return f"relays from {' '.join(origin)} to {' '.join(dest)} without authentication: an open relay"
    return None


# --- a running smtpd and its tables ---------------------------------------------------------------


@dataclass(frozen=True)
class TableUser:
    """A running smtpd whose configuration names a table file: its pid and the table's name."""

    pid: int
    table: str


def _conf_argument(argv: list[str]) -> str | None:
    """The FILE of `-f FILE` in smtpd's argv (getopt "BdD:hnP:f:FT:v": options may be bundled)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return None
        for j, ch in enumerate(arg[1:], 1):
            if ch in "DPTf":
                value = arg[j + 1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                if not arg[j + 1:]:
                    i += 1
                if ch == "f":
                    return value
                break
        i += 1
    return None


def table_files(conf_text: str) -> dict[str, str]:
    """{table name: file path} of the `table NAME file:PATH` (or `table NAME /PATH`) lines."""
    out = {}
    for line in conf_text.splitlines():
        toks = [t.strip('"') for t in _tokens(line)]
        if len(toks) >= 3 and toks[0] == "table":
            spec = toks[2]
            if spec.startswith("file:"):
                out[toks[1].strip("<>")] = spec[5:]
            elif spec.startswith("/"):
                out[toks[1].strip("<>")] = spec
    return out


def smtpd_tables_reading(path: Path, default_conf: Path, proc: Path = Path("/proc")) -> list[TableUser]:
    """The running smtpd(s) that serve the file `path` as a table, and that table's name.

    Only an smtpd in our own mount namespace counts: it sees the same `path`, and its control socket
    is the one smtpctl reaches. Its configuration is the `-f` file, else `default_conf` (the OS's).
    """
    try:
        ours = os.readlink(proc / "self/ns/mnt")
    except OSError:
        return []
    wanted = os.path.realpath(path)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "smtpd" or os.readlink(entry / "ns/mnt") != ours:
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if argv[0].startswith("smtpd:"):  # a child process (`smtpd: lookup`...), not the parent
                continue
            conf = _conf_argument([a for a in argv if a != ""] or [""]) or str(default_conf)
            if not os.path.isabs(conf):
                conf = os.path.join(os.readlink(entry / "cwd"), conf)
            text = Path(conf).read_text(errors="replace")
        except OSError:
            continue
        for name, file in table_files(text).items():
            if os.path.realpath(file) == wanted:
                found.append(TableUser(int(entry.name), name))
    return found


def update_table(name: str) -> tuple[bool, str]:
    """`smtpctl update table NAME`: smtpd's lookup process re-reads the table. (ok, smtpctl's words)."""
    smtpctl = find_binary("smtpctl")
    if not smtpctl:
        return False, "smtpctl is not installed"
    try:
        proc = subprocess.run([smtpctl, "update", "table", name], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, "smtpctl did not answer in 30 s"
    words = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, words[-1] if words else f"exit status {proc.returncode}"
