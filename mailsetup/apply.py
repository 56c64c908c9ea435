"""The apply step: write the plan, let the real smtpd judge the result, put every file back when it
refuses, and only then prune the backups a kept number allows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mailsetup import queuekey, spool
from mailsetup.errors import MailsetupError
from mailsetup.model import MailSetup
from mailsetup.opensmtpd import check_config, openssl_major, smtpd_version, tls_defect
from mailsetup.plan import Applied, apply_plan, prune_backups, undo_applied
from mailsetup.provision import Provisioning


@dataclass
class ConfigVerdict:
    ran: bool
    ok: bool
    text: str


def verify_with_smtpd(setup: MailSetup) -> ConfigVerdict:
    """`smtpd -n` on the written smtpd.conf, when smtpd is installed and can judge it."""
    if os.geteuid() != 0:
        return ConfigVerdict(False, True, "smtpd -n skipped: it needs root (smtpd checks the key's owner)")
    result = check_config(Path(setup.layout.smtpd_conf))
    if result is None:
        return ConfigVerdict(False, True, "smtpd -n skipped: OpenSMTPD is not installed here")
    verdict = result.output.splitlines()[-1] if result.output else ""
    return ConfigVerdict(True, result.ok, verdict if result.ok else result.output)


def verify_with_dovecot(setup: MailSetup) -> ConfigVerdict:
    """`doveconf -n -c` on the written dovecot.conf (--imap dovecot), when Dovecot is installed."""
    from mailsetup import dovecot

    if setup.imap != "dovecot":
        return ConfigVerdict(False, True, "")
    result = dovecot.check_config(Path(setup.layout.dovecot_conf))
    if result is None:
        return ConfigVerdict(False, True, "doveconf -n skipped: Dovecot is not installed here")
    return ConfigVerdict(True, result.ok, "doveconf -n: dovecot.conf OK" if result.ok else result.output)


def installed_smtpd_warning() -> str | None:
    found = smtpd_version()
    if found is None:
        return None
    return tls_defect((found[0], found[1]), openssl_major())


def apply_and_verify(prov: Provisioning) -> tuple[list[Applied], ConfigVerdict]:
    """Write the plan; if the real smtpd refuses the result, put every file back and fail."""
    results = apply_plan(prov.plan)
    try:
        verdict = verify_with_smtpd(prov.setup)
        dovecot_verdict = verify_with_dovecot(prov.setup) if verdict.ok else None
    except BaseException:  # Ctrl-C or a crash while smtpd judges: unchecked files do not stay
        undo_applied(results)
        raise
    if verdict.ran and not verdict.ok:
        undo_applied(results)
        raise MailsetupError(
            f"smtpd -n refused the new configuration, so every file was put back: {verdict.text}"
            + _version_mismatch(prov.setup),
            exit_code=1,
        )
    if dovecot_verdict is not None and not dovecot_verdict.ok:
        undo_applied(results)
        raise MailsetupError("doveconf -n refused the new dovecot.conf, so every file was put back: "
                             f"{dovecot_verdict.text}" + _dovecot_mismatch(prov.setup),
                             hint="or leave Dovecot out: --imap none", exit_code=1)
    prov.dovecot_check = dovecot_verdict
    # Only now: a refused run above puts the old files back. Never the backups that still open
    # queued mail: while the spool holds envelopes the current key cannot read, every kept queue
    # key (and smtpd.conf, which carries it) is the way back to them (`doctor` names the one).
    held = _backups_that_open_queued_mail(prov.setup)
    prune_backups([r for r in results if Path(r.path) not in held], prov.setup.keep_backups)
    return results, verdict


def _backups_that_open_queued_mail(setup: MailSetup) -> set[Path]:
    """The files whose backups must all stay: the queue key and smtpd.conf, while any queued
    envelope does not open with the current key (or the queue cannot be read to tell)."""
    if not setup.queue.encryption:
        return set()
    precious = {Path(setup.queue.key_file), Path(setup.layout.smtpd_conf)}
    try:
        stranded = spool.unreadable_envelopes(Path(setup.layout.spool),
                                             queuekey.read_queue_key(Path(setup.queue.key_file)))
    except (OSError, MailsetupError):
        return precious
    return precious if stranded else set()


def _dovecot_mismatch(setup: MailSetup) -> str:
    from mailsetup.dovecot import dovecot_version

    found = dovecot_version()
    if found is None or (found >= (2, 4)) == (setup.dovecot_version >= (2, 4)):
        return ""
    wanted = f"{setup.dovecot_version[0]}.{setup.dovecot_version[1]}"
    return (f" (it was rendered for Dovecot {wanted} but the installed Dovecot is {found[0]}.{found[1]}; "
            "leave out the Dovecot version you gave (--dovecot-version) to render for the installed one)")


def _version_mismatch(setup: MailSetup) -> str:
    """Why smtpd -n may refuse: the file was rendered for another smtpd than the one installed."""
    found = smtpd_version()
    if found is None or (found[0], found[1]) == setup.smtpd_version:
        return ""
    wanted = f"{setup.smtpd_version[0]}.{setup.smtpd_version[1]}"
    return (f" (it was rendered for smtpd {wanted} but the installed smtpd is {found[0]}.{found[1]}; "
            "leave out the smtpd version you gave (--smtpd-version, or in --answers) to render for the "
            "installed one)")
