"""preflight against a hostile DNS answer (issue 13 review): whoever runs the reverse zone of the
host's address chooses how many PTR names it lists and how slowly each of them resolves."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_preflight import ProbeHost, _setup

ADDRESS = "192.0.2.20"
NAMES = [f"p{n}.slow.test" for n in range(22)]  # 22 PTR records still fit one 512-byte UDP answer
DELAY = 0.8  # each forward answer comes just inside preflight's --timeout 1


class SlowDns:
    """A DNS server on a free loopback UDP port: ADDRESS's PTR lists NAMES, each of which answers its A
    query only after DELAY seconds; every other question is NXDOMAIN at once."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.forward_queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._answer, args=(data, peer), daemon=True).start()

    def _answer(self, data: bytes, peer) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        reply = dns.message.make_response(query)
        if question.rdtype == dns.rdatatype.PTR and name == "20.2.0.192.in-addr.arpa":
            reply.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", "PTR", [n + "." for n in NAMES]))
        elif question.rdtype == dns.rdatatype.A and name in NAMES:
            self.forward_queries += 1
            time.sleep(DELAY)
            reply.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", "192.0.2.77"))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        try:
            self.sock.sendto(reply.to_wire(), peer)
        except OSError:
            pass

    def stop(self) -> None:
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def slow_dns():
    server = SlowDns()
    yield server
    server.stop()


@pytest.mark.once
def test_a_reverse_zone_listing_many_slow_names_costs_a_few_lookups_not_one_each(tmp_path: Path, slow_dns: SlowDns):
    """Each PTR name was looked up forward, one after the other, each allowed the whole timeout: 22
    names answering in 0.8 s kept preflight (and `init` before it writes) waiting 18 s, and a longer
    list over TCP far longer. The first few are looked up; the line says how many were not."""
    root = _setup(tmp_path, "example.test")
    greeter = ProbeHost(b"220 ready\r\n")
    try:
        started = time.monotonic()
        r = run_cli("preflight", "--root", root, "--nameserver", slow_dns.address, "--probe", greeter.address,
                    "--dnsbl", "zen.example", "--ip", ADDRESS, "--timeout", "1")
        took = time.monotonic() - started
    finally:
        greeter.stop()
    line = next((x for x in r.out.splitlines() if x.startswith(f"✗ reverse DNS of {ADDRESS}: ")), None)
    assert line is not None, r.out + r.err
    assert re.search(r"PTR names (p\d+\.slow\.test, ){4}p\d+\.slow\.test \(and 17 more, not looked "
                     r"up\), which does not resolve back", line), line
    assert slow_dns.forward_queries == 5
    assert took < 10, f"preflight took {took:.1f}s"
