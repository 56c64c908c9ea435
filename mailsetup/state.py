"""What an earlier run left on disk — certificate, keys, users, aliases, queued mail — read for the
re-run summary and for the checks that make rotation safe.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup
from mailsetup.opensmtpd import find_binary

OPENSMTPD_SPOOL = Path("/var/spool/smtpd")


@dataclass(frozen=True)
class ExistingState:
    cert_subject: str | None
    cert_expires: str | None
    cert_days_left: int | None
    key_type: str | None
    queue_key_age_days: int | None
    users: int
    aliases: int

    def lines(self) -> list[str]:
        out = []
        if self.cert_subject:
            out.append(f"certificate: {self.cert_subject}, {self.key_type}, expires {self.cert_expires} "
                       f"({self.cert_days_left} days left)")
        else:
            out.append("certificate: none yet")
        out.append("queue key: " + (f"{self.queue_key_age_days} days old" if self.queue_key_age_days is not None
                                    else "none"))
        out.append(f"mail users: {self.users}; aliases: {self.aliases}")
        return out

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def read_state(setup: MailSetup) -> ExistingState:
    from mailsetup import aliases as aliases_mod
    from mailsetup import credentials, pki

    subject = expires = key_type = None
    days_left = None
    if Path(setup.tls.cert).exists():
        try:
            info = pki.inspect_cert(pki.load_cert(Path(setup.tls.cert)))
            subject, key_type = info.subject, info.key_type
            expires, days_left = f"{info.not_after:%Y-%m-%d}", info.days_left()
        except MailsetupError as exc:
            subject = f"unreadable ({exc.message})"
    qk = Path(setup.queue.key_file)
    age = int((time.time() - qk.stat().st_mtime) // 86400) if qk.exists() else None
    try:
        users = len(credentials.read_credentials(Path(setup.layout.credentials)))
    except MailsetupError:
        users = 0
    try:
        n_aliases = len(aliases_mod.parse_aliases_file(Path(setup.layout.aliases)))
    except MailsetupError:
        n_aliases = 0
    return ExistingState(subject, expires, days_left, key_type, age, users, n_aliases)


def _smtpctl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess | None:
    smtpctl = find_binary("smtpctl")
    if not smtpctl:
        return None
    try:
        return subprocess.run([smtpctl, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


def opensmtpd_queue() -> tuple[bool, int]:
    """(smtpd is running, envelopes queued). Without a running smtpd, count the spool's files."""
    proc = _smtpctl("show", "queue")
    if proc is not None and proc.returncode == 0:
        return True, len([line for line in proc.stdout.splitlines() if line.strip()])
    queue = OPENSMTPD_SPOOL / "queue"
    try:
        count = sum(1 for p in queue.rglob("*") if p.is_file())
    except OSError:
        count = 0
    return False, count


def queued_mail(setup: MailSetup) -> list[str]:
    """Where mail encrypted with the current queue key still waits; empty means rotation is safe."""
    found = []
    ours = Path(setup.layout.queue_dir)
    if ours.is_dir():
        n = sum(1 for p in ours.iterdir() if p.is_file())
        if n:
            found.append(f"{n} message(s) in mailsetup's queue {ours}")
    if setup.root is None:  # a sandbox has no OpenSMTPD spool of its own
        running, n = opensmtpd_queue()
        if n:
            how = "smtpctl show queue" if running else f"files in {OPENSMTPD_SPOOL}/queue, smtpd not running"
            found.append(f"{n} envelope(s) in OpenSMTPD's queue ({how})")
    return found


def drain_opensmtpd(timeout: float, say) -> None:
    """Stop taking new mail (`smtpctl pause smtp`) and wait until smtpd's queue is empty."""
    proc = _smtpctl("pause", "smtp")
    if proc is None or proc.returncode != 0:
        raise MailsetupError("--drain: smtpd is not running (smtpctl pause smtp failed); its queued mail cannot "
                             "drain; start it, or pass --force-rotate to strand that mail", exit_code=1)
    say("paused smtpd's intake (smtpctl pause smtp); waiting for its queue to empty…")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running, n = opensmtpd_queue()
        if running and n == 0:
            return
        time.sleep(1)
    raise MailsetupError(f"--drain: smtpd's queue did not empty in {timeout:.0f} s; nothing rotated "
                         "(intake stays paused: smtpctl resume smtp)", exit_code=1)


def resume_opensmtpd() -> None:
    """Undo `smtpctl pause smtp` when we end up not rotating."""
    _smtpctl("resume", "smtp")
