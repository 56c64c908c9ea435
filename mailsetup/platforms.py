"""Where each OS's OpenSMTPD package keeps its files, how it restarts, and how we detect the OS.

Facts come from each OS's packaging (see shared/reference/opensmtpd.md, "Per-OS layouts").
"""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from mailsetup.errors import MailsetupError


class Layout(NamedTuple):  # not a dataclass: `mailsetup aliases` starts without loading dataclasses
    """Paths and commands of one OS's OpenSMTPD, as absolute paths on the target host."""

    name: str
    title: str
    smtpd_conf: PurePosixPath
    aliases: PurePosixPath
    cert_dir: PurePosixPath
    key_dir: PurePosixPath
    state_dir: PurePosixPath  # mailsetup's own files: answers, queue key
    home_dir: PurePosixPath
    restart: str
    smtpd_user: str
    default_listen: str  # the external interface/address for ports 25 and 587
    localhost_listener: str  # how this OS's smtpd.conf names the loopback listener
    spool: PurePosixPath = PurePosixPath("/var/spool/smtpd")  # PATH_SPOOL: the same in every package
    dkim_dir: PurePosixPath = PurePosixPath("/etc/mail/dkim")  # the DKIM keys (the filter's README's place)
    dkim_user: str = "_dkimsign"  # opensmtpd-filter-dkimsign's user and group (Debian, OpenBSD)
    dkim_filter: PurePosixPath = PurePosixPath("/usr/libexec/opensmtpd/filter-dkimsign")  # on this host
    # The MTA-STS policy's web root: a web server serves it as https://mta-sts.DOMAIN/ (RFC 8461).
    mta_sts_dir: PurePosixPath = PurePosixPath("/var/www/mta-sts")
    # Thunderbird's autoconfig (--imap dovecot): a web server serves it as https://autoconfig.DOMAIN/.
    autoconfig_dir: PurePosixPath = PurePosixPath("/var/www/autoconfig")
    # certbot's config (live/, archive/, renewal-hooks/), work and logs directories (--tls acme)
    letsencrypt_dir: PurePosixPath = PurePosixPath("/etc/letsencrypt")
    letsencrypt_work: PurePosixPath = PurePosixPath("/var/lib/letsencrypt")
    letsencrypt_logs: PurePosixPath = PurePosixPath("/var/log/letsencrypt")
    # --imap dovecot: the whole dovecot.conf is ours (the one before it kept as a dated backup). A
    # local.conf beside Debian's conf.d cannot take away what conf.d turns on: passdb pam (the system
    # passwords would log in to IMAP too) and the snakeoil certificate.
    dovecot_conf: PurePosixPath = PurePosixPath("/etc/dovecot/dovecot.conf")
    dovecot_user: str = "dovecot"  # Dovecot's auth process reads the logins' passwd-file as this user's group
    dovecot_lmtp: PurePosixPath = PurePosixPath("/var/run/dovecot/lmtp")  # where smtpd hands mail to Dovecot

    @property
    def aliases_db(self) -> PurePosixPath:
        return self.aliases.with_name(self.aliases.name + ".db")

    @property
    def queue_key(self) -> PurePosixPath:
        return self.state_dir / "queue.key"

    @property
    def answers(self) -> PurePosixPath:
        return self.state_dir / "answers.toml"

    @property
    def credentials(self) -> PurePosixPath:
        return self.state_dir / "credentials"

    @property
    def imap_users(self) -> PurePosixPath:
        """Dovecot's passdb: the credentials table's logins and hashes in passwd-file form. In Dovecot's
        directory, not ours: a directory has one group, and /etc/mailsetup's lets smtpd's in."""
        return self.dovecot_conf.parent / "users"

    @property
    def dkim_state(self) -> PurePosixPath:
        """Which DKIM key signs, which waits for its record, which retires (no secrets)."""
        return self.state_dir / "dkim.toml"

    @property
    def mta_sts_policy(self) -> PurePosixPath:
        """The MTA-STS policy file, at the path RFC 8461 fixes under the web root."""
        return self.mta_sts_dir / ".well-known" / "mta-sts.txt"

    @property
    def autoconfig_file(self) -> PurePosixPath:
        """Where Thunderbird looks under the autoconfig host: /mail/config-v1.1.xml."""
        return self.autoconfig_dir / "mail" / "config-v1.1.xml"

    @property
    def queue_dir(self) -> PurePosixPath:
        """The embedded MTA's queue (smtpd keeps its own spool)."""
        return self.state_dir / "queue"


_ETC_SSL = (PurePosixPath("/etc/ssl/certs"), PurePosixPath("/etc/ssl/private"))

LAYOUTS: dict[str, Layout] = {
    "debian": Layout(
        "debian", "Debian / Ubuntu", PurePosixPath("/etc/smtpd.conf"), PurePosixPath("/etc/aliases"),
        *_ETC_SSL, PurePosixPath("/etc/mailsetup"), PurePosixPath("/home"),
        "systemctl restart opensmtpd", "opensmtpd", "0.0.0.0", "localhost",
    ),
    "rhel": Layout(
        "rhel", "RHEL / CentOS / Fedora / Alma / Rocky (EPEL)", PurePosixPath("/etc/opensmtpd/smtpd.conf"),
        PurePosixPath("/etc/aliases"), PurePosixPath("/etc/pki/tls/certs"), PurePosixPath("/etc/pki/tls/private"),
        PurePosixPath("/etc/mailsetup"), PurePosixPath("/home"),
        "systemctl restart opensmtpd", "smtpd", "0.0.0.0", "localhost",
    ),
    "alpine": Layout(
        "alpine", "Alpine Linux", PurePosixPath("/etc/smtpd/smtpd.conf"), PurePosixPath("/etc/smtpd/aliases"),
        *_ETC_SSL, PurePosixPath("/etc/mailsetup"), PurePosixPath("/home"),
        "rc-service smtpd restart", "smtpd", "0.0.0.0", "lo",
    ),
    "arch": Layout(
        "arch", "Arch Linux", PurePosixPath("/etc/smtpd/smtpd.conf"), PurePosixPath("/etc/smtpd/aliases"),
        *_ETC_SSL, PurePosixPath("/etc/mailsetup"), PurePosixPath("/home"),
        "systemctl restart smtpd", "smtpd", "0.0.0.0", "localhost",
    ),
    "freebsd": Layout(
        "freebsd", "FreeBSD (ports/pkg)", PurePosixPath("/usr/local/etc/mail/smtpd.conf"),
        PurePosixPath("/usr/local/etc/mail/aliases"), PurePosixPath("/usr/local/etc/ssl/certs"),
        PurePosixPath("/usr/local/etc/ssl/private"), PurePosixPath("/usr/local/etc/mailsetup"),
        PurePosixPath("/home"), "service smtpd restart", "_smtpd", "0.0.0.0", "localhost",
        dkim_dir=PurePosixPath("/usr/local/etc/mail/dkim"), mta_sts_dir=PurePosixPath("/usr/local/www/mta-sts"),
        dkim_filter=PurePosixPath("/usr/local/libexec/opensmtpd/filter-dkimsign"),
        letsencrypt_dir=PurePosixPath("/usr/local/etc/letsencrypt"),
        letsencrypt_work=PurePosixPath("/var/db/letsencrypt"),
    ),
    "openbsd": Layout(
        "openbsd", "OpenBSD", PurePosixPath("/etc/mail/smtpd.conf"), PurePosixPath("/etc/mail/aliases"),
        PurePosixPath("/etc/ssl"), PurePosixPath("/etc/ssl/private"), PurePosixPath("/etc/mailsetup"),
        PurePosixPath("/home"), "rcctl restart smtpd", "_smtpd", "egress", "lo0",
        dkim_filter=PurePosixPath("/usr/local/libexec/smtpd/filter-dkimsign"),
    ),
}

# Names people type for an OS, mapped to the layout that OS's package uses.
ALIASES = {
    "ubuntu": "debian", "raspbian": "debian", "linuxmint": "debian", "pop": "debian",
    "centos": "rhel", "fedora": "rhel", "almalinux": "rhel", "alma": "rhel", "rocky": "rhel",
    "ol": "rhel", "oracle": "rhel", "redhat": "rhel",
    "archlinux": "arch", "manjaro": "arch", "endeavouros": "arch",
}


def layout_names() -> list[str]:
    return sorted(set(LAYOUTS) | set(ALIASES))


def get_layout(name: str, flag: str = "--os") -> Layout:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise MailsetupError(
            f"{flag}: unknown OS {name!r}; choose one of: {', '.join(layout_names())}"
        )
    return LAYOUTS[key]


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def detect_os(os_release: Path = Path("/etc/os-release"), system: str | None = None) -> str | None:
    """The layout name for this host, or None when nothing we know matches."""
    system = system or os.uname().sysname  # platform.system() without loading platform
    if system == "OpenBSD":
        return "openbsd"
    if system == "FreeBSD":
        return "freebsd"
    try:
        info = parse_os_release(os_release.read_text(errors="replace"))
    except OSError:
        return None
    candidates = [info.get("ID", "")] + info.get("ID_LIKE", "").split()
    for cand in candidates:
        cand = cand.lower()
        cand = ALIASES.get(cand, cand)
        if cand in LAYOUTS:
            return cand
    return None


def restart_command(layout: Layout, systemd: Path = Path("/run/systemd/system"),
                    initd: Path = Path("/etc/init.d")) -> str:
    """How to restart smtpd on this host: the layout's command, unless it names systemctl on a host
    that does not run systemd (a container, a sysvinit Debian): then the init script, through
    `service` where there is one, or else what to do by hand."""
    if not layout.restart.startswith("systemctl ") or systemd.is_dir():  # sd_booted()'s own test
        return layout.restart
    name = layout.restart.split()[-1]
    if (initd / name).exists():
        import shutil

        if shutil.which("service") or Path("/usr/sbin/service").exists():
            return f"service {name} restart"
        return f"{initd / name} restart"
    return "no systemd and no init script for smtpd here: stop the running smtpd, then start it with `smtpd`"


def sandboxed(layout: Layout, root: Path | None) -> Layout:
    """The same layout with every path under `root` (for a sandbox a normal user can write)."""
    if root is None:
        return layout

    def under(p: PurePosixPath) -> PurePosixPath:
        return PurePosixPath(root) / p.relative_to("/")

    return layout._replace(
        smtpd_conf=under(layout.smtpd_conf),
        aliases=under(layout.aliases),
        cert_dir=under(layout.cert_dir),
        key_dir=under(layout.key_dir),
        state_dir=under(layout.state_dir),
        home_dir=under(layout.home_dir),
        spool=under(layout.spool),
        dkim_dir=under(layout.dkim_dir),
        mta_sts_dir=under(layout.mta_sts_dir),
        autoconfig_dir=under(layout.autoconfig_dir),
        letsencrypt_dir=under(layout.letsencrypt_dir),
        letsencrypt_work=under(layout.letsencrypt_work),
        letsencrypt_logs=under(layout.letsencrypt_logs),
        dovecot_conf=under(layout.dovecot_conf),
    )


# --- accounts smtpd delivers to -----------------------------------------------------------------

_ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def uid_min(login_defs: Path = Path("/etc/login.defs")) -> int:
    """The first uid of a person's account on this host (UID_MIN, 1000 by default)."""
    try:
        m = re.search(r"^\s*UID_MIN\s+(\d+)", login_defs.read_text(), re.M)
    except OSError:
        m = None
    return int(m.group(1)) if m else 1000


def account_problem(name: str, first_uid: int | None = None) -> str | None:
    """Why `name` is not a person's account on this host that gets mail, or None when it is: a uid
    from UID_MIN on (not nobody) and a home that exists — never a system account, whose 'home' may
    be /dev or /usr/sbin, and never root (smtpd does not deliver to root)."""
    if not _ACCOUNT_NAME.match(name):
        return "is not a user name"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return "is not an account on this host"
    first = uid_min() if first_uid is None else first_uid
    if not first <= pw.pw_uid < 65534:
        return f"is a system account (uid {pw.pw_uid}; people's accounts start at {first})"
    if not Path(pw.pw_dir).is_dir():
        return f"has no home directory ({pw.pw_dir} does not exist)"
    return None


def person_account(name: str, first_uid: int | None = None) -> bool:
    """The one rule for which local users get mail on a real host (the MTA's policy and --admin)."""
    return account_problem(name, first_uid) is None
