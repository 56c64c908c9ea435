"""`mailsetup doctor`: the set-up's health as a doctor's report — each check ✓ / ! / ✗ with one
sentence of why and what to do.
"""

from __future__ import annotations

import datetime as dt
import grp
import os
import pwd
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.files import read_secret
from mailsetup.model import MailSetup

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Finding:
    name: str
    status: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Doctor:
    def __init__(self, setup: MailSetup, now: dt.datetime | None = None):
        self.setup = setup
        self.now = now or dt.datetime.now(dt.UTC)
        self.findings: list[Finding] = []
        self.conf = Path(setup.layout.smtpd_conf)

    def check(self, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        try:
            status, detail = fn()
        except MailsetupError as exc:
            status, detail = FAIL, exc.message
        except OSError as exc:
            status, detail = FAIL, f"{exc.filename or ''}: {exc.strerror or exc}".strip(": ")
        self.findings.append(Finding(name, status, detail))

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    # --- the checks ---------------------------------------------------------------------------

    def smtpd_config(self) -> tuple[str, str]:
        from mailsetup.opensmtpd import check_config, find_binary

        if not find_binary("smtpd"):
            return WARN, "OpenSMTPD is not installed here, so smtpd -n cannot judge smtpd.conf"
        if os.geteuid() != 0:
            return WARN, "smtpd -n needs root (it checks the key's owner); run doctor as root"
        read_secret(self.conf)  # smtpd -n runs as root: only on a file no other user can steer
        result = check_config(self.conf)
        if result.ok:
            return OK, f"smtpd -n -f {self.conf}: configuration OK"
        return FAIL, f"smtpd -n refuses {self.conf}: {result.output.splitlines()[-1] if result.output else '?'}"

    def key_permissions(self) -> tuple[str, str]:
        key = Path(self.setup.tls.key)
        st = key.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o037:
            return FAIL, (f"{key} is mode {mode:04o}; smtpd refuses a key with more than rwxr----- "
                          f"(chmod 600 {key})")
        if st.st_uid != 0:
            return FAIL, f"{key} is owned by uid {st.st_uid}; smtpd loads keys owned by root only (chown root {key})"
        if mode & 0o040:
            return WARN, f"{key} is group-readable ({mode:04o}); 0600 is enough for smtpd"
        return OK, f"{key}: {mode:04o}, owned by root"

    def cert_permissions(self) -> tuple[str, str]:
        cert = Path(self.setup.tls.cert)
        st = cert.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            return FAIL, f"{cert} is writable by others ({mode:04o}); smtpd wants at most 0755 (chmod 644 {cert})"
        if st.st_uid != 0:
            return FAIL, f"{cert} is owned by uid {st.st_uid}; smtpd wants it owned by root (chown root {cert})"
        return OK, f"{cert}: {mode:04o}, owned by root"

    def cert_key_pair(self) -> tuple[str, str]:
        from mailsetup import pki

        cert = pki.load_cert(Path(self.setup.tls.cert))
        key = pki.load_key(Path(self.setup.tls.key))
        if not pki.is_pair(cert, key):
            return FAIL, (f"{self.setup.tls.key} is not the key of {self.setup.tls.cert}; "
                          "rotate with `mailsetup init --rotate-cert`")
        return OK, "the certificate and the key are a pair"

    def cert_expiry(self) -> tuple[str, str]:
        from mailsetup import pki

        info = pki.inspect_cert(pki.load_cert(Path(self.setup.tls.cert)))
        days = info.days_left(self.now)
        when = f"{info.not_after:%Y-%m-%d}"
        if self.setup.tls.source == "acme":
            return _acme_expiry(days, when, self.setup.layout.letsencrypt_logs)
        if days < 0:
            return FAIL, f"the certificate expired on {when}; renew: mailsetup init --rotate-cert"
        if days < 30:
            return WARN, f"the certificate expires on {when}, in {days} days; renew soon: mailsetup init --rotate-cert"
        return OK, f"valid until {when} ({days} days)"

    def cert_names_host(self) -> tuple[str, str]:
        from mailsetup import pki

        info = pki.inspect_cert(pki.load_cert(Path(self.setup.tls.cert)))
        if not pki._covers(info.names, self.setup.hostname):
            return FAIL, (f"the certificate names {', '.join(info.names) or 'no DNS names'}, not "
                          f"{self.setup.hostname}: clients will refuse it")
        return OK, f"{self.setup.hostname} is in the certificate's subjectAltName"

    def cert_chain(self) -> tuple[str, str]:
        """--tls acme: fullchain.pem leads from the certificate to a root clients trust."""
        from mailsetup import pki

        certs = pki.load_chain(Path(self.setup.tls.cert))
        store = trust_store()
        try:
            pki.verify_chain(certs, store.read_bytes(), self.setup.hostname, self.now)
        except MailsetupError as exc:
            broken = pki.chain_break(certs)
            if broken:
                return FAIL, f"{self.setup.tls.cert}: {broken}; renew it: certbot renew --force-renewal"
            return WARN, (f"the chain in {Path(self.setup.tls.cert).name} holds together ({len(certs)} "
                          f"certificates) but does not verify against {store}: {exc.message}; clients will "
                          "refuse it (a test or staging CA? set --acme-server to a trusted one)")
        return OK, f"{len(certs)} certificates in {Path(self.setup.tls.cert).name}, verified against {store}"

    def acme_hook(self) -> tuple[str, str]:
        from mailsetup import acme

        hook = acme.hook_path(self.setup)
        st = hook.stat()
        if st.st_uid != 0 or _mode(hook) != acme.HOOK_MODE:
            return FAIL, (f"{hook} is mode {_mode(hook):04o}, uid {st.st_uid}; certbot runs it only as an executable "
                          "and root must own it: re-run `mailsetup init`")
        return OK, f"{hook}: certbot restarts smtpd through it after each renewal"

    def queue_key(self) -> tuple[str, str]:
        from mailsetup import queuekey

        if not self.setup.queue.encryption:
            return WARN, "queue encryption is off: queued mail sits on disk in the clear"
        key = queuekey.read_queue_key(Path(self.setup.queue.key_file))
        m = re.search(queuekey.QUEUE_KEY_LINE + r"(\S+)", read_secret(self.conf).decode())
        if not m:
            return FAIL, f"{self.conf} has no queue encryption line, but the set-up wants one"
        if m.group(1) != key:
            return FAIL, (f"{self.conf} and {self.setup.queue.key_file} hold different queue keys; re-run "
                          "`mailsetup init` to render them in step")
        mode = _mode(Path(self.setup.queue.key_file))
        if mode & 0o077:
            return FAIL, f"{self.setup.queue.key_file} is mode {mode:04o}; a key must be 0600"
        return OK, "32 characters, the same in smtpd.conf and the key file (0600)"

    def queued_mail(self) -> tuple[str, str]:
        """Envelopes queued under another key are skipped by smtpd without a word: find them on disk."""
        from mailsetup import queuekey, spool

        queue_dir = Path(self.setup.layout.spool) / "queue"
        if not self.setup.queue.encryption:
            return OK, "queue encryption is off: nothing to decrypt"
        if queue_dir.exists() and not os.access(queue_dir, os.R_OK | os.X_OK):
            return WARN, f"{queue_dir} is readable by root only; run doctor as root to check the queued mail"
        envelopes = spool.queued_envelopes(Path(self.setup.layout.spool))
        if not envelopes:
            return OK, f"no mail queued in {queue_dir}"
        key_file = Path(self.setup.queue.key_file)
        bad = spool.unreadable_envelopes(Path(self.setup.layout.spool), queuekey.read_queue_key(key_file))
        if not bad:
            return OK, f"{len(envelopes)} queued envelope(s), all readable with the current queue key"
        opener = spool.key_that_opens(bad, _kept_keys(key_file))
        if opener is None:
            return FAIL, (f"{len(bad)} of {len(envelopes)} queued envelope(s) in {queue_dir} cannot be decrypted with "
                          f"{key_file}, and no kept key ({key_file.name}.*.bak) opens them: smtpd will never deliver "
                          "them; find the key they were queued under")
        conf = _conf_with_key(self.conf, queuekey.read_queue_key(opener))
        start = f"smtpd -f {conf}" if conf else f"smtpd with `queue encryption` set to the key in {opener}"
        return FAIL, (f"{len(bad)} of {len(envelopes)} queued envelope(s) in {queue_dir} cannot be decrypted with "
                      f"{key_file}, so smtpd will never deliver them; they decrypt with {opener}. To deliver them: "
                      f"stop smtpd, start {start}, run `smtpctl pause smtp`, wait until `smtpctl show queue` prints "
                      f"nothing, then restart it with the current key ({self.setup.layout.restart})")

    def aliases_db(self) -> tuple[str, str]:
        from mailsetup import aliases as aliases_mod

        db = Path(self.setup.layout.aliases_db)
        on_disk = aliases_mod.read_aliases_db(db)
        source = aliases_mod.parse_aliases_file(Path(self.setup.layout.aliases), self.setup.smtpd_version)
        wanted = {e.name: e.value for e in source}
        if on_disk != wanted:
            changed = sorted(set(on_disk.items()) ^ set(wanted.items()))
            name = changed[0][0] if changed else "?"
            return FAIL, (f"{db} is out of step with {self.setup.layout.aliases} (first difference: {name!r}); "
                          f"run: mailsetup aliases {self.setup.layout.aliases} && smtpctl update table aliases")
        return OK, f"{len(on_disk)} aliases, in step with {self.setup.layout.aliases}"

    def _lookup_reach(self, path: Path, table: str, fix: str) -> tuple[str, str] | None:
        """Whether smtpd's lookup process can open the table file `path`, tried as its user; None
        when that cannot be tried here (not root, or no such user on this machine)."""
        user = self.setup.layout.smtpd_user
        tried = readable_as(path, user)
        if tried is None:
            return None
        blocked, why = tried
        if blocked is None:
            return OK, f"smtpd's lookup user {user} can open {path} (tried as {user})"
        if blocked != path:
            return FAIL, (f"{blocked} ({_mode(blocked):04o}) keeps smtpd's lookup user {user} out, so smtpd cannot "
                          f"open {path} ('failed to open table {table}'); {fix}")
        return FAIL, (f"smtpd's lookup user {user} cannot open {path} ({why}): smtpd fails to (re)load it "
                      f"('failed to open table {table}'); {fix}")

    def credentials_reachable(self) -> tuple[str, str]:
        from mailsetup import credentials as creds_mod

        path = Path(self.setup.layout.credentials)
        _, owner = creds_mod.table_access(self.setup.layout.smtpd_user)
        group = _group_name(owner[1]) if owner else "its group"
        found = self._lookup_reach(
            path, "creds", f"`smtpctl update table creds` fails and new logins get 535 until smtpd restarts; "
            f"re-run `mailsetup init` (it makes the table root:{group} 0640, its directory g+x)")
        if found is None:
            return WARN, (f"cannot try as smtpd's lookup user {self.setup.layout.smtpd_user} (no such user here, "
                          "or doctor is not root), so whether smtpd can re-read the table is not known")
        return found

    def aliases_reachable(self) -> tuple[str, str]:
        db = Path(self.setup.layout.aliases_db)
        found = self._lookup_reach(db, "aliases", f"chmod 644 {db} and o+x on its directories")
        if found is not None:
            return found
        for parent in db.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                return FAIL, (f"{parent} ({_mode(parent):04o}) keeps smtpd's unprivileged lookup process out, so "
                              f"smtpd cannot open {db} ('failed to open table aliases'); chmod o+x {parent}")
        if not _mode(db) & 0o004:
            return FAIL, f"{db} is not readable by smtpd's own user (mode {_mode(db):04o}); chmod 644 {db}"
        return OK, f"smtpd's lookup process can read {db}"

    def rfc2142(self) -> tuple[str, str]:
        from mailsetup import aliases as aliases_mod
        from mailsetup import credentials as creds_mod
        from mailsetup.mta.policy import policy_for

        aliases = aliases_mod.read_aliases_db(Path(self.setup.layout.aliases_db))
        logins = [c.user for c in creds_mod.read_credentials(Path(self.setup.layout.credentials))]
        policy = policy_for(self.setup, aliases, logins, local_peers=frozenset())  # as a stranger asks
        bad = []
        for name in ("postmaster", "abuse"):
            d = policy.check_rcpt(f"{name}@{self.setup.domain}", False, "192.0.2.1")
            if not d.accepted or not (d.local_users or d.relay_to):
                bad.append(f"{name}@{self.setup.domain} ({d.reply()})")
        if bad:
            return FAIL, "RFC 2142 addresses lead nowhere: " + "; ".join(bad) + "; alias them to a person"
        return OK, f"postmaster@ and abuse@{self.setup.domain} reach a person"

    def credentials(self) -> tuple[str, str]:
        from mailsetup import credentials as creds_mod

        path = Path(self.setup.layout.credentials)
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o004:
            return FAIL, f"{path} is world-readable ({mode:04o}): password hashes leak; chmod 600 {path}"
        _, owner = creds_mod.table_access(self.setup.layout.smtpd_user)
        if mode & 0o070 and (owner is None or st.st_gid != owner[1]):
            return WARN, (f"{path} is group-accessible ({mode:04o}) by group {_group_name(st.st_gid)}, "
                          "not smtpd's; re-run `mailsetup init` to give it the right group")
        if mode & 0o030:
            return WARN, f"{path} is group-writable ({mode:04o}); 0640 is enough"
        users = creds_mod.read_credentials(path)
        return OK, f"{len(users)} login(s), mode {mode:04o}, owner {_owner_name(st)}"

    def ports(self) -> tuple[str, str]:
        busy = []
        held_by_smtpd = []
        for port in sorted({listener.port for listener in self.setup.listeners}):
            owner = port_owner(port)
            if owner is None:
                continue
            if owner[1] == "smtpd":
                held_by_smtpd.append(f"{port} (smtpd, pid {owner[0]})")
            else:
                busy.append(f"{port} is held by {owner[1]} (pid {owner[0]})")
        if busy:
            return FAIL, "; ".join(busy) + ": smtpd cannot listen there; stop it or pick another port"
        if held_by_smtpd:
            return OK, "held by smtpd: " + ", ".join(held_by_smtpd)
        return OK, "free: " + ", ".join(str(p) for p in sorted({listener.port for listener in self.setup.listeners}))

    def smtpd_version(self) -> tuple[str, str]:
        from mailsetup.opensmtpd import openssl_major, smtpd_version, tls_defect

        found = smtpd_version()
        if found is None:
            return WARN, ("OpenSMTPD is not installed here (apt-get install opensmtpd; on Debian 12 from "
                          "bookworm-backports, Debian 13 has 7.6)")
        defect = tls_defect((found[0], found[1]), openssl_major())
        if defect:
            return FAIL, defect
        wanted = self.setup.smtpd_version
        if (found[0], found[1]) < (6, 4) <= wanted or wanted < (6, 4) <= (found[0], found[1]):
            return FAIL, (f"smtpd.conf is written for {wanted[0]}.{wanted[1]}'s grammar but {found[2]} is installed; "
                          f"re-run init with --smtpd-version {found[0]}.{found[1]}")
        from mailsetup.aliases import TABLE_LINE_SYNTAX

        if ((found[0], found[1]) >= TABLE_LINE_SYNTAX) != (wanted >= TABLE_LINE_SYNTAX):
            # 7.5 changed how makemap and smtpd read aliases (no continuation lines, no comment after
            # an entry): the file was checked under the other rules
            return WARN, (f"the aliases were checked for {wanted[0]}.{wanted[1]}'s makemap but {found[2]} is "
                          f"installed, which reads aliases differently; re-run init with --smtpd-version "
                          f"{found[0]}.{found[1]}")
        return OK, f"OpenSMTPD {found[2]}"

    def open_relay(self) -> tuple[str, str]:
        from mailsetup.opensmtpd import open_relay_rules

        findings = open_relay_rules(read_secret(self.conf).decode())
        if findings:
            f = findings[0]
            return FAIL, f"{self.conf}:{f.line}: `{f.text}` {f.why}"
        return OK, "relay only for authenticated or local senders"

    def dkim(self) -> tuple[str, str]:
        from mailsetup import dkim

        setup = self.setup
        if not setup.dkim:
            return WARN, ("off: large providers junk or refuse unsigned mail; `mailsetup dkim` makes the keys "
                          "and signs (install opensmtpd-filter-dkimsign first)")
        keys = dkim.read_state(Path(setup.layout.dkim_state))
        active = dkim.signing(keys)
        if not active:
            return FAIL, f"{setup.layout.dkim_state} lists no active key, so nothing is signed; run `mailsetup dkim`"
        if setup.root is None and not Path(setup.layout.dkim_filter).exists():
            return FAIL, (f"{setup.layout.dkim_filter} is missing, so smtpd cannot start its signing filter; "
                          "apt-get install opensmtpd-filter-dkimsign")
        folder = setup.layout.dkim_dir
        for key in active:
            path = Path(key.path(folder))
            dkim.public_value(dkim.read_key(folder, key), key.algorithm, str(path))
            tried = readable_as(path, setup.layout.dkim_user)
            if tried is not None and tried[0] is not None:
                return FAIL, (f"the filter's user {setup.layout.dkim_user} cannot read {path} ({tried[1]}); "
                              "re-run `mailsetup dkim`")
        detail = "signing with " + ", ".join(f"{k.selector} ({k.algorithm})" for k in active)
        pending = [k.selector for k in keys if k.stage == "pending"]
        if pending:
            detail += "; pending " + ", ".join(pending) + ": publish their records, then `mailsetup dkim` switches"
        return OK, detail

    def run(self) -> list[Finding]:
        from mailsetup.dovecot_doctor import dovecot_checks

        for name, fn in (
            ("smtpd -n accepts smtpd.conf", self.smtpd_config),
            ("no open relay", self.open_relay),
            ("private key permissions", self.key_permissions),
            ("certificate permissions", self.cert_permissions),
            ("certificate and key are a pair", self.cert_key_pair),
            ("certificate expiry", self.cert_expiry),
            ("certificate names the mail host", self.cert_names_host),
            ("queue key", self.queue_key),
            ("queued mail readable with the queue key", self.queued_mail),
            ("aliases.db", self.aliases_db),
            ("aliases.db reachable by smtpd", self.aliases_reachable),
            ("postmaster and abuse", self.rfc2142),
            ("credentials table", self.credentials),
            ("credentials table re-readable by smtpd", self.credentials_reachable),
            ("ports", self.ports),
            ("smtpd version", self.smtpd_version),
            ("DKIM signing", self.dkim),
            *((("certificate chain", self.cert_chain), ("certbot deploy hook", self.acme_hook))
              if self.setup.tls.source == "acme" else ()),
            *dovecot_checks(self.setup),
        ):
            self.check(name, fn)
        return self.findings


def _acme_expiry(days: int, when: str, logs) -> tuple[str, str]:
    """certbot renews 30 days before the end: under 20 left means its renewals are failing."""
    if days < 0:
        return FAIL, f"the certificate expired on {when}; renew now: certbot renew (its log: {logs}/letsencrypt.log)"
    if days < 20:
        return WARN, (f"the certificate expires on {when}, in {days} days, and certbot renews from 30 days before: "
                      f"its renewals are failing; run `certbot renew` and read {logs}/letsencrypt.log")
    return OK, f"valid until {when} ({days} days); certbot renews it from 30 days before"


def trust_store() -> Path:
    """The roots a client here trusts: REQUESTS_CA_BUNDLE (as certbot reads it), else the system's."""
    import ssl

    given = os.environ.get("REQUESTS_CA_BUNDLE")
    if given:
        return Path(given)
    return Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def _ours(path: Path) -> bool:
    """A kept key or config is read only when it is a plain file of ours, not a link someone planted."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _kept_keys(key_file: Path) -> list[tuple[Path, str]]:
    """The dated backups of the queue key, newest first (rotation keeps each replaced key)."""
    from mailsetup import queuekey

    keys = []
    for path in sorted(key_file.parent.glob(key_file.name + ".*.bak"), reverse=True):
        if not _ours(path):
            continue
        try:
            keys.append((path, queuekey.read_queue_key(path)))
        except MailsetupError:
            continue
    return keys


def _conf_with_key(conf: Path, key: str) -> Path | None:
    """The kept smtpd.conf backup that carries `key`: a ready configuration to drain the old queue with."""
    from mailsetup import queuekey

    for path in sorted(conf.parent.glob(conf.name + ".*.bak"), reverse=True):
        if not _ours(path):
            continue
        try:
            m = re.search(queuekey.QUEUE_KEY_LINE + r"(\S+)", path.read_text(errors="replace"))
        except OSError:
            continue
        if m and m.group(1) == key:
            return path
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner_name(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    return f"{user}:{_group_name(st.st_gid)}"


def readable_as(path: Path, user: str) -> tuple[Path | None, str] | None:
    """Try, as `user` (its uid, gid and groups), to enter every directory above `path` and open it.

    (None, "") when it can; (the first path it cannot pass, strerror) when not; None when this
    cannot be tried here (we are not root, or there is no such user). A child process does the
    trying, so this one keeps its privileges.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    if os.geteuid() != 0:
        return None
    path = Path(os.path.abspath(path))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, try, report on the pipe, never return
        code = 0
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            for d in reversed(path.parents):
                if not os.access(d, os.X_OK):
                    os.write(write_end, f"{d}\0{os.strerror(13)}".encode())
                    code = 1
                    break
            else:
                try:
                    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
                except OSError as exc:
                    os.write(write_end, f"{path}\0{exc.strerror}".encode())
                    code = 1
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
            code = 2
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        said = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None, ""
    if code != 1 or "\0" not in said:
        return None
    where, _, why = said.partition("\0")
    return Path(where), why


def port_owner(port: int) -> tuple[int, str] | None:
    """(pid, command) of the process listening on TCP `port`, or None when nothing listens."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    if not inodes:
        with socket.socket() as s:  # no /proc: fall back to trying to bind
            try:
                s.bind(("127.0.0.1", port))
                return None
            except OSError:
                return (0, "another process") if not Path("/proc/net/tcp").exists() else None
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    comm = (pid_dir / "comm").read_text().strip()
                    return int(pid_dir.name), comm
        except OSError:
            continue
    return (0, "an unknown process")


def doctor_command(root, os_name: str | None, as_json: bool) -> bool:
    """`mailsetup doctor`: every check printed; whether none failed."""
    from mailsetup.answers import load_setup
    from mailsetup.report import print_doctor

    doc = Doctor(load_setup(root, os_name))
    print_doctor(doc.run(), as_json)
    return doc.ok
