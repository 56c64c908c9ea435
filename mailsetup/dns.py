"""The DNS records a mail domain needs (MX, A/AAAA, SPF, DMARC, PTR advice), as a zone-file
snippet and a table, and a comparison with what DNS answers now.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup


@dataclass(frozen=True)
class Record:
    name: str  # absolute, with the trailing dot
    type: str
    value: str
    why: str

    def zone_line(self) -> str:
        value = f'"{self.value}"' if self.type == "TXT" else self.value
        return f"{self.name:<32} 3600 IN {self.type:<5} {value}"


def wanted_records(setup: MailSetup, ips: list[str]) -> list[Record]:
    d, h = setup.domain + ".", setup.hostname + "."
    records = [Record(d, "MX", f"10 {h}", "mail for the domain goes to the mail host")]
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        records.append(Record(h, "AAAA" if addr.version == 6 else "A", str(addr), "the mail host's address"))
    records += [
        Record(d, "TXT", "v=spf1 mx -all", "SPF: only the domain's MX hosts send its mail"),
        Record(f"_dmarc.{d}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{setup.domain}",
               "DMARC: quarantine mail that fails SPF/DKIM alignment; reports to postmaster"),
    ]
    return records


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
    for rec in records:
        try:
            answer = resolver.resolve(rec.name, rec.type, raise_on_no_answer=False)
            found = [_normalise(rec.type, r.to_text()) for r in answer] if answer.rrset else []
        except dns.resolver.NXDOMAIN:
            found = []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            out.append(Comparison(rec, "warn", [], f"DNS did not answer ({type(exc).__name__}): not checked"))
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


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
