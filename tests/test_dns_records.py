"""Every record `mailsetup dns` prints beyond MX, A, SPF and DMARC: MTA-STS (its TXT, the policy file
init writes and the name that serves it), TLS-RPT and the client SRV records, and `dns --check`
comparing each with a real DNS server on loopback (dnsmasq) that serves it right, wrong or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli
from mta_kit import DNSMASQ, free_port, provision, start_dnsmasq

needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq (apt-get install dnsmasq-base)")

POLICY = "var/www/mta-sts/.well-known/mta-sts.txt"


@pytest.fixture
def root():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-records-", dir="/tmp"))
    base.chmod(0o755)
    yield provision(base / "root", "--smtp-port", str(free_port()), "--submission-port", str(free_port()))
    shutil.rmtree(base, ignore_errors=True)


def submission_port(root: Path) -> int:
    return tomllib.loads((root / "etc/mailsetup/answers.toml").read_text())["submission_port"]


def records(root: Path) -> dict[tuple[str, str], dict]:
    r = run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--json")
    assert r.code == 0, r.err
    return {(rec["type"], rec["name"]): rec for rec in json.loads(r.out)["records"]}


def policy_id(root: Path) -> str:
    """The id the policy file on disk should be announced with: derived from its text alone."""
    return hashlib.sha256((root / POLICY).read_bytes()).hexdigest()[:20]


# --- what is printed ---------------------------------------------------------------------------------

def test_dns_prints_mta_sts_tlsrpt_and_client_srv_records_for_a_provisioned_sandbox(root: Path):
    port = submission_port(root)
    r = run_cli("dns", "--root", root, "--ip", "192.0.2.10")
    assert r.code == 0, r.err
    ident = policy_id(root)
    for line in (
        "; -- TLS between mail servers (MTA-STS, TLS-RPT)",
        f'_mta-sts.example.test.           3600 IN TXT   "v=STSv1; id={ident}"',
        "mta-sts.example.test.            3600 IN CNAME mail.example.test.",
        '_smtp._tls.example.test.         3600 IN TXT   "v=TLSRPTv1; rua=mailto:postmaster@example.test"',
        "; -- where mail programs find the server (RFC 6186 SRV)",
        f"_submission._tcp.example.test.   3600 IN SRV   0 1 {port} mail.example.test.",
        "_submissions._tcp.example.test.  3600 IN SRV   0 0 0 .",
        "_imaps._tcp.example.test.        3600 IN SRV   0 0 0 .",
        "_imap._tcp.example.test.         3600 IN SRV   0 0 0 .",
        f"MTA-STS policy (mode testing, id {ident}): {root / POLICY}",
        "  Serve it at https://mta-sts.example.test/.well-known/mta-sts.txt with a CA-trusted certificate for "
        "mta-sts.example.test (senders ignore a policy fetched over a self-signed one); the CNAME above sends "
        "mta-sts.example.test to mail.example.test.",
        f'Mail clients (RFC 6186) find submission on mail.example.test port {port}; "0 0 0 ." says submissions, '
        "imaps, imap not offered here.",
    ):
        assert line in r.out.splitlines(), line
    # the zone snippet still pastes: every line is a record or a comment, up to the first blank line
    snippet = r.out.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith(";") or " 3600 IN " in line for line in snippet)

    payload = json.loads(run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--json").out)
    groups = {(rec["type"], rec["name"]): rec["group"] for rec in payload["records"]}
    assert groups[("MX", "example.test.")] == "routing"
    assert groups[("TXT", "_dmarc.example.test.")] == "authentication"
    assert groups[("TXT", "_mta-sts.example.test.")] == groups[("CNAME", "mta-sts.example.test.")] == "tls"
    assert groups[("TXT", "_smtp._tls.example.test.")] == "tls"
    assert groups[("SRV", "_imaps._tcp.example.test.")] == "clients"
    assert payload["mta_sts"] == {
        "mode": "testing", "id": ident, "max_age": 86400, "path": str(root / POLICY), "on_disk": "same",
        "url": "https://mta-sts.example.test/.well-known/mta-sts.txt",
        "policy": (root / POLICY).read_bytes().decode(),
    }


def test_init_writes_the_mta_sts_policy_where_a_web_server_can_serve_it(root: Path):
    policy = root / POLICY
    assert policy.read_bytes() == b"version: STSv1\r\nmode: testing\r\nmx: mail.example.test\r\nmax_age: 86400\r\n"
    assert policy.stat().st_mode & 0o777 == 0o644
    for folder in (policy.parent, policy.parent.parent):  # a web server running as anyone reaches it
        assert folder.stat().st_mode & 0o755 == 0o755


def test_enforce_changes_the_policy_and_its_id_and_testing_goes_back(root: Path):
    before = records(root)[("TXT", "_mta-sts.example.test.")]["value"]
    r = run_cli("init", "--yes", "--no-smoke", "--root", root, "--mta-sts-mode", "enforce")
    assert r.code == 0, r.err
    assert "the MTA-STS policy changed: publish its new _mta-sts id (mailsetup dns) so senders fetch it again" \
        in r.out
    # the sandbox's certificate is self-signed: enforcing would turn every MTA-STS sender away
    assert ("  ! --mta-sts-mode enforce with a self-signed certificate: senders that honour MTA-STS will refuse to "
            "deliver to mail.example.test; give it a CA-trusted certificate first (--tls existing)") in r.err
    assert (root / POLICY).read_bytes().split(b"\r\n") == [
        b"version: STSv1", b"mode: enforce", b"mx: mail.example.test", b"max_age: 604800", b""]
    after = records(root)[("TXT", "_mta-sts.example.test.")]["value"]
    assert after != before and after == f"v=STSv1; id={policy_id(root)}"
    assert 'mta_sts_mode = "enforce"' in (root / "etc/mailsetup/answers.toml").read_text()
    # a re-run with no flag keeps the answer; --mta-sts-mode testing brings back the first policy and id
    assert run_cli("init", "--yes", "--no-smoke", "--root", root).code == 0
    assert records(root)[("TXT", "_mta-sts.example.test.")]["value"] == after
    assert run_cli("init", "--yes", "--no-smoke", "--root", root, "--mta-sts-mode", "testing").code == 0
    assert records(root)[("TXT", "_mta-sts.example.test.")]["value"] == before


def test_dns_says_when_the_policy_file_is_not_the_one_announced(root: Path):
    (root / POLICY).write_text("version: STSv1\nmode: enforce\nmx: elsewhere.example\nmax_age: 86400\n")
    r = run_cli("dns", "--root", root, "--ip", "192.0.2.10")
    assert f"  ! {root / POLICY} is not the policy these records announce: run mailsetup init" in r.out
    (root / POLICY).unlink()
    r = run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--json")
    assert json.loads(r.out)["mta_sts"]["on_disk"] == "missing"


def test_a_bad_or_hostile_mta_sts_mode_is_refused_and_nothing_is_written(tmp_path: Path):
    sandbox = tmp_path / "root"
    base = ["init", "--yes", "--no-smoke", "--domain", "example.test", "--os", "debian", "--root", sandbox,
            "--admin", "alice"]
    for bad in ("strict", "testing\nmx: evil.example.org", "enforce\r\nmax_age: 31557600"):
        r = run_cli(*base, "--mta-sts-mode", bad)
        assert r.code == 2
        assert r.err_lines[0] == f"mailsetup: error: --mta-sts-mode: {bad!r} is not testing, enforce or none"
        assert len(r.err_lines) == 1
        assert not sandbox.exists()
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "example.test"\nmta_sts_mode = "Enforce"\n')
    r = run_cli(*base, "--answers", answers)
    assert r.code == 2 and r.err_lines == [
        f"mailsetup: error: {answers}:2: --mta-sts-mode: 'Enforce' is not testing, enforce or none"]
    # a hostile host name never reaches the policy's lines either (it is refused as a DNS name)
    r = run_cli(*base, "--hostname", "mail.example.test\nmx: evil.example.org")
    assert r.code == 2 and not sandbox.exists()
    # the accepted values give exactly four lines, each one field
    assert run_cli(*base, "--mta-sts-mode", "none").code == 0
    lines = (sandbox / POLICY).read_bytes().decode().split("\r\n")
    assert lines == ["version: STSv1", "mode: none", "mx: mail.example.test", "max_age: 86400", ""]


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust rules apply to root")
def test_a_web_root_another_user_owns_is_left_alone_and_the_rest_is_written(tmp_path: Path):
    sandbox = tmp_path / "root"
    (sandbox / "var/www").mkdir(parents=True)
    os.chown(sandbox / "var/www", 65534, 65534)  # nobody's, as after a `chown -R www-data /var/www`
    r = run_cli("init", "--yes", "--no-smoke", "--domain", "example.test", "--os", "debian", "--root", sandbox,
                "--admin", "alice")
    assert r.code == 0, r.err
    assert (f"  ! MTA-STS policy not written: refusing to write {sandbox / POLICY}: {sandbox / 'var/www'} is owned by "
            "uid 65534") in r.err
    assert "(mta_sts.policy), to put where your web server serves it" in r.err
    assert not (sandbox / "var/www/mta-sts").exists()
    assert (sandbox / "etc/smtpd.conf").exists()
    r = run_cli("dns", "--root", sandbox, "--json")
    assert json.loads(r.out)["mta_sts"]["on_disk"] == "missing"


# --- dns --check against a real DNS server --------------------------------------------------------

class Dnsmasq:
    """dnsmasq on a free loopback port serving the given options (NXDOMAIN for the rest of the zone)."""

    def __init__(self, *options: str):
        self.port = free_port()
        self.proc = start_dnsmasq(self.port, "--local=/example.test/", *options)

    def check(self, root: Path, *extra: str):
        return run_cli("dns", "--root", root, "--ip", "192.0.2.10", "--check", "--nameserver",
                       f"127.0.0.1:{self.port}", *extra)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def checked(run) -> dict[tuple[str, str], dict]:
    return {(c["type"], c["name"]): c for c in json.loads(run.out)["check"]}


BASICS = ("--mx-host=example.test,mail.example.test,10", "--host-record=mail.example.test,192.0.2.10",
          "--txt-record=example.test,v=spf1 mx -all",
          "--txt-record=_dmarc.example.test,v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test")
NEW = [("TXT", "_mta-sts.example.test."), ("CNAME", "mta-sts.example.test."), ("TXT", "_smtp._tls.example.test."),
       ("SRV", "_submission._tcp.example.test."), ("SRV", "_submissions._tcp.example.test."),
       ("SRV", "_imaps._tcp.example.test."), ("SRV", "_imap._tcp.example.test.")]


@needs_dnsmasq
def test_dns_check_passes_each_record_served_right_and_names_a_stale_mta_sts_id(root: Path):
    ident = policy_id(root)
    server = Dnsmasq(
        *BASICS,
        f"--txt-record=_mta-sts.example.test,v=STSv1; id={ident}",
        "--cname=mta-sts.example.test,mail.example.test",
        "--txt-record=_smtp._tls.example.test,v=TLSRPTv1;rua=mailto:postmaster@example.test",  # spacing differs
        f"--srv-host=_submission._tcp.example.test,mail.example.test,{submission_port(root)},0,1",
        # no target: dnsmasq serves "0 0 1 ." — the "." alone says "not offered" (RFC 2782)
        "--srv-host=_submissions._tcp.example.test", "--srv-host=_imaps._tcp.example.test",
        "--srv-host=_imap._tcp.example.test",
        *(f"--txt-record={name.rstrip('.')},{rec['value']}" for (rtype, name), rec in records(root).items()
          if "._domainkey." in name),  # the DKIM keys' records (on by default), as printed
    )
    try:
        r = server.check(root, "--json")
        assert r.code == 0, r.out + r.err
        found = checked(r)
        for key in NEW:
            assert found[key]["status"] == "ok", found[key]
        assert found[("SRV", "_submission._tcp.example.test.")]["found"] == [
            f"0 1 {submission_port(root)} mail.example.test"]
        # the policy changes: DNS still serves the old id, and --check says so in words
        assert run_cli("init", "--yes", "--no-smoke", "--root", root, "--mta-sts-mode", "enforce").code == 0
        new_ident = policy_id(root)
        r = server.check(root)
    finally:
        server.stop()
    assert r.code == 1
    assert (f"✗ TXT _mta-sts.example.test.: published with id {ident}, but the current policy's id is {new_ident}: "
            "senders keep the policy they cached until the id changes; publish the new one "
            f"(found: v=STSv1; id={ident})") in r.out.splitlines()


@needs_dnsmasq
def test_dns_check_fails_each_record_served_wrong(root: Path):
    server = Dnsmasq(
        *BASICS,
        "--txt-record=_mta-sts.example.test,v=STSv1; id=one",
        "--txt-record=_mta-sts.example.test,v=STSv1; id=two",  # two policies: senders heed neither
        "--host-record=mta-sts.example.test,192.0.2.77",  # its own address, not a CNAME to the mail host
        "--txt-record=_smtp._tls.example.test,v=TLSRPTv1; rua=mailto:reports@elsewhere.example",
        "--srv-host=_submission._tcp.example.test,mail.example.test,25,0,1",  # the MX port, not submission
        "--srv-host=_imaps._tcp.example.test,imap.example.test,993,0,1",  # offered, but not set up here
    )
    try:
        r = server.check(root, "--json")
    finally:
        server.stop()
    assert r.code == 1
    found = checked(r)
    sts = found[("TXT", "_mta-sts.example.test.")]
    assert (sts["status"], sts["detail"]) == ("fail", "2 STSv1 records: senders ignore them all; keep one")
    web = found[("CNAME", "mta-sts.example.test.")]
    assert web["status"] == "warn" and web["found"] == ["192.0.2.77"]
    assert web["detail"] == "no CNAME, but it has its own address (192.0.2.77): the web server there must serve the " \
                            "policy"
    rpt = found[("TXT", "_smtp._tls.example.test.")]
    assert (rpt["status"], rpt["detail"]) == ("fail", "differs: v=TLSRPTv1; rua=mailto:reports@elsewhere.example")
    sub = found[("SRV", "_submission._tcp.example.test.")]
    assert (sub["status"], sub["found"]) == ("fail", ["0 1 25 mail.example.test"])
    imaps = found[("SRV", "_imaps._tcp.example.test.")]
    assert imaps["status"] == "warn" and imaps["found"] == ["0 1 993 imap.example.test"]
    assert found[("SRV", "_imap._tcp.example.test.")]["detail"] == "missing"


@needs_dnsmasq
def test_dns_check_fails_each_record_that_is_missing(root: Path):
    server = Dnsmasq(*BASICS)
    try:
        r = server.check(root, "--json")
    finally:
        server.stop()
    assert r.code == 1
    found = checked(r)
    for key in NEW:
        assert found[key]["status"] == "fail", found[key]
        assert found[key]["detail"].startswith("missing"), found[key]
    assert found[("CNAME", "mta-sts.example.test.")]["detail"] == "missing: senders cannot fetch the MTA-STS policy"
