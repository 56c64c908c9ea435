"""Durable Maildir delivery: write in tmp/, fsync, rename into new/, fsync the directory.

A message is in new/ completely or not at all, and survives a crash once the call returns.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from mailsetup.files import publish, write_new_file

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


_known: set[Path] = set()


def ensure_maildir(maildir: Path, owner: tuple[int, int] | None = None) -> None:
    """tmp/, new/, cur/ (0700). For a real user (`owner`), the home must exist already and what is
    made belongs to them, as if they had made it; in a sandbox, missing parents are made too."""
    for d in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if d.is_dir():
            continue
        d.mkdir(mode=0o700, parents=owner is None, exist_ok=True)
        if owner is not None:
            os.chown(d, *owner, follow_symlinks=False)  # a link swapped in meanwhile: never its target
    _known.add(maildir)


def unique_name() -> str:
    now = time.time()
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def deliver(maildir: Path, *chunks: bytes, owner: tuple[int, int] | None = None) -> Path:
    """Put the message (the chunks, in order) into maildir/new durably; returns its path.

    Raises OSError (disk full, permissions) with nothing left in new/."""
    return deliver_chunks(maildir, chunks, owner=owner)


def deliver_chunks(maildir: Path, chunks: Iterable[bytes], owner: tuple[int, int] | None = None) -> Path:
    """deliver() from a stream of chunks (a big message read from its spool file piece by piece),
    each written as it comes, so the message is never whole in memory."""
    if maildir not in _known:  # three mkdirs per message cost more than they are worth
        ensure_maildir(maildir, owner)
    name = unique_name()
    tmp = maildir / "tmp" / name
    try:
        write_new_file(tmp, chunks, 0o600, owner)
    except FileNotFoundError:  # removed under us since we last looked (raised by the open, before any chunk is read)
        ensure_maildir(maildir, owner)
        write_new_file(tmp, chunks, 0o600, owner)
    final = maildir / "new" / name
    publish(tmp, final)
    return final
