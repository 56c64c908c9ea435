"""The defaults and the version reading that light commands share with the model (model.py takes
them from here): `mailsetup aliases` needs these without loading the model and what it imports."""

from __future__ import annotations

import re

from mailsetup.errors import MailsetupError

DEFAULT_SMTPD_VERSION = (7, 4)
DEFAULT_KEEP_BACKUPS = 5  # dated backups kept of each file, as certbot keeps five versions


def parse_version(value: object, flag: str = "--smtpd-version") -> tuple[int, int]:
    """7.4, 6.0.3, or as `smtpd -h` prints it (6.8.0p2, 7.4.0-portable); nothing after it: a version
    with words behind it ("7.4 evil") is a mistake, not 7.4."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?(?:p\d+)?(?:-[A-Za-z]+)?\s*", str(value))
    if not m:
        raise MailsetupError(f"{flag}: {value!r} is not a version like 7.4 or 6.0.3")
    return int(m.group(1)), int(m.group(2))
