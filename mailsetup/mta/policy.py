"""Who may send what where: the embedded MTA's accept / deliver / relay / refuse decisions.

Built from the same MailSetup as smtpd.conf (inbound for the domain through the aliases; relay only
for authenticated or local senders) and testable without sockets.
"""

from __future__ import annotations

import functools
import ipaddress
import pwd
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mailsetup import aliases as aliases_mod
from mailsetup.aliases import split_value, target_kind
from mailsetup.model import MailSetup
from mailsetup.platforms import person_account, uid_min

MAX_ALIAS_DEPTH = 20
LOOPBACK = frozenset({"127.0.0.1", "::1"})
# smtpd's limit on recipients per transaction (SMTP_LIMIT_RCPT): the 1001st is answered
# `451 4.5.3 Too many recipients` (measured on 7.4).
MAX_RECIPIENTS = 1000


@dataclass(frozen=True)
class Decision:
    code: int
    message: str
    local_users: tuple[str, ...] = ()  # Maildirs to deliver to
    relay_to: tuple[str, ...] = ()  # addresses to queue for the relay
    skipped: tuple[str, ...] = ()  # alias targets the embedded MTA does not run (pipes, files)

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    def reply(self) -> str:
        return f"{self.code} {self.message}"


def _refuse(code: int, message: str) -> Decision:
    return Decision(code, message)


_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]+$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


# A sender as smtpd 7.4 takes it in MAIL FROM (its valid_localpart / valid_domainpart, checked
# against it in tests/test_protocol_hygiene.py): a dot-atom local part of atext (which, unlike a
# recipient's, may hold "%" and "!"), and a domain of labels of letters, digits, "_" and "-" (not
# first), at most 63 long, or an address literal. No control character ever gets past: the sender
# is written into Return-Path and the log as it came.
_SENDER_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SENDER_LOCAL = re.compile(rf"{_SENDER_ATOM}(?:\.{_SENDER_ATOM})*\Z")
_SENDER_DOMAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z")


def sender_refusal(address: str) -> Decision | None:
    """Why MAIL FROM's path (as aiosmtpd hands it: out of its brackets, "<>" for the null sender)
    is refused, or None."""
    if address in ("", "<>"):
        return None
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    if not _SENDER_LOCAL.match(local):
        return _refuse(553, "5.1.0 sender address syntax error")
    if at and domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            ipaddress.ip_address(literal[5:] if literal.lower().startswith("ipv6:") else literal)
        except ValueError:
            return _refuse(553, "5.1.0 sender address syntax error")
    elif at and not _SENDER_DOMAIN.match(domain):
        return _refuse(553, "5.1.0 sender address syntax error")
    return None


def split_address(address: str) -> tuple[str, str] | Decision:
    """(local part, lower-cased domain) of a plain address, or the refusal for a tricky one.

    Everything spammers use to slip past relay checks is refused outright: source routes, quoted
    local parts, percent hacks, bang paths, several '@', trailing dots, IP literals for a local part.
    The checks go in this order (the shape, then the local part, then the domain) so that each
    address gets the one reason smtpd's reader would see first.
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    if addr.lower() == "postmaster":
        return "postmaster", ""  # RFC 5321 4.5.1: <postmaster> with no domain must be accepted
    refusal = _shape_refusal(addr)
    if refusal:
        return refusal
    local, domain = addr.split("@")
    if not local:
        return _refuse(553, "5.1.3 empty local part")
    if not domain:
        return _refuse(553, "5.1.3 empty domain")
    return _local_refusal(local) or _split_domain(local, domain)


def _shape_refusal(addr: str) -> Decision | None:
    if not addr:
        return _refuse(553, "5.1.3 empty recipient address")
    if addr.startswith("@"):
        return _refuse(553, "5.1.3 source routes are not accepted")
    if '"' in addr or "\\" in addr:
        return _refuse(553, "5.1.3 quoted local parts are not accepted")
    if addr.count("@") != 1:
        return _refuse(553, "5.1.3 an address has exactly one '@'")
    return None


_ROUTING = (("%", "5.1.3 '%' routing (the percent hack) is not accepted"),
            ("!", "5.1.3 '!' routing (bang paths) is not accepted"),
            (":", "5.1.3 source routes are not accepted"), (",", "5.1.3 source routes are not accepted"))


def _local_refusal(local: str) -> Decision | None:
    for char, why in _ROUTING:
        if char in local:
            return _refuse(553, why)
    if not _LOCAL_ATOM.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return _refuse(553, "5.1.3 malformed local part")
    return None


def _split_domain(local: str, domain: str) -> tuple[str, str] | Decision:
    if domain.endswith("."):
        return _refuse(553, "5.1.2 a domain with a trailing dot is not accepted")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return _refuse(553, "5.1.2 malformed address literal")
        return local, domain.lower()
    if not _DOMAIN.match(domain):
        return _refuse(553, "5.1.2 malformed domain")
    return local, domain.lower()


@dataclass
class Policy:
    """Decisions for one MailSetup: its domains, its aliases, its users, its relay rule."""

    domains: frozenset[str]
    aliases: Mapping[str, str]
    is_local_user: Callable[[str], bool]
    local_peers: frozenset[str] = LOOPBACK  # smtpd's `from local`; empty = treat everyone as remote
    relay_rule: str = "auth-or-local"
    local_names: frozenset[str] = frozenset()  # smtpd's `for local`, matched only `from local`
    _cache: dict = field(default_factory=dict, repr=False)

    def peer_is_local(self, peer_ip: str | None) -> bool:
        return peer_ip is not None and peer_ip in self.local_peers

    def may_relay(self, authenticated: bool, peer_ip: str | None) -> bool:
        if self.relay_rule != "auth-or-local":  # the only rule any template renders
            return False
        return authenticated or self.peer_is_local(peer_ip)

    def check_rcpt(self, address: str, authenticated: bool = False, peer_ip: str | None = None) -> Decision:
        parts = split_address(address)
        if isinstance(parts, Decision):
            return parts
        local, domain = parts
        # The template's rules in their order: `from any for domain D`, then `match for local` (no
        # `from`: smtpd reads it as `from local`), then relaying for authenticated or local senders.
        if domain == "" or domain in self.domains:
            return self._local(local, address)
        if domain in self.local_names and self.peer_is_local(peer_ip):
            return self._local(local, address)
        if self.may_relay(authenticated, peer_ip):
            return Decision(250, "2.1.5 ok, will relay", relay_to=(f"{local}@{domain}",))
        return _refuse(550, "5.7.1 relaying denied: authenticate first")

    def _local(self, local: str, address: str) -> Decision:
        # The aliases do not change while the server runs: expand each local part once.
        key = local.lower()
        cached = self._cache.get(key)
        if cached is None:
            cached = self._expand_local(local)
            if len(self._cache) < 10_000:
                self._cache[key] = cached
        return cached

    def _expand_local(self, local: str) -> Decision:
        users: list[str] = []
        relay: list[str] = []
        skipped: list[str] = []
        error = self._expand(local.lower(), users, relay, skipped, seen=set(), depth=0)
        if error:
            return error
        if not users and not relay:
            if skipped:
                return _refuse(
                    550, f"5.1.1 <{local}> delivers only to a command or a file, which mailsetup's "
                    "embedded MTA never runs"
                )
            return _refuse(550, "5.1.1 invalid recipient")
        return Decision(250, "2.1.5 ok", tuple(dict.fromkeys(users)), tuple(dict.fromkeys(relay)),
                        tuple(skipped))

    def _expand(self, name: str, users: list, relay: list, skipped: list, seen: set, depth: int) -> Decision | None:
        """Expand like smtpd: aliases recursively (loop-safe), the rest as users or addresses."""
        if depth > MAX_ALIAS_DEPTH:
            return _refuse(451, "4.3.0 alias expansion too deep")
        if name in seen:
            return None  # a loop: this branch adds nothing new
        seen.add(name)
        # smtpd's aliases_get: the name as given, then cut at the first '+' (team+x is team)
        value = aliases_mod.lookup(self.aliases, name)
        if value is None:
            user = name.split("+", 1)[0]  # smtpd delivers alice+tag to alice (measured on 7.4)
            if user == "root":
                return _refuse(550, "5.1.1 smtpd does not deliver to root: alias root to a person")
            if user and self.is_local_user(user):
                users.append(user)
                return None
            return _refuse(550, "5.1.1 invalid recipient") if depth == 0 else None
        targets, problem = split_value(value)
        if problem:  # smtpd answers 424 4.2.4 here; so do we, naming why
            return _refuse(451, f"4.2.4 mailing list expansion problem: {problem}")
        for target in targets:
            kind = target_kind(target)
            if kind in ("filter", "filename", "include"):
                skipped.append(target)
                continue
            if kind == "error":
                m = re.match(r"^:?error:([245]\d\d)\s*(.*)$", target, re.I)
                if m:
                    return _refuse(int(m.group(1)), m.group(2) or "refused by alias")
                continue
            if "@" in target:
                parts = split_address(target)
                if isinstance(parts, Decision):
                    skipped.append(target)
                    continue
                t_local, t_domain = parts
                if t_domain in self.domains or t_domain in self.local_names:  # expansion is from local
                    err = self._expand(t_local.lower(), users, relay, skipped, seen, depth + 1)
                else:
                    relay.append(f"{t_local}@{t_domain}")  # forwarding the admin configured
                    err = None
            else:
                err = self._expand(target.lower(), users, relay, skipped, seen, depth + 1)
            if err and err.code != 550:
                return err
        return None


@functools.lru_cache(maxsize=1)
def machine_mailname() -> str:
    """The name smtpd's `for local` knows this machine by: /etc/mailname, else the host name
    canonicalised through the resolver (smtpd's getmailname())."""
    try:
        with open("/etc/mailname", encoding="ascii", errors="replace") as fh:
            name = fh.readline().strip()
        if name:
            return name.lower()
    except OSError:
        pass
    host = socket.gethostname()
    try:
        canon = socket.getaddrinfo(host, None, flags=socket.AI_CANONNAME)[0][3]
    except (OSError, IndexError):
        canon = ""
    return (canon or host).lower()


def local_names() -> frozenset[str]:
    """smtpd's <localnames> table behind `match for local`: localhost, the machine's mail name and
    its loopback address literals. Measured on 7.4 from a remote peer: only the `for domain` domain
    is accepted; --hostname is local only when it is the machine's own name."""
    return frozenset({"localhost", machine_mailname(), "[127.0.0.1]", "[ipv6:::1]"})


def policy_for(setup: MailSetup, aliases: Mapping[str, str], logins: Iterable[str],
               local_peers: frozenset[str] = LOOPBACK, *, for_smtpd: bool = False) -> Policy:
    """The one Policy for a set-up, from the same model as the template's match rules: the server,
    doctor and smoke all ask it. `logins` are the credentials table's users; `local_peers` empty
    treats every peer as remote (doctor asks as a stranger would); `for_smtpd` judges local users as
    the real smtpd does (system accounts, even for a sandbox)."""
    is_local_user = local_user_check(setup, aliases, logins, system_accounts=for_smtpd)
    return Policy(frozenset({setup.domain}), aliases, is_local_user, local_peers, local_names=local_names())


_USERNAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def local_user_check(setup: MailSetup, aliases: Mapping[str, str], creds: Iterable[str],
                     system_accounts: bool = False) -> Callable[[str], bool]:
    """Who counts as a local user. On a real host: a person's account (platforms.person_account, the
    rule --admin is held to as well). In a sandbox: a login, or a plain name an alias points at, or a
    home already made there. With `system_accounts`: any account but root, which is whom the real
    smtpd delivers to, in a sandbox too."""
    if system_accounts:
        return _system_account
    if setup.root is None:
        first = uid_min()  # read once, not per recipient
        return lambda name: person_account(name, first)
    home = Path(setup.layout.home_dir)
    named: set[str] = set(creds)
    for value in aliases.values():
        targets, _ = aliases_mod.split_value(value)
        for t in targets:
            if aliases_mod.target_kind(t) == "username" and "@" not in t:
                named.add(t.lower())
    named -= set(aliases)

    def sandbox_user(name: str) -> bool:
        if name == "root" or not _USERNAME.match(name):  # a name, never a path
            return False
        return name in named or (home / name).is_dir()
    return sandbox_user


def _system_account(name: str) -> bool:
    try:
        return pwd.getpwnam(name).pw_uid != 0
    except KeyError:
        return False
