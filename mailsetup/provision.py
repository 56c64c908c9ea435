"""The init pipeline: from a MailSetup to a Plan of every file (nothing touched), then apply + check.

Existing keys, certificates and queue keys are kept on a re-run; rotation is an explicit choice.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsetup import aliases as aliases_mod
from mailsetup import credentials, queuekey
from mailsetup.errors import MailsetupError
from mailsetup.files import read_current, read_input
from mailsetup.model import MailSetup, validate_admin
from mailsetup.opensmtpd import (
    open_relay_rules,
)
from mailsetup.plan import FileChange, Plan
from mailsetup.render import ANSWERS_MODE, render_answers, render_smtpd_conf

CONF_MODE = 0o600  # it carries the queue key, and smtpd reads it with no secrecy check
DOVECOT_CONF_MODE = 0o644  # no secret in it (the key is named, not held); Dovecot's processes read it
QUEUE_KEY_REDACT = queuekey.QUEUE_KEY_LINE + r"(?P<secret>(?!stdin\b)[^\s-]\S*)"


@dataclass
class Provisioning:
    setup: MailSetup
    plan: Plan
    aliases_format: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    key_type_in_use: str | None = None  # of the certificate that will be on disk
    dkim_keys: list = field(default_factory=list)  # dkim.DkimKey: every key the state file will list
    dovecot_check: Any = None  # apply.ConfigVerdict of `doveconf -n` once written (--imap dovecot)

    def files_report(self) -> list[dict[str, str]]:
        """The plan's files as --json reports them."""
        return [{"path": str(c.path), "mode": f"{c.mode:04o}", "state": c.state(), "reason": c.reason}
                for c in self.plan.changes]


def default_aliases_text(setup: MailSetup, admin: str | None) -> str:
    root_line = f"root: {admin}\n" if admin else "# root: you@example.org   (who reads root's mail)\n"
    return (
        f"# {setup.layout.aliases}: local aliases, aliases(5) format, written by mailsetup.\n"
        "# After editing run `mailsetup aliases` (or makemap) and `smtpctl update table aliases`.\n"
        f"{root_line}"
        "postmaster: root\n"
        "abuse: root\n"
    )


def _aliases_source(setup: MailSetup, admin: str | None) -> tuple[str, str]:
    """(text, name for messages) of the aliases file to install."""
    if setup.aliases_import is not None:
        path = setup.aliases_import
        try:
            data = read_input(path)
        except OSError as exc:
            raise MailsetupError(f"--aliases: cannot read {path}: {exc.strerror}") from None
        try:
            return data.decode("utf-8"), str(path)
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise MailsetupError(f"{path}:{line}: not UTF-8 text") from None
    current = Path(setup.layout.aliases)
    if current.exists():
        try:
            data = read_input(current)
        except OSError as exc:
            raise MailsetupError(f"{current}: cannot read the existing aliases file: {exc.strerror}") from None
        try:
            return data.decode("utf-8"), str(current)
        except UnicodeDecodeError as exc:  # where, never which byte: the file is not ours to quote
            line = data[: exc.start].count(b"\n") + 1
            raise MailsetupError(f"{current}:{line}: not UTF-8 text") from None
    return default_aliases_text(setup, admin), "(default aliases)"


def _plan_tls(setup: MailSetup, prov: Provisioning, rotate: bool, key_type_chosen: bool) -> None:
    from mailsetup import pki

    cert_path, key_path = Path(setup.tls.cert), Path(setup.tls.key)
    if setup.tls.source == "acme":
        _plan_acme(setup, prov, rotate)
        return
    if setup.tls.source == "existing":
        info = pki.check_existing_pair(cert_path, key_path, setup.hostname)
        prov.key_type_in_use = info.key_type
        prov.notes.append(f"using your certificate {cert_path} (expires {info.not_after:%Y-%m-%d})")
        if rotate:
            prov.warnings.append("--rotate-cert: the certificate is your own (--cert); renew it where it came from")
        return
    if cert_path.exists() and key_path.exists() and not rotate:
        try:
            info = pki.check_existing_pair(cert_path, key_path, setup.hostname)
        except MailsetupError as exc:
            prov.warnings.append(f"replacing the existing certificate: {exc.message}")
        else:
            # A re-run that accepts every default changes no key: only a key type asked for replaces it.
            if info.key_type == setup.tls.key_type or not key_type_chosen:
                prov.key_type_in_use = info.key_type
                prov.notes.append(
                    f"kept the existing certificate {cert_path} ({info.key_type}, "
                    f"expires {info.not_after:%Y-%m-%d})"
                )
                return
            prov.notes.append(f"new key and certificate: the key type changes from {info.key_type} "
                              f"to {setup.tls.key_type}")
    key = pki.generate_key(setup.tls.key_type)
    prov.key_type_in_use = setup.tls.key_type
    prov.plan.add(
        FileChange(key_path, pki.key_pem(key), pki.KEY_MODE, f"TLS private key ({setup.tls.key_type})",
                   secret=True)
    )
    prov.plan.add(
        FileChange(cert_path, pki.self_signed_cert(key, setup.hostname, setup.tls.days), pki.CERT_MODE,
                   f"self-signed certificate for {setup.hostname}, {setup.tls.days} days"
                   + (" (until the CA signs the CSR)" if setup.tls.source == "csr" else ""),
                   summary=f"a new self-signed certificate, CN and SAN {setup.hostname}")
    )
    if setup.tls.source == "csr":
        prov.plan.add(FileChange(Path(setup.tls.csr), pki.csr(key, setup.hostname), 0o644,
                                 "certificate signing request: send it to your CA"))


def _plan_acme(setup: MailSetup, prov: Provisioning, rotate: bool) -> None:
    """certbot's certificate: obtained by init before the plan is applied (acme.obtain), renewed by
    certbot, whose deploy hook (ours, in the plan) restarts smtpd."""
    from mailsetup import acme, pki

    prov.plan.add(acme.hook_change(setup))
    if not acme.have_certificate(setup) or rotate:
        prov.key_type_in_use = setup.tls.key_type
        prov.notes.append(acme.plan_note(setup))
        return
    try:
        info = pki.check_existing_pair(Path(setup.tls.cert), Path(setup.tls.key), setup.hostname)
    except MailsetupError as exc:  # it names --cert/--key, which an acme set-up never gave
        why = exc.message.split(": ", 1)[-1]
        raise MailsetupError(f"--tls acme: certbot's certificate does not check out ({why}); ask certbot for a "
                             "new one: mailsetup init --rotate-cert", exit_code=1) from None
    prov.key_type_in_use = info.key_type
    prov.notes.append(f"kept certbot's certificate {setup.tls.cert} (expires {info.not_after:%Y-%m-%d}); "
                      "certbot renews it")


def _plan_queue_key(setup: MailSetup, prov: Provisioning, rotate: bool, imported: str | None = None) -> str | None:
    if not setup.queue.encryption:
        return None
    path = Path(setup.queue.key_file)
    if path.exists() and not rotate:
        key = queuekey.read_queue_key(path)
        prov.notes.append(f"kept the existing queue key {path}")
        return key
    key = imported if imported and not rotate else queuekey.generate_queue_key()
    if key == imported:
        prov.notes.append(f"kept the imported smtpd.conf's queue key (now in {path})")
    prov.plan.add(
        FileChange(path, queuekey.queue_key_file_bytes(key), queuekey.KEY_MODE,
                   "queue encryption key (AES-256-GCM)" + (", rotated" if rotate and path.exists() else ""),
                   secret=True)
    )
    return key


def _plan_dkim(setup: MailSetup, prov: Provisioning, rotate: bool = False, switch: bool = False,
               today: dt.date | None = None) -> None:
    """The DKIM keys moved on by one run (dkim.next_state): a first pair, a pending pair for a
    rotation, the switch to it once DNS serves its records. A key file is never removed here."""
    from mailsetup import dkim

    state_path = Path(setup.layout.dkim_state)
    keys = dkim.read_state(state_path)
    prov.dkim_keys = keys
    if not setup.dkim:
        return
    if setup.root is None and not Path(setup.layout.dkim_filter).exists():
        raise MailsetupError(f"--dkim: {setup.layout.dkim_filter} is missing, so smtpd could not sign",
                             hint="install it (Debian: apt-get install opensmtpd-filter-dkimsign), or pass --no-dkim")
    folder = setup.layout.dkim_dir
    step = dkim.next_state(keys, rotate=rotate, switch=switch, today=today or dt.date.today(),
                           taken=_files_in(Path(folder)))
    for key in step.keys:  # each key kept must still be there, readable and of its kind
        if key not in step.new and key.stage != "retiring":
            dkim.public_value(dkim.read_key(folder, key), key.algorithm, str(key.path(folder)))
    mode, owner = dkim.key_access(setup.layout.dkim_user)
    from mailsetup.dns import Record

    for key in step.new:
        pem = dkim.generate_key(key.algorithm)
        prov.plan.add(FileChange(Path(key.path(folder)), pem, mode,
                                 f"DKIM {key.algorithm} key, selector {key.selector} ({key.stage})",
                                 secret=True, owner=owner))
        # its record, to publish (a pending key signs only once DNS serves it)
        prov.notes.append("DKIM record: " + Record(key.record_name(setup.domain) + ".", "TXT",
                                                   dkim.record_text(pem, key.algorithm), "").zone_line())
    prov.dkim_keys = step.keys
    prov.plan.add(FileChange(state_path, dkim.render_state(step.keys), dkim.STATE_MODE,
                             "DKIM keys and their stages (no secrets)"))
    prov.notes.extend(step.notes or ["kept the DKIM keys " + ", ".join(k.selector for k in dkim.signing(step.keys))])


def _files_in(folder: Path) -> set[str]:
    """The selectors of the key files already in the DKIM folder (a new key never reuses a name)."""
    try:
        return {name[:-4] for name in os.listdir(folder) if name.endswith(".key")}
    except OSError:
        return set()


def _plan_mta_sts(setup: MailSetup, prov: Provisioning) -> None:
    """The MTA-STS policy file, where a web server can serve it; a changed one needs its new id in DNS."""
    from mailsetup import dns

    change = FileChange(Path(setup.layout.mta_sts_policy), dns.mta_sts_policy(setup).encode(), dns.MTA_STS_POLICY_MODE,
                        f"MTA-STS policy (mode {setup.mta_sts_mode}): serve it at {dns.mta_sts_url(setup)}")
    try:
        read_current(change.path)  # what state() judges "replaced" on an OSError, apply would fail on
        state = change.state()
    except (MailsetupError, OSError) as exc:
        # A web root another user owns (a chown -R www-data /var/www) is theirs, and one in another
        # shape (a file where its folder goes) is not ours to fix: the mail set-up goes on without it.
        why = exc.message if isinstance(exc, MailsetupError) else f"{exc.filename}: {exc.strerror}"
        prov.warnings.append(f"MTA-STS policy not written: {why}; its text is in `mailsetup dns --json` "
                             "(mta_sts.policy), to put where your web server serves it")
        return
    prov.plan.add(change)
    if setup.mta_sts_mode == "enforce" and setup.tls.source in ("self-signed", "csr"):
        prov.warnings.append(f"--mta-sts-mode enforce with a self-signed certificate: senders that honour MTA-STS "
                             f"will refuse to deliver to {setup.hostname}; give it a CA-trusted certificate first "
                             "(--tls existing)")
    if state == "replaced":
        prov.notes.append("the MTA-STS policy changed: publish its new _mta-sts id (mailsetup dns) so senders "
                          "fetch it again")


def _with_admin(text: str, entries: list, admin: str, prov: Provisioning) -> str:
    """Make root's mail go to `admin`: change an existing `root:` entry, or add one."""
    root = next((e for e in entries if e.name == "root"), None)
    if root is None:
        prov.notes.append(f"root's mail goes to {admin}")
        return text + ("" if text.endswith("\n") or not text else "\n") + f"root: {admin}\n"
    if root.value.strip() == admin:
        return text
    lines = text.splitlines(keepends=True)
    line = lines[root.line - 1]
    if not re.match(r"(?i)^\s*root\s*:", line) or line.rstrip().endswith("\\"):
        prov.warnings.append(f"--admin {admin}: root's alias spans lines; left as it is ({root.value.strip()})")
        return text
    lines[root.line - 1] = f"root: {admin}\n"
    prov.notes.append(f"root's mail now goes to {admin} (was {root.value.strip()})")
    return "".join(lines)


def _plan_aliases(setup: MailSetup, prov: Provisioning, admin: str | None) -> None:
    text, source = _aliases_source(setup, admin)
    # the target smtpd's makemap rules: 7.5 and later read the same file differently
    entries = aliases_mod.parse_aliases(text, source, setup.smtpd_version)
    if admin:
        text = _with_admin(text, entries, admin, prov)
        entries = aliases_mod.parse_aliases(text, source, setup.smtpd_version)
    missing = aliases_mod.missing_rfc2142(entries)
    if missing:
        prov.warnings.append(
            f"{source} has no {' or '.join(missing)} alias (RFC 2142); added '{missing[0]}: root'"
            + (" and the rest" if len(missing) > 1 else "")
        )
        if not text.endswith("\n") and text:
            text += "\n"
        text += "# added by mailsetup: RFC 2142 wants these to reach a person\n"
        text += "".join(f"{name}: root\n" for name in missing)
        entries = aliases_mod.parse_aliases(text, source, setup.smtpd_version)
    if not any(e.name == "root" for e in entries):
        raise MailsetupError(
            "missing --admin: nobody would read root's mail (smtpd never delivers to root, so mail to "
            "root, postmaster and abuse would bounce); pass --admin USER or add 'root: USER' to the aliases"
        )
    aliases_path = Path(setup.layout.aliases)
    prov.plan.add(FileChange(aliases_path, text.encode(), aliases_mod.ALIASES_MODE,
                             f"aliases(5), {len(entries)} entries"))
    backend = aliases_mod.db_backend()
    if backend in ("bdb", "dbm"):
        db = aliases_mod.build_aliases_db(entries)
    elif backend == "makemap":
        prov.warnings.append("this Python's dbm cannot write Berkeley DB; built aliases.db with makemap")
        db = aliases_mod.build_aliases_db_with_makemap(text, entries)
    else:
        prov.aliases_format = "file"
        prov.warnings.append(
            "no Berkeley DB writer here (Python dbm or makemap): smtpd.conf uses a file: aliases table"
        )
        return
    wanted = {e.name: e.value for e in entries}
    prov.plan.add(FileChange(Path(setup.layout.aliases_db), db, aliases_mod.ALIASES_MODE,
                             "aliases.db (Berkeley DB hash, as makemap writes it)",
                             same_meaning=lambda path: aliases_mod.read_aliases_db(path) == wanted))


def _plan_credentials(setup: MailSetup, prov: Provisioning, new_user: tuple[str, str] | None,
                      imported: list | None = None) -> None:
    """The credentials table: created empty on first run (smtpd -n needs the file), plus a first user.
    A re-run keeps its users and gives it the owner and mode smtpd needs to re-read it. `imported`:
    the logins of an imported smtpd.conf's auth table, added with their hashes where the name is new."""
    path = Path(setup.layout.credentials)
    users = credentials.read_credentials(path)
    content = credentials.render_credentials(users)
    present = {u.user for u in users}
    added = [c for c in imported or [] if c.user not in present]
    if added:
        users = users + added
        content = credentials.render_credentials(users)
        prov.notes.append(f"carried over {len(added)} login(s) from the imported auth table")
    if new_user is None and not added:
        if path.exists():
            prov.notes.append(f"{len(users)} mail user(s) in {path}")
            content = path.read_bytes()  # as it is, comments and all: only its owner and mode may change
    elif new_user is not None:
        users = credentials.with_user(users, *new_user)
        content = credentials.render_credentials(users)
    mode, owner = credentials.table_access(setup.layout.smtpd_user)
    prov.plan.add(FileChange(path, content, mode,
                             f"credentials table for AUTH, {len(users)} user(s)", secret=True, owner=owner))
    if setup.imap == "dovecot":
        prov.plan.add(imap_users_change(setup, users))


def imap_users_change(setup: MailSetup, users: list) -> FileChange:
    """Dovecot's passwd-file: the same logins and bcrypt hashes as the credentials table, readable by
    root and Dovecot's auth group only."""
    from mailsetup import dovecot

    mode, owner = dovecot.imap_users_access(setup.layout.dovecot_user)
    return FileChange(Path(setup.layout.imap_users), dovecot.render_imap_users(users), mode,
                      f"IMAP logins for Dovecot (passwd-file), {len(users)} user(s)", secret=True, owner=owner)


def _plan_dovecot(setup: MailSetup, prov: Provisioning) -> None:
    """--imap dovecot: dovecot.conf from the same model (doveconf -n judges it once written)."""
    if setup.imap != "dovecot":
        _plan_imap_off(setup, prov)
        return
    from mailsetup.render import render_dovecot_conf

    prov.plan.add(FileChange(Path(setup.layout.dovecot_conf), render_dovecot_conf(setup).encode(), DOVECOT_CONF_MODE,
                             f"dovecot.conf (Dovecot {setup.dovecot_version[0]}.{setup.dovecot_version[1]}: "
                             "IMAPS on 993, LMTP for smtpd)"))
    _plan_autoconfig(setup, prov)


def _plan_imap_off(setup: MailSetup, prov: Provisioning) -> None:
    """IMAP turned off on a set-up whose last run served it: Dovecot's logins are emptied, so no one
    keeps logging in with a password `mailsetup user remove` no longer reaches. dovecot.conf and the
    autoconfig file are the admin's to retire with the service (named in a warning)."""
    from mailsetup.answers import load_answers

    users = Path(setup.layout.imap_users)
    try:
        if load_answers(Path(setup.layout.answers), ours=True).get("imap") != "dovecot" or not users.exists():
            return
    except MailsetupError:
        return  # no last run (or one gather() already refused)
    prov.plan.add(imap_users_change(setup, []))
    prov.warnings.append(
        f"IMAP is off: {users} is emptied, so no IMAP login works any more; stop Dovecot "
        f"(systemctl disable --now dovecot) and remove {setup.layout.dovecot_conf} and "
        f"{setup.layout.autoconfig_file} (which still offers IMAPS to mail clients)")


def _plan_autoconfig(setup: MailSetup, prov: Provisioning) -> None:
    """Thunderbird's autoconfig file under the web root, like the MTA-STS policy (and, like it, left
    out with a warning where the web root is not ours to write)."""
    from mailsetup import dns

    change = FileChange(Path(setup.layout.autoconfig_file), dns.autoconfig_xml(setup).encode(), dns.AUTOCONFIG_MODE,
                        f"Thunderbird autoconfig: serve it at {dns.autoconfig_url(setup)}")
    try:
        read_current(change.path)
        change.state()
    except (MailsetupError, OSError) as exc:
        why = exc.message if isinstance(exc, MailsetupError) else f"{exc.filename}: {exc.strerror}"
        prov.warnings.append(f"Thunderbird autoconfig not written: {why}")
        return
    prov.plan.add(change)


def recorded_answers(setup: MailSetup, key_type: str | None = None) -> dict:
    """What the answers file keeps, read from the model: the choices made (a default left out stays a
    default), the names that locate the set-up always, never a secret, never the sandbox root."""
    existing = setup.tls.source == "existing"
    values = {
        "domain": setup.domain, "hostname": setup.hostname, "os": setup.os_name, "admin": setup.admin,
        "tls": setup.tls.source, "key_type": key_type or setup.tls.key_type, "days": setup.tls.days,
        "cert": str(setup.tls.cert) if existing else None,  # absolute, as smtpd.conf names them
        "key": str(setup.tls.key) if existing else None,
        "listen": list(dict.fromkeys(lst.address for lst in setup.listeners)),
        "smtp_port": next(lst.port for lst in setup.listeners if lst.name == "smtp"),
        "submission_port": next(lst.port for lst in setup.listeners if lst.name == "submission"),
        "smtpd_version": f"{setup.smtpd_version[0]}.{setup.smtpd_version[1]}",
        "queue_compression": setup.queue.compression, "queue_encryption": setup.queue.encryption,
        "max_message_size": setup.max_message_size, "keep_backups": setup.keep_backups, "dkim": setup.dkim,
        "mta_sts_mode": setup.mta_sts_mode, "relay_tls": setup.relay_tls,
        "backup_mx": list(setup.backup_mx), "backup_for": list(setup.backup_for), "imap": setup.imap,
        "dovecot_version": (f"{setup.dovecot_version[0]}.{setup.dovecot_version[1]}" if setup.imap == "dovecot"
                            else None),
        **_acme_answers(setup),
    }
    always = {"domain", "hostname", "os", "admin", "key_type", "cert", "key", "smtpd_version", "imap",
              "dovecot_version"}
    return {k: v for k, v in values.items() if v is not None and (k in always or k in setup.answered)}


def _acme_answers(setup: MailSetup) -> dict:
    acme = setup.tls.acme
    if acme is None:
        return {}
    return {"acme_server": acme.server, "acme_email": acme.email,
            "webroot": str(acme.webroot) if acme.webroot else None, "http_01_port": acme.http_port,
            "reload_command": acme.reload}


def build_plan(setup: MailSetup, rotate_cert: bool = False, rotate_queue_key: bool = False,
               new_user: tuple[str, str] | None = None, rotate_dkim: bool = False,
               dkim_switch: bool = False, queue_key: str | None = None,
               logins: list | None = None) -> Provisioning:
    """Every file init would write, in memory. Nothing on disk changes.

    `new_user` is (name, bcrypt hash) of a login to add; `queue_key` the key an imported smtpd.conf
    used, kept where there is no queue key file yet (mail queued under it stays readable).
    """
    if setup.admin is not None and setup.root is None:  # before anything is generated or written
        validate_admin(setup.admin, real_host=True)  # smtpd delivers to a person's account only
    prov = Provisioning(setup=setup, plan=Plan(), aliases_format="db")
    _plan_tls(setup, prov, rotate_cert, key_type_chosen="key_type" in setup.answered)
    queue_key = _plan_queue_key(setup, prov, rotate_queue_key, queue_key)
    _plan_aliases(setup, prov, setup.admin)
    _plan_credentials(setup, prov, new_user, logins)
    _plan_dkim(setup, prov, rotate_dkim, dkim_switch)
    _plan_mta_sts(setup, prov)
    _plan_dovecot(setup, prov)
    conf = render_smtpd_conf(setup, queue_key, prov.aliases_format, dkim_keys=prov.dkim_keys)
    findings = open_relay_rules(conf)
    if findings:  # the template cannot produce one; this guards the template itself
        f = findings[0]
        raise MailsetupError(f"internal error: rendered smtpd.conf line {f.line} {f.why}", exit_code=1)
    prov.plan.add(FileChange(Path(setup.layout.smtpd_conf), conf.encode(), CONF_MODE,
                             "smtpd.conf", redact=(QUEUE_KEY_REDACT,)))
    answers = recorded_answers(setup, prov.key_type_in_use)
    prov.plan.add(FileChange(Path(setup.layout.answers), render_answers(answers),
                             ANSWERS_MODE, "answers (no secrets): re-runs start from these"))
    prov.warnings.extend(_environment_warnings(setup))
    return prov


def _environment_warnings(setup: MailSetup) -> list[str]:
    out = []
    if os.geteuid() != 0:
        out.append(
            "not running as root: smtpd loads a private key only when it is owned by root (mode at "
            f"most 0740); run `chown root {setup.tls.key} {setup.tls.cert}` before starting smtpd"
        )
    return out
