"""`mailsetup init --yes`: the seed tutorial as one unattended command, checked by the real smtpd."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import IS_ROOT, OPENSSL, init_args, needs_smtpd, run_cli, smtpd_check, tree


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_every_file_of_the_tutorial_with_safe_modes(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--admin", "alice"))
    assert r.code == 0, r.err
    conf = sandbox / "etc/smtpd.conf"
    key = sandbox / "etc/ssl/private/mail.example.test.key"
    cert = sandbox / "etc/ssl/certs/mail.example.test.crt"
    qkey = sandbox / "etc/mailsetup/queue.key"
    aliases = sandbox / "etc/aliases"
    db = sandbox / "etc/aliases.db"
    for path in (conf, key, cert, qkey, aliases, db):
        assert path.is_file(), path
    assert mode(key) == 0o600
    assert mode(qkey) == 0o600
    assert mode(conf) == 0o600  # it carries the queue key
    assert mode(cert) == 0o644
    assert mode(key.parent) == 0o700
    text = conf.read_text()
    assert f'pki mail.example.test key "{key}"' in text
    assert f"queue encryption {qkey.read_text().strip()}" in text
    assert f'table aliases "db:{db}"' in text
    assert "root: alice" in aliases.read_text()
    assert "postmaster: root" in aliases.read_text()
    assert "DNS" in r.out and "example.test. IN MX 10 mail.example.test." in r.out
    assert "systemctl restart opensmtpd" in r.out
    # Secrets never reach the terminal.
    assert qkey.read_text().strip() not in r.out + r.err
    assert "PRIVATE KEY" not in r.out + r.err


@needs_smtpd
def test_init_result_passes_real_smtpd_and_says_so(sandbox: Path):
    r = run_cli(*init_args(sandbox))
    assert r.code == 0, r.err
    assert "✓ smtpd -n: configuration OK" in r.out
    check = smtpd_check(sandbox / "etc/smtpd.conf")
    assert check.returncode == 0, check.stderr


def test_dry_run_shows_the_plan_and_writes_nothing(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--dry-run"))
    assert r.code == 0, r.err
    assert "dry run: nothing was written" in r.out
    assert "new       0600" in r.out and "smtpd.conf" in r.out
    assert "+listen on 0.0.0.0 port 587 tls-require" in r.out  # the diff is shown
    assert "<redacted>" in r.out  # but not the queue key
    assert not sandbox.exists()


def test_rerun_keeps_cert_key_and_queue_key_unchanged(sandbox: Path):
    assert run_cli(*init_args(sandbox)).code == 0
    before = tree(sandbox)
    r = run_cli(*init_args(sandbox))
    assert r.code == 0, r.err
    assert "Everything is already in place" in r.out
    assert "kept the existing certificate" in r.out
    assert tree(sandbox) == before


def test_changed_setting_replaces_conf_and_keeps_dated_backup(sandbox: Path):
    assert run_cli(*init_args(sandbox)).code == 0
    old = (sandbox / "etc/smtpd.conf").read_bytes()
    r = run_cli(*init_args(sandbox, "--submission-port", "2587"))
    assert r.code == 0, r.err
    assert "replaced  0600" in r.out
    backups = list((sandbox / "etc").glob("smtpd.conf.*.bak"))
    assert len(backups) == 1
    assert backups[0].read_bytes() == old
    assert mode(backups[0]) == 0o600  # a backup of a secret stays secret
    assert "port 2587 tls-require" in (sandbox / "etc/smtpd.conf").read_text()


def test_imported_aliases_file_gets_postmaster_and_abuse(sandbox: Path, tmp_path: Path):
    src = tmp_path / "my-aliases"
    src.write_text("root: alice\nteam: alice, bob\n")
    r = run_cli(*init_args(sandbox, "--aliases", src))
    assert r.code == 0, r.err
    assert "no postmaster or abuse alias (RFC 2142)" in r.err
    installed = (sandbox / "etc/aliases").read_text()
    assert installed.startswith("root: alice\nteam: alice, bob\n")
    assert "postmaster: root\nabuse: root\n" in installed


def test_bad_aliases_file_names_file_and_line_and_writes_nothing(sandbox: Path, tmp_path: Path):
    src = tmp_path / "aliases"
    src.write_text("root: alice\n# ok\nthis line has no colon\n")
    r = run_cli(*init_args(sandbox, "--aliases", src))
    assert r.code == 2
    assert len(r.err_lines) == 1
    assert r.err_lines[0].startswith(f"mailsetup: error: {src}:3:")
    assert "Traceback" not in r.err
    assert not sandbox.exists()


def test_missing_domain_is_one_line_naming_the_flag(sandbox: Path):
    r = run_cli("init", "--yes", "--root", sandbox, "--os", "debian")
    assert r.code == 2
    assert r.err_lines == ["mailsetup: error: missing --domain (the mail domain, e.g. --domain example.org)"]
    assert not sandbox.exists()


def test_without_yes_and_no_terminal_nothing_is_written(sandbox: Path):
    r = run_cli("init", "--domain", "example.test", "--os", "debian", "--root", sandbox, "--admin", "alice")
    assert r.code == 2
    assert "pass --yes" in r.err
    assert not sandbox.exists()


def test_failure_midway_puts_every_file_back(sandbox: Path):
    assert run_cli(*init_args(sandbox)).code == 0
    before = tree(sandbox)
    # smtpd.conf is written last; make its rename fail by putting a directory where it goes.
    conf = sandbox / "etc/smtpd.conf"
    conf.rename(sandbox / "etc/smtpd.conf.saved")
    conf.mkdir()
    (conf / "blocker").write_text("x")
    r = run_cli(*init_args(sandbox, "--submission-port", "2587", "--admin", "carol"))
    assert r.code == 1
    assert "every file was put back" in r.err
    assert "Traceback" not in r.err
    conf.joinpath("blocker").unlink()
    conf.rmdir()
    (sandbox / "etc/smtpd.conf.saved").rename(conf)
    after = {k: v for k, v in tree(sandbox).items() if not k.endswith(".bak")}
    assert after == before


@needs_smtpd
@pytest.mark.skipif(OPENSSL is None, reason="needs openssl")
def test_smtpd_refusal_rolls_everything_back(sandbox: Path, tmp_path: Path):
    # The user's own certificate with a key smtpd refuses (group/other-readable).
    key, cert = tmp_path / "own.key", tmp_path / "own.crt"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
         "-subj", "/CN=mail.example.test", "-addext", "subjectAltName=DNS:mail.example.test"],
        check=True, capture_output=True,
    )
    os.chmod(key, 0o644)
    r = run_cli(*init_args(sandbox, "--cert", cert, "--key", key))
    assert r.code == 1
    assert "smtpd -n refused the new configuration, so every file was put back" in r.err
    assert tree(sandbox) == {}


@pytest.mark.skipif(not IS_ROOT, reason="checks the warning given to a normal user; run as root here")
def test_existing_cert_that_does_not_name_the_host_is_refused(sandbox: Path, tmp_path: Path):
    key, cert = tmp_path / "own.key", tmp_path / "own.crt"
    assert run_cli("cert", "--hostname", "other.example.test", "--out-cert", cert, "--out-key", key).code == 0
    r = run_cli(*init_args(sandbox, "--cert", cert, "--key", key))
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: --cert: {cert} names other.example.test, not mail.example.test"]
    assert not sandbox.exists()


def test_python_m_mailsetup_works():
    import sys

    # From elsewhere than the checkout, so that it is the installed package that answers.
    proc = subprocess.run([sys.executable, "-m", "mailsetup", "--help"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0
    assert "init" in proc.stdout and "keygen" in proc.stdout


def test_without_admin_nobody_would_read_roots_mail_so_init_asks_for_it(sandbox: Path):
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", sandbox)
    assert r.code == 2
    assert len(r.err_lines) == 1
    assert r.err_lines[0].startswith("mailsetup: error: missing --admin: nobody would read root's mail")
    assert not sandbox.exists()


def test_admin_on_a_rerun_changes_who_reads_roots_mail(sandbox: Path):
    assert run_cli(*init_args(sandbox, "--admin", "alice", "--no-smoke")).code == 0
    r = run_cli(*init_args(sandbox, "--admin", "carol", "--no-smoke"))
    assert r.code == 0, r.err
    assert "root's mail now goes to carol (was alice)" in r.out
    text = (sandbox / "etc/aliases").read_text()
    assert "root: carol\n" in text and "root: alice" not in text
    assert next((sandbox / "etc").glob("aliases.2*.bak")).read_text().count("root: alice") == 1


@pytest.mark.skipif(not IS_ROOT or not shutil.which("runuser"), reason="needs root and runuser to become nobody")
def test_a_normal_user_can_provision_a_sandbox_and_is_told_about_key_ownership():
    import tempfile

    from conftest import MAILSETUP

    base = Path(tempfile.mkdtemp(prefix="mailsetup-nobody-", dir="/tmp"))
    base.chmod(0o777)
    try:
        proc = subprocess.run(
            [shutil.which("runuser"), "-u", "nobody", "--", MAILSETUP, "init", "--yes", "--domain", "example.test",
             "--os", "debian", "--admin", "alice", "--root", str(base / "root")],
            capture_output=True, text=True, timeout=120, cwd="/tmp", env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "not running as root: smtpd loads a private key only when it is owned by root" in proc.stderr
        assert "smtpd -n skipped: it needs root" in proc.stdout
        assert "12/12 passed" in proc.stdout  # DKIM signing on by default in a sandbox
        key = base / "root/etc/ssl/private/mail.example.test.key"
        assert key.stat().st_uid != 0 and (key.stat().st_mode & 0o777) == 0o600
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_changing_the_key_type_on_a_rerun_makes_a_new_key_and_certificate(sandbox: Path):
    assert run_cli(*init_args(sandbox, "--no-smoke")).code == 0
    key = sandbox / "etc/ssl/private/mail.example.test.key"
    old = key.read_bytes()
    r = run_cli(*init_args(sandbox, "--no-smoke", "--key-type", "ecdsa-p256"))
    assert r.code == 0, r.err
    assert "the key type changes from rsa-2048 to ecdsa-p256" in r.out
    assert key.read_bytes() != old and b"BEGIN PRIVATE KEY" in key.read_bytes()
    r = run_cli(*init_args(sandbox, "--no-smoke", "--key-type", "ecdsa-p256"))
    assert "Everything is already in place" in r.out


def test_a_rerun_with_defaults_keeps_a_certificate_of_another_key_type(sandbox: Path):
    key = sandbox / "etc/ssl/private/mail.example.test.key"
    key.parent.mkdir(parents=True)
    (sandbox / "etc/ssl/certs").mkdir(parents=True)
    assert run_cli("cert", "--hostname", "mail.example.test", "--key-type", "ecdsa-p256", "--out-key", key,
                   "--out-cert", sandbox / "etc/ssl/certs/mail.example.test.crt").code == 0
    old = key.read_bytes()
    for _ in range(2):
        r = run_cli(*init_args(sandbox, "--no-smoke"))
        assert r.code == 0, r.err
        assert key.read_bytes() == old
    assert 'key_type = "ecdsa-p256"' in (sandbox / "etc/mailsetup/answers.toml").read_text()


def test_ctrl_c_while_smtpd_judges_the_files_puts_them_back(sandbox: Path, tmp_path: Path):
    import signal
    import time

    from conftest import MAILSETUP

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "smtpd").write_text('#!/bin/sh\n[ "$1" = -h ] && { echo "version: OpenSMTPD 7.4.0"; exit 0; }\n'
                                'echo judging > "$MARK"\nexec sleep 30\n')
    (stub / "smtpd").chmod(0o755)
    mark = tmp_path / "judging"
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", MARK=str(mark), NO_COLOR="1")
    proc = subprocess.Popen([MAILSETUP, *map(str, init_args(sandbox))], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.exists(), "smtpd -n was never called"
    assert (sandbox / "etc/smtpd.conf").exists()  # written, now being judged
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert "interrupted; nothing was left half-written." in err
    assert [p for p in sandbox.rglob("*") if p.is_file()] == []
