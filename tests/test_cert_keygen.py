"""`mailsetup cert` and `mailsetup keygen`, checked with the real openssl and smtpd."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import OPENSSL, init_args, needs_openssl, needs_smtpd, run_cli, smtpd_check, tree

from mailsetup import files


def openssl(*args: object) -> str:
    proc = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@needs_openssl
@pytest.mark.parametrize(
    "key_type,openssl_says",
    [("rsa-2048", "Public-Key: (2048 bit)"), ("rsa-4096", "Public-Key: (4096 bit)"),
     ("ecdsa-p256", "NIST CURVE: P-256")],
)
def test_cert_is_what_openssl_req_should_have_made(tmp_path: Path, key_type: str, openssl_says: str):
    crt, key = tmp_path / "mail.crt", tmp_path / "mail.key"
    r = run_cli("cert", "--hostname", "mail.example.org", "--key-type", key_type, "--days", "825",
                "--out-cert", crt, "--out-key", key)
    assert r.code == 0, r.err
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = openssl("x509", "-in", crt, "-noout", "-text")
    # OpenSSL 3.0 (Debian 12) prints "CN = x", 3.5 (Debian 13) "CN=x"
    assert re.search(r"Subject: CN ?= ?mail\.example\.org\n", text)
    assert "DNS:mail.example.org" in text
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert "TLS Web Server Authentication" in text
    assert "Subject Key Identifier" in text
    assert openssl_says in text
    # The key is the certificate's, and the certificate checks out as a trust anchor of itself.
    assert openssl("x509", "-in", crt, "-noout", "-pubkey") == openssl("pkey", "-in", key, "-pubout")
    assert "OK" in openssl("verify", "-CAfile", crt, crt)
    assert "Certificate will not expire" in openssl("x509", "-in", crt, "-noout", "-checkend", str(824 * 86400))
    assert "Certificate will expire" in subprocess.run(
        [OPENSSL, "x509", "-in", crt, "-noout", "-checkend", str(826 * 86400)], capture_output=True, text=True
    ).stdout
    assert "SHA-256 fingerprint:" in r.out
    assert "PRIVATE" not in r.out


@needs_openssl
def test_cert_refuses_to_overwrite_then_force_keeps_backups(tmp_path: Path):
    crt, key = tmp_path / "mail.crt", tmp_path / "mail.key"
    args = ["cert", "--hostname", "mail.example.org", "--out-cert", crt, "--out-key", key]
    assert run_cli(*args).code == 0
    before = tree(tmp_path)
    r = run_cli(*args)
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: --out-key: {key} exists; pass --force to replace it (a backup is kept)"]
    assert tree(tmp_path) == before
    r = run_cli(*args, "--force")
    assert r.code == 0, r.err
    backups = sorted(p.name for p in tmp_path.glob("*.bak"))
    assert len(backups) == 2
    old_key_backup = next(tmp_path.glob("mail.key.*.bak"))
    assert old_key_backup.read_bytes() == before["mail.key"]
    assert stat.S_IMODE(old_key_backup.stat().st_mode) == 0o600
    assert key.read_bytes() != before["mail.key"]


@needs_openssl
def test_csr_for_a_ca(tmp_path: Path):
    key, req = tmp_path / "mail.key", tmp_path / "mail.csr"
    r = run_cli("cert", "--hostname", "mail.example.org", "--csr", req, "--out-key", key,
                "--out-cert", tmp_path / "unused.crt")
    assert r.code == 0, r.err
    text = openssl("req", "-in", req, "-noout", "-text", "-verify")
    assert re.search(r"CN ?= ?mail\.example\.org", text) and "DNS:mail.example.org" in text
    assert not (tmp_path / "unused.crt").exists()


def test_cert_bad_hostname_is_one_line(tmp_path: Path):
    r = run_cli("cert", "--hostname", "mail", "--out-cert", tmp_path / "c", "--out-key", tmp_path / "k")
    assert r.code == 2
    assert r.err_lines == [
        "mailsetup: error: --hostname: 'mail' is not a fully qualified name (expected something like mail.example.com)"
    ]
    assert tree(tmp_path) == {}


def test_private_files_are_never_readable_by_others_not_even_before_rename(tmp_path: Path, monkeypatch):
    seen: list[int] = []
    real_replace = os.replace

    def watching_replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        seen.append(stat.S_IMODE(os.stat(src, dir_fd=src_dir_fd).st_mode))
        return real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", watching_replace)
    old = os.umask(0)  # the most careless umask a user could have
    try:
        files.write_atomic(tmp_path / "secret.key", b"k", 0o600)
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temp file left


def test_keygen_prints_32_hex_characters_each_time_new():
    keys = {run_cli("keygen").out.strip() for _ in range(3)}
    assert len(keys) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)


def test_keygen_out_is_0600_and_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "queue.key"
    r = run_cli("keygen", "--out", out)
    assert r.code == 0 and r.out == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = out.read_text()
    assert re.fullmatch(r"[0-9a-f]{32}\n", first)
    r = run_cli("keygen", "--out", out)
    assert r.code == 2 and "pass --force" in r.err
    assert out.read_text() == first
    assert run_cli("keygen", "--out", out, "--force").code == 0
    assert out.read_text() != first
    assert next(tmp_path.glob("queue.key.*.bak")).read_text() == first


@needs_smtpd
def test_smtpd_accepts_our_queue_key_and_refuses_a_wrong_length(sandbox: Path):
    assert run_cli(*init_args(sandbox)).code == 0
    conf = sandbox / "etc/smtpd.conf"
    assert smtpd_check(conf).returncode == 0
    key = (sandbox / "etc/mailsetup/queue.key").read_text().strip()
    conf.write_text(conf.read_text().replace(key, key[:16]))
    check = smtpd_check(conf)
    assert check.returncode != 0 and "invalid key for queue encryption" in check.stderr
    # …and our own reader refuses the same thing before smtpd ever sees it.
    (sandbox / "etc/mailsetup/queue.key").write_text(key[:16] + "\n")
    r = run_cli(*init_args(sandbox))
    assert r.code == 2
    assert "the queue key must be exactly 32 characters, not 16" in r.err


def test_out_paths_in_missing_folders_are_refused_not_created(tmp_path: Path):
    r = run_cli("keygen", "--out", tmp_path / "no/such/dir/queue.key")
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: --out: the folder {tmp_path / 'no/such/dir'} does not exist"]
    assert not (tmp_path / "no").exists()
