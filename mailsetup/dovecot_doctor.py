"""`doctor`'s checks of Dovecot (--imap dovecot): its configuration accepted by doveconf, the same
certificate pair as smtpd's, port 993 held by Dovecot, and each login's Maildir private to its owner.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Callable
from pathlib import Path

from mailsetup.model import MailSetup

OK, WARN, FAIL = "ok", "warn", "fail"
IMAPS_PORT = 993


def dovecot_config(setup: MailSetup) -> tuple[str, str]:
    from mailsetup.dovecot import check_config

    conf = Path(setup.layout.dovecot_conf)
    if not conf.is_file():
        return FAIL, f"{conf} is missing; re-run `mailsetup init --imap dovecot`"
    result = check_config(conf)
    if result is None:
        return WARN, "Dovecot is not installed here (apt-get install dovecot-imapd dovecot-lmtpd)"
    if not result.ok:
        return FAIL, f"doveconf -n refuses {conf}: {result.output}"
    return OK, f"doveconf -n -c {conf}: configuration OK"


_PAIR = re.compile(r"^\s*(ssl_cert|ssl_key|ssl_server_cert_file|ssl_server_key_file)\s*=\s*<?\s*(\S+)\s*$", re.M)


def dovecot_pair(setup: MailSetup) -> tuple[str, str]:
    """The files dovecot.conf names are the ones smtpd.conf's `pki` names (renewed together)."""
    text = Path(setup.layout.dovecot_conf).read_text(errors="replace")
    named = {("cert" if "cert" in key else "key"): value for key, value in _PAIR.findall(text)}
    wanted = {"cert": str(setup.tls.cert), "key": str(setup.tls.key)}
    differ = [f"{what} {named.get(what, 'none')} (smtpd: {path})" for what, path in wanted.items()
              if named.get(what) != path]
    if differ:
        return FAIL, "dovecot.conf names another " + "; ".join(differ) + ": re-run `mailsetup init`"
    return OK, f"the same pair as smtpd: {setup.tls.cert}, {setup.tls.key}"


def imaps_port(setup: MailSetup) -> tuple[str, str]:
    from mailsetup.doctor import port_owner

    owner = port_owner(IMAPS_PORT)
    if owner is None:
        return WARN, f"nothing listens on {IMAPS_PORT}: start Dovecot (systemctl restart dovecot)"
    if owner[1] in ("dovecot", "imap-login"):
        return OK, f"{IMAPS_PORT} held by Dovecot (pid {owner[0]})"
    return FAIL, f"{IMAPS_PORT} is held by {owner[1]} (pid {owner[0]}): Dovecot cannot listen there"


def _maildir_of(setup: MailSetup, user: str) -> tuple[Path, int | None]:
    """The login's Maildir and the uid that should own it (None in a sandbox: no such account here)."""
    if setup.root is not None:
        return Path(setup.maildir_for(user)), None
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return Path(setup.maildir_for(user)), -1
    return Path(account.pw_dir) / "Maildir", account.pw_uid


def maildirs_private(setup: MailSetup) -> tuple[str, str]:
    """Each login's Maildir: owned by its account, nothing for group or others (IMAP serves it to
    the owner; smtpd and Dovecot's LMTP deliver as that account)."""
    from mailsetup.credentials import read_credentials

    bad, fine = [], 0
    for cred in read_credentials(Path(setup.layout.credentials)):
        path, uid = _maildir_of(setup, cred.user)
        if uid == -1:
            bad.append(f"{cred.user} is no account on this host, so nothing delivers to it")
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # created by the first delivery
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid) or st.st_mode & 0o077:
            bad.append(f"{path} is mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid} (chmod 700, owned by "
                       f"{cred.user})")
        else:
            fine += 1
    if bad:
        return FAIL, "; ".join(bad)
    return OK, f"{fine} Maildir(s), each its owner's only" if fine else "no Maildir yet (the first mail makes it)"


def dovecot_checks(setup: MailSetup) -> tuple[tuple[str, Callable[[], tuple[str, str]]], ...]:
    """The (name, check) pairs doctor runs when the set-up serves IMAP."""
    if setup.imap != "dovecot":
        return ()
    checks = [("doveconf -n accepts dovecot.conf", lambda: dovecot_config(setup)),
              ("Dovecot serves smtpd's certificate pair", lambda: dovecot_pair(setup)),
              ("each login's Maildir private", lambda: maildirs_private(setup))]
    if setup.root is None and os.path.exists("/proc/net/tcp"):
        checks.insert(2, ("port 993 held by Dovecot", lambda: imaps_port(setup)))
    return tuple(checks)
