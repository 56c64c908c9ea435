"""The real OpenSMTPD on loopback, for the smoke test: smtpd.conf rendered from the set-up with only
its listeners (free loopback ports) and its outbound relay (a local sink) changed, run in the
foreground with its own spool and control socket, always stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mailsetup import opensmtpd
from mailsetup.errors import MailsetupError
from mailsetup.files import read_secret
from mailsetup.model import Listener, MailSetup
from mailsetup.queuekey import read_queue_key
from mailsetup.render import render_smtpd_conf


def loopback_setup(setup: MailSetup, smtp_port: int, submission_port: int, listen: str = "127.0.0.1") -> MailSetup:
    """The same set-up listening only on loopback ports: the smtp and submission listeners moved, and
    no `listen on localhost` (port 25 on loopback may be this host's own smtpd's)."""
    listeners = (Listener("smtp", listen, smtp_port, "starttls", "optional"),
                 Listener("submission", listen, submission_port, "require", "required"))
    # The smoke test runs no Dovecot: the loopback smtpd writes the Maildir itself, the one LMTP writes.
    return replace(setup, listeners=listeners, layout=setup.layout._replace(localhost_listener=""), imap="none")


def loopback_config(setup: MailSetup, smtp_port: int, submission_port: int, relay_port: int,
                    listen: str = "127.0.0.1") -> str:
    """smtpd.conf for the loopback smtpd, rendered from the model through the same template as the
    real one, relaying to a sink on `relay_port`. It uses the set-up's own files (cert, key, queue
    key, aliases.db or the aliases file, credentials)."""
    return render_smtpd_conf(loopback_setup(setup, smtp_port, submission_port, listen), *_render_inputs(setup),
                             relay_host=f"smtp://127.0.0.1:{relay_port}", dkim_keys=dkim_keys_on_disk(setup))


def _render_inputs(setup: MailSetup) -> tuple[str | None, str]:
    """The queue key and the aliases table format the written smtpd.conf was rendered with."""
    queue_key = read_queue_key(Path(setup.queue.key_file)) if setup.queue.encryption else None
    return queue_key, "db" if Path(setup.layout.aliases_db).exists() else "file"


def dkim_keys_on_disk(setup: MailSetup) -> list:
    """The DKIM keys the state file lists (none when signing is off)."""
    from mailsetup import dkim

    return dkim.read_state(Path(setup.layout.dkim_state)) if setup.dkim else []


def _rules(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def check_written_config(setup: MailSetup) -> None:
    """The loopback smtpd runs what the set-up renders; so that it proves the smtpd.conf smtpd reads,
    that file must say the same (comments aside). The error names the first line that differs, never
    its text (the file holds the queue key)."""
    path = Path(setup.layout.smtpd_conf)
    try:
        found = _rules(read_secret(path).decode(errors="replace"))
    except FileNotFoundError:
        raise MailsetupError(f"{path}: missing; run `mailsetup init` first", exit_code=1) from None
    wanted = _rules(render_smtpd_conf(setup, *_render_inputs(setup), dkim_keys=dkim_keys_on_disk(setup)))
    for i in range(max(len(found), len(wanted))):
        if i >= len(found) or i >= len(wanted) or found[i][1] != wanted[i][1]:
            where = f"{path}:{found[i][0]}" if i < len(found) else f"{path}: ends before a line"
            raise MailsetupError(f"{where} differs from what the set-up renders, so smtpd would not run what the "
                                 "smoke test proves; re-run `mailsetup init`", exit_code=1)


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
