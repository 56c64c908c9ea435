"""`mailsetup smoke --engine opensmtpd`: the set-up proven on the real daemon — in full on 7.x, and
the 6.8 + OpenSSL 3 TLS defect named on a real 6.8 binary."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import IS_ROOT, SMTPD, run_cli
from mta_kit import free_port, provision

pytestmark = pytest.mark.skipif(not (SMTPD and IS_ROOT), reason="needs OpenSMTPD installed and root")


def ensure_system_user(name: str) -> None:
    """smtpd delivers only to system users; CI's machine starts without them."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)


@pytest.fixture
def root():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-real-", dir="/tmp"))
    base.chmod(0o755)  # smtpd's unprivileged processes must reach aliases.db
    ensure_system_user("alice")
    yield provision(base / "root")
    shutil.rmtree(base, ignore_errors=True)


def smoke(root: Path, *extra: object) -> tuple[int, dict[str, dict], str]:
    r = run_cli("smoke", "--root", root, "--engine", "opensmtpd", "--json", *extra)
    checks = {c["name"]: c for c in json.loads(r.out)} if r.out.strip() else {}
    return r.code, checks, r.err


def test_real_smtpd_passes_the_whole_smoke_test(root: Path):
    code, checks, err = smoke(root)
    assert code == 0, (checks, err)
    for name in ("smtpd version and the known TLS defect", "STARTTLS with the generated certificate",
                 "inbound over STARTTLS through the aliases into Maildir", "unauthenticated relay refused",
                 "AUTH without TLS refused", "wrong password refused", "authenticated submission accepted for relay",
                 "relay delivers to the relay host", "the server's own name in the greeting and EHLO"):
        assert checks[name]["ok"], checks[name]
    assert "smtpd -d on 127.0.0.1" in checks["start the OpenSMTPD on the set-up's files"]["detail"]
    # smtpd greets, answers EHLO and relays as --hostname, not as this machine's name.
    assert checks["the server's own name in the greeting and EHLO"]["detail"] == (
        "greets and answers EHLO as mail.example.test")
    assert checks["relay delivers to the relay host"]["detail"].endswith("introducing itself as mail.example.test")
    assert "-> alice" in checks["inbound over STARTTLS through the aliases into Maildir"]["detail"]
    # The same JSON shape as the embedded engine.
    assert all(set(c) == {"name", "ok", "detail", "seconds"} for c in checks.values())
    # It stopped what it started (read /proc: a minimal Debian has no pgrep). Another test on the other
    # worker may be running an smtpd of its own right now, in a work directory that still exists; a
    # leftover is an smtpd whose work directory the smoke test has already removed.
    assert orphaned_smtpds() == []


def orphaned_smtpds() -> list[str]:
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if b"/mailsetup-smtpd-" in arg:
                work = arg[: arg.index(b"/mailsetup-smtpd-") + len(b"/mailsetup-smtpd-")]
                rest = arg[len(work):].split(b"/")[0]
                if not Path(os.fsdecode(work + rest)).exists():
                    leftovers.append(cmdline.parent.name)
                break
    return leftovers


@pytest.fixture
def backup_root():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-real-", dir="/tmp"))
    base.chmod(0o755)
    ensure_system_user("alice")
    yield provision(base / "root", "--backup-for", "a.test", "--relay-tls", "verify")
    shutil.rmtree(base, ignore_errors=True)


def test_a_backup_mx_takes_a_strangers_mail_for_its_backup_domain_and_is_no_open_relay(backup_root: Path):
    """The real smtpd on the set-up's rules (the written smtpd.conf's, checked line by line), asked
    from 127.0.0.2, which is not `from local`: RCPT for the backup domain and for our own is taken,
    any other domain refused, a subdomain and the relay tricks too."""
    from mailsetup.answers import load_setup
    from mailsetup.realsmtpd import RealSmtpd, check_written_config, loopback_config
    from mailsetup.smoke import RELAY_TRICKS, STRANGER

    setup = load_setup(backup_root, "debian")
    check_written_config(setup)  # the loopback smtpd runs what smtpd.conf says
    smtp, submission = free_port(), free_port()
    conf = loopback_config(setup, smtp, submission, free_port())
    assert 'match from any for domain <backup_domains> action "backup"\n' in conf
    wanted = {"bob@a.test": 250, "Bob@A.TEST": 250, "alice@example.test": 250, "x@example.net": 550,
              "x@mail.a.test": 550, "x@a.test.example.net": 550,
              **{t.format(domain="a.test"): 550 for t in RELAY_TRICKS if "{domain}." in t or "@{" not in t}}
    answered = {}
    with RealSmtpd(SMTPD, conf, (smtp, submission)), \
            smtplib.SMTP("127.0.0.1", smtp, local_hostname="stranger.invalid", timeout=10,
                         source_address=(STRANGER, 0)) as client:
        client.ehlo()
        for rcpt in wanted:
            client.rset()
            client.mail("someone@example.net")
            answered[rcpt] = client.rcpt(f"<{rcpt}>")[0]
    assert {r: code // 100 for r, code in answered.items()} == {r: code // 100 for r, code in wanted.items()}
    # The whole smoke test still passes: its relay sink (plain SMTP) is not asked for a verified certificate.
    code, checks, err = smoke(backup_root)
    assert code == 0, (checks, err)


@pytest.fixture(scope="session")
def smtpd_68() -> Path:
    """bookworm's own opensmtpd (6.8.0p2), unpacked beside the installed 7.x."""
    cache = Path("/var/cache/mailsetup-tests/opensmtpd-6.8")
    binary = cache / "root/usr/sbin/smtpd"
    pairs = (ln.split("=", 1) for ln in Path("/etc/os-release").read_text().splitlines() if "=" in ln)
    release = {k: v.strip('"') for k, v in pairs}
    if not binary.exists() and release.get("VERSION_CODENAME") != "bookworm":
        # Debian 13 has no 6.8 (its own package is 7.6) and its apt knows no bookworm release
        pytest.skip(f"the 6.8 defect is Debian 12's own package; this is {release.get('PRETTY_NAME', '?')}")
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", "opensmtpd/bookworm"], cwd=cache, capture_output=True, text=True)
        debs = list(cache.glob("opensmtpd_6.8*.deb"))
        if got.returncode != 0 or not debs:
            pytest.skip(f"cannot fetch bookworm's opensmtpd 6.8 package: {got.stderr.strip()[-200:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(cache / "root")], check=True)
    version = subprocess.run([binary, "-h"], capture_output=True, text=True)
    if "6.8" not in version.stdout + version.stderr:
        pytest.skip(f"{binary} is not 6.8: {version.stdout + version.stderr}")
    return binary


def test_the_68_tls_defect_is_named_with_its_remedy(root: Path, smtpd_68: Path):
    code, checks, err = smoke(root, "--smtpd", smtpd_68)
    assert code == 1
    version = checks["smtpd version and the known TLS defect"]
    assert not version["ok"]
    assert "fails every STARTTLS handshake" in version["detail"] and "#1171" in version["detail"]
    assert "bookworm-backports" in version["detail"]
    tls = checks["STARTTLS with the generated certificate"]
    assert not tls["ok"] and "tlsv1 alert internal error" in tls["detail"].lower()
    assert "the known TLS defect named above" in tls["detail"]


def test_a_missing_smtpd_binary_is_one_line(root: Path):
    r = run_cli("smoke", "--root", root, "--engine", "opensmtpd", "--smtpd", "/nonexistent/smtpd")
    assert r.code == 2
    assert r.err_lines == ["mailsetup: error: --smtpd: /nonexistent/smtpd is not an executable smtpd"]


def test_a_hand_edited_smtpd_conf_is_named_not_passed_off_as_proven(root: Path):
    """The loopback smtpd runs smtpd.conf as the set-up renders it; a written file that says something
    else is named (file:line, not its text: it holds the queue key) instead of being reported as
    proven. Comments may differ."""
    conf = root / "etc/smtpd.conf"
    original = conf.read_text()
    lines = original.splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("smtp max-message-size"))
    lines[number - 1] = "smtp max-message-size 1M\n"
    conf.write_text("".join(lines))
    code, checks, err = smoke(root)
    assert code == 1
    start = checks["start the OpenSMTPD on the set-up's files"]
    assert not start["ok"]
    assert start["detail"].startswith(f"{conf}:{number} differs from what the set-up renders"), start
    assert "queue encryption" not in start["detail"]
    conf.write_text("# a note of the admin's\n" + original)
    code, checks, err = smoke(root)
    assert code == 0, (checks, err)
