"""What `init` asks, as data: one table of questions (key, prompt, flag, validator, default), read
by both prompters (the wizard and the unattended one that names the missing flag), and the
answers, kept in layers so that every value knows where it came from.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailsetup import model
from mailsetup.errors import MailsetupError
from mailsetup.model import KEY_TYPES, default_hostname, flag_of
from mailsetup.platforms import LAYOUTS, detect_os, get_layout

Check = Callable[[Any, str, Mapping[str, Any]], Any]  # (value, where it came from, the other answers)


def _username_or_blank(value: Any, where: str, answers: Mapping[str, Any]) -> str:
    from mailsetup.credentials import validate_username

    return validate_username(value, where) if value else ""


def _os(value: Any, where: str, answers: Mapping[str, Any]) -> str:
    model.refuse_injection(str(value), where)
    return get_layout(str(value)).name


def _os_of(answers: Mapping[str, Any]) -> str:
    return str(answers.get("os") or detect_os() or "debian")


@dataclass(frozen=True)
class Question:
    key: str  # the answers key; the flag is --KEY with '-' for '_'
    prompt: str
    flag: str
    kind: str  # text | select | confirm | path | setting (a flag or answers key, never asked)
    validate: Check | None = None  # the one check of this value
    saved: bool = True  # recorded in answers.toml (and so a key an answers file may set)
    default: Callable[[Mapping[str, Any]], Any] = lambda a: None
    choices: Callable[[], list[tuple[str, str]]] | None = None  # (value, label)
    when: Callable[[Answers], bool] = lambda a: True  # asked only when it applies
    reask: bool = True  # asked again when the user changes the settings of a re-run
    required: str = ""  # what to say when an unattended run has no answer (empty: optional)
    then_password: bool = False  # a name answered here is followed by its password, kept apart
    ask_first: str = ""  # a yes/no asked before the question itself; no means no answer
    explain: str = ""  # said before the question: what the choice means


def _current(key: str, fallback: Any = None) -> Callable[[Mapping[str, Any]], Any]:
    return lambda a: a.get(key) if a.get(key) not in (None, "") else fallback


TLS_CHOICES = [
    ("self-signed", "new self-signed certificate"),
    ("existing", "my own certificate and key (e.g. Let's Encrypt)"),
    ("csr", "a key and a CSR to send to a CA"),
    ("acme", "a CA-trusted certificate from Let's Encrypt, renewed by certbot (needs this host's public "
             "name to reach it on port 80)"),
]
# Said before the choice: the default is safe anywhere; acme only works on a host the CA can reach.
TLS_HELP = ("self-signed works anywhere, but mail clients warn about it (servers sending to you accept it); "
            "acme gets a certificate every client trusts, but only for a public name whose port 80 reaches this host")

IMAP_CHOICES = [
    ("dovecot", "Dovecot: IMAPS on 993 with the same certificate and logins; smtpd hands mail over by LMTP"),
    ("none", "none: mail stays in each ~/Maildir for local mail readers"),
]
IMAP_HELP = "IMAP lets people read their mail from a phone or a desktop client (port 993, TLS only)"


def default_imap(answers: Mapping[str, Any]) -> str:
    """Dovecot when it is installed on the host being set up (doveconf found); never by itself in a
    sandbox (--root), where no Dovecot would read what we write."""
    from mailsetup.dovecot import installed

    return "dovecot" if not answers.get("root") and installed() else "none"


QUESTIONS: tuple[Question, ...] = (
    Question("domain", "Mail domain (--domain):", "--domain", "text",
             validate=lambda v, w, a: model.validate_dns_name(v, w), default=_current("domain", ""),
             required="the mail domain, e.g. --domain example.org"),
    Question("hostname", "Mail host name, its FQDN (--hostname):", "--hostname", "text",
             validate=lambda v, w, a: model.validate_dns_name(v, w),
             default=lambda a: a.get("hostname") or default_hostname(model.validate_dns_name(a["domain"], "--domain"))),
    Question("os", "OS layout (--os):", "--os", "select", validate=_os,
             default=lambda a: a.get("os") or detect_os() or "debian",
             choices=lambda: [(name, f"{name} ({LAYOUTS[name].title})") for name in LAYOUTS]),
    Question("tls", "TLS certificate (--tls):", "--tls", "select", choices=lambda: TLS_CHOICES,
             validate=lambda v, w, a: model.validate_tls(v, w), when=lambda a: not (a.get("cert") and a.get("key")),
             explain=TLS_HELP),
    Question("acme_email", "Address Let's Encrypt writes to about the certificate, blank for none (--acme-email):",
             "--acme-email", "text", validate=lambda v, w, a: model.validate_email(v, w) if v else "",
             default=_current("acme_email", ""), when=lambda a: a.get("tls") == "acme"),
    Question("acme_server", "ACME directory URL (--acme-server):", "--acme-server", "setting",
             validate=lambda v, w, a: model.validate_acme_server(v, w)),
    Question("webroot", "A web server's document root for the http-01 challenge (--webroot):", "--webroot",
             "setting", validate=lambda v, w, a: model.validate_path(v, w)),
    Question("http_01_port", "Port certbot's own server answers the http-01 challenge on (--http-01-port):",
             "--http-01-port", "setting", validate=lambda v, w, a: model.validate_port(v, w)),
    Question("reload_command", "What certbot's deploy hook runs after a renewal (--reload-command):",
             "--reload-command", "setting", validate=lambda v, w, a: model.validate_command(v, w)),
    Question("cert", "Certificate file (--cert):", "--cert", "path", reask=False,
             when=lambda a: a.get("tls") == "existing"),
    Question("key", "Its private key file (--key):", "--key", "path", reask=False,
             when=lambda a: a.get("tls") == "existing"),
    Question("key_type", "Key type (--key-type):", "--key-type", "select",
             validate=lambda v, w, a: model.validate_key_type(v, w), default=_current("key_type", "rsa-2048"),
             choices=lambda: [(k, k) for k in KEY_TYPES], when=lambda a: a.get("tls", "self-signed") != "existing"),
    Question("days", "Certificate lifetime in days (--days):", "--days", "setting",
             validate=lambda v, w, a: model.validate_days(v, w)),
    Question("queue_compression", "Compress the queue (--queue-compression)?", "--queue-compression", "confirm",
             validate=lambda v, w, a: model.validate_bool(v, w), default=lambda a: a.get("queue_compression", True)),
    Question("queue_encryption", "Encrypt the queue (--queue-encryption)?", "--queue-encryption", "confirm",
             validate=lambda v, w, a: model.validate_bool(v, w), default=lambda a: a.get("queue_encryption", True)),
    Question("aliases", "Aliases file (--aliases):", "--aliases", "path", saved=False,
             ask_first="Import an existing aliases file (--aliases)?",
             when=lambda a: "admin" not in a.given),  # --admin given: the default aliases, no import
    Question("admin", "Who reads root's, postmaster's and abuse's mail? A local user or an address (--admin):",
             "--admin", "text", validate=lambda v, w, a: model.validate_admin(v, w, real_host=not a.get("root")),
             default=lambda a: str(a.get("admin") or a.get("user") or ""), when=lambda a: not a.get("aliases")),
    Question("user", "First mail user for submission, blank for none (--user):", "--user", "text", saved=False,
             validate=_username_or_blank, default=lambda a: str(a.get("admin") or ""), then_password=True),
    Question("dkim", "Sign outgoing mail with DKIM, RSA and Ed25519 (--dkim)?", "--dkim", "confirm",
             validate=lambda v, w, a: model.validate_bool(v, w), default=lambda a: bool(a.get("dkim", True))),
    Question("imap", "IMAP server for reading mail: dovecot or none (--imap):", "--imap", "select",
             validate=lambda v, w, a: model.validate_imap(v, w), choices=lambda: IMAP_CHOICES,
             default=lambda a: a.get("imap") or default_imap(a), explain=IMAP_HELP),
    Question("dovecot_version", "The Dovecot version to write for (--dovecot-version):", "--dovecot-version",
             "setting", validate=lambda v, w, a: model.parse_dovecot_version(v, w)),
    Question("mta_sts_mode", "MTA-STS policy mode: testing, enforce or none (--mta-sts-mode):", "--mta-sts-mode",
             "setting", validate=lambda v, w, a: model.validate_mta_sts_mode(v, w)),
    Question("relay_tls", "Outbound TLS: opportunistic or verify (--relay-tls):", "--relay-tls", "setting",
             validate=lambda v, w, a: model.validate_relay_tls(v, w)),
    Question("backup_mx", "Other hosts that are backup MXes for the domain (--backup-mx):", "--backup-mx", "setting",
             validate=lambda v, w, a: model.validate_backup_mx(v, w, str(a.get("hostname") or ""))),
    Question("backup_for", "Domains this host is a backup MX for (--backup-for):", "--backup-for", "setting",
             validate=lambda v, w, a: model.validate_backup_for(v, w, str(a.get("domain") or ""))),
    Question("listen", "Addresses or interfaces smtpd listens on (--listen):", "--listen", "setting",
             validate=lambda v, w, a: model.validate_addresses(v, w, _os_of(a))),
    Question("smtp_port", "Port of the MX listener (--smtp-port):", "--smtp-port", "setting",
             validate=lambda v, w, a: model.validate_port(v, w)),
    Question("submission_port", "Port of the submission listener (--submission-port):", "--submission-port",
             "setting", validate=lambda v, w, a: model.validate_port(v, w)),
    Question("smtpd_version", "The smtpd version to write for (--smtpd-version):", "--smtpd-version", "setting",
             validate=lambda v, w, a: model.parse_version(v, w)),
    Question("max_message_size", "Largest message accepted, in bytes (--max-message-size):",
             "--max-message-size", "setting", validate=lambda v, w, a: model.validate_message_size(v, w)),
    Question("keep_backups", "Dated backups kept of each file (--keep-backups):", "--keep-backups", "setting",
             validate=lambda v, w, a: model.validate_keep_backups(v, w)),
    Question("smoke", "Run the smoke test when done (--smoke)?", "--smoke", "confirm", saved=False,
             validate=lambda v, w, a: model.validate_bool(v, w), default=lambda a: True),
)

BY_KEY = {q.key: q for q in QUESTIONS}
SAVED_KEYS = tuple(q.key for q in QUESTIONS if q.saved)  # what answers.toml may hold
assert all(q.flag == flag_of(q.key) for q in QUESTIONS)

# From the most to the least binding. The wizard's answers sit under the flags (a flag is never
# asked) and over the answers file and the last run (whose values it offers as defaults).
LAYERS = ("flags", "wizard", "file", "last run", "detected")


class Answers(Mapping[str, Any]):
    """The answers of one run, its layers kept apart and read through one ChainMap (copier's
    AnswersMap): a value is the most binding layer's, and `source(key)` says which layer that is."""

    def __init__(self, **layers: Mapping[str, Any]):
        unknown = set(layers) - {name.replace(" ", "_") for name in LAYERS}
        assert not unknown, unknown
        self.layers: dict[str, dict[str, Any]] = {
            name: {k: v for k, v in (layers.get(name.replace(" ", "_")) or {}).items() if v is not None}
            for name in LAYERS}
        self._chain = ChainMap(*(self.layers[name] for name in LAYERS))
        # A layer read from a file (answers.load_answers) knows the line of each key.
        self._files = {name: layers.get(name.replace(" ", "_")) for name in ("file", "last run")}

    def __getitem__(self, key: str) -> Any:
        return self._chain[key]

    def __iter__(self):
        return iter(self._chain)

    def __len__(self) -> int:
        return len(self._chain)

    def source(self, key: str) -> str | None:
        return next((name for name in LAYERS if key in self.layers[name]), None)

    def where(self, key: str) -> str:
        """Where a value came from, as an error names it: `FILE:LINE: --flag` for a value read from
        an answers file, else the flag that gives it."""
        layer = self.source(key)
        origin = self._files.get(layer) if layer else None
        return origin.where(key) if hasattr(origin, "where") else flag_of(key)

    @property
    def given(self) -> set[str]:
        """Answered by a flag: never asked."""
        return set(self.layers["flags"])

    def answer(self, key: str, value: Any) -> None:
        """What the person typed in the wizard."""
        self.layers["wizard"][key] = value

    def installed_version_wins(self) -> str | None:
        """The installed smtpd decides the grammar smtpd.conf is written in: the version the last run
        recorded gives way to it, so a host upgraded from 6.8 to 7.4 is not rendered for 6.8 again. A
        version chosen for this run (--smtpd-version, or an --answers file) still wins.
        Returns the note to show when a recorded version was replaced."""
        installed = self.layers["detected"].get("smtpd_version")
        if not installed or self.source("smtpd_version") != "last run":
            return None
        recorded = self.layers["last run"].pop("smtpd_version")
        if _major_minor(recorded) == _major_minor(installed):
            return None
        return f"smtpd_version: recorded {recorded} replaced by installed {installed}"


def _major_minor(value: Any) -> tuple[str, ...]:
    return tuple(str(value).strip().split(".")[:2])


def require_answers(answers: Mapping[str, Any]) -> None:
    """The unattended prompter: nobody to ask, so a required answer that is missing stops the run
    with one line naming its flag (certbot's non-interactive display)."""
    missing = [q for q in QUESTIONS if q.required and not answers.get(q.key)]
    if missing:
        raise MailsetupError(f"missing {', '.join(q.flag for q in missing)} ({missing[0].required})")


def can_sign(answers: Mapping[str, Any]) -> bool:
    """DKIM's default for a new set-up: on, in a sandbox or where smtpd's DKIM filter is installed
    (a smtpd.conf naming a missing filter keeps smtpd from starting), for smtpd 6.6 and later."""
    version = answers.get("smtpd_version")
    try:
        if version and model.parse_version(version) < (6, 6):
            return False
        layout = get_layout(str(answers.get("os") or detect_os() or "debian"))
    except MailsetupError:  # a bad value is judged, and named, with the other answers
        return True
    from pathlib import Path

    return bool(answers.get("root")) or Path(layout.dkim_filter).exists()


def check_given(answers: Answers) -> None:
    """Every value a flag or the --answers file gave, judged by its row's validator before anything
    is asked: a bad one stops the run in one line naming the flag, or the file and line."""
    for q in QUESTIONS:
        if q.validate is not None and answers.source(q.key) in ("flags", "file"):
            q.validate(answers[q.key], answers.where(q.key), answers)


def check_typed(question: Question, answers: Mapping[str, Any]) -> Callable[[str], bool | str] | None:
    """The question's validator as a prompt wants it: True, or the sentence that says why not."""
    if question.validate is None:
        return None
    check = question.validate

    def validate(text: str) -> bool | str:
        try:
            check(text, question.flag, answers)
        except MailsetupError as exc:
            return exc.message
        return True
    return validate
