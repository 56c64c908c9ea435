"""`mailsetup serve`, driven by real clients (swaks, smtplib, openssl s_client) as users would."""

from __future__ import annotations

import concurrent.futures
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import pytest
from conftest import OPENSSL, needs_openssl, run_cli
from mta_kit import PASSWORD, Serve, Sink, maildir_new, provision

SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="needs swaks")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return provision(tmp_path_factory.mktemp("mta") / "root", "--max-message-size", "200000")


@pytest.fixture(scope="module")
def sink():
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def served(root: Path, sink: Sink):
    with Serve(root, relay_port=sink.port) as s:
        yield s


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--timeout", "10", *args], capture_output=True, text=True, timeout=60)


def tls_ctx(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "etc/ssl/certs/mail.example.test.crt"))
    ctx.check_hostname = False  # we dial 127.0.0.1; the cert itself is checked against the file
    return ctx


def msg(subject: str, to: str, size: int = 0) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "sender@example.net"
    m["To"] = to
    m["Subject"] = subject
    m.set_content("hello\n" + "x" * size)
    return m


def raw(subject: str, to: str, size: int = 0) -> bytes:
    return msg(subject, to, size).as_bytes(policy=SMTP_POLICY)


def delivered(root: Path, user: str, token: str) -> list[Path]:
    return [p for p in maildir_new(root, user) if token.encode() in p.read_bytes()]


@needs_swaks
def test_inbound_starttls_to_an_alias_lands_in_every_targets_maildir(root: Path, served: Serve):
    r = swaks("--server", f"127.0.0.1:{served.smtp}", "--to", "team@example.test", "--from", "x@example.net",
              "--header", "Subject: token-team-1", "-tls")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: delivered" in r.stdout
    for user in ("alice", "bob"):
        [path] = delivered(root, user, "token-team-1")
        text = path.read_bytes().decode()
        assert text.startswith("Return-Path: <x@example.net>\nDelivered-To: " + user + "\n")
        assert "\r" not in text
        assert "with ESMTPS;" in text  # the Received line records TLS
        assert (path.stat().st_mode & 0o777) == 0o600


@needs_openssl
def test_openssl_s_client_sees_the_generated_certificate(root: Path, served: Serve):
    cert = root / "etc/ssl/certs/mail.example.test.crt"
    proc = subprocess.run(
        [OPENSSL, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{served.smtp}", "-CAfile", str(cert),
         "-verify_hostname", "mail.example.test", "-verify_return_error", "-brief"],
        input="QUIT\n", capture_output=True, text=True, timeout=30,
    )
    out = proc.stdout + proc.stderr
    assert "Verification: OK" in out, out
    assert "Peer certificate: CN = mail.example.test" in out or "CN=mail.example.test" in out.replace(" ", "")


@needs_swaks
def test_stranger_cannot_relay_and_tricks_are_refused(served: Serve):
    for rcpt in ["victim@example.net", "victim%example.net@example.test", "example.net!victim@example.test",
                 "victim@[192.0.2.1]", '"victim@example.net"@example.test', "@example.test:victim@example.net"]:
        r = swaks("--server", f"127.0.0.1:{served.smtp}", "--to", rcpt, "--from", "spam@example.net",
                  "--quit-after", "RCPT")
        assert r.returncode != 0, rcpt
        assert "<** 55" in r.stdout, (rcpt, r.stdout)


def test_loopback_clients_are_local_like_smtpd_from_local(root: Path, sink: Sink):
    # Without --loopback-is-remote a loopback client may relay, exactly as `match from local` allows.
    with Serve(root, relay_port=sink.port, remote=False) as s, smtplib.SMTP("127.0.0.1", s.smtp) as c:
        c.ehlo()
        c.mail("local@example.test")
        code, _ = c.rcpt("friend@example.net")
        assert code == 250


@needs_swaks
def test_auth_is_not_offered_before_tls(served: Serve):
    r = swaks("--server", f"127.0.0.1:{served.smtp}", "--to", "x@example.net", "--auth", "PLAIN",
              "--auth-user", "alice", "--auth-password", PASSWORD)
    assert r.returncode != 0
    assert "Host did not advertise authentication" in r.stdout + r.stderr
    with smtplib.SMTP("127.0.0.1", served.submission) as c:
        c.ehlo()
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 530
        assert c.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530


def test_wrong_password_is_refused(root: Path, served: Serve):
    with smtplib.SMTP("127.0.0.1", served.submission) as c:
        c.starttls(context=tls_ctx(root))
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.login("alice", "not the password")
        assert err.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("mallory", PASSWORD)


@needs_swaks
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_authenticated_submission_relays_to_the_relay_host(served: Serve, sink: Sink, mech: str):
    before = len(sink.messages)
    r = swaks("--server", f"127.0.0.1:{served.submission}", "-tls", "--auth", mech, "--auth-user", "alice",
              "--auth-password", PASSWORD, "--to", "friend@example.net", "--from", "alice@example.test",
              "--header", f"Subject: relay-{mech}")
    assert r.returncode == 0, r.stdout
    assert "Ok: queued as" in r.stdout
    sink.wait_for(before + 1)
    assert any(f"relay-{mech}".encode() in m[2] and m[1] == ["friend@example.net"] for m in sink.messages)


def test_submission_without_auth_cannot_send(root: Path, served: Serve):
    with smtplib.SMTP("127.0.0.1", served.submission) as c:
        c.starttls(context=tls_ctx(root))
        c.ehlo()
        code, text = c.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530 and b"Authentication required" in text


def test_size_limit_gives_552_at_mail_and_at_data(root: Path, served: Serve):
    big = raw("too-big", "alice@example.test", 300_000)
    with smtplib.SMTP("127.0.0.1", served.smtp) as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "200000"
        with pytest.raises(smtplib.SMTPSenderRefused) as err:  # SIZE= declared up front
            c.sendmail("x@example.net", ["alice@example.test"], big)
        assert err.value.smtp_code == 552
    with smtplib.SMTP("127.0.0.1", served.smtp) as c:  # a client that does not declare SIZE
        c.helo()
        c.mail("x@example.net")
        c.rcpt("alice@example.test")
        code, reply = c.data(big)
        assert code == 552, reply
    assert not delivered(root, "alice", "too-big")


def test_queued_mail_is_encrypted_at_rest_and_survives_a_restart(root: Path, tmp_path: Path):
    # No relay host: outbound mail waits in the queue, encrypted.
    queue = root / "etc/mailsetup/queue"
    with Serve(root) as s, smtplib.SMTP("127.0.0.1", s.submission) as c:
        c.starttls(context=tls_ctx(root))
        c.login("alice", PASSWORD)
        c.send_message(msg("queued-secret-words", "friend@example.net"), from_addr="alice@example.test")
    files = [p for p in queue.iterdir() if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        assert b"queued-secret-words" not in data and b"friend@example.net" not in data
        assert (p.stat().st_mode & 0o777) == 0o600
    # A restart with a relay host picks the whole queue up again.
    with Sink() as sink2, Serve(root, relay_port=sink2.port):
        sink2.wait_for(1)
        assert any(b"queued-secret-words" in m[2] for m in sink2.messages)
    deadline = time.monotonic() + 5
    while [p for p in queue.iterdir() if p.is_file()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in queue.iterdir() if p.is_file()]


def test_120_concurrent_connections_are_all_served(root: Path, served: Serve):
    def one(i: int) -> int:
        with smtplib.SMTP("127.0.0.1", served.smtp, timeout=30) as c:
            c.ehlo()
            time.sleep(0.3)  # hold the connection so they overlap
            c.sendmail("x@example.net", ["bob@example.test"], raw(f"conc-{i}-end", "bob@example.test"))
            return 250

    with concurrent.futures.ThreadPoolExecutor(120) as pool:
        results = list(pool.map(one, range(120)))
    assert results == [250] * 120
    bodies = [p.read_bytes() for p in maildir_new(root, "bob")]
    assert all(any(f"conc-{i}-end".encode() in b for b in bodies) for i in range(120))


def test_connection_cap_answers_421(root: Path):
    with Serve(root, "--max-connections", "3") as s:
        time.sleep(0.3)  # let the start-up probes' connections close
        # From three addresses: one address alone may hold only half the slots.
        held = [socket.create_connection(("127.0.0.1", s.smtp), source_address=(f"127.0.0.{i}", 0))
                for i in (1, 2, 3)]
        try:
            for h in held:
                assert h.recv(100).startswith(b"220")
            extra = socket.create_connection(("127.0.0.1", s.smtp), source_address=("127.0.0.4", 0))
            assert extra.recv(100).startswith(b"421")
            extra.close()
        finally:
            for h in held:
                h.close()


def test_idle_client_is_timed_out(root: Path):
    with Serve(root, "--timeout", "1") as s:
        sock = socket.create_connection(("127.0.0.1", s.smtp))
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"220")
        started = time.monotonic()
        rest = b""
        while chunk := sock.recv(100):
            rest += chunk
        assert time.monotonic() - started < 5
        sock.close()


def test_kill_9_loses_nothing_that_was_answered_250(root: Path, tmp_path: Path):
    s = Serve(root).start()
    acked: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", s.smtp, timeout=10) as c:
            for i in range(40):
                token = f"k9-{i}-end"
                try:
                    c.sendmail("x@example.net", ["alice@example.test"], raw(token, "alice@example.test"))
                except (smtplib.SMTPException, OSError):
                    break
                acked.append(token)
                if i == 25:
                    s.kill9()
    finally:
        s.stop()
    assert len(acked) >= 26
    bodies = b"".join(p.read_bytes() for p in maildir_new(root, "alice"))
    lost = [t for t in acked if t.encode() not in bodies]
    assert lost == []
    # Nothing half-written is left visible: tmp/ holds at most the one message in flight.
    assert len(list((root / "home/alice/Maildir/tmp").iterdir())) <= 1


def test_serve_stops_cleanly_on_sigterm(root: Path):
    s = Serve(root).start()
    assert s.stop() == 0
    assert "stopped" in s.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.smtp), timeout=1)


def test_serve_logs_one_line_per_transaction(root: Path, served: Serve):
    with smtplib.SMTP("127.0.0.1", served.smtp) as c:
        c.sendmail("logme@example.net", ["alice@example.test"], raw("log-line", "alice@example.test"))
    time.sleep(0.2)
    lines = [line for line in served.log_text().splitlines() if "from=<logme@example.net>" in line]
    assert len(lines) == 1
    assert "to=alice@example.test" in lines[0] and "local=alice" in lines[0]


def test_a_transaction_logged_just_before_a_stop_is_in_the_log(root: Path):
    """Log lines are written in batches: the ones still waiting when SIGTERM comes are written
    before serve exits."""
    s = Serve(root).start()
    try:
        with smtplib.SMTP("127.0.0.1", s.smtp) as c:
            c.sendmail("laststop@example.net", ["alice@example.test"], raw("last-line", "alice@example.test"))
    finally:
        assert s.stop() == 0
    assert [line for line in s.log_text().splitlines() if "from=<laststop@example.net>" in line]


def test_serve_without_a_setup_is_one_line(tmp_path: Path):
    r = run_cli("serve", "--root", tmp_path / "empty")
    assert r.code == 2
    assert len(r.err_lines) == 1 and "no mailsetup set-up found" in r.err


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.once
def test_a_log_flood_while_stderr_is_not_read_keeps_serve_bounded(tmp_path: Path):
    """serve's log lines wait in memory for a writer thread. When stderr stops being read (a paused
    terminal, a stuck journal pipe) that thread blocks, and every refused recipient a client sends
    (each ~0.5 KB of log) waited for ever: a remote client grew the server without bound. Expected:
    memory stays bounded (the lines that cannot wait are counted and dropped, not kept)."""
    import contextlib
    import threading

    from conftest import MAILSETUP
    from mta_kit import free_port, wait_port

    root = provision(tmp_path / "root")
    port, sub = free_port(), free_port()
    proc = subprocess.Popen([MAILSETUP, "serve", "--root", str(root), "--smtp-port", str(port), "--submission-port",
                             str(sub), "--loopback-is-remote"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_port(sub)
        time.sleep(0.5)
        before = _rss_kb(proc.pid)
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        replies = [0]

        def drain() -> None:
            with contextlib.suppress(OSError):
                while data := sock.recv(65536):
                    replies[0] += data.count(b"\r\n")

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        rcpt = b"RCPT TO:<a@" + b"x" * 60 + b"." + b".".join([b"y" * 60] * 6) + b".example>\r\n"
        assert len(rcpt) < 510  # under the command line limit (512, as smtpd's)
        sock.sendall(b"EHLO client.example.net\r\nMAIL FROM:<a@example.net>\r\n")
        n = 40000
        for _ in range(n // 500):
            sock.sendall(rcpt * 500)
        deadline = time.monotonic() + 120
        while replies[0] < n + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert replies[0] >= n + 2, replies[0]
        grown = _rss_kb(proc.pid) - before
        sock.close()
        assert grown < 20_000, f"serve grew {grown} KB holding log lines nobody can write"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()
