"""A backup MX and verified outbound TLS, as a user sets them up: --relay-tls, --backup-mx and
--backup-for (or their answers-file keys), what they write (smtpd.conf, answers.toml, the MTA-STS
policy), the records `mailsetup dns` prints and checks against a real DNS server (dnsmasq), and the
one-line errors a bad value gets. The real smtpd's side is in test_render.py (`smtpd -n`) and
test_real_smtpd.py (a stranger's RCPT for a backup domain and for any other)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import IS_ROOT, OPENSSL, SMTPD, init_args, run_cli, tree
from mta_kit import DNSMASQ, free_port, start_dnsmasq

needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq (apt-get install dnsmasq-base)")
needs_world = pytest.mark.skipif(
    not (IS_ROOT and SMTPD and DNSMASQ and OPENSSL and shutil.which("unshare") and shutil.which("ip")),
    reason="needs root, OpenSMTPD, dnsmasq, openssl, unshare and ip for a network namespace")

BACKUP = ("--relay-tls", "verify", "--backup-mx", "mx2.other.test", "--backup-mx", "MX3.other.test",
          "--backup-for", "a.test", "--backup-for", "x.test")


def init_b(sandbox: Path, *extra: object):
    """b.test's mail host, mail.b.test (no DKIM: its records are not what these tests are about)."""
    return run_cli(*init_args(sandbox, "--no-smoke", "--no-dkim", *extra, domain="b.test"))


def rules(conf: Path) -> list[str]:
    return [line for line in conf.read_text().splitlines() if line.startswith(("table backup", "action", "match"))]


def test_the_three_settings_reach_smtpd_conf_and_the_answers_file_and_a_rerun_keeps_them(sandbox: Path):
    r = init_b(sandbox, *BACKUP)
    assert r.code == 0, r.err
    assert rules(sandbox / "etc/smtpd.conf") == [
        'table backup_domains { "a.test", "x.test" }',
        f'action "local_mail" maildir "{sandbox}/home/%{{user.username}}/Maildir" alias <aliases>',
        'action "outbound" relay tls helo mail.b.test',
        'action "backup" relay backup mx mail.b.test tls helo mail.b.test',
        'match from any for domain "b.test" action "local_mail"',
        'match from any for domain <backup_domains> action "backup"',
        'match for local action "local_mail"',
        'match auth from any for any action "outbound"',
        'match from local for any action "outbound"',
    ]
    recorded = (sandbox / "etc/mailsetup/answers.toml").read_text().splitlines()
    for line in ('relay_tls = "verify"', 'backup_mx = ["mx2.other.test", "mx3.other.test"]',
                 'backup_for = ["a.test", "x.test"]'):
        assert line in recorded
    # Every MX is in the MTA-STS policy: a sender that enforces it refuses an MX it does not name.
    policy = (sandbox / "var/www/mta-sts/.well-known/mta-sts.txt").read_bytes()
    assert b"mx: mail.b.test\r\nmx: mx2.other.test\r\nmx: mx3.other.test\r\n" in policy
    r = run_cli("init", "--yes", "--no-smoke", "--root", sandbox)  # from the answers file alone
    assert r.code == 0, r.err
    assert "Everything is already in place" in r.out


def test_by_default_outbound_tls_is_opportunistic_and_nothing_is_relayed_as_a_backup(sandbox: Path):
    r = init_b(sandbox)
    assert r.code == 0, r.err
    found = rules(sandbox / "etc/smtpd.conf")
    assert 'action "outbound" relay helo mail.b.test' in found
    assert not [line for line in found if "backup" in line]
    recorded = (sandbox / "etc/mailsetup/answers.toml").read_text()
    assert "relay_tls" not in recorded and "backup_" not in recorded  # a default stays a default


def test_the_answers_file_keys_do_what_the_flags_do(tmp_path: Path, sandbox: Path):
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "b.test"\nadmin = "alice"\nrelay_tls = "verify"\nbackup_for = "a.test"\n'
                       'backup_mx = ["mx2.other.test"]\n')
    r = run_cli("init", "--yes", "--no-smoke", "--no-dkim", "--os", "debian", "--root", sandbox, "--answers", answers)
    assert r.code == 0, r.err
    found = rules(sandbox / "etc/smtpd.conf")
    assert found[0] == 'table backup_domains { "a.test" }'
    assert 'action "outbound" relay tls helo mail.b.test' in found
    assert 'backup_for = ["a.test"]' in (sandbox / "etc/mailsetup/answers.toml").read_text()


@pytest.mark.parametrize("flags,error", [
    (["--relay-tls", "strict"], "--relay-tls: 'strict' is not opportunistic or verify"),
    (["--backup-mx", "mail.b.test"],
     "--backup-mx: mail.b.test is this host's own name (--hostname): list the other MX hosts"),
    (["--backup-mx", "mx2.other.test", "--backup-mx", "MX2.other.test"], "--backup-mx: mx2.other.test is given twice"),
    (["--backup-mx", "backup"],
     "--backup-mx: 'backup' is not a fully qualified name (expected something like mail.example.com)"),
    (["--backup-for", "B.test"],
     "--backup-for: b.test is this host's own domain (--domain), whose mail is delivered here"),
    (["--backup-for", "a.test", "--backup-for", "a.test"], "--backup-for: a.test is given twice"),
    (["--backup-for", 'a.test" }\nmatch from any for any action "outbound'],
     "--backup-for: 'a.test\" }\\nmatch from any for any action \"outbound' contains a double quote, "
     "which is not allowed here"),
])
def test_a_bad_value_is_one_line_naming_its_flag_and_nothing_is_written(sandbox: Path, flags: list, error: str):
    r = init_b(sandbox, *flags)
    assert (r.code, r.err_lines) == (2, [f"mailsetup: error: {error}"])
    assert tree(sandbox) == {}


@pytest.mark.parametrize("line,error", [
    ('relay_tls = "yes"', "--relay-tls: 'yes' is not opportunistic or verify"),
    ("backup_mx = [25]", "--backup-mx: [25] is not a DNS name or a list of them"),
    ('backup_for = ["b.test"]', "--backup-for: b.test is this host's own domain (--domain), whose mail is delivered "
                                "here"),
])
def test_a_bad_value_in_an_answers_file_names_its_file_and_line(tmp_path: Path, sandbox: Path, line: str, error: str):
    answers = tmp_path / "answers.toml"
    answers.write_text(f'domain = "b.test"\nadmin = "alice"\n{line}\n')
    r = run_cli("init", "--yes", "--no-smoke", "--os", "debian", "--root", sandbox, "--answers", answers)
    assert (r.code, r.err_lines) == (2, [f"mailsetup: error: {answers}:3: {error}"])
    assert tree(sandbox) == {}


def mx_records(sandbox: Path) -> list[str]:
    r = run_cli("dns", "--root", sandbox, "--ip", "192.0.2.2", "--json")
    assert r.code == 0, r.err
    return [rec["value"] for rec in json.loads(r.out)["records"] if rec["type"] == "MX"]


def test_dns_prints_the_backup_mxes_after_this_hosts_own(sandbox: Path):
    assert init_b(sandbox, "--backup-mx", "mx2.other.test", "--backup-mx", "mx3.other.test").code == 0
    assert mx_records(sandbox) == ["10 mail.b.test.", "20 mx2.other.test.", "30 mx3.other.test."]
    text = run_cli("dns", "--root", sandbox, "--ip", "192.0.2.2").out.splitlines()
    zone = [line.split() for line in text if " IN MX " in line]
    assert zone == [["b.test.", "3600", "IN", "MX", "10", "mail.b.test."],
                    ["b.test.", "3600", "IN", "MX", "20", "mx2.other.test."],
                    ["b.test.", "3600", "IN", "MX", "30", "mx3.other.test."]]


@needs_dnsmasq
def test_dns_check_checks_each_backup_mx_like_the_primary(sandbox: Path):
    assert init_b(sandbox, "--backup-mx", "mx2.other.test", "--backup-mx", "mx3.other.test").code == 0
    port = free_port()
    # mx3 is published with the wrong preference: only it fails
    server = start_dnsmasq(port, "--local=/b.test/", "--mx-host=b.test,mail.b.test,10",
                           "--mx-host=b.test,mx2.other.test,20", "--mx-host=b.test,mx3.other.test,40")
    try:
        r = run_cli("dns", "--root", sandbox, "--ip", "192.0.2.2", "--check", "--nameserver", f"127.0.0.1:{port}",
                    "--json")
    finally:
        server.terminate()
        server.wait(5)
    assert r.code == 1
    mx = [(c["wanted"], c["status"]) for c in json.loads(r.out)["check"] if c["type"] == "MX"]
    assert mx == [("10 mail.b.test.", "ok"), ("20 mx2.other.test.", "ok"), ("30 mx3.other.test.", "fail")]


def test_serve_refuses_a_backup_mx_in_one_line(sandbox: Path):
    """The embedded MTA would refuse the backup domains' mail the MX records send here."""
    assert init_b(sandbox, "--backup-for", "a.test").code == 0
    r = run_cli("serve", "--root", sandbox, "--smtp-port", str(free_port()), "--submission-port", str(free_port()))
    assert (r.code, r.err_lines) == (2, [
        "mailsetup: error: this set-up is a backup MX for a.test (--backup-for), which the embedded MTA does not do; "
        "run the real smtpd (mailsetup smoke --engine opensmtpd)"])


# --- what verify means, measured: the real smtpd delivering to an MX it finds through DNS ------------

@pytest.fixture
def world_dir():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-world-", dir="/tmp"))
    base.chmod(0o755)  # smtpd's unprivileged processes must reach the set-up's files
    yield base
    shutil.rmtree(base, ignore_errors=True)


def ca_signed(base: Path, name: str) -> tuple[Path, Path, Path]:
    """A test CA, and a certificate for `name` it signed: (the CA bundle with it, cert, key)."""
    def openssl(*args: object) -> None:
        subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", base / "ca.key", "-out", base / "ca.crt",
            "-subj", "/CN=mailsetup test CA", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", base / "mx.key", "-out", base / "mx.csr",
            "-subj", f"/CN={name}")
    (base / "san").write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", base / "mx.csr", "-CA", base / "ca.crt", "-CAkey", base / "ca.key",
            "-CAcreateserial", "-out", base / "mx.crt", "-days", "2", "-extfile", base / "san")
    (base / "mx.key").chmod(0o600)
    bundle = base / "ca-certificates.crt"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes() + (base / "ca.crt").read_bytes())
    return bundle, base / "mx.crt", base / "mx.key"


def send_through_dns(base: Path, relay_tls: str, mx_cert: str, *sender_flags: str) -> dict:
    """example.test's smtpd (--relay-tls `relay_tls`) sends to postmaster@a.test, whose MX mx.a.test
    shows a self-signed certificate, one a CA the sender trusts signed (`trusted`), or such a one
    for another name (`mismatched`)."""
    sender, receiver = base / "sender", base / "receiver"
    r = run_cli(*init_args(sender, "--no-smoke", "--no-dkim", "--relay-tls", relay_tls, *sender_flags))
    assert r.code == 0, r.err
    # DNS names mx.a.test as a.test's MX; a mismatched host calls itself (and its certificate) other.a.test
    receiver_tls, bundle, name = [], None, "other.a.test" if mx_cert == "mismatched" else "mx.a.test"
    if mx_cert != "self-signed":
        bundle, cert, key = ca_signed(base, name)
        receiver_tls = ["--tls", "existing", "--cert", cert, "--key", key]
    r = run_cli(*init_args(receiver, "--no-smoke", "--no-dkim", "--hostname", name, *receiver_tls, domain="a.test"))
    assert r.code == 0, r.err
    world = Path(__file__).with_name("relay_world.py")
    proc = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "--", sys.executable, world,
                           base, sender, receiver, *([bundle] if bundle else [])],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BACKUP": "1" if "--backup-for" in sender_flags else "0"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_world
def test_opportunistic_tls_delivers_to_an_mx_with_a_self_signed_certificate_unverified(world_dir: Path):
    out = send_through_dns(world_dir, "opportunistic", "self-signed")
    assert out["action"] == 'action "outbound" relay helo mail.example.test'
    assert any('cert-check result="unverified"' in line for line in out["mta"]), out
    assert len(out["delivered"]) == 1 and out["queued"] == [], out


@needs_world
@pytest.mark.parametrize("mx_cert,why", [("self-signed", "certificate verification failed: self-signed certificate"),
                                         ("mismatched", "name `mx.a.test' not present in server certificate")])
def test_verify_refuses_an_mx_whose_certificate_it_cannot_verify_and_keeps_the_mail(world_dir: Path, mx_cert: str,
                                                                                     why: str):
    out = send_through_dns(world_dir, "verify", mx_cert)
    assert out["action"] == 'action "outbound" relay tls helo mail.example.test'
    assert any(why in line for line in out["mta"]), out
    assert out["delivered"] == [] and out["queued"], out


@needs_world
def test_verify_delivers_to_an_mx_whose_certificate_a_trusted_ca_signed(world_dir: Path):
    out = send_through_dns(world_dir, "verify", "trusted")
    assert any('cert-check result="valid"' in line for line in out["mta"]), out
    assert len(out["delivered"]) == 1 and out["queued"] == [], out


@needs_world
def test_a_backup_mx_hands_a_strangers_mail_to_the_primary_mx_with_tls_verified(world_dir: Path):
    """mx2.a.test (MX 20, --backup-for a.test) takes a.test's mail from a sender on the internet and
    hands it to the MX of higher priority, mx.a.test (MX 10), over STARTTLS with its certificate
    verified."""
    out = send_through_dns(world_dir, "verify", "trusted", "--hostname", "mx2.a.test", "--backup-for", "a.test")
    assert out["backup_action"] == 'action "backup" relay backup mx mx2.a.test tls helo mx2.a.test'
    assert any("address=smtp+tls://127.0.0.2:25 host=mx.a.test" in line for line in out["mta"]), out
    assert any('cert-check result="valid"' in line for line in out["mta"]), out
    assert len(out["delivered"]) == 1 and out["queued"] == [], out
