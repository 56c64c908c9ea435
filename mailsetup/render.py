"""Renders smtpd.conf from the model through Jinja2 templates, strictly.

smtpd.conf has no escape for a newline, so every value reaches a template only through a filter
that quotes or rejects; a value that skipped the filters fails the render instead of being printed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from mailsetup import __version__
from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup

_BARE = re.compile(r"^[A-Za-z0-9:][A-Za-z0-9._:/%-]*$")
_QUOTABLE = re.compile(r'^[^"\\\x00-\x1f\x7f\s#$]+$')
_COMMENT = re.compile(r"^[^\x00-\x1f\x7f]*$")


class Filtered(str):
    """A value that went through one of the filters below; only these may be printed."""


def _bare(value: object) -> Filtered:
    text = str(value)
    if not _BARE.fullmatch(text):
        raise MailsetupError(f"refusing to render {text!r} into smtpd.conf: not a plain token")
    return Filtered(text)


def _quote(value: object) -> Filtered:
    text = str(value)
    if not _QUOTABLE.fullmatch(text):
        raise MailsetupError(f"refusing to render {text!r} into smtpd.conf: it cannot be quoted safely")
    return Filtered(f'"{text}"')


def _comment(value: object) -> Filtered:
    text = str(value)
    if not _COMMENT.fullmatch(text):
        raise MailsetupError(f"refusing to render {text!r} into a smtpd.conf comment")
    return Filtered(text)


_TOKEN = re.compile(r"^[A-Za-z0-9/._:-]+$")


def _command(tokens: object) -> Filtered:
    """A filter's command line, quoted: each word a plain token (no space, quote or shell character),
    so a domain or a path can never add a word or end the string."""
    words = [str(t) for t in tokens]  # type: ignore[union-attr]
    for word in words:
        if not _TOKEN.fullmatch(word):
            raise MailsetupError(f"refusing to render {word!r} into a smtpd.conf filter command")
    return Filtered('"' + " ".join(words) + '"')


_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")


def _path(value: object) -> Filtered:
    """An absolute path for dovecot.conf, which has no quoting we could rely on for one: plain
    characters only, so a path can never end a value or start another setting."""
    text = str(value)
    if not _PATH.fullmatch(text):
        raise MailsetupError(f"refusing to render {text!r} into dovecot.conf: not a plain absolute path")
    return Filtered(text)


def _finalize(value: object) -> object:
    if value is None or isinstance(value, Filtered):
        return "" if value is None else value
    raise MailsetupError(f"internal error: template printed {value!r} without a quoting filter")


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - smtpd.conf, not HTML; values are quoted by the filters
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
    )
    env.filters.update(bare=_bare, quote=_quote, comment=_comment, command=_command, path=_path)
    return env


def _load_template(name: str) -> str:
    try:
        return resources.files("mailsetup.templates").joinpath(name).read_text()
    except FileNotFoundError:
        raise MailsetupError(f"template {name} is missing from the installed package") from None


@dataclass(frozen=True)
class _ListenerView:
    address: str
    port: int
    tls_word: str
    auth_word: str
    signs: bool = False  # DKIM-signs what it takes (submission)


@dataclass(frozen=True)
class _FilterView:
    name: str
    command: list[str]


def _dkim_filters(setup: MailSetup, dkim_keys: list | None) -> list[_FilterView]:
    """One filter-dkimsign per signing key, RSA first (empty when DKIM is off)."""
    from mailsetup import dkim

    if not setup.dkim:
        return []
    if setup.smtpd_version < (6, 6):  # filters (proc-exec) came with 6.6
        raise MailsetupError(f"--dkim: smtpd {setup.smtpd_version[0]}.{setup.smtpd_version[1]} has no filters; "
                             "DKIM signing needs smtpd 6.6 or later")
    keys = dkim.signing(dkim_keys or [])
    if not keys:
        raise MailsetupError("internal error: DKIM is on but no key signs", exit_code=1)
    return [_FilterView(f"dkimsign_{k.algorithm}",
                        ["filter-dkimsign", *(["-a", k.signature_algorithm] if k.algorithm != "rsa" else []),
                         "-d", setup.domain, "-s", k.selector, "-k", str(k.path(setup.layout.dkim_dir))])
            for k in keys]


def _localhost_listener(setup: MailSetup) -> str | None:
    """`listen on localhost` unless a listener already takes port 25 on loopback (a wildcard, or
    loopback itself).

    Measured on 7.4: `listen on localhost` beside `listen on 0.0.0.0 port 25` passes `smtpd -n`
    but the daemon then dies with "listen: Address already in use".
    """
    covers_loopback = ("0.0.0.0", "::", "127.0.0.1", "::1", "lo", "lo0", "localhost")
    for listener in setup.listeners:
        if listener.port == 25 and listener.address in covers_loopback:
            return None
    return setup.layout.localhost_listener


def template_name(setup: MailSetup) -> str:
    return "smtpd.conf.j2" if setup.modern_grammar else "smtpd.conf.legacy.j2"


def render_smtpd_conf(setup: MailSetup, queue_key: str | None, aliases_format: str = "db",
                      relay_host: str | None = None, dkim_keys: list | None = None) -> str:
    """The smtpd.conf text for `setup`; `queue_key` is required when queue encryption is on.

    `aliases_format` is "db" (aliases.db, as makemap writes it) or "file" (the aliases file itself,
    for hosts where no Berkeley DB writer is available). `relay_host` (smtp://HOST:PORT) sends
    outbound mail there instead of to each domain's MX: the smoke test's sink.
    """
    if setup.queue.encryption and not queue_key:
        raise MailsetupError("internal error: queue encryption is on but no queue key was given")
    if relay_host and not setup.modern_grammar:
        raise MailsetupError(f"a relay host needs the grammar of smtpd 6.4 or later; this set-up is for "
                             f"{setup.smtpd_version[0]}.{setup.smtpd_version[1]}", exit_code=1)
    if setup.imap == "dovecot" and not setup.modern_grammar:
        raise MailsetupError("--imap dovecot: delivery by LMTP is written for smtpd 6.4 or later; this set-up is "
                             f"for {setup.smtpd_version[0]}.{setup.smtpd_version[1]}")
    listeners = [
        _ListenerView(
            address=listener.address,
            port=listener.port,
            tls_word="tls" if listener.tls == "starttls" else "tls-require",
            auth_word="auth-optional" if listener.auth == "optional" else "auth",
            signs=setup.dkim and listener.name == "submission",
        )
        for listener in setup.listeners
    ]
    dkim_filters = _dkim_filters(setup, dkim_keys)
    major, minor = setup.smtpd_version
    context = {
        "version": __version__,
        "smtpd_version": f"{major}.{minor}",
        "os_title": setup.layout.title,
        "hostname": setup.hostname,
        "domain": setup.domain,
        "cert": setup.tls.cert,
        "key": setup.tls.key,
        "compression": setup.queue.compression,
        "encryption": setup.queue.encryption,
        "queue_key": queue_key,
        "aliases_table": (
            f"db:{setup.layout.aliases_db}" if aliases_format == "db" else f"file:{setup.layout.aliases}"
        ),
        "max_message_size": setup.max_message_size,
        "creds_table": f"file:{setup.layout.credentials}",
        "localhost_listener": _localhost_listener(setup),
        "listeners": listeners,
        "maildir": setup.maildir_template,
        "lmtp": setup.layout.dovecot_lmtp if setup.imap == "dovecot" else None,
        "relay_host": relay_host,
        "dkim_filters": dkim_filters,
        "dkim_chain": Filtered(", ".join(_quote(f.name) for f in dkim_filters)),
        "dkim_user": setup.layout.dkim_user,
        # `relay tls`: STARTTLS required and the MX's certificate verified (plain `relay` never verifies
        # it). Not toward the smoke test's sink (relay_host), which speaks plain SMTP on loopback.
        "relay_tls": setup.relay_tls == "verify" and not relay_host,
        "backup_domains": Filtered(", ".join(_quote(d) for d in setup.backup_for)),
    }
    text = _environment().get_template(template_name(setup)).render(**context)
    # Collapse the blank lines that skipped blocks leave behind.
    return re.sub(r"\n{3,}", "\n\n", text)


def dovecot_template_name(setup: MailSetup) -> str:
    """One template per grammar: 2.3 (Debian 12) and 2.4 (Debian 13), whose settings were renamed."""
    return "dovecot.conf.2.4.j2" if setup.dovecot_version >= (2, 4) else "dovecot.conf.2.3.j2"


def render_dovecot_conf(setup: MailSetup, imaps_port: int = 993, loopback: dict | None = None) -> str:
    """dovecot.conf for `--imap dovecot`: IMAPS with smtpd's certificate pair, the logins of the
    credentials table (as the passwd-file `Layout.imap_users`), the Maildir smtpd delivered to.
    `loopback` (base_dir, users, uid, gid, home) makes the smoke test's copy: on 127.0.0.1 only, with
    its own sockets and one throw-away login that reads one Maildir."""
    context = {
        "version": __version__,
        "os_title": setup.layout.title,
        "hostname": setup.hostname,
        "cert": setup.tls.cert,
        "key": setup.tls.key,
        "users": loopback["users"] if loopback else setup.layout.imap_users,
        "lmtp": setup.layout.dovecot_lmtp,
        "imaps_port": imaps_port,
        # In a sandbox the homes are under --root, as smtpd.conf's maildir says; on a host, ~/Maildir.
        "home_dir": setup.layout.home_dir if setup.root is not None and not loopback else None,
        "loopback": loopback,
    }
    text = _environment().get_template(dovecot_template_name(setup)).render(**context)
    return re.sub(r"\n{3,}", "\n\n", text)


ANSWERS_MODE = 0o644


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 32 for c in escaped):
        raise MailsetupError(f"answers: {text!r} has a control character")
    return f'"{escaped}"'


def render_answers(answers: dict[str, object]) -> bytes:
    """answers.toml: the recorded choices, one `key = value` line each, in the order given."""
    lines = ["# mailsetup answers: what `mailsetup init` chose (no secrets). A re-run starts from here.\n"]
    for key, value in answers.items():
        if value is None or value == []:
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines).encode()
