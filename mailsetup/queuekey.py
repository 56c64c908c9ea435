"""The queue encryption key: OpenSMTPD uses the 32 characters as-is as the AES-256-GCM key.

Kept free of heavy imports so `mailsetup keygen` starts fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mailsetup.errors import MailsetupError

KEY_LENGTH = 32  # crypto.c: KEY_SIZE 32; anything else is "invalid key for queue encryption"
KEY_MODE = 0o600
_PLAIN = re.compile(r"^[A-Za-z0-9]{32}$")

# The `queue encryption` line up to its key, as smtpd takes it: indented, with any blanks between its
# words, and `key` before the key in the grammar before 6.4 (smtpd -n: configuration OK).
QUEUE_KEY_LINE = r"(?m)^[ \t]*queue[ \t]+encryption[ \t]+(?:key[ \t]+)?"


def generate_queue_key() -> str:
    """16 random bytes as 32 hex characters, like `openssl rand -hex 16`."""
    # What secrets.token_hex(16) returns (it reads os.urandom too), without importing `secrets`, whose
    # hmac/hashlib load libcrypto: ~4 ms of `mailsetup keygen`'s start.
    return os.urandom(16).hex()


def validate_queue_key(value: str, where: str) -> str:
    """The key as smtpd.conf will carry it; `where` names the flag or file for the error."""
    if len(value) != KEY_LENGTH:
        raise MailsetupError(
            f"{where}: the queue key must be exactly {KEY_LENGTH} characters, not {len(value)} "
            "(make one with `mailsetup keygen`)"
        )
    if not _PLAIN.match(value):
        # smtpd would take other bytes too, but a key must fit on a smtpd.conf line unquoted.
        raise MailsetupError(f"{where}: the queue key must be letters and digits only")
    return value


def queue_key_file_bytes(key: str) -> bytes:
    return (key + "\n").encode("ascii")


def read_queue_key(path: Path) -> str:
    from mailsetup.files import read_secret

    try:
        text = read_secret(Path(path)).decode("ascii", errors="strict")
    except FileNotFoundError:
        raise MailsetupError(f"{path}: the queue key file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not ASCII text"
        raise MailsetupError(f"{path}: cannot read the queue key: {why}") from None
    return validate_queue_key(text.strip(), str(path))
