"""Delivery on a real host (no --root) runs as root into a user's home: what the user put there
(links, a rename race) must never steer root's writes, and what is delivered belongs to the user.

Each test makes its own host: a private mount namespace over a copy of /etc (where useradd makes the
throwaway users) and an empty /home and /run, in which `mailsetup init` and `mailsetup serve` (or
`mailsetup smoke`) run as root. The test reaches that /home through the directory it bind-mounts, and
talks SMTP to the server on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, Run, own_var
from mta_kit import free_port, wait_port

pytestmark = pytest.mark.skipif(not (IS_ROOT and shutil.which("unshare") and shutil.which("useradd")),
                                reason="needs root, unshare and useradd for a private mount namespace")

USER = "dlvuser"  # the admin, so postmaster -> root -> USER too


class Host:
    """This machine seen through a private mount namespace: /etc a copy, /home and /run empty. Each
    command is a fresh namespace over the same copies, so what one writes the next one sees."""

    def __init__(self, base: Path):
        self.base = base
        self.etc, self.home = base / "etc", base / "home"
        subprocess.run(["cp", "-a", "/etc", str(self.etc)], check=True)
        self.home.mkdir(mode=0o755)
        self.log = base / "serve.log"

    def command(self, *args: object) -> list[str]:
        mounts = (f"mount --bind {self.etc} /etc && mount --bind {self.home} /home "
                  f"&& mount -t tmpfs tmpfs /run && {own_var(f'{self.etc}.var', f'{self.etc}.var-work')}")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh",
                *map(str, args)]

    def run(self, *args: object) -> Run:
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=180,
                              env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def add_user(self, name: str) -> tuple[int, int]:
        r = self.run("useradd", "-m", "-s", "/usr/sbin/nologin", name)
        assert r.code == 0, r.err
        for line in (self.etc / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
        raise AssertionError(f"{name} is not in the copy of /etc/passwd")

    def init(self) -> None:
        r = self.run(MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--admin", USER,
                     "--no-smoke", "--no-preflight")  # a real host's init would ask the world's DNS and port 25
        assert r.code == 0, r.out + r.err

    def serve(self) -> Serving:
        return Serving(self)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Serving:
    """`mailsetup serve` (no --root) in the host's namespace, on free loopback ports."""

    def __init__(self, host: Host):
        self.host = host
        self.port = free_port()
        self._log = open(host.log, "ab")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            host.command(MAILSETUP, "serve", "--smtp-port", self.port, "--submission-port", free_port()),
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"),
        )

    def __enter__(self) -> Serving:
        try:
            wait_port(self.port, 20)
        except TimeoutError:
            self.__exit__()
            raise AssertionError("serve did not start: " + self.host.log_text()) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def send(self, to: str, n: int = 1) -> list[tuple[int, str]]:
        """Send n messages to `to` in one session; the reply to each DATA."""
        replies = []
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.invalid", timeout=20) as c:
            for i in range(n):
                try:
                    c.sendmail("sender@example.net", [to], f"Subject: test {i}\n\nmessage {i}\n")
                    replies.append((250, "ok"))
                except smtplib.SMTPDataError as exc:
                    replies.append((exc.smtp_code, exc.smtp_error.decode(errors="replace")))
        return replies


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    h.uid, h.gid = h.add_user(USER)  # type: ignore[attr-defined]
    h.init()
    return h


def root_only_dir(host: Host) -> Path:
    """/home/rootonly in the namespace: root's, 0700, where no mail of a user may ever land."""
    d = host.home / "rootonly"
    d.mkdir(mode=0o700)
    return d


def users_maildir(host: Host, *subdirs: str) -> Path:
    md = host.home / USER / "Maildir"
    md.mkdir(mode=0o700)
    os.chown(md, host.uid, host.gid)
    for sub in subdirs:
        (md / sub).mkdir(mode=0o700)
        os.chown(md / sub, host.uid, host.gid)
    return md


def users_link(target: str, link: Path, host: Host) -> None:
    link.symlink_to(target)
    os.lchown(link, host.uid, host.gid)  # the user's own link, as they would make it


REFUSED = "refusing to deliver to /home/{user}/Maildir{sub}: it is not a folder but a link or a file"


def test_maildir_new_a_link_to_a_root_only_folder_gets_nothing(host: Host):
    rootonly = root_only_dir(host)
    md = users_maildir(host, "tmp", "cur")
    users_link("/home/rootonly", md / "new", host)
    with host.serve() as srv:
        [(code, text)] = srv.send(f"{USER}@example.test")
    assert code == 451, text
    assert "a local mailbox cannot be written safely" in text
    assert list(rootonly.iterdir()) == []  # nothing written through the link
    assert list((md / "tmp").iterdir()) == []  # and nothing left half-delivered
    assert REFUSED.format(user=USER, sub="/new") in host.log_text()


def test_maildir_a_link_elsewhere_gets_no_folders_made_there(host: Host):
    elsewhere = host.home / "elsewhere"  # root's, as anything outside the user's reach would be
    elsewhere.mkdir(mode=0o755)
    users_link("/home/elsewhere", host.home / USER / "Maildir", host)
    with host.serve() as srv:
        [(code, text)] = srv.send(f"{USER}@example.test")
    assert code == 451, text
    assert list(elsewhere.iterdir()) == []  # no tmp/, new/, cur/ made through the link
    assert REFUSED.format(user=USER, sub="") in host.log_text()


def test_a_rename_race_on_maildir_tmp_never_steers_root(host: Host):
    """A thread of the user's swaps ~/Maildir/tmp for a link to a root-only folder, and swaps a
    folder root has just made for a root-only file of theirs (the mkdir-then-chown window), in a loop
    while 50 messages are delivered."""
    rootonly = root_only_dir(host)
    md = users_maildir(host, "tmp", "new", "cur")
    secret = host.home / USER / "root-only"  # a file root left in the user's home: root's, 0600
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    tmp, aside = md / "tmp", md / "tmp.aside"
    stop = threading.Event()
    swaps = {"link": 0, "secret": 0}

    def race() -> None:
        while not stop.is_set():
            try:  # 1. tmp/ becomes a link to the root-only folder for a moment
                tmp.rename(aside)
                users_link("/home/rootonly", tmp, host)
                swaps["link"] += 1
                time.sleep(0.0005)
                tmp.unlink()
                aside.rename(tmp)
            except OSError:
                pass
            try:  # 2. tmp/ goes; the moment it is made again, it is swapped for the root-only file
                shutil.rmtree(tmp)
                deadline = time.monotonic() + 0.02
                while not stop.is_set() and time.monotonic() < deadline:
                    if os.path.lexists(tmp) and not os.path.lexists(aside):
                        tmp.rename(aside)
                        secret.rename(tmp)
                        swaps["secret"] += 1
                        time.sleep(0.0005)
                        tmp.rename(secret)
                        break
                if os.path.lexists(aside):
                    shutil.rmtree(aside, ignore_errors=True)
                if not os.path.lexists(tmp):
                    tmp.mkdir(mode=0o700)
                    os.chown(tmp, host.uid, host.gid)
            except OSError:
                pass
            time.sleep(0.001)

    racer = threading.Thread(target=race, daemon=True)
    with host.serve() as srv:
        racer.start()
        try:
            replies = srv.send(f"{USER}@example.test", 50)
        finally:
            stop.set()
            racer.join(10)
        if tmp.is_symlink():  # the racer stopped mid-swap
            tmp.unlink()
        replies += srv.send(f"{USER}@example.test")  # once the race is over, mail arrives again
    assert replies[-1][0] == 250, replies[-1]
    assert swaps["link"] > 10, swaps
    assert all(code in (250, 451) for code, _ in replies), replies
    assert list(rootonly.iterdir()) == []  # nothing ever written into the root-only folder
    st = os.lstat(secret) if os.path.lexists(secret) else os.lstat(tmp)
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # still root's
    delivered = [p for d in (md / "new", md / "tmp", aside) if d.is_dir() and not d.is_symlink()
                 for p in d.iterdir()]
    assert sum(1 for code, _ in replies if code == 250) == len(list((md / "new").iterdir()))
    for p in delivered:
        assert p.lstat().st_uid == host.uid and stat.S_IMODE(p.lstat().st_mode) == 0o600, p
    for d in (md, md / "new", md / "cur"):
        assert d.lstat().st_uid == host.uid, d


def test_a_fresh_user_gets_a_maildir_and_mail_of_their_own(host: Host):
    uid, gid = host.add_user("dlvfresh")
    home = host.home / "dlvfresh"
    assert not (home / "Maildir").exists()
    with host.serve() as srv:
        [(code, text)] = srv.send("dlvfresh@example.test")
    assert code == 250, text + host.log_text()
    for d in ("Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        st = (home / d).lstat()
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o700), d
    [mail] = (home / "Maildir/new").iterdir()
    st = mail.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o600)
    assert b"message 0" in mail.read_bytes()
    assert list((home / "Maildir/tmp").iterdir()) == []


def test_a_home_that_is_not_the_users_own_gets_nothing(host: Host):
    uid, gid = host.add_user("dlvother")
    home = host.home / "dlvother"
    os.chown(home, 0, 0)  # e.g. a home an admin took over: root's, not the user's
    with host.serve() as srv:
        [(code, text)] = srv.send("dlvother@example.test")
    assert code == 451, text
    assert not (home / "Maildir").exists()
    assert (f"refusing to deliver to /home/dlvother: /home/dlvother is owned by uid 0, not by its user (uid {uid})"
            in host.log_text())


def test_the_smoke_test_on_this_host_delivers_the_same_way(host: Host):
    """`mailsetup smoke` (as `init` runs it) delivers through the same path as serve: the admin's
    Maildir is theirs, the smoke message is taken out again, and a link in their Maildir fails the
    inbound check instead of being written through."""
    r = host.run(MAILSETUP, "smoke")
    assert r.code == 0, r.out + r.err
    md = host.home / USER / "Maildir"
    for d in (md, md / "tmp", md / "new", md / "cur"):
        assert (d.lstat().st_uid, stat.S_IMODE(d.lstat().st_mode)) == (host.uid, 0o700), d
    assert list((md / "new").iterdir()) == []  # its own message removed again

    rootonly = root_only_dir(host)
    (md / "new").rmdir()
    users_link("/home/rootonly", md / "new", host)
    r = host.run(MAILSETUP, "smoke")
    assert r.code == 1, r.out + r.err
    assert "✗ inbound over STARTTLS through the aliases into Maildir" in r.out
    assert "451" in r.out and "a local mailbox cannot be written safely" in r.out
    assert REFUSED.format(user=USER, sub="/new") in r.err
    assert list(rootonly.iterdir()) == []


def test_a_home_moved_or_taken_over_while_serving_is_judged_again(host: Host):
    """serve keeps the user's opened home between messages; a home moved aside and made anew gets
    the next message, and a home no longer the user's gets none."""
    home = host.home / USER
    with host.serve() as srv:
        assert srv.send(f"{USER}@example.test")[0][0] == 250
        home.rename(host.home / "moved-aside")
        home.mkdir(mode=0o700)
        os.chown(home, host.uid, host.gid)
        assert srv.send(f"{USER}@example.test")[0][0] == 250
        assert len(list((host.home / "moved-aside/Maildir/new").iterdir())) == 1
        assert len(list((home / "Maildir/new").iterdir())) == 1
        os.chown(home, 0, 0)
        [(code, _)] = srv.send(f"{USER}@example.test")
        assert code == 451
        assert len(list((home / "Maildir/new").iterdir())) == 1
    assert f"refusing to deliver to /home/{USER}: /home/{USER} is owned by uid 0" in host.log_text()
