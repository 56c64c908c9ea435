"""OpenSMTPD's queue as it lies on disk: where the envelopes are (queue_fs.c) and whether a queue
key opens them (crypto.c) — read when smtpd cannot be asked, and to find mail a key change stranded.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

# queue_fs.c: PATH_SPOOL/queue/<msgid's top byte, 2 hex>/<msgid, 8 hex>/<evpid, 16 hex>, beside the
# message file. incoming/ is not counted: smtpd purges it at every start, whatever the key.
_BUCKET = re.compile(r"^[0-9a-f]{2}$")
_MSGID = re.compile(r"^[0-9a-f]{8}$")
_EVPID = re.compile(r"^[0-9a-f]{16}$")

# crypto.c: a version byte (API_VERSION 1), a 12-byte IV, the AES-256-GCM ciphertext, a 16-byte tag.
# Measured on 7.4.0p1: every envelope and message file it writes decrypts this way with the key.
_VERSION, _IV, _TAG = 1, 12, 16
_ENVELOPE_MAX = 64 * 1024  # an envelope is a few hundred bytes; smtpd itself refuses huge ones


def _subdirs(path: Path, pattern: re.Pattern) -> list[Path]:
    """Directories below `path` whose names match, never through a symlink (smtpd's fts is physical)."""
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if pattern.match(e.name) and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def queued_envelopes(spool: Path) -> list[Path]:
    """Every envelope file smtpd would load from `spool` at its next start."""
    found = []
    for bucket in _subdirs(Path(spool) / "queue", _BUCKET):
        for msg in _subdirs(bucket, _MSGID):
            if not msg.name.startswith(bucket.name):
                continue
            try:
                with os.scandir(msg) as it:
                    found.extend(Path(e.path) for e in it if _EVPID.match(e.name) and e.name.startswith(msg.name)
                                  and e.is_file(follow_symlinks=False))
            except OSError:
                continue
    return sorted(found)


def _read_envelope(path: Path) -> bytes | None:
    """The file's bytes, never through a symlink and never more than an envelope can be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _ENVELOPE_MAX:
            return None
        return os.read(fd, _ENVELOPE_MAX + 1)
    finally:
        os.close(fd)


def opens_with(data: bytes, key: str) -> bool:
    """Whether smtpd, holding `key`, could decrypt this queue file (the GCM tag proves it)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data) <= 1 + _IV + _TAG or data[0] != _VERSION:
        return False
    try:
        AESGCM(key.encode("ascii")).decrypt(data[1:1 + _IV], data[1 + _IV:], None)
    except (InvalidTag, ValueError):
        return False
    return True


def unreadable_envelopes(spool: Path, key: str) -> list[Path]:
    """The queued envelopes `key` cannot decrypt: smtpd running with that key skips them for ever."""
    out = []
    for path in queued_envelopes(spool):
        data = _read_envelope(path)
        if data is None or not opens_with(data, key):
            out.append(path)
    return out


def key_that_opens(paths: list[Path], keys: list[tuple[Path, str]]) -> Path | None:
    """Which of the kept keys (path, key) decrypts the first of these envelopes, if any."""
    for path in paths[:1]:
        data = _read_envelope(path)
        if data is None:
            return None
        for where, key in keys:
            if opens_with(data, key):
                return where
    return None
