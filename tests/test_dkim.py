"""DKIM (issue 13, part 1): two keys (RSA-2048, Ed25519) made by `init --dkim`, the filter chain in
smtpd.conf that the real `smtpd -n` accepts, the records `mailsetup dns` prints, and signatures made
by each engine that dkimpy verifies against those records served by a real DNS server (dnsmasq)."""

from __future__ import annotations

import base64
import grp
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, SMTPD, run_cli
from mta_kit import DNSMASQ, PASSWORD, Serve, Sink, free_port, provision, start_dnsmasq

FILTER = Path("/usr/libexec/opensmtpd/filter-dkimsign")
needs_smtpd = pytest.mark.skipif(not (SMTPD and IS_ROOT and FILTER.exists()),
                                 reason="needs OpenSMTPD, opensmtpd-filter-dkimsign and root")


@pytest.fixture
def root():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-dkim-", dir="/tmp"))
    base.chmod(0o755)  # smtpd's lookup process and the filter's user must reach their files
    yield provision(base / "root", "--dkim")
    shutil.rmtree(base, ignore_errors=True)


def _keys(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "etc/mail/dkim").glob("*.key"))}


def _records(root: Path) -> dict[str, str]:
    r = run_cli("dns", "--root", root, "--json")
    assert r.code == 0, r.err
    return {rec["name"]: rec["value"] for rec in json.loads(r.out)["records"] if "._domainkey." in rec["name"]}


def test_init_makes_an_rsa_and_an_ed25519_key_named_by_month(root: Path):
    keys = _keys(root)
    month = time.strftime("%Y%m")
    assert set(keys) == {f"{month}r", f"{month}e"}
    for selector, path in keys.items():
        st = path.stat()
        text = subprocess.run(["openssl", "pkey", "-in", path, "-noout", "-text"], capture_output=True, text=True)
        assert text.returncode == 0, text.stderr
        assert ("Private-Key: (2048 bit" in text.stdout and "modulus" in text.stdout) if selector.endswith("r") else \
            ("ED25519 Private-Key" in text.stdout)
        if IS_ROOT and _group_exists("_dkimsign"):  # root's file the filter's group reads, no one else
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, grp.getgrnam("_dkimsign").gr_gid, 0o640)
        else:
            assert st.st_mode & 0o777 == 0o600
    state = (root / "etc/mailsetup/dkim.toml").read_text()
    assert state.count('stage = "active"') == 2 and "PRIVATE" not in state
    assert "dkim = true" in (root / "etc/mailsetup/answers.toml").read_text()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_smtpd_conf_signs_submission_and_local_mail_never_inbound(root: Path):
    conf = (root / "etc/smtpd.conf").read_text()
    keys = _keys(root)
    rsa, ed = (next(s for s in keys if s.endswith(c)) for c in "re")
    assert (f'filter "dkimsign_rsa" proc-exec "filter-dkimsign -d example.test -s {rsa} -k {keys[rsa]}" '
            'user "_dkimsign" group "_dkimsign"') in conf
    assert (f'filter "dkimsign_ed25519" proc-exec "filter-dkimsign -a ed25519-sha256 -d example.test -s {ed} '
            f'-k {keys[ed]}" user "_dkimsign" group "_dkimsign"') in conf
    assert 'filter "dkimsign" chain { "dkimsign_rsa", "dkimsign_ed25519" }' in conf
    assert 'listen on socket filter "dkimsign"' in conf
    listens = [line for line in conf.splitlines() if line.startswith("listen on 0.0.0.0")]
    assert [("port 587" in line, 'filter "dkimsign"' in line) for line in listens] == [(False, False), (True, True)]


@needs_smtpd
def test_the_real_smtpd_accepts_the_filter_chain(root: Path):
    r = subprocess.run([SMTPD, "-n", "-f", root / "etc/smtpd.conf"], capture_output=True, text=True)
    assert r.returncode == 0 and "configuration OK" in r.stdout + r.stderr, r.stderr


def test_a_rerun_keeps_the_keys_and_dkim_off_leaves_them_alone(root: Path):
    before = {s: p.read_bytes() for s, p in _keys(root).items()}
    r = run_cli("init", "--yes", "--no-smoke", "--root", root)
    assert r.code == 0, r.err
    assert {s: p.read_bytes() for s, p in _keys(root).items()} == before
    assert "kept the DKIM keys" in r.out
    r = run_cli("init", "--yes", "--no-smoke", "--root", root, "--no-dkim")
    assert r.code == 0, r.err
    assert "dkimsign" not in (root / "etc/smtpd.conf").read_text()
    assert {s: p.read_bytes() for s, p in _keys(root).items()} == before  # never deleted
    assert _records(root) == {}


def test_dns_prints_each_keys_record_from_the_key_on_disk(root: Path):
    records = _records(root)
    for selector, path in _keys(root).items():
        der = subprocess.run(["openssl", "pkey", "-in", path, "-pubout", "-outform", "DER"], capture_output=True,
                             check=True).stdout
        if selector.endswith("e"):
            wanted = f"v=DKIM1; k=ed25519; p={base64.b64encode(der[-32:]).decode()}"  # RFC 8463: the raw key
        else:
            wanted = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        assert records[f"{selector}._domainkey.example.test."] == wanted
    zone = run_cli("dns", "--root", root).out
    rsa_line = next(line for line in zone.splitlines() if "r._domainkey" in line)
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', rsa_line))  # long TXT: split into strings
    assert len(re.findall(r'"([^"]*)"', rsa_line)) >= 2


class DnsServer:
    """dnsmasq on a free loopback port, serving the given TXT records (and NXDOMAIN for the rest)."""

    def __init__(self, txt: dict[str, str]):
        self.port = free_port()
        # dnsmasq splits a long value into 255-byte strings itself
        self.proc = start_dnsmasq(self.port, "--local=/example.test/",
                                  *(f"--txt-record={name.rstrip('.')},{value}" for name, value in txt.items()))

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, 3
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _verify(message: bytes, dns_server: DnsServer) -> list[bool]:
    import dkim

    checker = dkim.DKIM(message)
    count = sum(1 for k, _ in checker.headers if k.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(checker.verify(idx=i, dnsfunc=dns_server.dnsfunc))
        except dkim.DKIMException:  # a body hash mismatch is raised, not returned
            results.append(False)
    return results


@pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq")
def test_the_embedded_mta_signs_and_the_signatures_verify_through_real_dns(root: Path):
    """A message submitted to `mailsetup serve` leaves through its relay with both signatures; they
    verify with the records `mailsetup dns` printed, served by dnsmasq; a changed body fails; an
    inbound message (port 25, no AUTH) is not signed."""
    import smtplib
    import ssl

    dns_server = DnsServer(_records(root))
    try:
        with Sink() as sink, Serve(root, relay_port=sink.port) as served:
            ctx = ssl.create_default_context(cafile=str(root / "etc/ssl/certs/mail.example.test.crt"))
            ctx.check_hostname = False  # we dial 127.0.0.1; the certificate itself is checked against the file
            with smtplib.SMTP("127.0.0.1", served.submission, local_hostname="client.example.test") as c:
                c.starttls(context=ctx)
                c.login("alice", PASSWORD)
                c.sendmail("alice@example.test", ["someone@example.net"],
                           b"From: alice@example.test\r\nTo: someone@example.net\r\nSubject: signed?\r\n\r\nhello\r\n")
            with smtplib.SMTP("127.0.0.1", served.smtp, local_hostname="stranger.example.net") as c:
                c.sendmail("stranger@example.net", ["alice@example.test"],
                           b"From: stranger@example.net\r\nSubject: inbound\r\n\r\nhi alice\r\n")
            deadline = time.monotonic() + 20
            while not sink.messages and time.monotonic() < deadline:
                time.sleep(0.1)
        assert sink.messages, "nothing was relayed"
        message = sink.messages[0][2]
        assert _verify(message, dns_server) == [True, True]
        assert b"a=rsa-sha256" in message and b"a=ed25519-sha256" in message
        assert _verify(message.replace(b"hello", b"hellO"), dns_server) == [False, False]
        inbound = next((root / "home/alice/Maildir/new").iterdir()).read_bytes()
        assert b"hi alice" in inbound and b"DKIM-Signature" not in inbound
    finally:
        dns_server.stop()


def test_the_smoke_test_proves_the_signatures_on_the_embedded_mta(root: Path):
    r = run_cli("smoke", "--root", root, "--json")
    checks = {c["name"]: c for c in json.loads(r.out)}
    assert r.code == 0, (checks, r.err)
    check = checks["DKIM signatures verify against the records `mailsetup dns` prints"]
    assert check["ok"] and "2 signatures" in check["detail"] and "a changed body fails" in check["detail"]
    assert checks["STARTTLS with the generated certificate"]["detail"].endswith(", self-signed")


@needs_smtpd
def test_the_smoke_test_proves_the_signatures_on_the_real_smtpd(root: Path):
    from test_real_smtpd import ensure_system_user

    ensure_system_user("alice")
    r = run_cli("smoke", "--root", root, "--engine", "opensmtpd", "--json")
    checks = {c["name"]: c for c in json.loads(r.out)} if r.out.strip() else {}
    assert r.code == 0, (checks, r.err)
    check = checks["DKIM signatures verify against the records `mailsetup dns` prints"]
    assert check["ok"] and "2 signatures" in check["detail"], check


def test_dkim_needs_the_modern_grammar(tmp_path: Path):
    r = run_cli("init", "--yes", "--no-smoke", "--domain", "example.test", "--os", "debian", "--root",
                tmp_path / "root", "--admin", "alice", "--dkim", "--smtpd-version", "6.0")
    assert r.code == 2, r.out + r.err
    assert r.err_lines == ["mailsetup: error: --dkim: smtpd 6.0 has no filters; DKIM signing needs smtpd 6.6 or later"]
    assert not (tmp_path / "root").exists()


def _state(root: Path) -> dict[str, tuple[str, str | None]]:
    import tomllib

    data = tomllib.loads((root / "etc/mailsetup/dkim.toml").read_text())
    return {k["selector"]: (k["stage"], str(k["retire_after"]) if "retire_after" in k else None) for k in data["key"]}


def _signing(root: Path) -> list[str]:
    return re.findall(r"-s (\S+) -k", (root / "etc/smtpd.conf").read_text())


@pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq")
def test_rotation_moves_through_its_stages_with_dns_checked_at_each_step(root: Path):
    import datetime as dt

    first = _signing(root)
    assert len(first) == 2
    # 1. --rotate: the next pair, pending; signing stays with the first.
    r = run_cli("dkim", "--root", root, "--rotate", "--yes")
    assert r.code == 0, r.out + r.err
    pending = [s for s, (stage, _) in _state(root).items() if stage == "pending"]
    assert len(pending) == 2 and not set(pending) & set(first)
    assert _signing(root) == first
    assert "next DKIM keys" in r.out and "the next run switches to them" in r.out
    records = _records(root)
    for s in pending:  # the run itself printed the records to publish, as `dns` prints them
        printed = next(line for line in r.out.splitlines() if f"DKIM record: {s}._domainkey" in line)
        assert "".join(re.findall(r'"([^"]*)"', printed)) == records[f"{s}._domainkey.example.test."]
    assert {name.split(".")[0] for name in records} == set(first) | set(pending)  # all four to publish
    # 2. DNS serves only the first pair: no switch, and it says which record is missing.
    served = DnsServer({n: v for n, v in records.items() if n.split(".")[0] in first})
    try:
        r = run_cli("dkim", "--root", root, "--yes", "--nameserver", f"127.0.0.1:{served.port}")
        assert r.code == 0, r.out + r.err
        assert _signing(root) == first and all(_state(root)[s][0] == "pending" for s in pending)
        for s in pending:  # a warning, so on stderr
            assert f"{s}._domainkey.example.test. is missing, so signing stays with the current keys" in r.err
        check = run_cli("dns", "--root", root, "--check", "--nameserver", f"127.0.0.1:{served.port}", "--json")
        assert check.code == 1
        verdicts = {c["name"].split(".")[0]: c["status"] for c in json.loads(check.out)["check"]
                    if "._domainkey." in c["name"]}
        assert verdicts == {**{s: "ok" for s in first}, **{s: "fail" for s in pending}}
    finally:
        served.stop()
    # 3. DNS serves the next pair too: the run switches, and the old records are to stay a week.
    served = DnsServer(records)
    try:
        r = run_cli("dkim", "--root", root, "--yes", "--nameserver", f"127.0.0.1:{served.port}")
    finally:
        served.stop()
    assert r.code == 0, r.out + r.err
    week = (dt.date.today() + dt.timedelta(days=7)).isoformat()
    assert sorted(_signing(root)) == sorted(pending)
    assert _state(root) == {**{s: ("active", None) for s in pending}, **{s: ("retiring", week) for s in first}}
    assert f"keep the old records published until {week}" in r.out
    zone = run_cli("dns", "--root", root).out
    assert zone.count(f"keep published until {week}") == 2
    # The smoke test that ran after the switch proved the new keys sign.
    assert "DKIM signatures verify" in r.out and all(s in r.out for s in pending)
    # 4. A week later the old keys are retired: gone from the state and from the records.
    state = root / "etc/mailsetup/dkim.toml"
    state.write_text(state.read_text().replace(f"retire_after = {week}", "retire_after = 2000-01-01"))
    r = run_cli("dkim", "--root", root, "--yes")
    assert r.code == 0, r.out + r.err
    assert set(_state(root)) == set(pending)
    assert {name.split(".")[0] for name in _records(root)} == set(pending)
    assert r.out.count("retired: its record may be removed") == 2


def test_a_switch_can_be_forced_without_dns_and_says_so(root: Path):
    first = _signing(root)
    assert run_cli("dkim", "--root", root, "--rotate", "--yes").code == 0
    r = run_cli("dkim", "--root", root, "--yes", "--force-dkim-switch")
    assert r.code == 0, r.out + r.err
    assert not set(_signing(root)) & set(first)
    assert "without checking DNS (--force-dkim-switch)" in r.out + r.err


def test_dkim_on_a_host_with_no_setup_is_one_line(tmp_path: Path):
    r = run_cli("dkim", "--root", tmp_path / "nothing", "--yes")
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: no mailsetup set-up found under {tmp_path / 'nothing'} "
                           "(no answers.toml); run `mailsetup init` first"]


def test_a_running_serve_signs_with_the_new_keys_after_a_switch(root: Path):
    """`mailsetup serve` loads the keys at start; after `mailsetup dkim` switched to the next pair it
    follows within seconds, so it never keeps signing with keys whose records are to be removed."""
    import smtplib
    import ssl

    def send(port: int) -> None:
        ctx = ssl.create_default_context(cafile=str(root / "etc/ssl/certs/mail.example.test.crt"))
        ctx.check_hostname = False  # we dial 127.0.0.1; the certificate itself is checked against the file
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test") as c:
            c.starttls(context=ctx)
            c.login("alice", PASSWORD)
            c.sendmail("alice@example.test", ["someone@example.net"],
                       b"From: alice@example.test\r\nTo: someone@example.net\r\nSubject: keys\r\n\r\nhello\r\n")

    def selectors(message: bytes) -> list[str]:
        return sorted(re.findall(rb"\bs=([0-9a-z]+);", re.sub(rb"\r\n[ \t]+", b" ", message)))

    first = sorted(s.encode() for s in _signing(root))
    with Sink() as sink, Serve(root, relay_port=sink.port) as served:
        send(served.submission)
        assert run_cli("dkim", "--root", root, "--rotate", "--yes").code == 0
        assert run_cli("dkim", "--root", root, "--yes", "--force-dkim-switch").code == 0
        second = sorted(s.encode() for s in _signing(root))
        assert second != first
        deadline = time.monotonic() + 10
        while "DKIM: signing with" not in served.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        send(served.submission)
        deadline = time.monotonic() + 20
        while len(sink.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [selectors(m[2]) for m in sink.messages] == [first, second]
