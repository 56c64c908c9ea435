"""Faults, load and hostile input against `mailsetup serve`: kill -9 under load, a full disk, a broken
Maildir, 200 concurrent clients, idle and slow clients, floods of bad commands, fuzzed sessions.

MAILSETUP_LONG=1 runs the long versions (more messages, more kills, more fuzzing).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mta_kit import Serve, maildir_new, provision

LONG = os.environ.get("MAILSETUP_LONG") == "1"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return provision(tmp_path_factory.mktemp("faults") / "root")


def message(token: str) -> bytes:
    return (f"From: load@example.net\r\nTo: alice@example.test\r\nSubject: {token}\r\n\r\n"
            f"body of {token}\r\n" + ("x" * 76 + "\r\n") * 26).encode()


def tokens_in(root: Path, user: str, pattern: str) -> collections.Counter:
    found: collections.Counter = collections.Counter()
    rx = re.compile(pattern.encode())
    for p in maildir_new(root, user):
        for m in set(rx.findall(p.read_bytes()[:400])):  # the token stands in subject and body
            found[m.decode()] += 1
    return found


@pytest.mark.once
def test_kill_9_at_random_points_under_load_loses_nothing(root: Path):
    """Every message answered 250 is delivered, across repeated kill -9 and restart. A message
    delivered but not yet acknowledged when the kill came is sent again by the client, so
    duplicates are bounded by (kills x sessions)."""
    total = 3000 if LONG else 1000
    sessions = 4
    rng = random.Random(1234)
    server = Serve(root).start()
    ports = (server.smtp, server.submission)
    lock = threading.Lock()
    acked: set[str] = set()
    done = threading.Event()
    kills = 0

    def restart() -> None:
        nonlocal server
        s = Serve(root)
        s.smtp, s.submission = ports
        server = s.start()

    def client(index: int) -> None:
        mine = [f"kill9-{index}-{i}-end" for i in range(index, total, sessions)]
        c = None
        for token in mine:
            for _attempt in range(200):  # like an MTA: retry until the server says 250
                try:
                    if c is None:
                        c = smtplib.SMTP("127.0.0.1", ports[0], timeout=10)
                    c.sendmail("load@example.net", ["alice@example.test"], message(token))
                    with lock:
                        acked.add(token)
                    break
                except (smtplib.SMTPException, OSError):
                    c = None
                    time.sleep(0.05)
            else:
                raise AssertionError(f"{token} never accepted")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()

    # Kill at random points of the load: when the count of acknowledged messages passes each of
    # these thresholds, plus a random delay so the kill lands mid-transaction, not between them.
    thresholds = sorted(rng.sample(range(50, total - 50), 10 if LONG else 5))

    def killer() -> None:
        nonlocal kills
        for threshold in thresholds:
            while len(acked) < threshold and not done.is_set():
                time.sleep(0.002)
            if done.is_set():
                break
            time.sleep(rng.uniform(0, 0.01))
            server.kill9()
            kills += 1
            restart()

    k = threading.Thread(target=killer)
    k.start()
    try:
        for t in threads:
            t.join(300)
    finally:
        done.set()
        k.join(30)
        server.stop()
    assert kills == len(thresholds)
    assert len(acked) == total
    found = tokens_in(root, "alice", r"kill9-\d+-\d+-end")
    lost = sorted(acked - set(found))
    assert lost == [], f"lost {len(lost)} acknowledged messages after {kills} kills"
    duplicates = sum(n - 1 for n in found.values() if n > 1)
    assert duplicates <= kills * sessions, (duplicates, kills)


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return provision(tmp_path / "root")


def test_a_broken_maildir_gets_a_temporary_failure_and_nothing_is_lost(fresh: Path):
    maildir = fresh / "home/alice/Maildir"
    maildir.parent.mkdir(parents=True, exist_ok=True)
    maildir.write_text("not a directory")  # any OSError on delivery: ENOTDIR here
    with Serve(fresh) as s, smtplib.SMTP("127.0.0.1", s.smtp) as c:
        c.ehlo()
        c.mail("x@example.net")
        c.rcpt("alice@example.test")
        code, reply = c.data(message("broken-maildir"))
        assert 400 <= code < 500, reply
        assert b"try again later" in reply
        maildir.unlink()  # the admin fixes it; the sender's retry goes through
        c.rset()
        c.sendmail("x@example.net", ["alice@example.test"], message("broken-maildir"))
    assert tokens_in(fresh, "alice", "broken-maildir")["broken-maildir"] == 1


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_full_disk_gets_a_temporary_failure(fresh: Path):
    maildir = fresh / "home/alice/Maildir"
    maildir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(maildir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (maildir / "filler").write_bytes(b"\0" * 60_000)
        with Serve(fresh) as s, smtplib.SMTP("127.0.0.1", s.smtp) as c:
            c.ehlo()
            c.mail("x@example.net")
            c.rcpt("alice@example.test")
            big = message("disk-full") + (b"y" * 76 + b"\r\n") * 260
            code, reply = c.data(big)
            assert code == 451, reply
            assert b"No space left on device" in reply
            assert not any(b"disk-full" in p.read_bytes() for p in (maildir / "new").iterdir())
            assert list((maildir / "tmp").iterdir()) == []  # the half-written file was removed
            (maildir / "filler").unlink()
            c.rset()
            c.sendmail("x@example.net", ["alice@example.test"], big)
        assert any(b"disk-full" in p.read_bytes() for p in (maildir / "new").iterdir())
    finally:
        subprocess.run(["umount", str(maildir)], capture_output=True)


def test_200_concurrent_connections(root: Path):
    with Serve(root) as s:
        barrier = threading.Barrier(200, timeout=60)

        def one(i: int) -> int:
            with smtplib.SMTP("127.0.0.1", s.smtp, timeout=60) as c:
                c.ehlo()
                barrier.wait()  # all 200 are connected at once
                c.sendmail("x@example.net", ["alice@example.test"], message(f"c200-{i}-end"))
                return 250

        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            assert list(pool.map(one, range(200))) == [250] * 200
    found = tokens_in(root, "alice", r"c200-\d+-end")
    assert len(found) == 200


def test_idle_and_slow_clients_time_out_without_starving_others(root: Path):
    with Serve(root, "--timeout", "1") as s:
        idle = [socket.create_connection(("127.0.0.1", s.smtp)) for _ in range(30)]
        slow = socket.create_connection(("127.0.0.1", s.smtp))
        slow.recv(100)
        started = time.monotonic()
        # A slowloris: one byte of a command at a time, never finishing the line.
        stop = threading.Event()

        def dribble() -> None:
            for ch in b"EHLO slowly-slowly-slowly.example":
                if stop.is_set():
                    return
                try:
                    slow.send(bytes([ch]))
                except OSError:
                    return
                time.sleep(0.2)

        t = threading.Thread(target=dribble)
        t.start()
        # Meanwhile a normal client is served at once, repeatedly.
        for i in range(5):
            t0 = time.monotonic()
            with smtplib.SMTP("127.0.0.1", s.smtp, timeout=5) as c:
                c.sendmail("x@example.net", ["alice@example.test"], message(f"busy-{i}-end"))
            assert time.monotonic() - t0 < 1.0
        # The idle and the slow ones are cut off after about the timeout.
        for sock in [*idle, slow]:
            sock.settimeout(5)
            data = b""
            try:
                while chunk := sock.recv(1000):
                    data += chunk
            except OSError:
                pass
            sock.close()
        stop.set()
        t.join(10)
        assert time.monotonic() - started < 4


def test_a_flood_of_bad_commands_is_cut_off_and_does_not_slow_others(root: Path):
    with Serve(root) as s:
        flood = socket.create_connection(("127.0.0.1", s.smtp))
        flood.settimeout(10)
        flood.recv(100)
        stop = threading.Event()
        replies = bytearray()

        def spam() -> None:
            while not stop.is_set():
                try:
                    flood.sendall(b"XYZZY nonsense\r\n" * 20)
                    replies.extend(flood.recv(65536))
                except OSError:
                    return

        t = threading.Thread(target=spam)
        t.start()
        timings = []
        for i in range(10):
            t0 = time.monotonic()
            with smtplib.SMTP("127.0.0.1", s.smtp, timeout=5) as c:
                c.sendmail("x@example.net", ["alice@example.test"], message(f"flood-{i}-end"))
            timings.append(time.monotonic() - t0)
        stop.set()
        t.join(15)
        flood.close()
    assert max(timings) < 1.0, timings
    assert b"Too many unrecognized commands, goodbye" in replies


# --- fuzzing the SMTP session in-process --------------------------------------------------------


@pytest.fixture(scope="module")
def inproc(root: Path):
    """The embedded MTA in a background thread of this process, for fast fuzzing."""
    from mailsetup.answers import load_setup
    from mailsetup.mta.server import EmbeddedMta, MtaOptions, load_runtime
    from mailsetup.smoke import _LoopThread

    loop = _LoopThread()
    rt = load_runtime(load_setup(root), MtaOptions(smtp_port=0, submission_port=0, timeout=5, local_peers=frozenset(),
                                                    queue_dir=root / "fuzz-queue"))
    mta = EmbeddedMta(rt)
    loop.run(mta.start())
    yield mta
    loop.run(mta.stop())
    loop.close()
    shutil.rmtree(root / "fuzz-queue", ignore_errors=True)


COMMANDS = [b"EHLO x", b"HELO x", b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@example.test>", b"DATA",
            b"RSET", b"NOOP", b"QUIT", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"VRFY root", b"HELP",
            b"RCPT TO:<victim@example.net>", b".", b"MAIL FROM:<>", b"BDAT 10"]
line = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=300),
    st.builds(lambda c, junk: c + b" " + junk, st.sampled_from(COMMANDS), st.binary(max_size=50)),
    st.just(b"A" * 5000),  # longer than any SMTP line may be
)
ending = st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\0\r\n"])


def _healthy(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
        assert c.ehlo()[0] == 250
        c.mail("x@example.net")
        assert c.rcpt("victim@example.net")[0] == 550  # still no open relay


@pytest.mark.once
@settings(max_examples=2000 if LONG else 150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(line, ending), max_size=25))
def test_fuzzed_sessions_never_break_the_server_or_open_it(inproc, session):
    port = inproc.ports["smtp"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(2)
        try:
            sock.recv(200)
            for data, end in session:
                sock.sendall(data + end)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the server may hang up on us; that is its right
    _healthy(port)
    # Nothing from a fuzzed session may be queued for relay.
    assert not [p for p in inproc.rt.queue.dir.iterdir() if p.is_file()]
