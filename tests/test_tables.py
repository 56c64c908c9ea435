"""Tables smtpd re-reads while it runs: `mailsetup user add/remove` reaches a running smtpd (the real
7.4, in a private mount namespace) and a running `mailsetup serve` without a restart; doctor flags a
credentials table smtpd's lookup user cannot read."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, SMTPD, run_cli
from mta_kit import PASSWORD, Serve, free_port, wait_port

needs_lookup_user = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("nsenter"), reason="needs root (to try as smtpd's user) and nsenter")


def lookup_gid() -> int:
    return grp.getgrnam("opensmtpd").gr_gid


@pytest.fixture
def root():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-tables-", dir="/tmp"))
    base.chmod(0o755)  # as /etc is: smtpd's unprivileged processes pass through
    root = base / "root"
    r = run_cli("init", "--yes", "--no-smoke", "--domain", "example.test", "--os", "debian", "--root", root,
                "--admin", "alice", "--smtp-port", free_port(), "--submission-port", free_port())
    assert r.code == 0, r.err
    r = run_cli("user", "add", "alice", "--password-stdin", "--root", root, input=PASSWORD + "\n")
    assert r.code == 0, r.err
    yield root
    shutil.rmtree(base, ignore_errors=True)


def tls_ctx(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "etc/ssl/certs/mail.example.test.crt"))
    ctx.check_hostname = False  # we dial 127.0.0.1; the cert itself is checked against the file
    return ctx


def auth_code(root: Path, port: int, user: str) -> int:
    """The reply code to AUTH PLAIN as `user` after STARTTLS on the submission port."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=tls_ctx(root))
        try:
            code, _ = c.login(user, PASSWORD)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        return code


class NamespacedSmtpd:
    """The real smtpd on the sandbox's files, with a loopback submission listener `auth <creds>`, in
    a private mount namespace whose /run (its control socket) and spool are its own."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.work = Path(tempfile.mkdtemp(prefix="mailsetup-smtpd-tables-"))
        self.work.chmod(0o711)
        self.log = self.work / "smtpd.log"

    def __enter__(self) -> NamespacedSmtpd:
        rendered = (self.root / "etc/smtpd.conf").read_text()
        pki = re.search(r"^pki (\S+) cert", rendered, re.M).group(1)
        lines = [line for line in rendered.splitlines() if not line.startswith("listen on")]
        lines.append(f"listen on 127.0.0.1 port {self.port} tls-require pki {pki} auth <creds>")
        conf = self.work / "smtpd.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        spool = self.work / "spool"
        spool.mkdir(mode=0o711)
        # unshare execs sh, which execs smtpd: the pid we hold is smtpd's, its ns/mnt the namespace.
        script = 'mount --bind "$1" /var/spool/smtpd && mount -t tmpfs -o mode=0755 tmpfs /run && exec "$2" -d -f "$3"'
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(spool), SMTPD,
             str(conf)], stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        try:
            wait_port(self.port, timeout=15)
        except TimeoutError:
            self.__exit__()
            raise AssertionError(self.log.read_text()) from None
        return self

    def cli(self, *args: object, input: str | None = None) -> subprocess.CompletedProcess:
        """The installed mailsetup, run inside smtpd's mount namespace (it sees that /run)."""
        return subprocess.run(
            ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--", MAILSETUP, *map(str, args)],
            input=input, capture_output=True, text=True, timeout=60, env=dict(os.environ, NO_COLOR="1"),
            stdin=None if input is not None else subprocess.DEVNULL)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.mark.skipif(not SMTPD, reason="needs OpenSMTPD installed")
@needs_lookup_user
def test_user_add_and_remove_reach_a_running_smtpd_without_a_restart(root: Path):
    creds = root / "etc/mailsetup/credentials"
    # The table is born root:<smtpd's lookup group> 0640 in a directory that group may enter.
    st = creds.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, lookup_gid(), 0o640)
    assert (creds.parent.stat().st_gid, creds.parent.stat().st_mode & 0o777) == (lookup_gid(), 0o710)
    with NamespacedSmtpd(root) as smtpd:
        assert auth_code(root, smtpd.port, "alice") == 235
        assert auth_code(root, smtpd.port, "bob") == 535
        added = smtpd.cli("user", "add", "bob", "--password-stdin", "--root", root, input=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        assert f"added bob in {creds}" in added.stdout
        assert f"reloaded table creds of the running smtpd (pid {smtpd.proc.pid}): the change is live" in added.stdout
        assert auth_code(root, smtpd.port, "bob") == 235  # no restart
        removed = smtpd.cli("user", "remove", "bob", "--root", root)
        assert removed.returncode == 0, removed.stderr
        assert f"reloaded table creds of the running smtpd (pid {smtpd.proc.pid})" in removed.stdout
        assert auth_code(root, smtpd.port, "bob") == 535
        assert smtpd.proc.poll() is None
        # When smtpd cannot re-read the table (a directory above it shut), the user hears it.
        base = root.parent
        base.chmod(0o700)
        try:
            failed = smtpd.cli("user", "add", "carol", "--password-stdin", "--root", root, input=PASSWORD + "\n")
        finally:
            base.chmod(0o755)
        assert failed.returncode == 1
        err = [line for line in failed.stderr.splitlines() if line.startswith("mailsetup:")]
        assert err == [f"mailsetup: error: the running smtpd (pid {smtpd.proc.pid}) could not re-read {creds}: "
                       "smtpctl update table creds: command failed"]
    # Outside its namespace no smtpd serves this file: nothing to reload, and it says so.
    later = run_cli("user", "remove", "carol", "--root", root)
    assert later.code == 0 and "no running smtpd here serves" in later.err


def doctor(root: Path) -> dict[str, dict]:
    r = run_cli("doctor", "--root", root, "--json")
    return {f["name"]: f for f in json.loads(r.out)}


@needs_lookup_user
def test_doctor_flags_a_credentials_table_smtpds_lookup_user_cannot_read(root: Path):
    name = "credentials table re-readable by smtpd"
    assert doctor(root)[name]["status"] == "ok"
    creds = root / "etc/mailsetup/credentials"
    os.chown(creds, 0, 0)  # root:root 0640, what a hand-made table often is
    found = doctor(root)
    assert found[name]["status"] == "fail"
    assert found[name]["detail"].startswith(f"smtpd's lookup user opensmtpd cannot open {creds} (Permission denied)")
    assert "re-run `mailsetup init`" in found[name]["detail"]
    # A re-run of init gives it back its group, keeping its users.
    assert run_cli("init", "--yes", "--no-smoke", "--root", root).code == 0
    assert creds.stat().st_gid == lookup_gid() and "alice $2b$" in creds.read_text()
    assert doctor(root)[name]["status"] == "ok"
    # The directory shut to the group: named as the one that keeps smtpd out.
    creds.parent.chmod(0o700)
    found = doctor(root)
    assert found[name]["status"] == "fail"
    assert found[name]["detail"].startswith(f"{creds.parent} (0700) keeps smtpd's lookup user opensmtpd out")


def test_serve_picks_up_a_user_added_while_it_runs(root: Path):
    with Serve(root) as served:
        assert auth_code(root, served.submission, "alice") == 235
        assert auth_code(root, served.submission, "bob") == 535
        assert run_cli("user", "add", "bob", "--password-stdin", "--root", root, input=PASSWORD + "\n").code == 0
        assert auth_code(root, served.submission, "bob") == 235  # no restart
        assert run_cli("user", "remove", "bob", "--root", root).code == 0
        assert auth_code(root, served.submission, "bob") == 535
        loads = served.log_text().count("loaded ")
        served.proc.send_signal(signal.SIGHUP)  # re-reads on demand too, and keeps serving
        deadline = time.monotonic() + 10
        while served.log_text().count("loaded ") == loads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.log_text().count(f"loaded {root}/etc/mailsetup/credentials: 1 login(s)") == 2
        assert served.proc.poll() is None
        assert auth_code(root, served.submission, "alice") == 235


@pytest.mark.skipif(not IS_ROOT, reason="giving a file a group needs root")
def test_a_table_is_born_with_its_group_and_a_failed_plan_puts_its_directory_back(tmp_path: Path):
    from mailsetup.errors import MailsetupError
    from mailsetup.plan import FileChange, apply_plan

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    table = FileChange(state / "credentials", b"bob $2b$10$x\n", 0o640, "creds", secret=True, owner=(0, 65534))
    blocked = FileChange(tmp_path / "table" / "x", b"y\n", 0o644, "a file under a file: cannot be written")
    (tmp_path / "table").write_text("")
    with pytest.raises(MailsetupError):
        apply_plan([table, blocked])
    assert not (state / "credentials").exists()
    assert (state.stat().st_gid, state.stat().st_mode & 0o777) == (0, 0o700)
    apply_plan([table])
    st = (state / "credentials").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 65534, 0o640)
    assert (state.stat().st_gid, state.stat().st_mode & 0o777) == (65534, 0o710)
    assert table.state() == "unchanged"
