"""The guided flow: questionary prompts that fill in only the answers no flag, answers file or earlier
run gave. It collects answers and never writes a file; each question names its flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailsetup.errors import MailsetupError
from mailsetup.model import KEY_TYPES, validate_dns_name
from mailsetup.platforms import LAYOUTS, detect_os


def _ask(question) -> Any:
    # unsafe_ask raises KeyboardInterrupt on Ctrl-C (ask() would print and return None).
    return question.unsafe_ask()


def _validator(check: Callable[[str], object]) -> Callable[[str], bool | str]:
    def validate(text: str) -> bool | str:
        try:
            check(text)
        except MailsetupError as exc:
            return exc.message
        return True
    return validate


def ask_missing(answers: dict[str, Any], given: set[str], change_all: bool = False) -> dict[str, Any]:
    """Ask what is not in `given` (flags) and not already answered; with change_all, ask every
    question not given by a flag, offering the current answer as the default."""
    import questionary

    out = dict(answers)

    def wanted(key: str) -> bool:
        return key not in given and (change_all or out.get(key) in (None, ""))

    if wanted("domain"):
        out["domain"] = _ask(questionary.text(
            "Mail domain (--domain):", default=str(out.get("domain") or ""),
            validate=_validator(lambda t: validate_dns_name(t, "--domain")),
        ))
    if wanted("hostname"):
        from mailsetup.model import default_hostname

        domain = validate_dns_name(out["domain"], "--domain")
        out["hostname"] = _ask(questionary.text(
            "Mail host name, its FQDN (--hostname):", default=str(out.get("hostname") or default_hostname(domain)),
            validate=_validator(lambda t: validate_dns_name(t, "--hostname")),
        ))
    if wanted("os"):
        detected = out.get("os") or detect_os() or "debian"
        choices = [questionary.Choice(f"{name} ({LAYOUTS[name].title})", value=name) for name in LAYOUTS]
        out["os"] = _ask(questionary.select(
            "OS layout (--os):", choices=choices, default=next(c for c in choices if c.value == detected),
        ))
    if wanted("tls") and not (out.get("cert") and out.get("key")):
        out["tls"] = _ask(questionary.select(
            "TLS certificate (--tls):",
            choices=[
                questionary.Choice("new self-signed certificate", value="self-signed"),
                questionary.Choice("my own certificate and key (e.g. Let's Encrypt)", value="existing"),
                questionary.Choice("a key and a CSR to send to a CA", value="csr"),
            ],
            default=None,
        ))
    if out.get("tls") == "existing":
        for key, label in (("cert", "Certificate file (--cert):"), ("key", "Its private key file (--key):")):
            if key not in given and not out.get(key):
                out[key] = _ask(questionary.path(label))
    if wanted("key_type") and out.get("tls", "self-signed") != "existing":
        out["key_type"] = _ask(questionary.select(
            "Key type (--key-type):", choices=list(KEY_TYPES), default=out.get("key_type") or "rsa-2048",
        ))
    if wanted("queue_compression"):
        out["queue_compression"] = _ask(questionary.confirm(
            "Compress the queue (--queue-compression)?", default=out.get("queue_compression", True)))
    if wanted("queue_encryption"):
        out["queue_encryption"] = _ask(questionary.confirm(
            "Encrypt the queue (--queue-encryption)?", default=out.get("queue_encryption", True)))
    if wanted("aliases") and "admin" not in given:
        if _ask(questionary.confirm("Import an existing aliases file (--aliases)?", default=False)):
            out["aliases"] = _ask(questionary.path("Aliases file (--aliases):"))
    if wanted("admin") and not out.get("aliases"):
        from mailsetup.model import validate_admin

        out["admin"] = _ask(questionary.text(
            "Who reads root's, postmaster's and abuse's mail? A local user or an address (--admin):",
            default=str(out.get("admin") or out.get("user") or ""),
            validate=_validator(lambda t: validate_admin(t, real_host=not out.get("root"))),
        ))
    if "user" not in given and not out.get("user") and not out.get("_users_exist"):
        from mailsetup.credentials import validate_username

        name = _ask(questionary.text(
            "First mail user for submission, blank for none (--user):", default=str(out.get("admin") or ""),
            validate=lambda t: True if not t else _validator(lambda v: validate_username(v, "--user"))(t),
        ))
        if name:
            out["user"] = name
            out["_password"] = ask_password(name)
    if "smoke" not in given:
        out["smoke"] = _ask(questionary.confirm("Run the smoke test when done?", default=True))
    return out


def ask_password(user: str) -> str:
    import questionary

    from mailsetup.credentials import check_password_rules

    while True:
        first = _ask(questionary.password(
            f"Password for {user} (hidden):", validate=_validator(check_password_rules)))
        again = _ask(questionary.password("Again:"))
        if first == again:
            return first
        questionary.print("The two passwords differ; once more.", style="fg:ansired")


RERUN_CHOICES = {
    "keep": "keep everything (no key or certificate changes)",
    "rotate-cert": "rotate the certificate (new key and certificate)",
    "rotate-queue-key": "rotate the queue encryption key",
    "rotate-all": "rotate both",
    "change": "change settings",
}


def ask_rerun_action() -> str:
    import questionary

    choices = [questionary.Choice(text, value=value) for value, text in RERUN_CHOICES.items()]
    return _ask(questionary.select("This host is already set up. What now?", choices=choices, default=choices[0]))


def confirm(message: str, default: bool = False) -> bool:
    import questionary

    return bool(_ask(questionary.confirm(message, default=default)))
