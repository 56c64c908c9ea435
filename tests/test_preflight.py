"""`mailsetup preflight`: every verdict from a real DNS answer (dnsmasq on a loopback port, serving a
small world of right and wrong records and two blocklists) or a real socket (probe listeners started
here: one greets, one is closed, one takes the connection and says nothing). Nothing leaves loopback.
`init` runs it on a real host (a private mount namespace here) and never under --root.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import MAILSETUP, init_args, run_cli
from mta_kit import DNSMASQ, free_port, start_dnsmasq
from test_answers_truth import Host, needs_root_ns

pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="needs dnsmasq (apt-get install dnsmasq-base)")

# The world as DNS tells it. 192.0.2.0/24 is for documentation: nothing is ever sent to these addresses,
# they are only looked up.
WORLD = [
    # Answer NXDOMAIN for the rest of each zone, as its authority would (not REFUSED, as for the rest).
    "--local=/example.test/", "--local=/other.test/", "--local=/2.0.192.in-addr.arpa/",
    "--local=/zen.example/", "--local=/bl.example/", "--local=/zen.spamhaus.org/",
    # example.test is right: MX → mail.example.test → 192.0.2.10 → PTR mail.example.test
    "--mx-host=example.test,mail.example.test,10",
    "--host-record=mail.example.test,192.0.2.10",  # the A record and its PTR
    # 192.0.2.11: its PTR names a host that resolves elsewhere; zen.example lists it and says where to look
    "--ptr-record=11.2.0.192.in-addr.arpa,other.example.test",
    "--host-record=other.example.test,192.0.2.99",
    "--host-record=11.2.0.192.zen.example,127.0.0.2",
    "--txt-record=11.2.0.192.zen.example,Listed: see https://zen.example/lookup?ip=192.0.2.11",
    # 192.0.2.12: forward-confirmed, but under another host's name
    "--host-record=relay.example.test,192.0.2.12",
    # 192.0.2.13 has no PTR; Spamhaus's own zone (served here) lists it, with no TXT
    "--host-record=13.2.0.192.zen.spamhaus.org,127.0.0.4",
    # 192.0.2.14: Spamhaus refuses the query (what it answers to a public resolver)
    "--host-record=14.2.0.192.zen.spamhaus.org,127.255.255.254",
    # 192.0.2.15: bl.example lists it, its TXT link carrying a terminal escape (clear screen)
    "--host-record=15.2.0.192.bl.example,127.0.0.2",
    "--txt-record=15.2.0.192.bl.example,https://bl.example/q\x1b[2Jx",
    # two.example.test resolves to this host and to another
    "--host-record=two.example.test,192.0.2.10", "--host-record=two.example.test,192.0.2.98",
    # pref.test lists its mail host, but prefers another
    "--local=/pref.test/", "--mx-host=pref.test,mail.pref.test,20", "--mx-host=pref.test,first.pref.test,5",
    # other.test is wrong: no MX, and its mail host resolves to an address that is not ours
    "--host-record=mail.other.test,192.0.2.99",
    # IPv6: 2001:db8::10 is forward-confirmed as another name; 2001:db8::11 has no PTR and is listed (nibbles)
    "--local=/8.b.d.0.1.0.0.2.ip6.arpa/",
    "--host-record=v6.example.test,2001:db8::10",
    "--host-record=1.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example,127.0.0.3",
]


class DnsServer:
    """dnsmasq on a free loopback port, serving WORLD."""

    def __init__(self, records: list[str]):
        self.port = free_port()
        self.proc = start_dnsmasq(self.port, *records)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class ProbeHost:
    """A TCP listener on a free loopback port that greets each client with `greeting` (None: takes the
    connection and says nothing) and records what the client said."""

    def __init__(self, greeting: bytes | None):
        self.greeting = greeting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.heard = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                if self.greeting is not None:
                    conn.sendall(self.greeting)
                try:
                    while chunk := conn.recv(1024):
                        self.heard += chunk
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def dns_world():
    server = DnsServer(WORLD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def greeter():
    probe = ProbeHost(b"220-probe.example ESMTP\r\n220 ready\r\n")
    yield probe
    probe.stop()


def _setup(base: Path, domain: str) -> Path:
    root = base / domain
    r = run_cli(*init_args(root, "--no-smoke", domain=domain))
    assert r.code == 0, r.err
    return root


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A set-up for example.test (mail host mail.example.test, listening on 0.0.0.0)."""
    return _setup(tmp_path_factory.mktemp("preflight"), "example.test")


def preflight(root: Path, dns: DnsServer, probe: str, *extra: object):
    return run_cli("preflight", "--root", root, "--nameserver", dns.address, "--probe", probe,
                   "--dnsbl", "zen.example", "--dnsbl", "bl.example", "--timeout", "1", *extra)


def lines(out: str) -> dict[str, str]:
    """Each check's line, by its name."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^([✓!✗]) (.+?): ", line)
        if m:
            found[m.group(2)] = line
    return found


INBOUND = ("! inbound port 25: whether port 25 can be reached from the internet cannot be proven from inside this "
           "host; from a machine outside its network run `nc -v mail.example.test 25` (or `swaks --server "
           "mail.example.test:25 --to postmaster@example.test`): it should print a 220 greeting")


def test_a_host_whose_dns_agrees_passes_and_the_probe_is_greeted(example: Path, dns_world: DnsServer,
                                                                  greeter: ProbeHost):
    before = greeter.connections
    r = preflight(example, dns_world, greeter.address, "--ip", "192.0.2.10")
    assert r.code == 0, r.out + r.err
    assert r.out.splitlines() == [
        "Preflight: mail.example.test (192.0.2.10) and example.test, as the internet sees them:",
        "✓ host name: mail.example.test resolves to 192.0.2.10, this host's address",
        "✓ reverse DNS of 192.0.2.10: 192.0.2.10 → mail.example.test → 192.0.2.10 (forward-confirmed)",
        "✓ MX: example.test's MX is mail.example.test (preference 10)",
        f"✓ outbound port 25: {greeter.address} (127.0.0.1) greeted: 220 ready",
        "✓ blocklist zen.example (192.0.2.10): 192.0.2.10 is not listed on zen.example",
        "✓ blocklist bl.example (192.0.2.10): 192.0.2.10 is not listed on bl.example",
        INBOUND,
        "6 ok, 1 warning(s), 0 problem(s)",
    ]
    assert greeter.connections == before + 1
    deadline = time.monotonic() + 2
    while b"QUIT" not in greeter.heard and time.monotonic() < deadline:
        time.sleep(0.02)
    assert greeter.heard.endswith(b"QUIT\r\n")  # it says goodbye after the greeting, and nothing else


def test_a_wrong_address_a_ptr_that_does_not_resolve_back_and_a_listing_fail(example: Path, dns_world: DnsServer,
                                                                             greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--ip", "192.0.2.11")
    assert r.code == 1, r.out + r.err
    found = lines(r.out)
    assert found["host name"] == (
        "✗ host name: mail.example.test resolves to 192.0.2.10, not to this host's 192.0.2.11: mail for it goes "
        "elsewhere; publish: mail.example.test. 3600 IN A 192.0.2.11")
    assert found["reverse DNS of 192.0.2.11"] == (
        "✗ reverse DNS of 192.0.2.11: 192.0.2.11's PTR names other.example.test, which does not resolve back to "
        "192.0.2.11: receivers that check forward-confirmed reverse DNS refuse its mail; ask whoever owns "
        "192.0.2.11 (your hosting provider) to set its reverse DNS (PTR) to mail.example.test, and "
        "mail.example.test to resolve to 192.0.2.11")
    assert found["blocklist zen.example (192.0.2.11)"] == (
        "✗ blocklist zen.example (192.0.2.11): 192.0.2.11 is listed on zen.example (127.0.0.2): receivers that use "
        "it refuse this host's mail; find why and ask for removal: https://zen.example/lookup?ip=192.0.2.11")
    assert found["blocklist bl.example (192.0.2.11)"].startswith("✓ ")
    assert r.out.splitlines()[-1] == "3 ok, 1 warning(s), 3 problem(s)"


def test_a_ptr_under_another_name_warns_and_a_missing_ptr_fails(example: Path, dns_world: DnsServer,
                                                               greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--ip", "192.0.2.12", "--ip", "192.0.2.13")
    assert r.code == 1, r.out + r.err
    found = lines(r.out)
    assert found["reverse DNS of 192.0.2.12"] == (
        "! reverse DNS of 192.0.2.12: 192.0.2.12's PTR names relay.example.test, which resolves back, but not "
        "mail.example.test (the name smtpd greets with): ask whoever owns 192.0.2.12 (your hosting provider) to "
        "set its reverse DNS (PTR) to mail.example.test")
    assert found["reverse DNS of 192.0.2.13"] == (
        "✗ reverse DNS of 192.0.2.13: 192.0.2.13 has no PTR record: many receivers (Gmail among them) refuse its "
        "mail; ask whoever owns 192.0.2.13 (your hosting provider) to set its reverse DNS (PTR) to mail.example.test")


@pytest.mark.parametrize(("hostname", "verdict"), [
    ("vm.localdomain", "✗ host name: vm.localdomain is not a name the internet can look up; give the host a public "
                       "fully-qualified name (init --hostname mail.DOMAIN) and publish its A/AAAA record"),
    ("mx.example.test", "✗ host name: mx.example.test has no A/AAAA record: nobody can find this host; add: "
                        "mx.example.test. 3600 IN A 192.0.2.10"),
    ("two.example.test", "! host name: two.example.test resolves to 192.0.2.10 (this host) but also to 192.0.2.98, "
                         "not one of this host's addresses: remove that record"),
])
def test_a_host_name_that_is_local_missing_or_shared_is_named(tmp_path: Path, dns_world: DnsServer,
                                                              greeter: ProbeHost, hostname: str, verdict: str):
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke", "--hostname", hostname))
    assert r.code == 0, r.err
    r = preflight(root, dns_world, greeter.address, "--ip", "192.0.2.10")
    assert lines(r.out)["host name"] == verdict
    # the domain's MX names mail.example.test, not this host
    assert lines(r.out)["MX"] == (f"✗ MX: example.test's MX is 10 mail.example.test, not {hostname}: its mail goes "
                                  f"elsewhere; publish: example.test. 3600 IN MX 10 {hostname}.")
    assert r.code == 1


def test_ipv6_addresses_are_looked_up_by_their_nibbles(example: Path, dns_world: DnsServer, greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--ip", "2001:db8::10", "--ip", "2001:db8::11")
    assert r.code == 1, r.out + r.err
    found = lines(r.out)
    assert found["reverse DNS of 2001:db8::10"].startswith(
        "! reverse DNS of 2001:db8::10: 2001:db8::10's PTR names v6.example.test, which resolves back, but not "
        "mail.example.test")
    assert found["reverse DNS of 2001:db8::11"].startswith("✗ reverse DNS of 2001:db8::11: 2001:db8::11 has no PTR")
    assert found["blocklist zen.example (2001:db8::10)"].startswith("✓ ")
    assert found["blocklist zen.example (2001:db8::11)"] == (
        "✗ blocklist zen.example (2001:db8::11): 2001:db8::11 is listed on zen.example (127.0.0.3): receivers that "
        "use it refuse this host's mail; find why and ask for removal: the zen.example list's web site")


def test_a_blocklists_own_text_is_shown_on_one_line_without_terminal_escapes(example: Path, dns_world: DnsServer,
                                                                            greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--ip", "192.0.2.15")
    # click drops colour codes only when not writing to a terminal: the line itself must show the escape
    assert "\x1b" not in r.out
    assert lines(r.out)["blocklist bl.example (192.0.2.15)"].endswith(
        "find why and ask for removal: https://bl.example/q\\x1b[2Jx")


def test_spamhaus_listing_points_at_its_lookup_and_a_refused_query_is_not_a_listing(
        example: Path, dns_world: DnsServer, greeter: ProbeHost):
    # zen.spamhaus.org is served by the local dnsmasq here, like every other name
    r = run_cli("preflight", "--root", example, "--nameserver", dns_world.address, "--probe", greeter.address,
                "--ip", "192.0.2.13", "--ip", "192.0.2.14", "--timeout", "1", "--dnsbl", "zen.spamhaus.org")
    assert r.code == 1, r.out + r.err
    found = lines(r.out)
    assert found["blocklist zen.spamhaus.org (192.0.2.13)"] == (
        "✗ blocklist zen.spamhaus.org (192.0.2.13): 192.0.2.13 is listed on zen.spamhaus.org (127.0.0.4): "
        "receivers that use it refuse this host's mail; find why and ask for removal: https://check.spamhaus.org/")
    assert found["blocklist zen.spamhaus.org (192.0.2.14)"] == (
        "! blocklist zen.spamhaus.org (192.0.2.14): zen.spamhaus.org answered 127.255.255.254 for 192.0.2.14, "
        "which is no listing: it refused the query (ask through your own resolver, not a public one): not checked")


def test_no_mx_and_a_host_name_elsewhere_say_which_records_to_publish(tmp_path: Path, dns_world: DnsServer,
                                                                     greeter: ProbeHost):
    other = _setup(tmp_path, "other.test")
    r = preflight(other, dns_world, greeter.address, "--ip", "192.0.2.20")
    assert r.code == 1, r.out + r.err
    found = lines(r.out)
    assert found["MX"] == ("✗ MX: other.test has no MX record: mail for it cannot find this host; add: "
                           "other.test. 3600 IN MX 10 mail.other.test.")
    assert found["host name"] == (
        "✗ host name: mail.other.test resolves to 192.0.2.99, not to this host's 192.0.2.20: mail for it goes "
        "elsewhere; publish: mail.other.test. 3600 IN A 192.0.2.20")
    # the very records `mailsetup dns` prints
    zone = [" ".join(line.split()) for line in run_cli("dns", "--root", other, "--ip", "192.0.2.20").out.splitlines()]
    assert "other.test. 3600 IN MX 10 mail.other.test." in zone
    assert "mail.other.test. 3600 IN A 192.0.2.20" in zone


def test_an_mx_that_prefers_another_host_is_a_warning(tmp_path: Path, dns_world: DnsServer, greeter: ProbeHost):
    r = preflight(_setup(tmp_path, "pref.test"), dns_world, greeter.address, "--ip", "192.0.2.10")
    assert lines(r.out)["MX"] == ("! MX: pref.test's MX lists mail.pref.test, but first.pref.test is preferred "
                                  "(5 first.pref.test, 20 mail.pref.test): mail goes there first")


@pytest.mark.parametrize("kind", ["closed", "silent", "refusing"])
def test_a_probe_that_is_closed_silent_or_refusing_is_a_warning_with_what_to_do(
        example: Path, dns_world: DnsServer, kind: str):
    advice = ("many clouds block it: ask the provider to open outbound port 25, or send through a relay (a smart "
              "host on port 587)")
    probe = None
    if kind == "closed":
        address = f"127.0.0.1:{free_port()}"  # nothing listens there
        wanted = f"! outbound port 25: {address} refused the connection: outbound port 25 may be blocked; {advice}"
    else:
        probe = ProbeHost(None if kind == "silent" else b"554 5.7.1 no mail from your network\r\n")
        address = probe.address
        wanted = (f"! outbound port 25: {address} took the connection but sent no greeting within 1s: something "
                  f"between may hold port 25; {advice}" if kind == "silent" else
                  f"! outbound port 25: {address} answered `554 5.7.1 no mail from your network`, not 220: it will "
                  f"not take mail from here; {advice}")
    try:
        started = time.monotonic()
        r = preflight(example, dns_world, address, "--ip", "192.0.2.10")
        took = time.monotonic() - started
    finally:
        if probe:
            probe.stop()
    assert r.code == 0, r.out + r.err  # a warning: advice, not a failure
    assert lines(r.out)["outbound port 25"] == wanted
    assert took < 10  # --timeout 1 bounds the silent probe
    if probe:
        assert probe.connections == 1


def test_without_ip_it_says_plainly_that_no_public_address_is_known(example: Path, dns_world: DnsServer,
                                                                    greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert set(report) == {"hostname", "domain", "addresses", "ok", "checks"}
    assert (report["hostname"], report["domain"], report["addresses"], report["ok"]) == (
        "mail.example.test", "example.test", [], True)
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail"} and check["status"] in ("ok", "warn", "fail")
    by_name = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == [
        "public addresses", "host name", "MX", "outbound port 25", "inbound port 25"]
    assert by_name["public addresses"] == {
        "name": "public addresses", "status": "warn",
        "detail": "no public address of this host is known (smtpd listens on 0.0.0.0): give --ip ADDR (this host's "
                  "public address) to check its reverse DNS and the blocklists"}
    assert by_name["host name"]["detail"] == (
        "mail.example.test resolves to 192.0.2.10; whether that is this host is not known: give --ip ADDR")
    assert by_name["host name"]["status"] == "warn"


def test_a_failure_in_json_sets_ok_false_and_the_exit_code(example: Path, dns_world: DnsServer, greeter: ProbeHost):
    r = preflight(example, dns_world, greeter.address, "--ip", "192.0.2.11", "--json")
    assert r.code == 1
    report = json.loads(r.out)
    assert report["ok"] is False and report["addresses"] == ["192.0.2.11"]
    assert {c["name"] for c in report["checks"] if c["status"] == "fail"} == {
        "host name", "reverse DNS of 192.0.2.11", "blocklist zen.example (192.0.2.11)"}


def test_dns_that_does_not_answer_leaves_checks_unmade_not_failed(example: Path, greeter: ProbeHost):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes the questions, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        r = run_cli("preflight", "--root", example, "--nameserver", f"127.0.0.1:{silent.getsockname()[1]}",
                    "--probe", greeter.address, "--ip", "192.0.2.10", "--dnsbl", "zen.example", "--timeout", "0.5")
    finally:
        silent.close()
    assert r.code == 0, r.out + r.err
    found = lines(r.out)
    assert found["host name"] == "! host name: no DNS answer for mail.example.test A within 0.5s: not checked"
    assert found["MX"] == "! MX: no DNS answer for example.test MX within 0.5s: not checked"
    assert found["blocklist zen.example (192.0.2.10)"].endswith(": not checked")
    assert found["outbound port 25"].startswith("✓ ")


@pytest.mark.parametrize(("args", "error"), [
    (["--ip", "not-an-ip"], "--ip: 'not-an-ip' is not an IP address"),
    (["--probe", "mx.example:99999"], "--probe: 99999 is not a port number (1-65535)"),
    (["--probe", "bad host!"], "--probe: 'bad host!' is not HOST, HOST:PORT or [ADDR]:PORT"),
    (["--dnsbl", "zen_bl.example"], "--dnsbl: 'zen_bl.example' is not a valid DNS name (label 'zen_bl': letters, "
                                    "digits and inner hyphens only, 1-63 characters)"),
    (["--nameserver", "dns.example"], "--nameserver: 'dns.example' is not ADDR, ADDR:PORT or [ADDR]:PORT"),
    (["--timeout", "0"], "--timeout: 0 is not a positive number of seconds"),
])
def test_bad_options_are_one_line_naming_the_flag(example: Path, args: list[str], error: str):
    r = run_cli("preflight", "--root", example, *args)
    assert r.code == 2, r.out + r.err
    assert r.err_lines == [f"mailsetup: error: {error}"]
    assert r.out == ""


def test_without_a_setup_it_is_one_line(tmp_path: Path):
    r = run_cli("preflight", "--root", tmp_path)
    assert r.code == 2 and len(r.err_lines) == 1 and "no mailsetup set-up found" in r.err


# --- init -------------------------------------------------------------------------------------


class Listening:
    """A DNS server and a probe that only count: whoever asks them is reaching out."""

    def __init__(self):
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.probe = ProbeHost(b"220 probe\r\n")

    def args(self) -> list[str]:
        return ["--nameserver", f"127.0.0.1:{self.udp.getsockname()[1]}", "--probe", self.probe.address,
                "--dnsbl", "zen.example", "--ip", "192.0.2.10"]

    def questions(self) -> int:
        count = 0
        while True:
            try:
                self.udp.recv(512)
            except BlockingIOError:
                return count
            count += 1

    def stop(self) -> None:
        self.udp.close()
        self.probe.stop()


def test_init_in_a_sandbox_never_runs_preflight(sandbox: Path):
    heard = Listening()
    try:
        r = run_cli(*init_args(sandbox, "--no-smoke", *heard.args()))
        asked, probed = heard.questions(), heard.probe.connections
    finally:
        heard.stop()
    assert r.code == 0, r.err
    assert "Preflight" not in r.out + r.err
    assert (asked, probed) == (0, 0)  # nothing was asked of DNS, nothing connected


def test_init_refuses_a_bad_preflight_option_before_anything_is_written(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--probe", "mx.example:0"))
    assert r.code == 2 and r.err_lines == ["mailsetup: error: --probe: 0 is not a port number (1-65535)"]
    assert not sandbox.exists()


def host_init(host: Host, *args: object):
    """init on the namespace's host as a person runs it (Host.init adds --no-preflight)."""
    return host.run(MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--no-smoke",
                    "--admin", "ops@example.org", *args)


@needs_root_ns
def test_init_on_a_real_host_runs_preflight_before_writing_and_never_fails_on_it(tmp_path: Path,
                                                                                dns_world: DnsServer,
                                                                                greeter: ProbeHost):
    host = Host(tmp_path)
    before = greeter.connections
    # 192.0.2.11: the host name points elsewhere, the PTR does not resolve back, zen.example lists it
    r = host_init(host, "--nameserver", dns_world.address, "--probe", greeter.address, "--dnsbl", "zen.example",
                  "--ip", "192.0.2.11")
    assert r.code == 0, r.out + r.err  # advice: a ✗ does not fail the run
    assert greeter.connections == before + 1
    out = r.out
    heading = "Preflight: mail.example.test (192.0.2.11) and example.test, as the internet sees them:"
    assert out.index("Plan:") < out.index(heading) < out.index("Wrote ")  # after the plan, before writing
    found = lines(out)
    assert found["host name"].startswith("✗ host name: mail.example.test resolves to 192.0.2.10, not to")
    assert found["MX"] == "✓ MX: example.test's MX is mail.example.test (preference 10)"
    assert found["blocklist zen.example (192.0.2.11)"].startswith("✗ ")
    assert ("! preflight: the ✗ above keep mail from arriving or being accepted; once fixed, re-check with "
            "`mailsetup preflight`") in r.err
    assert (host.etc / "smtpd.conf").exists()

    # --json carries the same checks in the report
    r = host_init(host, "--nameserver", dns_world.address, "--probe", greeter.address, "--dnsbl", "zen.example",
                  "--ip", "192.0.2.10", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)["preflight"]
    assert report["ok"] is True and report["addresses"] == ["192.0.2.10"]
    assert {c["name"]: c["status"] for c in report["checks"]}["reverse DNS of 192.0.2.10"] == "ok"


@needs_root_ns
def test_init_on_a_real_host_with_no_preflight_skips_it(tmp_path: Path):
    host = Host(tmp_path)
    heard = Listening()
    try:
        r = host_init(host, "--dry-run", "--no-preflight", *heard.args())
        asked, probed = heard.questions(), heard.probe.connections
    finally:
        heard.stop()
    assert r.code == 0, r.out + r.err
    assert "Preflight skipped." in r.out and "Preflight:" not in r.out
    assert (asked, probed) == (0, 0)
