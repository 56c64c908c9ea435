"""`mailsetup preflight`: what the internet will make of this host before it sends or takes mail —
its name and addresses, reverse DNS, the domain's MX, outbound port 25, the DNS blocklists.

Every verdict comes from a real DNS answer (the system's resolver or --nameserver) or a real socket.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mailsetup.doctor import FAIL, OK, WARN, Finding
from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup

DEFAULT_PROBE = "gmail-smtp-in.l.google.com:25"  # a large provider's MX: what outbound mail meets first
DEFAULT_DNSBLS = ("zen.spamhaus.org", "bl.spamcop.net")
DEFAULT_TIMEOUT = 5.0
# PTR names looked up forward, the host's own first: each is one more query that may take the whole
# timeout, and a reverse zone may list dozens (receivers look at the first one or few).
MAX_PTR_NAMES = 5
# Where a listed address is taken off each well-known list; any other list says so in its TXT answer.
DELIST = {"zen.spamhaus.org": "https://check.spamhaus.org/",
          "bl.spamcop.net": "https://www.spamcop.net/bl.shtml"}
# Names only a local network knows, as installers leave them (vm.localdomain): nobody out there finds them.
_LOCAL_SUFFIXES = (".local", ".localdomain", ".lan", ".internal", ".home.arpa", ".localhost", ".invalid")
_RELAY_ADVICE = ("many clouds block it: ask the provider to open outbound port 25, or send through a relay "
                 "(a smart host on port 587)")


@dataclass(frozen=True)
class PreflightOptions:
    """How preflight asks: the addresses to check (None: the host's public ones), whom to ask, what to probe."""

    ips: tuple[str, ...] | None = None
    nameserver: tuple[str, int] | None = None
    probe: tuple[str, int] = (DEFAULT_PROBE.partition(":")[0], 25)
    dnsbls: tuple[str, ...] = DEFAULT_DNSBLS
    timeout: float = DEFAULT_TIMEOUT


def preflight_options(ips: list[str] | None, nameserver: str | None, probe: str | None,
                      dnsbls: list[str] | None, timeout: float = DEFAULT_TIMEOUT) -> PreflightOptions:
    """The options as given on the command line, each checked (a bad one is one line naming its flag)."""
    from mailsetup.dns import parse_nameserver, validate_ips
    from mailsetup.model import validate_dns_name

    if not (0 < timeout and math.isfinite(timeout)):
        raise MailsetupError(f"--timeout: {timeout:g} is not a positive number of seconds")
    zones = tuple(validate_dns_name(z, "--dnsbl", fqdn=False) for z in dnsbls) if dnsbls else DEFAULT_DNSBLS
    return PreflightOptions(ips=tuple(validate_ips(ips)) if ips else None,
                            nameserver=parse_nameserver(nameserver) if nameserver else None,
                            probe=parse_probe(probe or DEFAULT_PROBE), dnsbls=zones, timeout=timeout)


def parse_probe(value: str) -> tuple[str, int]:
    """--probe: HOST, HOST:PORT, ADDR:PORT or [V6]:PORT (port 25 when none is given)."""
    from mailsetup.dns import split_hostport
    from mailsetup.model import validate_dns_name

    host, port = split_hostport(value, 25, "--probe")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        return validate_dns_name(host, "--probe", fqdn=False), port
    except MailsetupError:
        raise MailsetupError(f"--probe: {value!r} is not HOST, HOST:PORT or [ADDR]:PORT") from None


class Unanswered(Exception):
    """DNS gave no verdict (timeout, no server, a refusal): the check is not made, and says so."""


class Lookup:
    """One resolver for every question: the system's, or --nameserver's."""

    def __init__(self, nameserver: tuple[str, int] | None, timeout: float):
        import dns.resolver

        self.error = None
        try:
            self.resolver = dns.resolver.Resolver(configure=nameserver is None)
        except dns.resolver.NoResolverConfiguration:
            self.resolver, self.error = None, "no DNS resolver is configured here (/etc/resolv.conf)"
            return
        if nameserver:
            self.resolver.nameservers, self.resolver.port = [nameserver[0]], nameserver[1]
        self.resolver.lifetime = timeout

    def ask(self, name: str, rtype: str) -> list[str]:
        """The answer's values (lower case, no trailing dot for names); [] when the name or the type
        does not exist; Unanswered when DNS gave no verdict."""
        import dns.exception
        import dns.resolver

        if self.resolver is None:
            raise Unanswered(self.error)
        try:
            answer = self.resolver.resolve(name, rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout:
            raise Unanswered(f"no DNS answer for {name} {rtype} within {self.resolver.lifetime:g}s") from None
        except dns.resolver.NoNameservers:
            raise Unanswered(f"no DNS server would answer {name} {rtype} (each failed or refused)") from None
        except dns.exception.DNSException as exc:
            raise Unanswered(f"DNS gave no answer for {name} {rtype} ({type(exc).__name__})") from None
        if not answer.rrset:
            return []
        return [r.to_text().lower().rstrip(".") if rtype != "TXT" else b"".join(r.strings).decode(errors="replace")
                for r in answer]

    def addresses(self, name: str) -> list[str]:
        return self.ask(name, "A") + self.ask(name, "AAAA")


@dataclass
class Preflight:
    setup: MailSetup
    opts: PreflightOptions
    lookup: Lookup
    addresses: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def check(self, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        try:
            status, detail = fn()
        except Unanswered as exc:
            status, detail = WARN, f"{exc}: not checked"
        self.findings.append(Finding(name, status, detail))

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    def as_dict(self) -> dict:
        return {"hostname": self.setup.hostname, "domain": self.setup.domain, "addresses": self.addresses,
                "ok": self.ok, "checks": [f.as_dict() for f in self.findings]}

    # --- the checks ---------------------------------------------------------------------------

    def host_addresses(self) -> tuple[str, str]:
        return WARN, ("no public address of this host is known (smtpd listens on "
                      f"{', '.join(sorted({lst.address for lst in self.setup.listeners}))}): give --ip ADDR "
                      "(this host's public address) to check its reverse DNS and the blocklists")

    def host_name(self) -> tuple[str, str]:
        host = self.setup.hostname
        if "." not in host or host.endswith(_LOCAL_SUFFIXES):
            return FAIL, (f"{host} is not a name the internet can look up; give the host a public "
                          "fully-qualified name (init --hostname mail.DOMAIN) and publish its A/AAAA record")
        found = self.lookup.addresses(host)
        add = "; ".join(_zone_line(host, _rtype(a), a) for a in self.addresses) or f"{host}. A <this host's address>"
        if not found:
            return FAIL, f"{host} has no A/AAAA record: nobody can find this host; add: {add}"
        if not self.addresses:
            return WARN, (f"{host} resolves to {', '.join(found)}; whether that is this host is not known: "
                          "give --ip ADDR")
        missing = [a for a in self.addresses if a not in found]
        if missing:
            return FAIL, (f"{host} resolves to {', '.join(found)}, not to this host's {', '.join(missing)}: "
                          f"mail for it goes elsewhere; publish: {add}")
        extra = [a for a in found if a not in self.addresses]
        if extra:
            return WARN, (f"{host} resolves to {', '.join(self.addresses)} (this host) but also to "
                          f"{', '.join(extra)}, not one of this host's addresses: remove that record")
        return OK, f"{host} resolves to {', '.join(found)}, this host's address"

    def reverse_dns(self, address: str) -> tuple[str, str]:
        host = self.setup.hostname
        ask_owner = (f"ask whoever owns {address} (your hosting provider) to set its reverse DNS (PTR) to {host}")
        names = self.lookup.ask(ipaddress.ip_address(address).reverse_pointer, "PTR")
        if not names:
            return FAIL, f"{address} has no PTR record: many receivers (Gmail among them) refuse its mail; {ask_owner}"
        names = sorted(names, key=lambda n: n != host)
        more = f" (and {len(names) - MAX_PTR_NAMES} more, not looked up)" if len(names) > MAX_PTR_NAMES else ""
        names = names[:MAX_PTR_NAMES]
        confirmed = [n for n in names if address in self.lookup.ask(n, _rtype(address))]
        if host in confirmed:
            return OK, f"{address} → {host} → {address} (forward-confirmed)"
        if confirmed:
            return WARN, (f"{address}'s PTR names {confirmed[0]}, which resolves back, but not {host} (the name "
                          f"smtpd greets with): {ask_owner}")
        return FAIL, (f"{address}'s PTR names {', '.join(names)}{more}, which does not resolve back to {address}: "
                      f"receivers that check forward-confirmed reverse DNS refuse its mail; {ask_owner}, "
                      f"and {host} to resolve to {address}")

    def mx(self) -> tuple[str, str]:
        domain, host = self.setup.domain, self.setup.hostname
        # The record `mailsetup dns` prints for the domain's MX.
        record = _zone_line(domain, "MX", f"10 {host}.")
        found = sorted((int(p), name) for p, _, name in (v.partition(" ") for v in self.lookup.ask(domain, "MX")))
        if not found:
            return FAIL, f"{domain} has no MX record: mail for it cannot find this host; add: {record}"
        ours = [p for p, name in found if name == host]
        shown = ", ".join(f"{p} {name or '.'}" for p, name in found)
        if not ours:
            return FAIL, f"{domain}'s MX is {shown}, not {host}: its mail goes elsewhere; publish: {record}"
        if ours[0] > found[0][0]:
            return WARN, f"{domain}'s MX lists {host}, but {found[0][1]} is preferred ({shown}): mail goes there first"
        return OK, f"{domain}'s MX is {host} (preference {ours[0]})"

    def outbound_25(self) -> tuple[str, str]:
        host, port = self.opts.probe
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        try:
            ipaddress.ip_address(host)
            targets = [host]
        except ValueError:
            targets = self.lookup.addresses(host)
            if not targets:
                return WARN, f"the probe host {host} has no address in DNS: not checked; give another --probe"
        return probe_smtp(targets[0], port, where, self.opts.timeout)

    def blocklist(self, address: str, zone: str) -> tuple[str, str]:
        addr = ipaddress.ip_address(address)
        reversed_ = ".".join(reversed(addr.exploded.replace(":", "") if addr.version == 6
                                      else addr.exploded.split(".")))
        name = f"{reversed_}.{zone}"
        codes = self.lookup.ask(name, "A")
        if not codes:
            return OK, f"{address} is not listed on {zone}"
        listed = [c for c in codes if ipaddress.ip_address(c) in ipaddress.ip_network("127.0.0.0/24")]
        if not listed:
            # Spamhaus answers 127.255.255.x to queries it will not serve (a public resolver, say).
            return WARN, (f"{zone} answered {', '.join(codes)} for {address}, which is no listing: it refused the "
                          "query (ask through your own resolver, not a public one): not checked")
        return FAIL, (f"{address} is listed on {zone} ({', '.join(listed)}): receivers that use it refuse this "
                      f"host's mail; find why and ask for removal: {self._delist(name, zone)}")

    def _delist(self, name: str, zone: str) -> str:
        from mailsetup.report import one_line

        try:  # a list says where to look in a TXT record beside the listing
            links = [word for text in self.lookup.ask(name, "TXT") for word in text.split() if word.startswith("http")]
        except Unanswered:
            links = []
        # the list's own text: shown on one line, never as terminal control characters
        return one_line(links[0])[:200] if links else DELIST.get(zone, f"the {zone} list's web site")

    def inbound_25(self) -> tuple[str, str]:
        ports = sorted({lst.port for lst in self.setup.listeners if lst.name == "smtp"})
        port = ports[0] if ports else 25
        return WARN, (f"whether port {port} can be reached from the internet cannot be proven from inside this "
                      f"host; from a machine outside its network run `nc -v {self.setup.hostname} {port}` (or "
                      f"`swaks --server {self.setup.hostname}:{port} --to postmaster@{self.setup.domain}`): "
                      "it should print a 220 greeting")

    def run(self) -> list[Finding]:
        if not self.addresses:
            self.check("public addresses", self.host_addresses)
        self.check("host name", self.host_name)
        for address in self.addresses:
            self.check(f"reverse DNS of {address}", lambda a=address: self.reverse_dns(a))
        self.check("MX", self.mx)
        self.check("outbound port 25", self.outbound_25)
        for address in self.addresses:
            for zone in self.opts.dnsbls:
                self.check(f"blocklist {zone} ({address})", lambda a=address, z=zone: self.blocklist(a, z))
        self.check("inbound port 25", self.inbound_25)
        return self.findings


def probe_smtp(address: str, port: int, where: str, timeout: float) -> tuple[str, str]:
    """Connect to an SMTP server and read its greeting: 220 within `timeout`, or why not."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except ConnectionRefusedError:
        return WARN, f"{where} refused the connection: outbound port 25 may be blocked; {_RELAY_ADVICE}"
    except TimeoutError:
        return WARN, f"{where} did not answer within {timeout:g}s: outbound port 25 looks blocked; {_RELAY_ADVICE}"
    except OSError as exc:
        return WARN, f"cannot reach {where}: {exc.strerror or exc}; {_RELAY_ADVICE}"
    with sock:
        greeting = _read_greeting(sock, deadline)
        if greeting is None:
            return WARN, (f"{where} took the connection but sent no greeting within {timeout:g}s: something "
                          f"between may hold port 25; {_RELAY_ADVICE}")
        if not greeting.startswith("220"):
            return WARN, f"{where} answered `{greeting}`, not 220: it will not take mail from here; {_RELAY_ADVICE}"
        try:
            sock.sendall(b"QUIT\r\n")  # a polite goodbye; nothing hangs on its answer
        except OSError:
            pass
        return OK, f"{where} ({address}) greeted: {greeting}"


def _read_greeting(sock: socket.socket, deadline: float) -> str | None:
    """The last line of the server's greeting (shown one line, at most 100 characters), or None when none came."""
    from mailsetup.report import one_line

    data = b""
    while True:
        lines = [line.rstrip(b"\r") for line in data.split(b"\n")]
        done = [line for line in lines[:-1] if len(line) < 4 or line[3:4] != b"-"]
        if done:
            return one_line(done[0].decode("ascii", errors="replace"))[:100]
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > 4096:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(1024)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return one_line(data.decode("ascii", errors="replace"))[:100] or None
        data += chunk


def _rtype(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def _zone_line(name: str, rtype: str, value: str) -> str:
    from mailsetup.dns import Record

    return " ".join(Record(name + ".", rtype, value, "").zone_line().split())


def public_addresses(setup: MailSetup) -> list[str]:
    """The listeners' public addresses (those `mailsetup dns` publishes when no --ip is given)."""
    from mailsetup.dns import address_records_for

    return address_records_for(setup, [])[0]


def run_preflight(setup: MailSetup, opts: PreflightOptions) -> Preflight:
    """Every check, asked of DNS and the probe host now."""
    addresses = list(opts.ips) if opts.ips is not None else public_addresses(setup)
    pre = Preflight(setup, opts, Lookup(opts.nameserver, opts.timeout), addresses)
    pre.run()
    return pre


def preflight_command(root, os_name: str | None, opts: PreflightOptions, as_json: bool) -> bool:
    """`mailsetup preflight`: every check printed; whether none failed."""
    from mailsetup.answers import load_setup
    from mailsetup.report import print_preflight

    pre = run_preflight(load_setup(root, os_name), opts)
    print_preflight(pre, as_json)
    return pre.ok
