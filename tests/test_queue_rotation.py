"""Rotating the queue key on a host whose real smtpd holds queued mail: refused while the mail is
there (asked of smtpd, or counted on disk while smtpd is down); `--drain` always gives smtpd its
intake back (timeout, Ctrl-C, a kill); `--force-rotate` keeps the old key and prints the way back,
which really delivers; `doctor` finds the envelopes the current key cannot open.

Each test makes its own host: a private mount and network namespace with a copy of /etc, its own
/var/spool/smtpd and /run, and only loopback (so the queued mail's MX lookups fail and it stays queued).
The CLI, smtpd and smtpctl all run inside it through nsenter, as they would on the real machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, SMTPD, Run, own_var, run_cli

TOOLS = all(shutil.which(t) for t in ("unshare", "nsenter", "ip", "cp"))
pytestmark = pytest.mark.skipif(not (SMTPD and IS_ROOT and TOOLS),
                                reason="needs OpenSMTPD, root, and unshare/nsenter/ip (util-linux, iproute2)")

KEY = Path("/etc/mailsetup/queue.key")
CONF = Path("/etc/smtpd.conf")

# Inside the namespace: talk SMTP to the smtpd on 127.0.0.1:25 and print what it answered.
SEND = """
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", 25, timeout=5)
for n in range(int(sys.argv[1])):
    s.sendmail("root@example.test", ["bob@remote.test", "carol@remote.test"], f"Subject: queued {n}\\n\\nhello\\n")
s.quit()
"""
INTAKE = """
import smtplib
try:
    s = smtplib.SMTP("127.0.0.1", 25, timeout=3)
except Exception as exc:
    print("no greeting:", type(exc).__name__)
else:
    print("greeting", s.ehlo()[0], "mail", s.mail("root@example.test")[0])
    s.quit()
"""


class Host:
    """A stand-in mail host; everything it starts is stopped by close()."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailsetup-host-", dir="/tmp"))
        self.base.chmod(0o755)
        self.etc = self.base / "etc"
        self.spool = self.base / "spool"
        subprocess.run(["cp", "-a", "/etc", str(self.etc)], check=True)
        self.spool.mkdir(mode=0o711)
        self.smtpd: subprocess.Popen | None = None
        script = ('mount --bind "$1" /etc && ' + own_var(f"{self.etc}.var", f"{self.etc}.var-work") +
                  ' && mount --bind "$2" /var/spool/smtpd && '
                  'mount -t tmpfs -o mode=0755 tmpfs /run && ip link set lo up && echo ready && exec sleep 600')
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--", "sh", "-c", script, "sh",
             str(self.etc), str(self.spool)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.close()
            pytest.fail("could not set up the namespace")

    def cmd(self, *args: object) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *map(str, args)]

    def run(self, *args: object, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def mailsetup(self, *args: object, timeout: float = 60) -> Run:
        p = self.run("env", "NO_COLOR=1", MAILSETUP, *args, timeout=timeout)
        return Run(p.returncode, p.stdout, p.stderr)

    def python(self, code: str, *args: object) -> str:
        p = self.run(sys.executable, "-c", code, *args)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    def path(self, inside: Path) -> Path:
        """Where a path of the namespace's /etc or spool lies, seen from the test."""
        if inside.is_relative_to("/etc"):
            return self.etc / inside.relative_to("/etc")
        return self.spool / inside.relative_to("/var/spool/smtpd")

    def start_smtpd(self, conf: Path = CONF) -> None:
        self.smtpd = subprocess.Popen(self.cmd(SMTPD, "-d", "-f", conf), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while self.status() == "":
            assert self.smtpd.poll() is None and time.monotonic() < deadline, "smtpd did not start"
            time.sleep(0.1)

    def stop_smtpd(self) -> None:
        if self.smtpd is not None and self.smtpd.poll() is None:
            os.killpg(self.smtpd.pid, signal.SIGTERM)
            self.smtpd.wait(10)
        self.smtpd = None

    def status(self) -> str:
        """`smtpctl show status`: empty when no smtpd answers."""
        p = self.run("smtpctl", "show", "status")
        return p.stdout if p.returncode == 0 else ""

    def queue(self) -> list[str]:
        return [line for line in self.run("smtpctl", "show", "queue").stdout.splitlines() if line.strip()]

    def provision_with_stuck_mail(self) -> None:
        """`mailsetup init`, then smtpd started and holding 4 envelopes it cannot deliver."""
        r = self.mailsetup("init", "--yes", "--domain", "example.test", "--admin", "ops@elsewhere.test",
                           "--no-smoke")
        assert r.code == 0, r.err
        self.start_smtpd()
        self.python(SEND, 2)
        assert len(self.queue_after(10.0, until=4)) == 4

    def queue_after(self, seconds: float, until: int | None = None) -> list[str]:
        """`smtpctl show queue` once `until` envelopes are listed, or after `seconds` (smtpd loads
        its queue from disk in the background after it starts)."""
        deadline = time.monotonic() + seconds
        while True:
            lines = self.queue()
            if (until is not None and len(lines) >= until) or time.monotonic() > deadline:
                return lines
            time.sleep(0.2)

    def close(self) -> None:
        try:
            self.stop_smtpd()
        finally:
            if self.holder.poll() is None:
                os.killpg(self.holder.pid, signal.SIGKILL)
                self.holder.wait(10)
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def host():
    """The host after `mailsetup init`, its smtpd running and holding 4 envelopes it cannot deliver."""
    h = Host()
    try:
        h.provision_with_stuck_mail()
        yield h
    finally:
        h.close()


def intake_open(h: Host) -> bool:
    """A new SMTP session gets its 220 and MAIL is accepted (a paused smtpd never greets)."""
    return h.python(INTAKE) == "greeting 250 mail 250" and "SMTP running" in h.status()


def test_rotation_refuses_while_smtpd_holds_mail_and_a_drain_timeout_resumes_intake(host: Host):
    key = host.path(KEY).read_text()
    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke")
    assert r.code == 1
    assert r.err_lines[-1].startswith("mailsetup: error: not rotating the queue key: 4 envelope(s) in OpenSMTPD's "
                                      "queue (smtpctl show queue)")
    started = time.monotonic()
    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke", "--drain", "--drain-timeout", "2")
    assert time.monotonic() - started < 15
    assert r.code == 1, r.err
    assert "paused smtpd's intake" in r.out
    assert "resumed smtpd's intake (smtpctl resume smtp): nothing was rotated." in r.err
    assert r.err_lines[-1] == ("mailsetup: error: --drain: smtpd's queue still holds 4 envelope(s) after 2 s "
                               "(--drain-timeout); nothing rotated, and smtpd takes mail again")
    assert intake_open(host)
    assert host.path(KEY).read_text() == key
    assert len(host.queue()) == 4
    # doctor opens smtpd's own envelopes with the key it was given.
    r = host.mailsetup("doctor", "--json")
    finding = {f["name"]: f for f in json.loads(r.out)}["queued mail readable with the queue key"]
    assert finding == {"name": "queued mail readable with the queue key", "status": "ok",
                       "detail": "4 queued envelope(s), all readable with the current queue key"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_interrupting_the_drain_resumes_intake(host: Host, sig: signal.Signals):
    key = host.path(KEY).read_text()
    cli = subprocess.Popen(host.cmd("env", "NO_COLOR=1", MAILSETUP, "init", "--yes", "--rotate-queue-key",
                                    "--no-smoke", "--drain", "--drain-timeout", "60"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        while "SMTP paused" not in host.status():
            assert cli.poll() is None and time.monotonic() < deadline, "the drain never paused smtpd"
            time.sleep(0.1)
        cli.send_signal(sig)  # nsenter execs: this is the mailsetup process itself
        out, err = cli.communicate(timeout=15)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, err
    assert "resumed smtpd's intake (smtpctl resume smtp): nothing was rotated." in err
    assert "Traceback" not in err
    assert intake_open(host)
    assert host.path(KEY).read_text() == key


def test_a_drained_queue_rotates_and_smtpd_stays_paused_until_restarted(host: Host):
    old = host.path(KEY).read_text()
    cli = subprocess.Popen(host.cmd("env", "NO_COLOR=1", MAILSETUP, "init", "--yes", "--rotate-queue-key",
                                    "--no-smoke", "--drain", "--drain-timeout", "20"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        while "SMTP paused" not in host.status():
            assert cli.poll() is None and time.monotonic() < deadline, "the drain never paused smtpd"
            time.sleep(0.1)
        assert host.run("smtpctl", "remove", "all").returncode == 0  # as if the mail had been delivered
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, err
    assert host.path(KEY).read_text() != old
    # A warning, among the last lines printed, with the restart command for this host.
    assert "smtpd's intake stays paused until you restart it with the new key: " in err.split("Warnings:")[-1]
    # Mail taken now would be queued under the old key the restart drops.
    assert "SMTP paused" in host.status()


def test_a_stopped_smtpd_spool_is_counted_and_force_rotate_keeps_the_way_back(host: Host):
    host.stop_smtpd()
    assert host.status() == ""
    # What smtpctl says with no daemon: nothing on stdout, exit 0 — it cannot be the judge.
    offline = host.run("smtpctl", "show", "queue")
    assert (offline.returncode, offline.stdout) == (0, "")
    assert "offline encrypted queue is not supported yet" in offline.stderr
    key = host.path(KEY).read_text()

    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke")
    assert r.code == 1
    assert r.err_lines == [
        "mailsetup: error: not rotating the queue key: 4 envelope(s) in OpenSMTPD's queue (counted in "
        "/var/spool/smtpd/queue: smtpd is not answering). OpenSMTPD holds one key and cannot read mail queued "
        "under another; let the queue drain (--drain pauses smtpd and waits), or pass --force-rotate to strand it"]
    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke", "--drain", "--drain-timeout", "2")
    assert r.code == 1
    assert r.err_lines[-1].startswith("mailsetup: error: --drain: not rotating the queue key: 4 envelope(s)")
    assert "no running smtpd can deliver it first" in r.err_lines[-1]
    assert host.path(KEY).read_text() == key

    conf_backups = set(host.path(CONF).parent.glob("smtpd.conf.*.bak"))
    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke", "--force-rotate")
    assert r.code == 0, r.err
    assert host.path(KEY).read_text() != key
    backups = sorted(host.path(KEY).parent.glob("queue.key.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == key
    assert backups[0].stat().st_mode & 0o777 == 0o600
    kept_key = Path("/etc/mailsetup") / backups[0].name
    (conf_backup,) = [Path("/etc") / p.name
                      for p in set(host.path(CONF).parent.glob("smtpd.conf.*.bak")) - conf_backups]
    assert "stranded under the old key: 4 envelope(s) in OpenSMTPD's queue" in r.err
    steps = [line.strip() for line in r.err.splitlines() if re.match(r"\s+\d\. ", line)]
    assert len(steps) == 3
    assert f"start smtpd -f {conf_backup}; then: smtpctl pause smtp" in steps[0]
    assert "wait until `smtpctl show queue` prints nothing" in steps[1] and str(kept_key) in steps[1]
    assert "restart smtpd with the new key" in steps[2]

    r = host.mailsetup("doctor", "--json")
    assert r.code == 1
    finding = {f["name"]: f for f in json.loads(r.out)}["queued mail readable with the queue key"]
    assert finding["status"] == "fail"
    assert finding["detail"].startswith(f"4 of 4 queued envelope(s) in /var/spool/smtpd/queue cannot be decrypted "
                                        f"with {KEY}, so smtpd will never deliver them; they decrypt with {kept_key}")
    assert f"start smtpd -f {conf_backup}, run `smtpctl pause smtp`" in finding["detail"]

    # The way back is real: smtpd on the new key sees nothing, on the kept configuration all four.
    # smtpd loads its queue from disk after it starts, a few envelopes at a time: watch it for a while.
    host.start_smtpd()
    assert host.queue_after(3.0) == []
    host.stop_smtpd()
    host.start_smtpd(conf_backup)
    assert len(host.queue_after(15.0, until=4)) == 4


def test_a_sandbox_spool_is_counted_on_disk(tmp_path: Path):
    root = tmp_path / "root"
    assert run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin",
                   "alice", "--no-smoke").code == 0
    msg = root / "var/spool/smtpd/queue/18/18505550"
    msg.mkdir(parents=True)
    for name in ("18505550f819b47d", "1850555004b009e0", "message"):
        (msg / name).write_bytes(b"\x01" + os.urandom(60))
    (msg / "not-an-envelope").write_bytes(b"x")
    r = run_cli("init", "--yes", "--root", root, "--rotate-queue-key", "--no-smoke")
    assert r.code == 1
    assert f"not rotating the queue key: 2 envelope(s) in OpenSMTPD's queue (counted in {root}/var/spool/smtpd/queue" \
        in r.err_lines[0]


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_drain_timeout_must_be_a_positive_number_of_seconds(tmp_path: Path, value: str):
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--domain", "example.test",
                "--admin", "alice", "--no-smoke", "--drain", "--drain-timeout", value)
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: --drain-timeout: {value} is not a positive number of seconds"]
    assert not (tmp_path / "root").exists()


def test_backups_that_still_open_queued_mail_are_never_pruned(tmp_path: Path):
    """Backups are kept to a number, but not the queue keys (nor the smtpd.conf carrying them) while
    the queue holds envelopes the current key cannot open: each forced rotation keeps its old key,
    the way back to that mail. Once the queue is clear, the next run keeps to the number again."""
    root = tmp_path / "root"
    assert run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin",
                   "alice", "--no-smoke", "--keep-backups", "2").code == 0
    msg = root / "var/spool/smtpd/queue/18/18505550"
    msg.mkdir(parents=True)
    (msg / "18505550f819b47d").write_bytes(b"\x01" + os.urandom(60))  # opens with no key we have
    key = root / "etc/mailsetup/queue.key"
    for _ in range(4):
        r = run_cli("init", "--yes", "--root", root, "--rotate-queue-key", "--force-rotate", "--no-smoke")
        assert r.code == 0, r.err
        time.sleep(1.05)  # backups are stamped to the second
    assert len(list(key.parent.glob("queue.key.*.bak"))) == 4
    assert len(list((root / "etc").glob("smtpd.conf.*.bak"))) == 4
    shutil.rmtree(root / "var/spool/smtpd/queue/18")
    r = run_cli("init", "--yes", "--root", root, "--rotate-queue-key", "--no-smoke")
    assert r.code == 0, r.err
    assert len(list(key.parent.glob("queue.key.*.bak"))) == 2
    assert len(list((root / "etc").glob("smtpd.conf.*.bak"))) == 2


def test_keygen_over_the_live_queue_key_never_prunes_the_backup_that_opens_queued_mail(tmp_path: Path):
    """`keygen --out KEY --force` over a set-up's queue key keeps backups to a number too, but it
    cannot tell which spool that key serves: the backup that still opens queued mail must stay."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    root = tmp_path / "root"
    assert run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin",
                   "alice", "--no-smoke").code == 0
    key = root / "etc/mailsetup/queue.key"
    first = key.read_text().strip()
    msg = root / "var/spool/smtpd/queue/18/18505550"
    msg.mkdir(parents=True)
    iv = os.urandom(12)
    (msg / "18505550f819b47d").write_bytes(b"\x01" + iv + AESGCM(first.encode()).encrypt(iv, b"envelope", None))
    for _ in range(6):
        r = run_cli("keygen", "--out", key, "--force")
        assert r.code == 0, r.err
    kept = {p.read_text().strip() for p in key.parent.glob("queue.key.*.bak")}
    assert first in kept  # the only key that opens the queued envelope


# Inside the namespace: a client that opens its session, waits for a line on stdin, then sends a
# message in that same session (a slow client, or one in the middle of its transaction).
SLOW_CLIENT = """
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", 25, timeout=30)
s.ehlo("client.example.test")
print("open", flush=True)
sys.stdin.readline()
s.sendmail("root@example.test", ["bob@remote.test"], "Subject: in flight\\n\\nhello\\n")
print("sent", flush=True)
s.quit()
"""


def test_the_drain_waits_for_a_session_open_before_the_pause(host: Host):
    """`pause smtp` stops new sessions, not the open ones: a message committed in one after the queue
    looked empty would be queued under the old key and stranded by the rotation (the small internet's
    rotation test lost one that way). The drain waits until no session is open."""
    old = host.path(KEY).read_text()
    client = subprocess.Popen(host.cmd(sys.executable, "-c", SLOW_CLIENT), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli = None
    try:
        assert client.stdout.readline().strip() == "open", client.stderr.read()
        cli = subprocess.Popen(host.cmd("env", "NO_COLOR=1", MAILSETUP, "init", "--yes", "--rotate-queue-key",
                                        "--no-smoke", "--drain", "--drain-timeout", "40"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 20
        while "SMTP paused" not in host.status():
            assert cli.poll() is None and time.monotonic() < deadline, "the drain never paused smtpd"
            time.sleep(0.1)
        assert host.run("smtpctl", "remove", "all").returncode == 0  # the queue is empty now...
        time.sleep(3)
        assert cli.poll() is None, "rotated while a session was still open"  # ...but a session is open
        assert host.path(KEY).read_text() == old
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "sent"
        client.wait(10)
        deadline = time.monotonic() + 20
        while not host.queue():  # the message the open session committed under the old key
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert cli.poll() is None and host.path(KEY).read_text() == old
        assert host.run("smtpctl", "remove", "all").returncode == 0  # as if it had been delivered
        out, err = cli.communicate(timeout=30)
    finally:
        for proc in (client, cli):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert cli.returncode == 0, err
    assert host.path(KEY).read_text() != old


def test_rotating_with_an_empty_queue_still_pauses_intake_until_the_restart(host: Host):
    """An empty queue at the plan is not enough: a running smtpd keeps taking mail under the old key
    until it is restarted with the new one, and that mail would be stranded (the small internet lost
    one message this way while B rotated its key). Its intake is paused before the key is written."""
    assert host.run("smtpctl", "remove", "all").returncode == 0
    old = host.path(KEY).read_text()
    r = host.mailsetup("init", "--yes", "--rotate-queue-key", "--no-smoke")
    assert r.code == 0, r.err
    assert host.path(KEY).read_text() != old
    assert "smtpd's intake stays paused until you restart it with the new key" in r.err
    assert "SMTP paused" in host.status()
    assert not intake_open(host)  # nothing can be queued under the key the restart drops
