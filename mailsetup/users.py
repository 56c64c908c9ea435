"""`mailsetup user add/list/remove`: the credentials table of the set-up, written through files.py
with the owner and mode smtpd needs, then re-read by a running smtpd that serves it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mailsetup import credentials as c
from mailsetup.errors import MailsetupError
from mailsetup.report import echo


def _setup(root: Path | None, os_name: str | None):
    from mailsetup.answers import load_setup

    return load_setup(root, os_name)


def list_users(root: Path | None, os_name: str | None) -> list[str]:
    return [cred.user for cred in c.read_credentials(Path(_setup(root, os_name).layout.credentials))]


def add_user(name: str, password_stdin: bool, root: Path | None, os_name: str | None) -> None:
    """Add a login, or change its password (asked twice, hidden, or one line of standard input)."""
    c.validate_username(name)
    setup = _setup(root, os_name)
    creds = c.read_credentials(Path(setup.layout.credentials))
    ask = c.ask_password_twice if sys.stdin.isatty() else None
    hashed = c.hash_password(c.read_password(password_stdin, ask,
                                             "no terminal to ask for the password on: pass --password-stdin"))
    existed = any(x.user == name for x in creds)
    _write_credentials(setup, c.with_user(creds, name, hashed),
                       f"{'changed the password of' if existed else 'added'} {name} in")


def remove_user(name: str, root: Path | None, os_name: str | None) -> None:
    """Remove a login (the Maildir is left alone)."""
    setup = _setup(root, os_name)
    remaining = c.without_user(c.read_credentials(Path(setup.layout.credentials)), name)
    _write_credentials(setup, remaining, f"removed {name} from")


def _write_credentials(setup, creds: list, done: str) -> None:
    """Write the table (owner and mode smtpd needs to re-read it), then have a running smtpd that
    serves this file re-read it, so the change is live without a restart."""
    from mailsetup.opensmtpd import smtpd_tables_reading, update_table
    from mailsetup.plan import FileChange, apply_plan
    from mailsetup.platforms import LAYOUTS
    from mailsetup.provision import imap_users_change

    layout = setup.layout
    path = Path(layout.credentials)
    mode, owner = c.table_access(layout.smtpd_user)
    changes = [FileChange(path, c.render_credentials(creds), mode, "credentials", secret=True, owner=owner)]
    if setup.imap == "dovecot":  # the same logins for IMAP: both files in one plan, both or neither
        changes.append(imap_users_change(setup, creds))
    apply_plan(changes, setup.keep_backups)
    echo(f"{done} {path}" + (f" and {layout.imap_users}" if setup.imap == "dovecot" else ""))
    _reload_dovecot(setup)
    users = smtpd_tables_reading(path, Path(LAYOUTS[layout.name].smtpd_conf))
    if not users:
        echo(f"no running smtpd here serves {path}; smtpd reads it when it starts", err=True)
    for user in users:
        ok, said = update_table(user.table)
        if not ok:
            raise MailsetupError(
                f"the running smtpd (pid {user.pid}) could not re-read {path}: "
                f"smtpctl update table {user.table}: {said}",
                hint=f"`mailsetup doctor` says why; or restart smtpd: {layout.restart}", exit_code=1)
        echo(f"reloaded table {user.table} of the running smtpd (pid {user.pid}): the change is live")


def _reload_dovecot(setup) -> None:
    """Dovecot reads the passwd-file at each login; `doveadm reload` also drops what its auth process
    cached. Only this host's Dovecot, never from a sandbox (--root)."""
    if setup.imap != "dovecot" or setup.root is not None:
        return
    from mailsetup.dovecot import reload_running

    said = reload_running()
    echo(said or "no running Dovecot here; it reads the logins when it starts", err=not said)
