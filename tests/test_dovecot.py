"""`--imap dovecot`: Dovecot's configuration written from the same model as smtpd.conf, judged by the
real `doveconf -n`, put back when refused; the logins' passwd-file Dovecot reads; IMAPS read back."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, SMTPD, init_args, own_var, run_cli, tree

DOVECONF = shutil.which("doveconf") or (os.path.exists("/usr/bin/doveconf") and "/usr/bin/doveconf")
needs_dovecot = pytest.mark.skipif(not (DOVECONF and IS_ROOT), reason="needs Dovecot installed and root")
PASSWORD = "Secr3t-pass-x"


def installed_dovecot() -> tuple[int, int]:
    out = subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout
    major, minor = re.match(r"(\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


def doveconf(conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DOVECONF, "-n", "-c", str(conf)], capture_output=True, text=True)


@needs_dovecot
def test_imap_dovecot_writes_a_dovecot_conf_that_doveconf_accepts(tmp_path: Path):
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--imap", "dovecot", "--user", "alice", "--password-stdin", "--no-smoke"),
                input=PASSWORD + "\n")
    assert r.code == 0, r.out + r.err
    conf = root / "etc/dovecot/dovecot.conf"
    assert "✓ doveconf -n: dovecot.conf OK" in r.out
    checked = doveconf(conf)
    assert checked.returncode == 0, checked.stderr
    shown = checked.stdout
    # IMAPS on 993 only, TLS required, with the very pair smtpd.conf names.
    assert re.search(r"inet_listener imap \{\s+port = 0\s+\}", shown)
    assert re.search(r"inet_listener imaps \{\s+port = 993\s+ssl = yes", shown)
    assert "ssl = required" in shown
    smtpd_conf = (root / "etc/smtpd.conf").read_text()
    cert = re.search(r'pki \S+ cert "([^"]+)"', smtpd_conf).group(1)
    key = re.search(r'pki \S+ key "([^"]+)"', smtpd_conf).group(1)
    text = conf.read_text()
    assert cert in text and key in text and cert == str(root / "etc/ssl/certs/mail.example.test.crt")
    assert str(root / "home") in text  # the Maildir smtpd delivers to, under the sandbox
    # One set of logins: the credentials table's bcrypt hash, in the passwd-file Dovecot's passdb reads.
    users = root / "etc/dovecot/users"
    [hash_] = re.findall(r"^alice (\S+)$", (root / "etc/mailsetup/credentials").read_text(), re.M)
    assert f"alice:{{BLF-CRYPT}}{hash_}\n" in users.read_text()
    st = users.stat()
    assert st.st_mode & 0o777 == 0o640 and st.st_uid == 0 and grp.getgrgid(st.st_gid).gr_name == "dovecot"
    assert 'imap = "dovecot"' in (root / "etc/mailsetup/answers.toml").read_text()


@needs_dovecot
def test_dovecot_conf_that_doveconf_refuses_puts_every_file_back(tmp_path: Path):
    root = tmp_path / "root"
    other = "2.3" if installed_dovecot() >= (2, 4) else "2.4"  # the grammar the installed one refuses
    r = run_cli(*init_args(root, "--imap", "dovecot", "--dovecot-version", other, "--no-smoke"))
    assert r.code == 1, r.out + r.err
    [line] = [x for x in r.err.splitlines() if x.startswith("mailsetup: error:")]
    assert line.startswith("mailsetup: error: doveconf -n refused the new dovecot.conf, so every file was put back")
    assert f"rendered for Dovecot {other}" in line
    assert not any(p.is_file() for p in root.rglob("*")), tree(root)


def test_a_sandbox_serves_no_imap_unless_asked(tmp_path: Path):
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke"))
    assert r.code == 0, r.out + r.err
    assert not (root / "etc/dovecot/dovecot.conf").exists()
    assert not (root / "etc/dovecot/users").exists()
    assert 'imap = "none"' in (root / "etc/mailsetup/answers.toml").read_text()


@needs_dovecot
def test_turning_imap_off_empties_dovecots_logins_and_says_what_is_left(tmp_path: Path):
    """A login removed later with `user remove` must not keep reading mail through a Dovecot that
    mailsetup no longer feeds: switching to --imap none empties its logins at once."""
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--imap", "dovecot", "--user", "alice", "--password-stdin", "--no-smoke"),
                input=PASSWORD + "\n")
    assert r.code == 0, r.out + r.err
    users = root / "etc/dovecot/users"
    assert "\nalice:{BLF-CRYPT}$2" in users.read_text()
    r = run_cli(*init_args(root, "--imap", "none", "--no-smoke"))
    assert r.code == 0, r.out + r.err
    assert "alice" not in users.read_text() and (users.stat().st_mode & 0o777) == 0o640
    assert "\nalice:" in next(users.parent.glob("users.*.bak")).read_text()  # a backup, as always
    [warning] = [x for x in r.err.splitlines() if "IMAP is off" in x]
    assert str(users) in warning and "autoconfig/mail/config-v1.1.xml" in warning and "dovecot.conf" in warning
    assert "\nalice $2" in (root / "etc/mailsetup/credentials").read_text()  # submission keeps its logins
    again = run_cli(*init_args(root, "--imap", "none", "--no-smoke"))
    assert again.code == 0 and "IMAP is off" not in again.err


def test_a_bad_imap_value_is_one_line_naming_the_flag(tmp_path: Path):
    r = run_cli(*init_args(tmp_path / "root", "--imap", "courier", "--no-smoke"))
    assert r.code == 2
    assert r.err.splitlines()[0] == "mailsetup: error: --imap: 'courier' is not dovecot or none"
    assert not (tmp_path / "root").exists() or not any(p.is_file() for p in (tmp_path / "root").rglob("*"))


needs_both = pytest.mark.skipif(not (DOVECONF and SMTPD and IS_ROOT and shutil.which("unshare")),
                                reason="needs Dovecot, OpenSMTPD, root and unshare")


@pytest.fixture(scope="module")
def private_host(tmp_path_factory) -> dict:
    """What tests/imap_kit.py saw, once for the tests below (it takes ~15 s)."""
    return in_a_private_host(tmp_path_factory.mktemp("host"))


def in_a_private_host(tmp_path: Path) -> dict:
    """tests/imap_kit.py as root on this host seen through private namespaces: a copy of /etc, an empty
    /home, /var under an overlay, a tmpfs /run (Dovecot's sockets), and a network of its own whose
    loopback holds ports 25 and 993 (never this machine's). Everything it starts dies with it."""
    etc, home = tmp_path / "etc", tmp_path / "home"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    home.mkdir()
    mounts = (f"mount --bind {etc} /etc && mount --bind {home} /home && "
              + own_var(f"{tmp_path}/var", f"{tmp_path}/var-work")
              + " && mount -t tmpfs tmpfs /run && ip link set lo up")
    kit = Path(__file__).with_name("imap_kit.py")
    proc = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--propagation",
                           "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", "/usr/bin/python3", str(kit),
                           MAILSETUP, PASSWORD], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_both
def test_mail_to_an_alias_goes_through_lmtp_and_is_read_over_imaps_with_the_same_password(private_host: dict):
    seen = private_host
    code, out, err = seen["init"]
    assert code == 0, out + err
    assert "✓ doveconf -n: dovecot.conf OK" in out and "✓ smtpd -n" in out
    assert seen["ports"] == [True, True], seen
    # postmaster -> root -> alice, handed to Dovecot's LMTP (its Delivered-To / Return-Path headers show it).
    assert len(seen["delivered"]) == 1, seen
    [message] = seen["delivered"]
    assert "Subject: through LMTP" in message and "Delivered-To: alice" in message, seen
    assert seen["alice"].startswith("ok:") and "Subject: through LMTP" in seen["alice"], seen
    assert seen["alice_wrong"].startswith("refused:"), seen
    assert seen["plain_imap"].startswith("closed:"), seen
    # One set of logins: a user added by `mailsetup user` logs in to IMAP at once, and no more once removed.
    assert seen["add_bob"][0] == 0 and "/etc/dovecot/users" in seen["add_bob"][1], (seen["add_bob"], seen["smtpd_log"])
    assert "told the running Dovecot to reload" in seen["add_bob"][1], seen["add_bob"]
    assert seen["bob"].startswith("ok:"), seen
    # A SHA-512 crypt login (imported) reads mail over IMAP too, with its own password only.
    assert seen["carol"].startswith("ok:") and seen["carol_wrong"].startswith("refused:"), seen
    assert seen["remove_bob"][0] == 0, seen["remove_bob"]
    assert seen["bob_removed"].startswith("refused:"), seen


@needs_both
def test_doctor_checks_dovecot_its_certificate_its_port_and_private_maildirs(private_host: dict):
    seen = private_host
    assert seen["init"][0] == 0, seen["init"]
    found = seen["doctor"]
    assert found["doveconf -n accepts dovecot.conf"] == ["ok", "doveconf -n -c /etc/dovecot/dovecot.conf: "
                                                          "configuration OK"]
    assert found["Dovecot serves smtpd's certificate pair"][0] == "ok", found
    assert found["port 993 held by Dovecot"][0] == "ok", found
    assert found["each login's Maildir private"] == ["ok", "1 Maildir(s), each its owner's only"], found
    status, detail = seen["doctor_open_maildir"]["each login's Maildir private"]
    assert status == "fail" and detail.startswith("/home/alice/Maildir is mode 0755"), detail


def test_dns_offers_imaps_and_init_writes_the_thunderbird_autoconfig_file(tmp_path: Path):
    import xml.etree.ElementTree as ET

    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--imap", "dovecot", "--no-smoke"))
    assert r.code == 0, r.out + r.err
    path = root / "var/www/autoconfig/mail/config-v1.1.xml"
    assert path.stat().st_mode & 0o777 == 0o644
    provider = ET.fromstring(path.read_text()).find("emailProvider")
    incoming, outgoing = provider.find("incomingServer"), provider.find("outgoingServer")
    assert provider.findtext("domain") == "example.test"
    assert [incoming.get("type"), incoming.findtext("hostname"), incoming.findtext("port"),
            incoming.findtext("socketType"), incoming.findtext("username")] == [
        "imap", "mail.example.test", "993", "SSL", "%EMAILLOCALPART%"]
    assert [outgoing.get("type"), outgoing.findtext("port"), outgoing.findtext("socketType")] == [
        "smtp", "587", "STARTTLS"]
    dns = run_cli("dns", "--root", root)
    assert dns.code == 0, dns.err
    assert "_imaps._tcp.example.test.        3600 IN SRV   0 1 993 mail.example.test." in dns.out
    assert "_imap._tcp.example.test.         3600 IN SRV   0 0 0 ." in dns.out  # 143 is closed
    assert (f"Thunderbird autoconfig: {path}; serve it at https://autoconfig.example.test/mail/config-v1.1.xml"
            in dns.out)
    as_json = json.loads(run_cli("dns", "--root", root, "--json").out)
    assert as_json["autoconfig"] == {"path": str(path), "url": "https://autoconfig.example.test/mail/config-v1.1.xml"}


def test_without_imap_dns_says_imaps_is_not_offered_and_no_autoconfig_is_written(tmp_path: Path):
    root = tmp_path / "root"
    assert run_cli(*init_args(root, "--no-smoke")).code == 0
    assert not (root / "var/www/autoconfig").exists()
    dns = run_cli("dns", "--root", root)
    assert "_imaps._tcp.example.test.        3600 IN SRV   0 0 0 ." in dns.out
    assert "Thunderbird autoconfig" not in dns.out


@needs_both
@pytest.mark.skipif(not shutil.which("mbsync"), reason="needs isync (mbsync)")
def test_a_real_imap_client_set_up_from_the_autoconfig_file_fetches_the_mail(private_host: dict):
    code, said, settings, fetched = private_host["mbsync"]
    assert settings == ["mail.example.test", "993", "alice", "IMAPS"]
    assert code == 0, said
    assert len(fetched) == 1 and "Subject: through LMTP" in fetched[0], (said, fetched)


IMAP_CHECK = "read back over IMAPS through Dovecot"


@needs_both
def test_the_smoke_test_reads_the_message_back_over_imaps_on_a_host(private_host: dict):
    code, checks, err = private_host["smoke"]
    assert code == 0, (checks, err)
    ok, detail = checks[IMAP_CHECK]
    assert ok, detail
    assert "(IMAPS, mail.example.test.crt) shows it in alice's INBOX; a wrong password is refused" in detail


@needs_both
def test_the_smoke_test_on_the_real_smtpd_reads_the_message_back_over_imaps(tmp_path: Path):
    from test_real_smtpd import ensure_system_user

    ensure_system_user("alice")  # smtpd and Dovecot deliver to and serve a person's account only
    base = Path(tempfile.mkdtemp(prefix="mailsetup-imap-", dir="/tmp"))
    base.chmod(0o755)  # smtpd's unprivileged processes must reach aliases.db
    try:
        root = base / "root"
        assert run_cli(*init_args(root, "--imap", "dovecot", "--no-smoke")).code == 0
        r = run_cli("smoke", "--root", root, "--engine", "opensmtpd", "--json")
        checks = {c["name"]: c for c in json.loads(r.out)}
        assert r.code == 0, ([c for c in checks.values() if not c["ok"]], r.err)
        assert checks[IMAP_CHECK]["ok"] and "shows it in alice's INBOX" in checks[IMAP_CHECK]["detail"]
        assert not list(Path("/tmp").glob("mailsetup-dovecot-*"))  # its Dovecot stopped and removed
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_dovecot
def test_init_json_reports_the_doveconf_verdict(tmp_path: Path):
    r = run_cli(*init_args(tmp_path / "root", "--imap", "dovecot", "--no-smoke", "--json"))
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["dovecot_check"] == {"ran": True, "ok": True, "detail": "doveconf -n: dovecot.conf OK"}


def _dovecots_running(conf_dir: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "dovecot" in line and conf_dir in line]


@needs_dovecot
def test_the_sandbox_smoke_on_the_embedded_mta_reads_the_message_back_over_imaps_as_root(tmp_path: Path):
    """The demo's case: root provisions a sandbox, the embedded MTA writes a root-owned Maildir, and a
    Dovecot run rootless in a user namespace (root is nobody there) serves that very Maildir."""
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--imap", "dovecot", "--no-smoke"))
    assert r.code == 0, r.out + r.err
    r = run_cli("smoke", "--root", root, "--json")
    checks = {c["name"]: c for c in json.loads(r.out)}
    assert r.code == 0, ([c for c in checks.values() if not c["ok"]], r.err)
    detail = checks[IMAP_CHECK]["detail"]
    assert checks[IMAP_CHECK]["ok"] and "shows it in alice's INBOX; a wrong password is refused" in detail
    maildir = root / "home/alice/Maildir"
    assert maildir.stat().st_uid == 0 and (maildir.stat().st_mode & 0o077) == 0  # still root's, private
    indexes = list(maildir.glob("dovecot*"))
    assert indexes and all(p.stat().st_uid == 0 for p in indexes)  # Dovecot read it as root, not as nobody
    port = int(re.search(r"Dovecot on 127\.0\.0\.1:(\d+)", detail).group(1))
    with pytest.raises(OSError):  # its Dovecot is stopped (other tests may run their own meanwhile)
        socket.create_connection(("127.0.0.1", port), 2).close()
    conf_dirs = [re.search(r"-c (\S+)/dovecot\.conf", x) for x in _dovecots_running("mailsetup-dovecot-")]
    assert all(m and Path(m.group(1)).is_dir() for m in conf_dirs)  # none left behind without its folder


@pytest.mark.skipif(not (DOVECONF and IS_ROOT and shutil.which("runuser")),
                    reason="needs Dovecot, root and runuser to become nobody")
def test_a_normal_users_sandbox_smoke_reads_the_message_back_with_a_dovecot_of_their_own():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-nobody-imap-", dir="/tmp"))
    base.chmod(0o777)
    try:
        proc = subprocess.run(
            [shutil.which("runuser"), "-u", "nobody", "--", MAILSETUP, *map(str, init_args(base / "root", "--imap",
                                                                                          "dovecot"))],
            capture_output=True, text=True, timeout=120, cwd="/tmp", env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(x for x in proc.stdout.splitlines() if IMAP_CHECK in x)
        assert line.lstrip().startswith("✓") and "shows it in alice's INBOX" in line, line
        assert (base / "root/home/alice/Maildir").stat().st_uid == pwd_uid("nobody")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid
