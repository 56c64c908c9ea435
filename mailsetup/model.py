"""MailSetup: the one validated, immutable model every artifact is rendered from.

Raw answers (flags, answers file, wizard) go in through `build_setup`; anything that could inject
text into smtpd.conf is refused there, with one line naming the flag.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mailsetup.defaults import DEFAULT_KEEP_BACKUPS, DEFAULT_SMTPD_VERSION, parse_version
from mailsetup.errors import MailsetupError
from mailsetup.platforms import Layout, account_problem, detect_os, get_layout, sandboxed

KEY_TYPES = ("rsa-2048", "rsa-4096", "ecdsa-p256")
DEFAULT_DOVECOT_VERSION = (2, 3)  # Debian 12's; 2.4 (Debian 13) needs another grammar
IMAP_SERVERS = ("dovecot", "none")
MODERN_GRAMMAR = (6, 4)  # action/match, `pki … cert`, `queue encryption KEY`
DEFAULT_MAX_MESSAGE_SIZE = 35 * 1024 * 1024  # smtpd's default
ACME_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"  # Let's Encrypt's, certbot's default
TLS_SOURCES = ("self-signed", "existing", "csr", "acme")

# Characters that end a token, start a comment or a macro, or open a block in smtpd.conf.
_HOSTILE = {
    '"': "a double quote",
    "'": "a single quote",
    "#": "'#'",
    "{": "'{'",
    "}": "'}'",
    "<": "'<'",
    ">": "'>'",
    "\\": "a backslash",
    "$": "'$'",
    ";": "';'",
    "`": "a backquote",
}


def _describe_char(ch: str) -> str:
    if ch == "\n":
        return "a newline"
    if ch == "\r":
        return "a carriage return"
    if ch == "\t":
        return "a tab"
    if ch == " ":
        return "a space"
    if ch.isspace():
        return f"white space (U+{ord(ch):04X})"
    if ord(ch) < 32 or ord(ch) == 127:
        return f"a control character (U+{ord(ch):04X})"
    return _HOSTILE.get(ch, repr(ch))


def refuse_injection(value: str, flag: str, allow_leading_dash: bool = False) -> str:
    """Refuse any value that could end a token or add a line to smtpd.conf."""
    for ch in value:
        if ch.isspace() or ord(ch) < 32 or ord(ch) == 127 or ch in _HOSTILE:
            raise MailsetupError(
                f"{flag}: {value!r} contains {_describe_char(ch)}, which is not allowed here"
            )
    if not allow_leading_dash and value.startswith("-"):
        raise MailsetupError(f"{flag}: {value!r} starts with '-', which is not allowed here")
    return value


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def validate_dns_name(value: Any, flag: str, fqdn: bool = True) -> str:
    """A DNS name as smtpd.conf and DNS want it: lower case, IDN as punycode, no trailing dot."""
    if not isinstance(value, str) or not value:
        raise MailsetupError(f"{flag}: a DNS name is required")
    refuse_injection(value, flag)
    if value.endswith("."):
        raise MailsetupError(f"{flag}: {value!r} ends with a dot; give the name without it")
    try:
        ascii_name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise MailsetupError(f"{flag}: {value!r} is not a valid DNS name") from None
    if len(ascii_name) > 253:
        raise MailsetupError(f"{flag}: {value!r} is longer than 253 characters")
    labels = ascii_name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise MailsetupError(
                f"{flag}: {value!r} is not a valid DNS name (label {label!r}: letters, digits and "
                "inner hyphens only, 1-63 characters)"
            )
    if fqdn and len(labels) < 2:
        raise MailsetupError(
            f"{flag}: {value!r} is not a fully qualified name (expected something like mail.example.com)"
        )
    if labels[-1].isdigit():
        raise MailsetupError(f"{flag}: {value!r} looks like an address, not a DNS name")
    return ascii_name


_ADMIN_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_ADMIN_LOCAL = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


def validate_admin(value: Any, flag: str = "--admin", real_host: bool = False) -> str:
    """Who reads root's mail: a local user name or one plain address — never a list, a command
    (`|…`), a file or an include, which would land in the aliases as such. On a real host a name
    must be a person's account smtpd delivers to, or root's mail (postmaster's, abuse's) bounces;
    in a sandbox (--root) it is a name there."""
    text = str(value)
    refuse_injection(text, flag)
    if _ADMIN_USER.match(text):
        if text == "root":
            raise MailsetupError(f"{flag}: smtpd never delivers to root; name a person")
        problem = account_problem(text) if real_host else None
        if problem:
            raise MailsetupError(
                f"{flag}: {text!r} {problem}, so smtpd would not deliver root's mail to it; name a person's "
                "account (uid from UID_MIN on, with a home) or an address such as you@example.org"
            )
        return text
    local, sep, domain = text.partition("@")
    if sep and _ADMIN_LOCAL.match(local) and not local.startswith(".") and ".." not in local:
        return f"{local}@{validate_dns_name(domain, flag)}"
    raise MailsetupError(f"{flag}: {text!r} is neither a local user name nor a plain address")


def validate_path(value: Any, flag: str) -> PurePosixPath:
    """An absolute path that can stand in smtpd.conf between double quotes."""
    text = str(value)
    if not text:
        raise MailsetupError(f"{flag}: a path is required")
    refuse_injection(text, flag)
    if not text.startswith("/"):
        raise MailsetupError(f"{flag}: {text!r} must be an absolute path")
    return PurePosixPath(text)


_IFNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")


def validate_listen(value: Any, flag: str, os_name: str) -> str:
    text = str(value)
    refuse_injection(text, flag)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _IFNAME.match(text):
        raise MailsetupError(f"{flag}: {text!r} is neither an IP address nor an interface name")
    if text in ("egress", "all") and os_name != "openbsd":
        raise MailsetupError(
            f"{flag}: {text!r} is an OpenBSD interface group; on this OS use an address "
            "(0.0.0.0, ::) or an interface name such as eth0"
        )
    return text


def _whole_number(value: Any, flag: str, what: str) -> int:
    """A whole number read from the digits it is written with: an answers file's `true` (which int()
    makes 1) or 365.9 is refused, not turned into a number."""
    try:
        return int(str(value), 10)
    except ValueError:
        raise MailsetupError(f"{flag}: {value!r} is not {what}") from None


def validate_port(value: Any, flag: str) -> int:
    port = _whole_number(value, flag, "a port number")
    if not 1 <= port <= 65535:
        raise MailsetupError(f"{flag}: {port} is not a port number (1-65535)")
    return port


def validate_key_type(value: Any, flag: str = "--key-type") -> str:
    key_type = str(value or "rsa-2048").lower()
    if key_type not in KEY_TYPES:
        raise MailsetupError(f"{flag}: {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    return key_type


def validate_days(value: Any, flag: str = "--days") -> int:
    """A certificate lifetime: a whole number of days, up to a hundred years."""
    days = _whole_number(value, flag, "a number of days")
    if not 1 <= days <= 36500:
        raise MailsetupError(f"{flag}: {days} is outside 1..36500")
    return days


def validate_hostport(value: str, flag: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise MailsetupError(f"{flag}: {value!r} is not HOST:PORT")
    return host.strip("[]"), validate_port(port, flag)


def validate_keep_backups(value: Any, flag: str = "--keep-backups") -> int:
    """How many dated backups of each file are kept: a whole number, at least 1."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError
        count = int(str(value).strip(), 10)
    except ValueError:
        raise MailsetupError(f"{flag}: {value!r} is not a number of backups (1 or more)") from None
    if count < 1:
        raise MailsetupError(f"{flag}: {count} is too few: keep at least 1 backup of each file")
    return count


def validate_imap(value: Any, flag: str = "--imap") -> str:
    text = str(value).strip().lower()
    if text not in IMAP_SERVERS:
        raise MailsetupError(f"{flag}: {value!r} is not dovecot or none")
    return text


def parse_dovecot_version(value: Any, flag: str = "--dovecot-version") -> tuple[int, int]:
    """2.3 or 2.4 (the two grammars we write); a later 2.x is written for as 2.4."""
    found = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", str(value))
    if not found:
        raise MailsetupError(f"{flag}: {value!r} is not a Dovecot version such as 2.3 or 2.4")
    version = (int(found.group(1)), int(found.group(2)))
    if version < (2, 3) or version[0] > 2:
        raise MailsetupError(f"{flag}: Dovecot {version[0]}.{version[1]} is not supported (2.3 or 2.4)")
    return version


def validate_bool(value: Any, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "on", "y"):
        return True
    if text in ("0", "no", "false", "off", "n"):
        return False
    raise MailsetupError(f"{flag}: {value!r} is not yes or no")


MTA_STS_MODES = ("testing", "enforce", "none")


def validate_mta_sts_mode(value: Any, flag: str = "--mta-sts-mode") -> str:
    """RFC 8461's policy modes: testing (report, deliver anyway), enforce, none (withdrawing a policy)."""
    text = str(value)
    if text not in MTA_STS_MODES:
        raise MailsetupError(f"{flag}: {text!r} is not testing, enforce or none")
    return text


RELAY_TLS = ("opportunistic", "verify")


def validate_relay_tls(value: Any, flag: str = "--relay-tls") -> str:
    """How outbound mail uses TLS: opportunistic (STARTTLS when offered, any certificate: what the
    internet does) or verify (STARTTLS required and the MX's certificate verified)."""
    text = str(value)
    if text not in RELAY_TLS:
        raise MailsetupError(f"{flag}: {text!r} is not opportunistic or verify")
    return text


def validate_names(value: Any, flag: str, own: str, own_what: str) -> tuple[str, ...]:
    """--backup-mx / --backup-for: one DNS name or a list of them, each once, never `own` (this
    host's own name or domain, which `own_what` names)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
        raise MailsetupError(f"{flag}: {value!r} is not a DNS name or a list of them")
    names: list[str] = []
    for item in items:
        name = validate_dns_name(item, flag)
        if name == own.lower():
            raise MailsetupError(f"{flag}: {name} is {own_what}")
        if name in names:
            raise MailsetupError(f"{flag}: {name} is given twice")
        names.append(name)
    return tuple(names)


def validate_backup_mx(value: Any, flag: str, hostname: str) -> tuple[str, ...]:
    return validate_names(value, flag, hostname, "this host's own name (--hostname): list the other MX hosts")


def validate_backup_for(value: Any, flag: str, domain: str) -> tuple[str, ...]:
    return validate_names(value, flag, domain, "this host's own domain (--domain), whose mail is delivered here")


@dataclass(frozen=True)
class Acme:
    """How certbot obtains and renews the certificate of `--tls acme`."""

    server: str = ACME_PRODUCTION  # the ACME directory URL
    email: str | None = None  # the account's contact; None registers without one
    webroot: PurePosixPath | None = None  # a web server's document root; None: certbot's own server
    http_port: int = 80  # where certbot's standalone server answers the http-01 challenge
    reload: str | None = None  # what the deploy hook runs after a renewal; None: the OS's restart of smtpd


@dataclass(frozen=True)
class Tls:
    cert: PurePosixPath
    key: PurePosixPath
    key_type: str = "rsa-2048"
    days: int = 3650
    # "existing": the user's own files, never overwritten; "csr": + a CSR; "acme": certbot's live files
    source: str = "self-signed"
    acme: Acme | None = None

    @property
    def csr(self) -> PurePosixPath:
        return self.cert.with_suffix(".csr")


@dataclass(frozen=True)
class Queue:
    compression: bool = True
    encryption: bool = True
    key_file: PurePosixPath = PurePosixPath("/etc/mailsetup/queue.key")


@dataclass(frozen=True)
class Listener:
    """One `listen on` line: where, which port, and what it demands before mail."""

    name: str  # "smtp" | "submission"
    address: str
    port: int
    tls: str  # "starttls" (offered) | "require"
    auth: str  # "optional" | "required"


@dataclass(frozen=True)
class MailSetup:
    domain: str
    hostname: str
    os_name: str
    layout: Layout  # already under `root`
    root: Path | None
    tls: Tls
    queue: Queue
    listeners: tuple[Listener, ...]
    aliases_import: Path | None = None  # a user's aliases file to adopt
    smtpd_version: tuple[int, int] = DEFAULT_SMTPD_VERSION
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    admin: str | None = None  # who reads root's mail: a local name or an address (its form checked)
    first_user: str | None = None  # a login init adds; its password travels beside the model, never in it
    keep_backups: int = DEFAULT_KEEP_BACKUPS  # dated backups kept of each file written
    smoke: bool = True  # init runs the smoke test once the files are written
    dkim: bool = False  # outgoing mail is DKIM-signed (RSA and Ed25519), by smtpd's filter or the embedded MTA
    mta_sts_mode: str = "testing"  # the MTA-STS policy's mode: testing first, enforce once reports are clean
    relay_tls: str = "opportunistic"  # outbound TLS: opportunistic (any certificate) or verify (a CA-trusted one)
    backup_mx: tuple[str, ...] = ()  # other hosts that are backup MXes for the domain (DNS: MX 20, 30…)
    backup_for: tuple[str, ...] = ()  # domains this host is a backup MX for: their mail is queued and handed on
    imap: str = "none"  # "dovecot": IMAPS on 993 from the same certificate and logins, mail handed over by LMTP
    dovecot_version: tuple[int, int] = DEFAULT_DOVECOT_VERSION  # the grammar dovecot.conf is written in
    # The keys some layer answered (flags, answers file, last run, wizard): the answers file records
    # these, so a default stays a default and follows the layout (or the key type on disk) next time.
    answered: frozenset[str] = frozenset()

    @property
    def modern_grammar(self) -> bool:
        return self.smtpd_version >= MODERN_GRAMMAR

    @property
    def maildir_template(self) -> str | None:
        """The Maildir smtpd delivers to; None means smtpd's default, ~/Maildir."""
        if self.root is None:
            return None
        return str(self.layout.home_dir / "%{user.username}" / "Maildir")

    def maildir_for(self, user: str) -> PurePosixPath:
        return self.layout.home_dir / user / "Maildir"


def default_hostname(domain: str) -> str:
    """This host's FQDN when it belongs to the domain, else mail.DOMAIN."""
    try:
        fqdn = socket.getfqdn().lower().rstrip(".")
    except OSError:
        fqdn = ""
    if fqdn.endswith("." + domain) and "." in fqdn:
        return fqdn
    return f"mail.{domain}"


def _user_path(value: Any, flag: str) -> Path:
    try:
        return Path(str(value)).expanduser()
    except RuntimeError:  # "~someone" for a user who does not exist
        raise MailsetupError(f"{flag}: {value!r} names the home of an unknown user") from None


def flag_of(key: str) -> str:
    """The option that answers `key`: --KEY with '-' for '_'."""
    return "--" + key.replace("_", "-")


def build_setup(raw: Mapping[str, Any], where: Callable[[str], str] = flag_of) -> MailSetup:
    """Validate raw answers (keys are flag names without dashes, '_' for '-') into a MailSetup.
    `where(key)` names the place a bad value came from: its flag, or the answers file and line."""
    domain = validate_dns_name(raw.get("domain"), where("domain"))
    hostname = validate_dns_name(raw.get("hostname") or default_hostname(domain), where("hostname"))
    root = _root(raw.get("root"))
    layout = _layout(raw.get("os"), where("os"))
    os_name = layout.name
    layout = sandboxed(layout, root)
    tls = _tls(raw, layout, hostname, where)
    queue = Queue(
        compression=validate_bool(raw.get("queue_compression", True), where("queue_compression")),
        encryption=validate_bool(raw.get("queue_encryption", True), where("queue_encryption")),
        key_file=layout.queue_key,
    )
    return MailSetup(
        domain=domain, hostname=hostname, os_name=os_name, layout=layout, root=root,
        tls=tls, queue=queue, listeners=_listeners(raw, layout, os_name, where),
        aliases_import=_user_path(raw["aliases"], where("aliases")) if raw.get("aliases") else None,
        smtpd_version=(parse_version(raw["smtpd_version"], where("smtpd_version")) if raw.get("smtpd_version")
                       else DEFAULT_SMTPD_VERSION),
        max_message_size=validate_message_size(raw.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE),
                                               where("max_message_size")),
        keep_backups=validate_keep_backups(raw.get("keep_backups", DEFAULT_KEEP_BACKUPS), where("keep_backups")),
        admin=validate_admin(raw["admin"], where("admin")) if raw.get("admin") is not None else None,
        first_user=_first_user(raw.get("user"), where("user")),
        smoke=validate_bool(raw.get("smoke", True), where("smoke")),
        dkim=validate_bool(raw.get("dkim", False), where("dkim")),
        mta_sts_mode=validate_mta_sts_mode(raw.get("mta_sts_mode", "testing"), where("mta_sts_mode")),
        relay_tls=validate_relay_tls(_given(raw, "relay_tls", "opportunistic"), where("relay_tls")),
        backup_mx=validate_backup_mx(_given(raw, "backup_mx", ()), where("backup_mx"), hostname),
        backup_for=validate_backup_for(_given(raw, "backup_for", ()), where("backup_for"), domain),
        imap=validate_imap(_given(raw, "imap", "none"), where("imap")),
        dovecot_version=(parse_dovecot_version(raw["dovecot_version"], where("dovecot_version"))
                         if raw.get("dovecot_version") else DEFAULT_DOVECOT_VERSION),
        answered=frozenset(k for k, v in raw.items() if v is not None),
    )


def _given(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    """The answer, or `default` when none was given (None: a flag left out); an empty "" is judged."""
    value = raw.get(key)
    return default if value is None else value


def _root(value: Any) -> Path | None:
    if value is None:
        return None
    if not str(value):
        raise MailsetupError("--root: a path is required (a sandbox folder; leave --root out for this host)")
    root_text = str(_user_path(value, "--root").absolute())
    validate_path(root_text, "--root")
    return Path(root_text)


def _layout(os_given: Any, flag: str = "--os") -> Layout:
    if os_given:
        refuse_injection(str(os_given), flag)
        return get_layout(str(os_given))
    detected = detect_os()
    if detected is None:
        raise MailsetupError(
            "--os: could not detect this OS's OpenSMTPD layout; pass --os "
            "(debian, rhel, alpine, arch, freebsd, openbsd)"
        )
    return get_layout(detected)


def validate_tls(value: Any, flag: str = "--tls") -> str:
    text = str(value)
    if text not in TLS_SOURCES:
        raise MailsetupError(f"{flag}: {text!r} is not self-signed, existing, csr or acme")
    return text


def validate_acme_server(value: Any, flag: str = "--acme-server") -> str:
    """An ACME directory URL: https, nothing a shell or certbot's renewal file could misread."""
    text = refuse_injection(str(value), flag)
    if not re.fullmatch(r"https://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/%:=?&+-]*)?", text):
        raise MailsetupError(f"{flag}: {text!r} is not an https:// URL of an ACME directory")
    return text


_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


def validate_email(value: Any, flag: str = "--acme-email") -> str:
    text = refuse_injection(str(value), flag)
    local, sep, domain = text.partition("@")
    if not (sep and _EMAIL_LOCAL.match(local)) or local.startswith(".") or ".." in local:
        raise MailsetupError(f"{flag}: {text!r} is not a plain address such as you@example.org")
    return f"{local}@{validate_dns_name(domain, flag)}"


def validate_command(value: Any, flag: str) -> str:
    """A shell command run as one line of a script: any words, but no line break or control character."""
    text = str(value).strip()
    if not text:
        raise MailsetupError(f"{flag}: a command is required")
    for ch in text:
        if ord(ch) < 32 or ord(ch) == 127:
            raise MailsetupError(f"{flag}: {text!r} contains {_describe_char(ch)}, which is not allowed here")
    return text


def _acme(raw: Mapping[str, Any], where: Callable[[str], str]) -> Acme:
    given = {k: raw.get(k) for k in ("acme_email", "webroot", "reload_command")}
    return Acme(
        server=validate_acme_server(raw.get("acme_server") or ACME_PRODUCTION, where("acme_server")),
        email=validate_email(given["acme_email"], where("acme_email")) if given["acme_email"] else None,
        webroot=validate_path(Path(str(given["webroot"])).absolute(), where("webroot")) if given["webroot"] else None,
        http_port=validate_port(raw.get("http_01_port", 80), where("http_01_port")),
        reload=validate_command(given["reload_command"], where("reload_command")) if given["reload_command"] else None,
    )


def _tls(raw: Mapping[str, Any], layout: Layout, hostname: str, where: Callable[[str], str]) -> Tls:
    key_type = validate_key_type(raw.get("key_type"), where("key_type"))
    days = validate_days(raw.get("days", 3650), where("days"))
    tls_mode = validate_tls(raw.get("tls") or ("existing" if raw.get("cert") or raw.get("key") else "self-signed"),
                            where("tls"))
    if tls_mode == "existing":
        if not (raw.get("cert") and raw.get("key")):
            raise MailsetupError("--cert and --key: give both files of an existing certificate, or neither")
        return Tls(
            cert=validate_path(Path(str(raw["cert"])).absolute(), where("cert")),
            key=validate_path(Path(str(raw["key"])).absolute(), where("key")),
            key_type=key_type, days=days, source="existing",
        )
    if raw.get("cert") or raw.get("key"):
        raise MailsetupError(f"--cert/--key: not used with --tls {tls_mode}")
    if tls_mode == "acme":  # certbot's stable names; live/ links to the newest version in archive/
        live = layout.letsencrypt_dir / "live" / hostname
        return Tls(cert=live / "fullchain.pem", key=live / "privkey.pem", key_type=key_type, days=days,
                   source="acme", acme=_acme(raw, where))
    return Tls(
        cert=layout.cert_dir / f"{hostname}.crt",
        key=layout.key_dir / f"{hostname}.key",
        key_type=key_type, days=days, source=tls_mode,
    )


def validate_addresses(value: Any, flag: str, os_name: str) -> list[str]:
    """--listen: one address or interface, or a list of them; each once."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
        raise MailsetupError(f"{flag}: {value!r} is not an address or a list of addresses")
    return list(dict.fromkeys(validate_listen(item, flag, os_name) for item in items))


def _listeners(raw: Mapping[str, Any], layout: Layout, os_name: str,
               where: Callable[[str], str]) -> tuple[Listener, ...]:
    addresses = validate_addresses(raw.get("listen") or [layout.default_listen], where("listen"), os_name)
    smtp_port = validate_port(raw.get("smtp_port", 25), where("smtp_port"))
    sub_port = validate_port(raw.get("submission_port", 587), where("submission_port"))
    if smtp_port == sub_port:
        raise MailsetupError(f"{where('submission_port')}: {sub_port} is also the SMTP port")
    listeners: list[Listener] = []
    for addr in addresses:
        listeners.append(Listener("smtp", addr, smtp_port, "starttls", "optional"))
        listeners.append(Listener("submission", addr, sub_port, "require", "required"))
    return tuple(listeners)


def validate_message_size(value: Any, flag: str = "--max-message-size") -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise MailsetupError(f"{flag}: {value!r} is not a number of bytes") from None
    if size < 1024:
        raise MailsetupError(f"{flag}: {size} is too small (at least 1024 bytes)")
    if size > MAX_MESSAGE_SIZE:  # smtpd's number is a C long long: a larger one fails `smtpd -n` late
        raise MailsetupError(f"{flag}: {size} is too large (smtpd takes at most {MAX_MESSAGE_SIZE})")
    return size


MAX_MESSAGE_SIZE = (1 << 63) - 1


def _first_user(value: Any, flag: str = "--user") -> str | None:
    if not value:
        return None
    from mailsetup.credentials import validate_username

    return validate_username(str(value), flag)
