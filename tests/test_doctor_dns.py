"""`mailsetup doctor` catches each fault it claims to (each introduced here), and `mailsetup dns`
against a real DNS server on loopback (dnsmasq)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, SMTPD, run_cli
from mta_kit import DNSMASQ, free_port, provision, start_dnsmasq


@pytest.fixture
def root():
    # World-traversable, as a real /etc is: smtpd's lookup process must reach aliases.db.
    base = Path(tempfile.mkdtemp(prefix="mailsetup-doctor-", dir="/tmp"))
    base.chmod(0o755)
    yield provision(base / "root", "--smtp-port", str(free_port()), "--submission-port", str(free_port()))
    shutil.rmtree(base, ignore_errors=True)


def doctor(root: Path) -> tuple[int, dict[str, dict]]:
    r = run_cli("doctor", "--root", root, "--json")
    return r.code, {f["name"]: f for f in json.loads(r.out)}


def only_failure(root: Path) -> dict:
    code, found = doctor(root)
    assert code == 1
    fails = [f for f in found.values() if f["status"] == "fail"]
    assert len(fails) == 1, fails
    return fails[0]


def test_a_fresh_setup_is_healthy(root: Path):
    code, found = doctor(root)
    assert code == 0, found
    must_be_ok = ["no open relay", "private key permissions", "certificate and key are a pair", "certificate expiry",
                  "certificate names the mail host", "queue key", "aliases.db", "aliases.db reachable by smtpd",
                  "postmaster and abuse", "credentials table", "ports"]
    if SMTPD and IS_ROOT:
        must_be_ok += ["smtpd -n accepts smtpd.conf", "smtpd version"]
    for name in must_be_ok:
        assert found[name]["status"] == "ok", found[name]
    r = run_cli("doctor", "--root", root)
    assert "✓ certificate expiry: valid until" in r.out and "0 problem(s)" in r.out


def test_world_readable_key(root: Path):
    key = root / "etc/ssl/private/mail.example.test.key"
    key.chmod(0o644)
    bad = only_failure_or_with_smtpd(root, "private key permissions")
    assert "smtpd refuses a key with more than rwxr-----" in bad["detail"] and "chmod 600" in bad["detail"]


def only_failure_or_with_smtpd(root: Path, name: str) -> dict:
    """The fault's own check fails; `smtpd -n` may fail alongside it, for the same reason."""
    code, found = doctor(root)
    assert code == 1
    fails = {f["name"] for f in found.values() if f["status"] == "fail"}
    assert name in fails and fails <= {name, "smtpd -n accepts smtpd.conf"}, fails
    return found[name]


def test_key_that_is_not_the_certificates(root: Path, tmp_path: Path):
    assert run_cli("cert", "--hostname", "mail.example.test", "--out-cert", tmp_path / "c", "--out-key",
                   tmp_path / "k").code == 0
    (root / "etc/ssl/private/mail.example.test.key").write_bytes((tmp_path / "k").read_bytes())
    bad = only_failure_or_with_smtpd(root, "certificate and key are a pair")
    assert "is not the key of" in bad["detail"]


def _cert_valid_for(root: Path, days: int, hostname: str = "mail.example.test", age_days: int = 0) -> None:
    from mailsetup import pki

    key = pki.load_key(root / "etc/ssl/private/mail.example.test.key")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days)
    (root / "etc/ssl/certs/mail.example.test.crt").write_bytes(pki.self_signed_cert(key, hostname, days, now=now))


def test_certificate_expiring_within_30_days_warns(root: Path):
    _cert_valid_for(root, 20)
    code, found = doctor(root)
    assert code == 0
    assert found["certificate expiry"]["status"] == "warn"
    assert "renew soon: mailsetup init --rotate-cert" in found["certificate expiry"]["detail"]


def test_expired_certificate_fails(root: Path):
    _cert_valid_for(root, 10, age_days=40)
    bad = only_failure(root)
    assert bad["name"] == "certificate expiry" and "expired on" in bad["detail"]


def test_certificate_for_another_host(root: Path):
    _cert_valid_for(root, 100, hostname="other.example.test")
    bad = only_failure(root)
    assert bad["name"] == "certificate names the mail host"
    assert "names other.example.test, not mail.example.test" in bad["detail"]


def test_queue_key_out_of_step_with_smtpd_conf(root: Path):
    (root / "etc/mailsetup/queue.key").write_text("f" * 32 + "\n")
    bad = only_failure(root)
    assert bad["name"] == "queue key" and "hold different queue keys" in bad["detail"]


def test_aliases_edited_without_rebuilding_the_db(root: Path):
    aliases = root / "etc/aliases"
    aliases.write_text(aliases.read_text() + "sales: alice\n")
    bad = only_failure(root)
    assert bad["name"] == "aliases.db" and "out of step" in bad["detail"] and "'sales'" in bad["detail"]


def test_postmaster_leading_nowhere(root: Path):
    aliases = root / "etc/aliases"
    aliases.write_text("root: alice\npostmaster: |/usr/bin/true\nabuse: alice\n")
    assert run_cli("aliases", aliases).code == 0
    bad = only_failure(root)
    assert bad["name"] == "postmaster and abuse" and "postmaster@example.test" in bad["detail"]


def test_world_readable_credentials(root: Path):
    (root / "etc/mailsetup/credentials").chmod(0o644)
    bad = only_failure(root)
    assert bad["name"] == "credentials table" and "world-readable" in bad["detail"]


def test_port_held_by_another_program(root: Path):
    conf = (root / "etc/smtpd.conf").read_text()
    port = int(conf.split("listen on 0.0.0.0 port ")[1].split()[0])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        bad = only_failure(root)
    assert bad["name"] == "ports" and f"{port} is held by" in bad["detail"]


def test_open_relay_rule_added_by_hand(root: Path):
    conf = root / "etc/smtpd.conf"
    conf.write_text(conf.read_text() + 'match from any for any action "outbound"\n')
    bad = only_failure(root)
    assert bad["name"] == "no open relay"
    assert "an open relay" in bad["detail"] and f"{conf}:" in bad["detail"]


def test_aliases_db_behind_a_private_directory(root: Path):
    (root / "etc").chmod(0o750)
    try:
        code, found = doctor(root)
    finally:
        (root / "etc").chmod(0o755)
    assert code == 1
    assert found["aliases.db reachable by smtpd"]["status"] == "fail"
    assert "failed to open table aliases" in found["aliases.db reachable by smtpd"]["detail"]


def test_doctor_without_a_setup_is_one_line(tmp_path: Path):
    r = run_cli("doctor", "--root", tmp_path)
    assert r.code == 2 and len(r.err_lines) == 1


# --- dns ----------------------------------------------------------------------------------------



def test_dns_prints_the_records_to_publish(root: Path):
    r = run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--ip", "2001:db8::10")
    assert r.code == 0, r.err
    assert "example.test.                    3600 IN MX    10 mail.example.test." in r.out
    assert "mail.example.test.               3600 IN A     192.0.2.10" in r.out
    # the set-up listens on 0.0.0.0 only: an AAAA record would send IPv6 senders to a closed port
    assert "IN AAAA" not in r.out and "; no AAAA for 2001:db8::10: smtpd listens on 0.0.0.0 only (IPv4)" in r.out
    assert '3600 IN TXT   "v=spf1 mx -all"' in r.out
    dmarc = '"v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"'
    assert f"_dmarc.example.test.             3600 IN TXT   {dmarc}" in r.out
    assert "PTR 10.2.0.192.in-addr.arpa. -> mail.example.test." in r.out
    r = run_cli("dns", "--root", root, "--ip", "not-an-ip")
    assert r.code == 2 and r.err_lines == ["mailsetup: error: --ip: 'not-an-ip' is not an IP address"]


@pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq (apt-get install dnsmasq-base)")
def test_dns_check_against_a_real_dns_server(root: Path):
    port = free_port()
    proc = start_dnsmasq(
        port,
        "--local=/example.test/",  # answer NXDOMAIN for the rest of the zone, as its authority would
        "--mx-host=example.test,mail.example.test,10",  # right
        "--host-record=mail.example.test,192.0.2.99",  # wrong address
        "--txt-record=example.test,v=spf1 mx -all",  # right (no shell here, so no quotes)
    )  # no DMARC record at all
    try:
        r = run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--check", "--nameserver", f"127.0.0.1:{port}",
                    "--json")
    finally:
        proc.terminate()
        proc.wait(5)
    assert r.code == 1, r.err
    check = {(c["type"], c["name"]): c for c in json.loads(r.out)["check"]}
    assert check[("MX", "example.test.")]["status"] == "ok"
    assert check[("TXT", "example.test.")]["status"] == "ok"
    assert check[("A", "mail.example.test.")]["status"] == "fail"
    assert check[("A", "mail.example.test.")]["found"] == ["192.0.2.99"]
    assert check[("TXT", "_dmarc.example.test.")]["detail"] == "missing"


def test_dns_check_says_when_dns_does_not_answer(root: Path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    r = run_cli("dns", "--root", root, "--check", "--nameserver", f"127.0.0.1:{port}")
    assert r.code == 0, r.err
    assert "DNS did not answer" in r.out and "not checked" in r.out
    # one timeout (3 s), not one per record: 13 records took 39 s when each was asked in turn
    assert r.out.count("not checked") >= 10 and time.monotonic() - started < 15


@pytest.mark.skipif(not (SMTPD and IS_ROOT), reason="needs OpenSMTPD installed, and root")
def test_doctor_warns_when_the_installed_smtpd_reads_aliases_by_other_rules():
    # 7.5 changed the aliases syntax: a setup made for the other side of it is checked by the wrong rules
    from mailsetup.opensmtpd import smtpd_version

    found = smtpd_version()
    other = "7.6" if (found[0], found[1]) < (7, 5) else "7.4"
    base = Path(tempfile.mkdtemp(prefix="mailsetup-doctor-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = provision(base / "root", "--smtpd-version", other, "--smtp-port", str(free_port()),
                         "--submission-port", str(free_port()))
        _code, found_checks = doctor(root)
        check = found_checks["smtpd version"]
        assert check["status"] == "warn", check
        assert check["detail"] == (f"the aliases were checked for {other}'s makemap but {found[2]} is installed, "
                                   f"which reads aliases differently; re-run init with --smtpd-version "
                                   f"{found[0]}.{found[1]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
