"""What `init` asks, as data: one table of questions (key, prompt, flag, validator, default), read
by both prompters (the wizard and the unattended one that names the missing flag), and the
answers, kept in layers so that every value knows where it came from.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailsetup.errors import MailsetupError
from mailsetup.model import KEY_TYPES, default_hostname, validate_admin, validate_dns_name, validate_key_type
from mailsetup.platforms import LAYOUTS, detect_os


def _username_or_blank(value: Any, answers: Mapping[str, Any]) -> str:
    from mailsetup.credentials import validate_username

    return validate_username(value, "--user") if value else ""


@dataclass(frozen=True)
class Question:
    key: str  # the answers key; the flag is --KEY with '-' for '_'
    prompt: str
    flag: str
    kind: str  # text | select | confirm | path
    validate: Callable[[Any, Mapping[str, Any]], Any] | None = None  # the one check of this value
    default: Callable[[Mapping[str, Any]], Any] = lambda a: None
    choices: Callable[[], list[tuple[str, str]]] | None = None  # (value, label)
    when: Callable[[Answers], bool] = lambda a: True  # asked only when it applies
    reask: bool = True  # asked again when the user changes the settings of a re-run
    required: str = ""  # what to say when an unattended run has no answer (empty: optional)
    then_password: bool = False  # a name answered here is followed by its password, kept apart
    ask_first: str = ""  # a yes/no asked before the question itself; no means no answer


def _current(key: str, fallback: Any = None) -> Callable[[Mapping[str, Any]], Any]:
    return lambda a: a.get(key) if a.get(key) not in (None, "") else fallback


TLS_CHOICES = [
    ("self-signed", "new self-signed certificate"),
    ("existing", "my own certificate and key (e.g. Let's Encrypt)"),
    ("csr", "a key and a CSR to send to a CA"),
]

QUESTIONS: tuple[Question, ...] = (
    Question("domain", "Mail domain (--domain):", "--domain", "text",
             validate=lambda v, a: validate_dns_name(v, "--domain"), default=_current("domain", ""),
             required="the mail domain, e.g. --domain example.org"),
    Question("hostname", "Mail host name, its FQDN (--hostname):", "--hostname", "text",
             validate=lambda v, a: validate_dns_name(v, "--hostname"),
             default=lambda a: a.get("hostname") or default_hostname(validate_dns_name(a["domain"], "--domain"))),
    Question("os", "OS layout (--os):", "--os", "select",
             default=lambda a: a.get("os") or detect_os() or "debian",
             choices=lambda: [(name, f"{name} ({LAYOUTS[name].title})") for name in LAYOUTS]),
    Question("tls", "TLS certificate (--tls):", "--tls", "select", choices=lambda: TLS_CHOICES,
             when=lambda a: not (a.get("cert") and a.get("key"))),
    Question("cert", "Certificate file (--cert):", "--cert", "path", reask=False,
             when=lambda a: a.get("tls") == "existing"),
    Question("key", "Its private key file (--key):", "--key", "path", reask=False,
             when=lambda a: a.get("tls") == "existing"),
    Question("key_type", "Key type (--key-type):", "--key-type", "select",
             validate=lambda v, a: validate_key_type(v), default=_current("key_type", "rsa-2048"),
             choices=lambda: [(k, k) for k in KEY_TYPES], when=lambda a: a.get("tls", "self-signed") != "existing"),
    Question("queue_compression", "Compress the queue (--queue-compression)?", "--queue-compression", "confirm",
             default=lambda a: a.get("queue_compression", True)),
    Question("queue_encryption", "Encrypt the queue (--queue-encryption)?", "--queue-encryption", "confirm",
             default=lambda a: a.get("queue_encryption", True)),
    Question("aliases", "Aliases file (--aliases):", "--aliases", "path",
             ask_first="Import an existing aliases file (--aliases)?",
             when=lambda a: "admin" not in a.given),  # --admin given: the default aliases, no import
    Question("admin", "Who reads root's, postmaster's and abuse's mail? A local user or an address (--admin):",
             "--admin", "text", validate=lambda v, a: validate_admin(v, real_host=not a.get("root")),
             default=lambda a: str(a.get("admin") or a.get("user") or ""), when=lambda a: not a.get("aliases")),
    Question("user", "First mail user for submission, blank for none (--user):", "--user", "text",
             validate=_username_or_blank, default=lambda a: str(a.get("admin") or ""), then_password=True),
    Question("smoke", "Run the smoke test when done (--smoke)?", "--smoke", "confirm", default=lambda a: True),
)

BY_KEY = {q.key: q for q in QUESTIONS}

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

    def __getitem__(self, key: str) -> Any:
        return self._chain[key]

    def __iter__(self):
        return iter(self._chain)

    def __len__(self) -> int:
        return len(self._chain)

    def source(self, key: str) -> str | None:
        return next((name for name in LAYERS if key in self.layers[name]), None)

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


def check_typed(question: Question, answers: Mapping[str, Any]) -> Callable[[str], bool | str] | None:
    """The question's validator as a prompt wants it: True, or the sentence that says why not."""
    if question.validate is None:
        return None
    check = question.validate

    def validate(text: str) -> bool | str:
        try:
            check(text, answers)
        except MailsetupError as exc:
            return exc.message
        return True
    return validate
