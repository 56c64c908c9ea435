"""The DNS records a mail domain needs (MX, A/AAAA, SPF, DMARC, DKIM, MTA-STS, TLS-RPT, client SRV,
PTR advice), as a zone-file snippet and a table, and a comparison with what DNS answers now.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup


@dataclass(frozen=True)
class Record:
    name: str  # absolute, with the trailing dot
    type: str
    value: str
    why: str

    def zone_line(self) -> str:
        # A TXT string holds at most 255 bytes: a longer value (a DKIM RSA key) is several strings,
        # which DNS joins again.
        value = " ".join(f'"{self.value[i:i + 255]}"' for i in range(0, len(self.value), 255)) \
            if self.type == "TXT" else self.value
        return f"{self.name:<32} 3600 IN {self.type:<5} {value}"


def dkim_records(setup: MailSetup, today=None) -> list[Record]:
    """One TXT per DKIM key DNS should serve: the active ones, the pending ones (which sign only
    once DNS serves them), and the retiring ones until their date. The key is read from disk."""
    import datetime as dt

    from mailsetup import dkim

    if not setup.dkim:
        return []
    today = today or dt.date.today()
    folder = setup.layout.dkim_dir
    records = []
    for key in dkim.published(dkim.read_state(Path(setup.layout.dkim_state)), today):
        if key.stage == "retiring" and not os.path.lexists(key.path(folder)):
            # A replaced key signs nothing: its file deleted early leaves no record to print, and must
            # not stop `dns`, the smoke test and every run that checks a pending switch until its date.
            continue
        why = {"active": f"DKIM ({key.algorithm}): the key that signs now",
               "pending": f"DKIM ({key.algorithm}): the next key; it signs once DNS serves this",
               "retiring": f"DKIM ({key.algorithm}): replaced; keep published until {key.retire_after}"}[key.stage]
        text = dkim.record_text(dkim.read_key(folder, key), key.algorithm, str(key.path(folder)))
        records.append(Record(key.record_name(setup.domain) + ".", "TXT", text, why))
    return records


def unpublished_pending_dkim(setup: MailSetup, nameserver: str | None) -> list[Comparison] | None:
    """None when no DKIM key is pending; else the pending keys' records DNS does not serve as
    printed (asked of `nameserver`, ADDR[:PORT], or the system's resolver): [] when all are."""
    from mailsetup import dkim

    pending = {k.selector for k in dkim.read_state(Path(setup.layout.dkim_state)) if k.stage == "pending"}
    if not pending:
        return None
    records = [r for r in dkim_records(setup) if r.name.split(".", 1)[0] in pending]
    server, port = parse_nameserver(nameserver) if nameserver else (None, 53)
    return [c for c in check_records(records, server, port) if c.status != "ok"]


def wanted_records(setup: MailSetup, ips: list[str]) -> list[Record]:
    d, h = setup.domain + ".", setup.hostname + "."
    records = [Record(d, "MX", f"10 {h}", "mail for the domain goes to the mail host")]
    records += [Record(d, "MX", f"{20 + 10 * i} {backup}.", "a backup MX: it queues the domain's mail while "
                       f"{setup.hostname} is down and hands it on") for i, backup in enumerate(setup.backup_mx)]
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        records.append(Record(h, "AAAA" if addr.version == 6 else "A", str(addr), "the mail host's address"))
    records += [
        Record(d, "TXT", "v=spf1 mx -all", "SPF: only the domain's MX hosts send its mail"),
        Record(f"_dmarc.{d}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{setup.domain}",
               "DMARC: quarantine mail that fails SPF/DKIM alignment; reports to postmaster"),
    ]
    records += mta_sts_records(setup) + tlsrpt_records(setup) + client_srv_records(setup)
    return records + dkim_records(setup)


# --- MTA-STS (RFC 8461), TLS-RPT (RFC 8460), client SRV (RFC 6186, 8314) -----------------------------

# How long a sender keeps a policy it fetched. Testing: a day, so a mistake is forgotten by tomorrow.
# Enforce: a week (RFC 8461 section 3.2 wants weeks or more, or an attacker who blocks the fetch
# soon undoes it; a week still bounds how long a wrong policy bites). None: a day, then the records
# can go (RFC 8461 section 8.3).
MTA_STS_MAX_AGE = {"testing": 86400, "enforce": 604800, "none": 86400}
MTA_STS_POLICY_MODE = 0o644  # a web server, whoever it runs as, must read it


def mta_sts_policy(setup: MailSetup) -> str:
    """The policy file RFC 8461 section 3.2 describes: `key: value` lines, each ended by CRLF (its
    grammar takes LF or CRLF). The values are the validated mode and host names: nothing else. Every
    MX is listed, backups too: a sender that enforces the policy refuses an MX it does not name."""
    lines = ("version: STSv1", f"mode: {setup.mta_sts_mode}",
             *(f"mx: {host}" for host in (setup.hostname, *setup.backup_mx)),
             f"max_age: {MTA_STS_MAX_AGE[setup.mta_sts_mode]}")
    return "".join(line + "\r\n" for line in lines)


def mta_sts_id(policy: str) -> str:
    """The TXT record's id: senders fetch the policy again only when it changes, so it is derived from
    the policy text (RFC 8461: 1 to 32 letters and digits)."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def mta_sts_url(setup: MailSetup) -> str:
    return f"https://mta-sts.{setup.domain}/.well-known/mta-sts.txt"


def mta_sts_records(setup: MailSetup) -> list[Record]:
    d = setup.domain + "."
    mode = setup.mta_sts_mode
    return [
        Record(f"_mta-sts.{d}", "TXT", f"v=STSv1; id={mta_sts_id(mta_sts_policy(setup))}",
               f"MTA-STS: senders fetch {mta_sts_url(setup)} (mode {mode}); a new id makes them fetch it again"),
        Record(f"mta-sts.{d}", "CNAME", f"{setup.hostname}.",
               "MTA-STS: the web server that serves the policy over HTTPS (a CA-trusted certificate "
               f"for mta-sts.{setup.domain})"),
    ]


def tlsrpt_records(setup: MailSetup) -> list[Record]:
    # postmaster, as DMARC's reports: init makes sure it reaches a person (RFC 2142 aliases)
    return [Record(f"_smtp._tls.{setup.domain}.", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{setup.domain}",
                   "TLS-RPT: senders mail a daily report of failed TLS to postmaster")]


def client_ports(setup: MailSetup) -> dict[str, int | None]:
    """Each mail-client service of RFC 6186 and RFC 8314 and the port this set-up offers it on;
    None: not offered here (no implicit-TLS submission listener; IMAPS only with --imap dovecot)."""
    submission = next(lst.port for lst in setup.listeners if lst.name == "submission")
    return {"submission": submission, "submissions": None, "imaps": 993 if setup.imap == "dovecot" else None,
            "imap": None}  # IMAP only with TLS from the first byte (RFC 8314): 143 is closed


def client_srv_records(setup: MailSetup) -> list[Record]:
    records = []
    for service, port in client_ports(setup).items():
        name = f"_{service}._tcp.{setup.domain}."
        if port is None:  # RFC 6186 section 4: the target "." says the service is not offered
            records.append(Record(name, "SRV", "0 0 0 .", f"clients: no {service} here (RFC 6186: not offered)"))
        else:
            records.append(Record(name, "SRV", f"0 1 {port} {setup.hostname}.",
                                  f"clients: {service} on {setup.hostname} port {port} (RFC 6186)"))
    return records


AUTOCONFIG_MODE = 0o644  # a web server, whoever it runs as, must read it


def autoconfig_url(setup: MailSetup) -> str:
    return f"https://autoconfig.{setup.domain}/mail/config-v1.1.xml"


def autoconfig_xml(setup: MailSetup) -> str:
    """Thunderbird's autoconfig file (config-v1.1.xml): IMAPS on 993 and submission with STARTTLS, the
    login being the address's local part (the names `mailsetup user` adds). Thunderbird does no SRV
    lookup: it fetches this file. The values are validated host names and ports, escaped all the same."""
    from xml.sax.saxutils import escape

    domain, host = escape(setup.domain), escape(setup.hostname)
    submission = next(lst.port for lst in setup.listeners if lst.name == "submission")

    def server(tag: str, kind: str, port: int, socket_type: str) -> str:
        return (f'    <{tag} type="{kind}">\n      <hostname>{host}</hostname>\n      <port>{port}</port>\n'
                f"      <socketType>{socket_type}</socketType>\n"
                "      <authentication>password-cleartext</authentication>\n"
                f"      <username>%EMAILLOCALPART%</username>\n    </{tag}>\n")

    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<!-- written by mailsetup; serve it at {escape(autoconfig_url(setup))} -->\n"
            '<clientConfig version="1.1">\n'
            f'  <emailProvider id="{domain}">\n    <domain>{domain}</domain>\n'
            f"    <displayName>{domain} mail</displayName>\n    <displayShortName>{domain}</displayShortName>\n"
            + server("incomingServer", "imap", 993, "SSL") + server("outgoingServer", "smtp", submission, "STARTTLS")
            + "  </emailProvider>\n</clientConfig>\n")


GROUPS = {
    "routing": "where mail for the domain goes",
    "authentication": "which mail is the domain's own (SPF, DKIM, DMARC)",
    "tls": "TLS between mail servers (MTA-STS, TLS-RPT)",
    "clients": "where mail programs find the server (RFC 6186 SRV)",
}


def group_of(record: Record) -> str:
    """The GROUPS key a record is shown under."""
    if record.type in ("MX", "A", "AAAA"):
        return "routing"
    if record.type == "SRV":
        return "clients"
    if record.name.startswith(("_mta-sts.", "mta-sts.", "_smtp._tls.")):
        return "tls"
    return "authentication"


def mta_sts_on_disk(setup: MailSetup) -> str:
    """Whether the policy file init wrote is the one the records announce: same, missing, differs or
    unreadable. It is no secret: read as whoever controls its path (files.read_input)."""
    import os

    from mailsetup.files import read_input

    path = Path(setup.layout.mta_sts_policy)
    if not os.path.lexists(path):
        return "missing"
    try:
        data = read_input(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, MailsetupError):
        return "unreadable"
    return "same" if data == mta_sts_policy(setup).encode() else "differs"


def _tags(text: str) -> dict[str, str]:
    """`v=STSv1; id=abc` as {'v': 'STSv1', 'id': 'abc'}: spaces around ';' and '=' do not count."""
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip()] = value.strip()
    return tags


def _check_tls_and_clients(rec: Record, found: list[str], resolve) -> Comparison | None:
    """The comparisons the generic one gets wrong for the MTA-STS, TLS-RPT and SRV records; None for
    any other record. `resolve(name, type)` gives DNS's answers (normalised), [] for none."""
    if rec.type == "TXT" and rec.value.startswith(("v=STSv1", "v=TLSRPTv1")):
        version = _tags(rec.value)["v"]
        same_kind = [f for f in found if _tags(f).get("v") == version]
        if not same_kind:
            return Comparison(rec, "fail", found, "missing")
        if len(same_kind) > 1:  # RFC 8461 3.1 / RFC 8460 3: then senders act as if there were none
            return Comparison(rec, "fail", found, f"{len(same_kind)} {version} records: senders ignore them all; "
                                                  "keep one")
        theirs, wanted = _tags(same_kind[0]), _tags(rec.value)
        if theirs == wanted:
            return Comparison(rec, "ok", found, "published")
        if version == "STSv1" and set(theirs) == {"v", "id"}:
            return Comparison(rec, "fail", found, f"published with id {theirs['id']}, but the current policy's id "
                                                  f"is {wanted['id']}: senders keep the policy they cached until "
                                                  "the id changes; publish the new one")
        return Comparison(rec, "fail", found, f"differs: {same_kind[0]}")
    if rec.type == "CNAME" and rec.name.startswith("mta-sts."):
        if _normalise("CNAME", rec.value) in found:
            return Comparison(rec, "ok", found, "published")
        if found:
            return Comparison(rec, "warn", found, f"points at {found[0]}, not this host: the web server there must "
                                                  "serve the policy")
        addresses = resolve(rec.name, "A") + resolve(rec.name, "AAAA")
        if addresses:
            return Comparison(rec, "warn", addresses, f"no CNAME, but it has its own address ({', '.join(addresses)})"
                                                      ": the web server there must serve the policy")
        return Comparison(rec, "fail", found, "missing: senders cannot fetch the MTA-STS policy")
    if rec.type == "SRV" and rec.value.endswith(" ."):
        # RFC 2782: the target "." alone says "not offered", whatever the numbers before it
        offered = [f for f in found if not f.endswith(" .")]
        if offered:
            return Comparison(rec, "warn", found, "DNS offers this service, which mailsetup does not set up here: "
                                                  "make sure it is served where the record points")
        if found:
            return Comparison(rec, "ok", found, "published (not offered)")
    return None


def _normalise_srv(text: str) -> str:
    """dnspython prints `0 1 587 mail.example.test.`: one space between fields, the target in lower
    case without its final dot, but "." (not offered) kept."""
    fields = text.split()
    if len(fields) == 4 and fields[3] != ".":
        fields[3] = fields[3].lower().rstrip(".")
    return " ".join(fields)


# Addresses the world cannot send to: a listener on one sits behind a router whose public address is
# the one to publish (--ip).
_BEHIND_NAT = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def _listens_for(setup: MailSetup, ip: str) -> bool:
    """Would mail sent to `ip` reach one of smtpd's listeners? 0.0.0.0 takes IPv4 only and :: takes
    IPv6 only (measured: smtpd 7.4 on Linux, `listen on ::` refuses 127.0.0.1); an interface name
    may hold any address, so it is taken on trust."""
    addr = ipaddress.ip_address(ip)
    for listener in setup.listeners:
        try:
            own = ipaddress.ip_address(listener.address)
        except ValueError:
            return True  # an interface (eth0, egress): we cannot tell which addresses it holds
        if own == addr or (own.is_unspecified and own.version == addr.version):
            return True
    return False


def address_records_for(setup: MailSetup, ips: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The addresses to publish as A/AAAA, and (ip, why) for each --ip left out. The records come
    from the same addresses as the listeners: an --ip smtpd does not listen on would send mail to a
    closed port. Without --ip, the listeners' own public addresses are the records."""
    listening = sorted({lst.address for lst in setup.listeners})
    if not ips:
        own = []
        for text in listening:
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                continue  # an interface: its address is the user's to give (--ip)
            if not (addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast
                    or any(addr in net for net in _BEHIND_NAT)):
                own.append(str(addr))
        return own, []
    keep: list[str] = []
    left_out: list[tuple[str, str]] = []
    for ip in ips:
        if _listens_for(setup, ip):
            keep.append(ip)
            continue
        addr = ipaddress.ip_address(ip)
        rtype, family = ("AAAA", "IPv6") if addr.version == 6 else ("A", "IPv4")
        wildcards = [a for a in listening if a in ("0.0.0.0", "::")]
        if wildcards and len(wildcards) == len(listening):
            other = "IPv4" if family == "IPv6" else "IPv6"
            every = "::" if addr.version == 6 else "0.0.0.0"
            why = (f"smtpd listens on {', '.join(listening)} only ({other}); to take mail over {family}, "
                   f"re-run init with {' '.join(f'--listen {a}' for a in [*listening, every])}")
        else:
            same = [a for a in listening if ":" in a] if addr.version == 6 else [a for a in listening if "." in a]
            why = (f"smtpd does not listen on it (it listens on {', '.join(listening)}); re-run init with "
                   f"--listen {ip}" + (f", or give --ip {same[0]}" if same else ""))
        left_out.append((ip, f"no {rtype} for {ip}: {why}"))
    return keep, left_out


def ptr_advice(setup: MailSetup, ips: list[str]) -> list[str]:
    if not ips:
        return [f"Ask whoever owns your IP addresses to set their reverse DNS (PTR) to {setup.hostname}: "
                "receivers distrust mail from an address whose PTR does not name the sending host."]
    return [f"PTR {ipaddress.ip_address(ip).reverse_pointer}. -> {setup.hostname}. "
            "(set by whoever owns the address: your hosting provider)" for ip in ips]


def validate_ips(values: list[str]) -> list[str]:
    out = []
    for v in values:
        try:
            addr = ipaddress.ip_address(v)
        except ValueError:
            raise MailsetupError(f"--ip: {v!r} is not an IP address") from None
        if addr.is_loopback or addr.is_unspecified:
            raise MailsetupError(f"--ip: {v} is not an address the world can reach")
        out.append(str(addr))
    return out


@dataclass
class Comparison:
    record: Record
    status: str  # ok | fail | warn
    found: list[str]
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.record.name, "type": self.record.type, "wanted": self.record.value,
                "status": self.status, "found": self.found, "detail": self.detail}


def _normalise(rtype: str, text: str) -> str:
    text = text.strip()
    if rtype == "TXT":
        # dnspython quotes TXT strings and splits long ones: "a" "b" -> ab
        parts = [p for p in text.split('"') if p.strip()] if '"' in text else [text]
        return "".join(parts)
    if rtype == "SRV":
        return _normalise_srv(text)
    return text.lower().rstrip(".")


def check_records(records: list[Record], nameserver: str | None, port: int = 53,
                  timeout: float = 3.0) -> list[Comparison]:
    """Ask DNS (the system's resolver, or `nameserver`) for each record and compare."""
    try:
        import dns.exception
        import dns.resolver
    except ImportError:
        raise MailsetupError("--check needs dnspython (pip install dnspython)", exit_code=1) from None
    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver:
        resolver.nameservers = [nameserver]
        resolver.port = port
    resolver.lifetime = timeout
    out = []
    silent = ""  # once DNS did not answer, the rest are not asked: a dead server costs one timeout, not one each
    for rec in records:
        if silent:
            out.append(Comparison(rec, "warn", [], silent))
            continue
        try:
            answer = resolver.resolve(rec.name, rec.type, raise_on_no_answer=False)
            found = [_normalise(rec.type, r.to_text()) for r in answer] if answer.rrset else []
        except dns.resolver.NXDOMAIN:
            found = []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            silent = f"DNS did not answer ({type(exc).__name__}): not checked"
            out.append(Comparison(rec, "warn", [], silent))
            continue
        special = _check_tls_and_clients(rec, found, lambda name, rtype: _lookup(resolver, name, rtype))
        if special is not None:
            out.append(special)
            continue
        wanted = _normalise(rec.type, rec.value)
        if rec.type == "TXT":
            prefix = rec.value.split(" ", 1)[0].split(";", 1)[0]
            same_kind = [f for f in found if f.startswith(prefix)]
            if wanted in same_kind and len(same_kind) == 1:
                out.append(Comparison(rec, "ok", found, "published"))
            elif not same_kind:
                out.append(Comparison(rec, "fail", found, "missing"))
            else:
                out.append(Comparison(rec, "fail", found, f"differs: {', '.join(same_kind)}"))
            continue
        if wanted in found:
            out.append(Comparison(rec, "ok", found, "published"))
        elif not found:
            out.append(Comparison(rec, "fail", found, "missing"))
        else:
            out.append(Comparison(rec, "fail", found, f"differs: {', '.join(found)}"))
    return out


def _lookup(resolver, name: str, rtype: str) -> list[str]:
    """DNS's answers for one more name, normalised; [] for none or no answer."""
    import dns.exception
    import dns.resolver

    try:
        answer = resolver.resolve(name, rtype, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.exception.Timeout):
        return []
    return [_normalise(rtype, r.to_text()) for r in answer] if answer.rrset else []


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [{**asdict(r), "group": group_of(r)} for r in records]


def mta_sts_info(setup: MailSetup) -> dict:
    """What `dns` says of the MTA-STS policy: its mode and id, the file init wrote and whether it is
    still the one the records announce, and where it must be served."""
    policy = mta_sts_policy(setup)
    return {"mode": setup.mta_sts_mode, "id": mta_sts_id(policy), "max_age": MTA_STS_MAX_AGE[setup.mta_sts_mode],
            "path": str(setup.layout.mta_sts_policy), "on_disk": mta_sts_on_disk(setup), "url": mta_sts_url(setup),
            "policy": policy}


def split_hostport(value: str, default_port: int, flag: str) -> tuple[str, int]:
    """HOST, HOST:PORT or [V6]:PORT (a bare IPv6 address keeps `default_port`); the port judged."""
    from mailsetup.model import validate_port

    if value.startswith("[") and "]:" in value:
        host, _, port_text = value[1:].partition("]:")
        return host, validate_port(port_text, flag)
    if value.count(":") == 1:
        host, _, port_text = value.partition(":")
        return host, validate_port(port_text, flag)
    return value, default_port


def parse_nameserver(value: str) -> tuple[str, int]:
    """--nameserver: ADDR, ADDR:PORT or [V6]:PORT."""
    host, port = split_hostport(value, 53, "--nameserver")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise MailsetupError(f"--nameserver: {value!r} is not ADDR, ADDR:PORT or [ADDR]:PORT") from None


def show_records(setup: MailSetup, ips_given: list[str], check: bool, nameserver: str | None,
                 as_json: bool) -> bool:
    """`mailsetup dns`: the records (as text or JSON), compared with live DNS when `check`; False
    when a comparison failed."""
    from mailsetup.report import print_dns, print_json

    ips, left_out = address_records_for(setup, validate_ips(ips_given))
    records = wanted_records(setup, ips)
    comparisons = None
    if check:
        server, port = parse_nameserver(nameserver) if nameserver else (None, 53)
        comparisons = check_records(records, server, port)
    if as_json:
        payload = {"records": records_as_dicts(records), "ptr": ptr_advice(setup, ips),
                   "left_out": [{"ip": addr, "why": why} for addr, why in left_out], "mta_sts": mta_sts_info(setup)}
        if setup.imap == "dovecot":
            payload["autoconfig"] = {"path": str(setup.layout.autoconfig_file), "url": autoconfig_url(setup)}
        if comparisons is not None:
            payload["check"] = [c.as_dict() for c in comparisons]
        print_json(payload)
    else:
        print_dns(setup, records, ptr_advice(setup, ips), bool(ips), comparisons, [why for _, why in left_out],
                  mta_sts=mta_sts_info(setup))
    return not (comparisons is not None and any(c.status == "fail" for c in comparisons))
