"""The real OpenSMTPD on loopback, for the smoke test: the rendered smtpd.conf with only its
listeners (free loopback ports) and its outbound relay (a local sink) changed, run in the
foreground with its own spool and control socket, always stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mailsetup import opensmtpd
from mailsetup.errors import MailsetupError


def derive_config(rendered: str, hostname: str, smtp_port: int, submission_port: int, relay_port: int,
                  listen: str = "127.0.0.1") -> str:
    """The same configuration with its listeners moved to loopback ports and relaying to a sink."""
    out = []
    placed = False
    for line in rendered.splitlines():
        if line.startswith("listen on "):
            if not placed:
                for port, mode in ((smtp_port, "tls"), (submission_port, "tls-require")):
                    auth = "auth-optional" if mode == "tls" else "auth"
                    out.append(f"listen on {listen} port {port} {mode} pki {hostname} {auth} <creds> "
                               f"hostname {hostname}")
                placed = True
            continue
        relay = re.match(r'^action "outbound" relay(?P<helo> helo \S+)?\s*$', line)
        if relay:
            line = f'action "outbound" relay host smtp://127.0.0.1:{relay_port}{relay["helo"] or ""}'
        out.append(line)
    text = "\n".join(out) + "\n"
    if not placed or f"relay host smtp://127.0.0.1:{relay_port}" not in text:
        raise MailsetupError("smtpd.conf does not look like mailsetup's (no listen or outbound relay lines)",
                             exit_code=1)
    return text


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MailsetupError(f"smtpd exited (status {proc.returncode}) before listening", exit_code=1)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise MailsetupError(f"smtpd did not listen on {host}:{port} within {timeout:.0f} s", exit_code=1)


class RealSmtpd:
    """`smtpd -d -f CONF` in a private mount namespace (own spool, own /run), stopped on exit."""

    def __init__(self, smtpd: str, conf_text: str, ports: tuple[int, ...]):
        self.smtpd = smtpd
        self.conf_text = conf_text
        self.ports = ports
        self.work = Path(tempfile.mkdtemp(prefix="mailsetup-smtpd-"))
        self.work.chmod(0o711)
        self.conf = self.work / "smtpd.conf"
        self.log = self.work / "smtpd.log"
        self.proc: subprocess.Popen | None = None
        self.isolated = False

    def start(self) -> RealSmtpd:
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the queue key
        with os.fdopen(fd, "w") as fh:
            fh.write(self.conf_text)
        opensmtpd.require_config_ok(self.conf, self.smtpd, "the loopback copy of smtpd.conf")
        spool = self.work / "spool"
        spool.mkdir(mode=0o711)
        self.proc, self.isolated = opensmtpd.start_foreground(self.smtpd, self.conf, self.log, spool)
        try:
            for port in self.ports:
                wait_port(port, self.proc)
        except MailsetupError as exc:
            tail = self.log_tail()
            self.stop()
            raise MailsetupError(f"{exc.message}: {tail}", exit_code=1) from None
        return self

    def log_tail(self, n: int = 400) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            opensmtpd.stop_foreground(self.proc)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> RealSmtpd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
