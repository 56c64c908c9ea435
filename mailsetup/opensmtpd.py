"""The real OpenSMTPD, when installed: every call of smtpd and smtpctl (version, `smtpd -n`, the
daemon in the foreground, `smtpctl`), and the open-relay check that `smtpd -n` does not do (it
accepts `match from any for any action "relay"`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.smtpdversion import find_binary, version_in_help


def _run(tool: str, args: list[str], timeout: float, binary: str | None = None) -> subprocess.CompletedProcess:
    """Run `tool ARGS` (smtpd or smtpctl): the one place their argv is built and run. A missing
    binary, an OS error or a hang becomes one MailsetupError line naming the command."""
    path = binary or find_binary(tool)
    if not path:
        raise MailsetupError(f"{tool} is not installed", exit_code=1)
    argv = [path, *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MailsetupError(f"{shlex.join(argv)} did not finish in {timeout:g} s", exit_code=1) from None
    except OSError as exc:
        raise MailsetupError(f"{shlex.join(argv)}: {exc.strerror or exc}", exit_code=1) from None


def _said(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).strip()


def smtpd_version(smtpd: str | None = None) -> tuple[int, int, str] | None:
    """(major, minor, full text) from `smtpd -h`, or None when smtpd is absent."""
    try:
        proc = _run("smtpd", ["-h"], 10, smtpd)
    except MailsetupError:
        return None
    return version_in_help(proc.stdout + proc.stderr)


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
    args = ["-n", "-f", str(conf)]
    try:
        proc = _run("smtpd", args, 30, smtpd)
    except MailsetupError as exc:
        return ConfigCheck(False, exc.message, shlex.join([smtpd, *args]))
    return ConfigCheck(proc.returncode == 0, _said(proc), shlex.join([smtpd, *args]))


def require_config_ok(conf: Path, smtpd: str, what: str) -> None:
    """`smtpd -n -f CONF` or one MailsetupError line with smtpd's words."""
    check = check_config(conf, smtpd)
    if check is None or not check.ok:
        said = check.output.replace("\n", " | ") if check else "smtpd is not installed"
        raise MailsetupError(f"smtpd -n refuses {what}: {said}", exit_code=1)


def _isolation_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def start_foreground(smtpd: str, conf: Path, log: Path, private_spool: Path | None) -> tuple[subprocess.Popen, bool]:
    """`smtpd -d -f CONF` in its own session, its output in `log`; with `private_spool` (and where
    mount namespaces work) in a private one with that spool and its own /run, so its control socket
    and queue are not the host's. (the process, whether it is isolated)."""
    isolated = private_spool is not None and _isolation_works()
    if isolated:
        script = ('mount --bind "$1" /var/spool/smtpd && mount -t tmpfs -o mode=0755 tmpfs /run'
                  ' && exec "$2" -d -f "$3"')
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                "sh", str(private_spool), smtpd, str(conf)]
    else:
        argv = [smtpd, "-d", "-f", str(conf)]
    with log.open("w") as out:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            raise MailsetupError(f"{shlex.join(argv)}: {exc.strerror or exc}", exit_code=1) from None
    return proc, isolated


def stop_foreground(proc: subprocess.Popen) -> None:
    """SIGTERM to the daemon's whole session, SIGKILL when it does not end within 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


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


def smtpctl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """`smtpctl ARGS`, its exit status left to the caller; MailsetupError when it cannot run."""
    return _run("smtpctl", list(args), timeout)


def update_table(name: str) -> tuple[bool, str]:
    """`smtpctl update table NAME`: smtpd's lookup process re-reads the table. (ok, smtpctl's words)."""
    try:
        proc = smtpctl("update", "table", name, timeout=30)
    except MailsetupError as exc:
        return False, exc.message
    words = _said(proc).splitlines()
    return proc.returncode == 0, words[-1] if words else f"exit status {proc.returncode}"
