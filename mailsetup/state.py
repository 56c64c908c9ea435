"""What an earlier run left on disk — certificate, keys, users, aliases, queued mail — read for the
re-run summary and for the checks that make rotation safe.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup
from mailsetup.opensmtpd import smtpctl

if TYPE_CHECKING:
    import subprocess

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
        n_aliases = len(aliases_mod.parse_aliases_file(Path(setup.layout.aliases), setup.smtpd_version))
    except MailsetupError:
        n_aliases = 0
    return ExistingState(subject, expires, days_left, key_type, age, users, n_aliases)


def _smtpctl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess | None:
    """smtpctl's answer, or None when it is missing or hangs: then no smtpd answers either."""
    try:
        return smtpctl(*args, timeout=timeout)
    except MailsetupError:
        return None


def smtpd_answers() -> bool:
    """Whether a running smtpd answers on its control socket. `smtpctl show queue` cannot tell: with
    no daemon it reads the spool itself and, for an encrypted queue, only warns and still exits 0."""
    proc = _smtpctl("show", "status")
    return proc is not None and proc.returncode == 0


def opensmtpd_queue(spool: Path = OPENSMTPD_SPOOL) -> tuple[bool, int]:
    """(smtpd answered, envelopes queued): smtpd's own count when it answers, else the spool's on disk."""
    from mailsetup import spool as spool_mod

    if smtpd_answers():
        proc = _smtpctl("show", "queue")
        if proc is not None and proc.returncode == 0:
            return True, len([line for line in proc.stdout.splitlines() if line.strip()])
    return False, len(spool_mod.queued_envelopes(spool))


def opensmtpd_sessions() -> int | None:
    """SMTP sessions open in smtpd now (`smtp.session` in `smtpctl show stats`), None when it does not say.
    `pause smtp` only stops new sessions: one open before it can still commit a message, under the
    key in force then, after the queue was seen empty."""
    proc = _smtpctl("show", "stats")
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "smtp.session" and value.strip().isdigit():
            return int(value)
    return 0  # smtpd lists a counter only once it has counted something


@dataclass(frozen=True)
class Queued:
    """Mail waiting under the current queue key; `drainable` when a running smtpd can deliver it first."""

    count: int
    where: str
    drainable: bool
    smtpd: bool = True  # in OpenSMTPD's spool, not mailsetup's own queue

    def __str__(self) -> str:
        return self.where


def queued_mail(setup: MailSetup) -> list[Queued]:
    """Where mail encrypted with the current queue key still waits; empty means rotation is safe."""
    from mailsetup import spool as spool_mod

    found = []
    ours = Path(setup.layout.queue_dir)
    if ours.is_dir():
        n = sum(1 for p in ours.iterdir() if p.is_file())
        if n:
            found.append(Queued(n, f"{n} message(s) in mailsetup's queue {ours}", False, smtpd=False))
    spool = Path(setup.layout.spool)
    if setup.root is None:
        running, n = opensmtpd_queue(spool)
    else:  # the host's smtpd is not the sandbox's: only the sandbox's spool, on disk
        running, n = False, len(spool_mod.queued_envelopes(spool))
    if n:
        how = "smtpctl show queue" if running else f"counted in {spool}/queue: smtpd is not answering"
        found.append(Queued(n, f"{n} envelope(s) in OpenSMTPD's queue ({how})", running))
    return found


@contextlib.contextmanager
def interrupt_on_termination():
    """SIGTERM and SIGHUP (a killed job, a closed terminal) unwind like Ctrl-C while smtpd is paused,
    so the code that resumes it runs: a paused MX takes no mail."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, stop)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


SETTLE = 1.0  # seconds the drained state must hold before the queue key may change


def drain_opensmtpd(timeout: float, say) -> None:
    """Stop taking new mail (`smtpctl pause smtp`) and wait until no SMTP session is open and smtpd's
    queue is empty. On a timeout, an interrupt or any error smtpd's intake is resumed before the
    exception goes on."""
    try:
        proc = _smtpctl("pause", "smtp")
    except BaseException:  # interrupted while smtpctl ran: smtpd may be paused already
        resume_opensmtpd(say)
        raise
    if proc is None or proc.returncode != 0:
        raise MailsetupError("--drain: smtpd is not running (smtpctl pause smtp failed); its queued mail cannot "
                             "drain; start it, or pass --force-rotate to strand that mail", exit_code=1)
    try:
        say("paused smtpd's intake (smtpctl pause smtp); waiting for its queue to empty…")
        deadline = time.monotonic() + timeout
        clean_since: float | None = None
        while True:
            sessions = opensmtpd_sessions()  # first: a session still open can queue one more message
            running, n = opensmtpd_queue()
            if not running:
                raise MailsetupError("--drain: smtpd stopped answering while its queue drained; nothing rotated",
                                     exit_code=1)
            if n == 0 and sessions == 0:
                # Clean twice, a second apart: `smtpctl pause` and smtpd's session count both reach
                # its processes by message, so a session accepted just as the pause was asked for
                # can be missing from the first look (the small internet caught one committing
                # under the old key that way).
                if clean_since is not None and time.monotonic() - clean_since >= SETTLE:
                    return
                clean_since = clean_since if clean_since is not None else time.monotonic()
            else:
                clean_since = None
            left = deadline - time.monotonic()
            if left <= 0 and clean_since is None:  # (drained at the deadline: one more look, not a failure)
                held = (f"smtpd's queue still holds {n} envelope(s)" if n else
                        f"{sessions if sessions is not None else 'an unknown number of'} SMTP session(s) still open")
                raise MailsetupError(f"--drain: {held} after {timeout:g} s (--drain-timeout); nothing rotated, and "
                                     "smtpd takes mail again", exit_code=1)
            time.sleep(SETTLE if clean_since is not None else min(1.0, left))
    except BaseException:
        resume_opensmtpd(say)
        raise


def resume_opensmtpd(say=None) -> bool:
    """Undo `smtpctl pause smtp` when we end up not rotating; says so, or what to run by hand."""
    proc = _smtpctl("resume", "smtp")
    ok = proc is not None and proc.returncode == 0
    if say is not None:
        if ok:
            say("resumed smtpd's intake (smtpctl resume smtp): nothing was rotated.", err=True)
        else:
            say("warning: could not resume smtpd's intake; run: smtpctl resume smtp", fg="yellow", err=True)
    return ok
