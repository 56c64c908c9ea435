"""The smoke test's IMAP step (--imap dovecot): a Dovecot of its own on a loopback port, rendered from
the same template as dovecot.conf, reads the Maildir the test message went to over IMAPS with a
throw-away password; a wrong password is refused. Stopped and removed whatever happens.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOBODY = 65534  # Debian's nobody and nogroup


def serving_plan(maildir: Path) -> tuple[list[str], int, int, dict | None] | str:
    """How a Dovecot of our own can read `maildir` as the account that owns it: (command prefix, uid,
    gid, rootless names), or why it cannot.
    - Root, and the Maildir a person's (a host; the real smtpd's in a sandbox): Dovecot starts as root
      and drops to that uid, as the packaged one does.
    - The Maildir ours (a sandbox with the embedded MTA delivers as whoever runs mailsetup): Dovecot
      runs rootless, all of it as us. Dovecot never serves uid 0, so root runs it in a user namespace
      of its own where root is `nobody` (the files it reads are still root's, and nothing else changes:
      the embedded MTA on the same loopback runs as root as well)."""
    import grp
    import pwd

    from mailsetup.files import _controllers

    try:
        st = maildir.stat()
        me = os.geteuid()
        steered = me == 0 and _controllers(maildir) - {st.st_uid}
    except OSError as exc:
        return f"it cannot be looked at ({exc.strerror})"
    if steered:
        # Root's Dovecot reads (and writes its indexes, moves new/ to cur/) as the Maildir's owner: a
        # path someone else steers (a link swapped in, another user's folder on the way) could point it
        # at root's or a third user's mail, which it would then read and change with their rights.
        return "a user other than its owner controls its path (a link or a folder of theirs on the way)"
    if me == 0 and st.st_uid != 0:
        return [], st.st_uid, st.st_gid, None
    if st.st_uid != me:
        return f"it belongs to uid {st.st_uid}, and only root can read another account's mail"
    if me != 0:
        return [], me, os.getegid(), {"user": pwd.getpwuid(me).pw_name, "group": grp.getgrgid(os.getegid()).gr_name}
    try:
        names = {"user": pwd.getpwuid(NOBODY).pw_name, "group": grp.getgrgid(NOBODY).gr_name}
    except KeyError:
        return f"this system has no uid/gid {NOBODY} (nobody) to run it as in a user namespace"
    prefix = ["unshare", "--user", f"--map-user={NOBODY}", f"--map-group={NOBODY}", "--"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"a user namespace could not be made (unshare: {exc})"
    if probe.returncode != 0:
        return "a user namespace could not be made (unshare --user refused here)"
    return prefix, NOBODY, NOBODY, names


class LoopbackDovecot:
    """`dovecot -F -c FILE` on 127.0.0.1:PORT, its base_dir a private temp dir; one login: `user`
    with `hashed` (bcrypt), reading `maildir` as the account that owns it (`serving_plan`)."""

    def __init__(self, setup: MailSetup, user: str, hashed: str, maildir: Path):
        from mailsetup.opensmtpd import find_binary

        self.binary = find_binary("dovecot")
        if not self.binary:
            raise MailsetupError("Dovecot is not installed here (dovecot not found)", exit_code=1)
        self.setup, self.user, self.hashed, self.maildir = setup, user, hashed, maildir
        self.work = Path(tempfile.mkdtemp(prefix="mailsetup-dovecot-"))
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> LoopbackDovecot:
        from mailsetup.dovecot import render_imap_users
        from mailsetup.render import render_dovecot_conf

        how = serving_plan(self.maildir)
        if isinstance(how, str):
            raise MailsetupError(f"Dovecot cannot serve {self.maildir}: {how}", exit_code=1)
        prefix, uid, gid, rootless = how
        self.work.chmod(0o755)  # Dovecot's login processes run unprivileged under base_dir
        users = self.work / "users"
        users.write_bytes(render_imap_users([_Cred(self.user, self.hashed)]))
        users.chmod(0o644)  # a throw-away hash of a throw-away password, gone with the dir
        conf = self.work / "dovecot.conf"  # outside base_dir, where Dovecot links dovecot.conf to it
        self.base = self.work / "run"
        self.base.mkdir(mode=0o755)
        conf.write_text(render_dovecot_conf(self.setup, self.port, loopback={
            "base_dir": self.base, "users": users, "uid": uid, "gid": gid, "home": self.maildir.parent,
            "rootless": rootless}))
        self.proc = subprocess.Popen([*prefix, self.binary, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise MailsetupError(f"dovecot -F exited {self.proc.returncode}: {self.log_tail()}", exit_code=1)
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise MailsetupError(f"Dovecot did not listen on 127.0.0.1:{self.port} within 15 s: {self.log_tail()}",
                             exit_code=1)

    def log_tail(self) -> str:
        try:
            return (self.base / "dovecot.log").read_text(errors="replace")[-300:].strip().replace("\n", " | ")
        except OSError:
            return (self.proc.stderr.read()[-300:] if self.proc and self.proc.stderr else "").strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)


class _Cred:
    def __init__(self, user: str, hashed: str):
        self.user, self.hash = user, hashed


class _Imaps(imaplib.IMAP4_SSL):
    """IMAPS to a loopback port that checks the certificate for the mail host's name, as a client
    that connects to that name would (the smoke test's SMTP client does the same)."""

    def __init__(self, port: int, tls: ssl.SSLContext, server_name: str):
        self.server_name = server_name
        super().__init__("127.0.0.1", port, ssl_context=tls, timeout=15)

    def _create_socket(self, timeout):
        plain = imaplib.IMAP4._create_socket(self, timeout)
        return self.ssl_context.wrap_socket(plain, server_hostname=self.server_name)


def _fetch_all(port: int, tls: ssl.SSLContext, user: str, password: str, server_name: str) -> list[bytes]:
    with _Imaps(port, tls, server_name) as imap:
        imap.login(user, password)
        imap.select("INBOX", readonly=True)
        _, found = imap.search(None, "ALL")
        bodies = [imap.fetch(n, "(BODY.PEEK[])")[1][0][1] for n in found[0].split()]
        imap.logout()
        return bodies


def read_back(setup: MailSetup, tls: ssl.SSLContext, user: str, maildir: Path, token: str,
              password: str, hashed: str) -> str:
    """The message with `token` read back from `user`'s Maildir over IMAPS; a wrong password refused."""
    dovecot = LoopbackDovecot(setup, user, hashed, maildir).start()
    try:
        bodies = _fetch_all(dovecot.port, tls, user, password, setup.hostname)
        assert any(token.encode() in b for b in bodies), f"IMAP shows {len(bodies)} message(s), not the test message"
        try:
            _fetch_all(dovecot.port, tls, user, password + "-wrong", setup.hostname)
        except imaplib.IMAP4.error:
            pass
        else:
            raise AssertionError("Dovecot accepted a wrong password")
    finally:
        dovecot.stop()
    return (f"Dovecot on 127.0.0.1:{dovecot.port} (IMAPS, {Path(setup.tls.cert).name}) shows it in {user}'s INBOX; "
            "a wrong password is refused")
