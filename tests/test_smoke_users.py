"""`mailsetup smoke` on a fresh set-up and on broken ones; `mailsetup user` and the real smtpd's AUTH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import SMTPD, init_args, needs_smtpd, run_cli, tree
from mta_kit import PASSWORD, free_port, provision, wait_port

SWAKS = shutil.which("swaks")


def test_init_ends_with_a_passing_smoke_test(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--admin", "alice"))
    assert r.code == 0, r.out + r.err
    assert "Smoke test (on loopback, with the set-up's own files)" in r.out
    for name in ("STARTTLS with the generated certificate", "inbound over STARTTLS through the aliases into Maildir",
                 "unauthenticated relay refused", "AUTH without TLS refused", "wrong password refused",
                 "authenticated submission accepted for relay", "queued mail encrypted at rest"):
        assert f"✓ {name}" in r.out, name
    assert "✗" not in r.out
    # It cleans up after itself: smoke login gone, smoke mail gone, no smoke queue left.
    assert "mailsetup-smoke" not in (sandbox / "etc/mailsetup/credentials").read_text()
    assert not list((sandbox / "home/alice/Maildir/new").iterdir())
    assert not list((sandbox / "etc/mailsetup").glob("smoke-queue-*"))


@pytest.fixture
def world_traversable():
    """smtpd opens db: tables after dropping to its own user (measured: 'lookup: failed to open table
    aliases' under pytest's 0700 tmp dir), so a real-daemon sandbox must be reachable by that user."""
    base = Path(tempfile.mkdtemp(prefix="mailsetup-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def smoke_json(root: Path, *extra: object) -> tuple[int, list[dict]]:
    r = run_cli("smoke", "--root", root, "--json", *extra)
    return r.code, json.loads(r.out) if r.out.strip() else []


def test_smoke_json_shape_and_exit_code(tmp_path: Path):
    root = provision(tmp_path / "root")
    before = tree(root)
    code, checks = smoke_json(root)
    assert code == 0
    assert len(checks) >= 9
    for c in checks:
        assert set(c) == {"name", "ok", "detail", "seconds"}
        assert c["ok"] is True and isinstance(c["seconds"], float)
    assert tree(root) == before  # the smoke test leaves the set-up exactly as it found it
    by_name = {c["name"]: c["detail"] for c in checks}
    assert by_name["the server's own name in the greeting and EHLO"] == "greets and answers EHLO as mail.example.test"
    assert by_name["relay delivers to the relay host"].endswith("introducing itself as mail.example.test")


def failing(checks: list[dict]) -> list[dict]:
    return [c for c in checks if not c["ok"]]


def test_smoke_fails_naming_a_tampered_aliases_db(tmp_path: Path):
    root = provision(tmp_path / "root")
    db = root / "etc/aliases.db"
    db.write_bytes(b"\0" * 4096)
    code, checks = smoke_json(root)
    assert code == 1
    [bad] = failing(checks)
    assert bad["name"] == "start the embedded MTA on the set-up's files"
    assert str(db) in bad["detail"] and "not a Berkeley DB" in bad["detail"]


def test_smoke_fails_when_postmaster_leads_nowhere(tmp_path: Path):
    root = provision(tmp_path / "root")
    (root / "etc/aliases").write_text("postmaster: nosuchuser@example.test\nabuse: alice\n")
    assert run_cli("aliases", root / "etc/aliases").code == 0
    code, checks = smoke_json(root)
    assert code == 1
    [bad] = failing(checks)
    assert bad["name"] == "inbound over STARTTLS through the aliases into Maildir"
    assert "postmaster@example.test" in bad["detail"]


def test_smoke_fails_naming_a_key_that_does_not_match_the_cert(tmp_path: Path):
    root = provision(tmp_path / "root")
    key = root / "etc/ssl/private/mail.example.test.key"
    other = tmp_path / "other"
    other.mkdir()
    assert run_cli("cert", "--hostname", "mail.example.test", "--out-cert", other / "c", "--out-key",
                   other / "k").code == 0
    key.write_bytes((other / "k").read_bytes())
    code, checks = smoke_json(root)
    assert code == 1
    [bad] = failing(checks)
    assert bad["name"] == "start the embedded MTA on the set-up's files"
    assert "are they a pair?" in bad["detail"]


def test_smoke_fails_naming_a_port_in_use(tmp_path: Path):
    root = provision(tmp_path / "root")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("smoke", "--root", root, "--smtp-port", port)
    assert r.code == 1
    assert "✗ start the embedded MTA on the set-up's files" in r.out
    assert f"port {port}: Address already in use" in r.out
    assert "mailsetup-smoke" not in (root / "etc/mailsetup/credentials").read_text()


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_user_add_list_remove_and_the_password_never_in_argv(tmp_path: Path):
    root = provision(tmp_path / "root")
    assert run_cli("user", "list", "--root", root).out.split() == ["alice", "bob"]
    creds = root / "etc/mailsetup/credentials"
    # root:<smtpd's lookup group> 0640 where that user exists and we are root (smtpd re-reads it), else 0600.
    assert (creds.stat().st_mode & 0o777) == (0o640 if os.geteuid() == 0 and _has_user("opensmtpd") else 0o600)
    assert PASSWORD not in creds.read_text()
    assert all(line.split()[1].startswith("$2b$") for line in creds.read_text().splitlines()
               if not line.startswith("#"))
    r = run_cli("user", "add", "carol", "--root", root)  # no terminal, no --password-stdin
    assert r.code == 2 and "pass --password-stdin" in r.err
    r = run_cli("user", "add", "carol", "--password-stdin", "--root", root, input="short\n")
    assert r.code == 2 and "at least 8 characters" in r.err
    r = run_cli("user", "add", "Carol Smith", "--password-stdin", "--root", root, input=PASSWORD + "\n")
    assert r.code == 2 and "is not a valid user name" in r.err
    r = run_cli("user", "remove", "bob", "--root", root)
    assert r.code == 0
    assert run_cli("user", "list", "--root", root).out.split() == ["alice"]
    r = run_cli("user", "remove", "bob", "--root", root)
    assert r.code == 2 and "no user 'bob'" in r.err
    # The password reaches neither the answers file nor any log.
    for path in root.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@needs_smtpd
@pytest.mark.skipif(SWAKS is None, reason="needs swaks")
def test_real_smtpd_accepts_our_bcrypt_credentials(world_traversable: Path):
    root = provision(world_traversable / "root")
    conf = root / "etc/smtpd.conf"
    smtp, sub = free_port(), free_port()
    lines = [line for line in conf.read_text().splitlines() if not line.startswith("listen on")]
    lines.append(f"listen on 127.0.0.1 port {smtp} tls pki mail.example.test auth-optional <creds>")
    lines.append(f"listen on 127.0.0.1 port {sub} tls-require pki mail.example.test auth <creds>")
    test_conf = root / "etc/smtpd-test.conf"
    test_conf.write_text("\n".join(lines) + "\n")
    os.chmod(test_conf, 0o600)
    proc = subprocess.Popen([SMTPD, "-d", "-f", str(test_conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(sub)
        ok = subprocess.run([SWAKS, "--server", f"127.0.0.1:{sub}", "-tls", "--auth", "PLAIN", "--auth-user",
                             "alice", "--auth-password", PASSWORD, "--quit-after", "AUTH"],
                            capture_output=True, text=True, timeout=30)
        assert "235 2.0.0 Authentication succeeded" in ok.stdout, ok.stdout
        bad = subprocess.run([SWAKS, "--server", f"127.0.0.1:{sub}", "-tls", "--auth", "PLAIN", "--auth-user",
                              "alice", "--auth-password", "wrong password", "--quit-after", "AUTH"],
                             capture_output=True, text=True, timeout=30)
        assert "535" in bad.stdout, bad.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        time.sleep(0.2)


def test_smoke_says_plainly_when_queue_encryption_is_off(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--no-queue-encryption"))
    assert r.code == 0, r.out
    assert "✓ queued mail at rest (encryption off): 1 queued file(s), NOT encrypted" in r.out
    assert "queue encryption" not in (sandbox / "etc/smtpd.conf").read_text().split("\n\n", 1)[1]


def test_smoke_cleans_up_after_an_interrupted_run(tmp_path: Path):
    root = provision(tmp_path / "root")
    creds = root / "etc/mailsetup/credentials"
    original = creds.read_text()
    # What a smoke test killed with -9 would leave behind.
    creds.write_text(original + "mailsetup-smoke-dead01 $2b$10$" + "a" * 53 + "\n")
    (root / "etc/mailsetup/smoke-queue-deadbeef").mkdir()
    code, checks = smoke_json(root)
    assert code == 0
    assert "removed 1 smoke-only login(s) and 1 smoke queue(s) left by an interrupted run" in checks[0]["detail"]
    assert creds.read_text() == original
    assert not list((root / "etc/mailsetup").glob("smoke-queue-*"))
