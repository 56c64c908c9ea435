"""The credentials table for AUTH: table(5) `user hash` lines, bcrypt hashes smtpd's crypt(3) checks.

Passwords never pass through argv, logs or the answers file. The file is root:GROUP 0640, GROUP
being that of smtpd's lookup user, which re-reads it on `smtpctl update table`; 0600 where no such
user exists (or we are not root). Never world-readable.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError

CREDS_MODE = 0o600  # where smtpd's lookup user does not exist here
CREDS_GROUP_MODE = 0o640  # root writes, smtpd's lookup process (its group) re-reads
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_HASH = re.compile(r"^\$(2[abxy]|6|5)\$\S+$")


def validate_username(name: str, flag: str = "NAME") -> str:
    if not _USER.match(name or ""):
        raise MailsetupError(
            f"{flag}: {name!r} is not a valid user name (lower-case letters, digits, '_', '.', '-'; "
            "at most 32 characters, starting with a letter or '_')"
        )
    if name == "root":
        raise MailsetupError(f"{flag}: smtpd never delivers to root; pick a person's user name")
    return name


def table_access(lookup_user: str) -> tuple[int, tuple[int, int] | None]:
    """(mode, owner) for the credentials table: root and the primary group of smtpd's lookup user
    (`Layout.smtpd_user`), so `smtpctl update table` can re-read it. When that user does not exist
    on this machine (smtpd not installed, another OS's layout in a sandbox) or we are not root (only
    root gives a file away), (0600, None): the table stays root's alone and smtpd reads it at start.
    """
    if os.geteuid() != 0:
        return CREDS_MODE, None
    try:
        gid = pwd.getpwnam(lookup_user).pw_gid
    except KeyError:
        return CREDS_MODE, None
    return CREDS_GROUP_MODE, (0, gid)


@dataclass(frozen=True)
class Credential:
    user: str
    hash: str


def parse_credentials(text: str, source: str) -> list[Credential]:
    creds: list[Credential] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split()
        if len(parts) != 2 or not _HASH.match(parts[1]):
            raise MailsetupError(f"{source}:{number}: expected 'user hash' (a $2b$ or $6$ hash)")
        if parts[0] in seen:  # the line number, never the line: it sits beside a password hash
            raise MailsetupError(f"{source}:{number}: duplicate user (also on line {seen[parts[0]]})")
        seen[parts[0]] = number
        creds.append(Credential(parts[0], parts[1]))
    return creds


def read_credentials(path: Path) -> list[Credential]:
    from mailsetup.files import read_secret

    try:
        # As root, only a table no other user could have added a login to.
        data = read_secret(Path(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MailsetupError(f"{path}: cannot read the credentials table: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # the place, never the bytes (they are password hashes)
        line = data.count(b"\n", 0, exc.start) + 1
        raise MailsetupError(f"{path}:{line}: not UTF-8 text") from None
    return parse_credentials(text, str(path))


def render_credentials(creds: list[Credential]) -> bytes:
    head = "# user  bcrypt-hash   (table(5) format for `auth <creds>`; managed by `mailsetup user`)\n"
    return (head + "".join(f"{c.user} {c.hash}\n" for c in creds)).encode()


def check_password_rules(password: str) -> str:
    if len(password.encode()) > 72:
        # bcrypt ignores everything after 72 bytes; refusing beats silently weakening the password.
        raise MailsetupError("password: longer than 72 bytes, which bcrypt would silently cut")
    if len(password) < 8:
        raise MailsetupError("password: at least 8 characters, please")
    if any(ord(c) < 32 for c in password):
        raise MailsetupError("password: control characters are not allowed")
    return password


def read_password(from_stdin: bool, ask: Callable[[], str] | None, no_terminal: str) -> str:
    """A password from one line of standard input (--password-stdin), else from `ask` (hidden, on a
    terminal); with neither, `no_terminal` is the error. Never from argv, where `ps` shows it."""
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise MailsetupError("--password-stdin: no password on standard input")
        return line
    if ask is None:
        raise MailsetupError(no_terminal)
    return ask()


def ask_password_twice() -> str:
    """The plain terminal's way: asked twice, hidden; a mismatch changes nothing."""
    import getpass

    from mailsetup.errors import Interrupted

    try:
        first = getpass.getpass("Password: ")
        again = getpass.getpass("Again: ")
    except KeyboardInterrupt:
        raise Interrupted() from None
    if first != again:
        raise MailsetupError("the two passwords differ; nothing changed")
    return first


def hash_password(password: str) -> str:
    import bcrypt

    check_password_rules(password)
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


@functools.lru_cache(maxsize=1)
def dummy_hash() -> bytes:
    """A hash at the cost `hash_password` uses, for logins that have none: an unknown user then
    costs what a wrong password costs, so the answer's timing does not tell which names exist."""
    import bcrypt

    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=10))


def check_password(creds: list[Credential] | dict[str, str], user: str, password: bytes) -> bool:
    import bcrypt

    table = creds if isinstance(creds, dict) else {c.user: c.hash for c in creds}
    stored = table.get(user)
    if stored is None or not stored.startswith("$2"):
        bcrypt.checkpw(password[:72], dummy_hash())  # same work, answer thrown away
        return False
    try:
        return bcrypt.checkpw(password[:72], stored.encode())
    except ValueError:
        bcrypt.checkpw(password[:72], dummy_hash())
        return False


def with_user(creds: list[Credential], user: str, hashed: str) -> list[Credential]:
    return [c for c in creds if c.user != user] + [Credential(user, hashed)]


def without_user(creds: list[Credential], user: str) -> list[Credential]:
    if not any(c.user == user for c in creds):
        raise MailsetupError(f"NAME: no user {user!r} in the credentials table")
    return [c for c in creds if c.user != user]
