"""Durable Maildir delivery: write in tmp/, fsync, rename into new/, fsync the directory.

A message is in new/ completely or not at all, and survives a crash once the call returns. A real
user's Maildir is reached through opened descriptors from their home down, never by a path root
walks (files.open_users_dir): what they put in their home cannot steer root's writes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from mailsetup.files import open_home, open_users_dir, publish, publish_in, remove_in, write_new_file

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


_known: set[Path] = set()


def ensure_maildir(maildir: Path, owner: tuple[int, int] | None = None) -> None:
    """tmp/, new/, cur/ (0700). For a real user (`owner`), their home must exist already and what is
    made belongs to them; in a sandbox, missing parents are made too."""
    if owner is not None:
        for fd in open_users_maildir(maildir, owner):
            os.close(fd)
        return
    for d in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if not d.is_dir():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _known.add(maildir)


def open_users_maildir(maildir: Path, owner: tuple[int, int], create: bool = True,
                       subdirs: tuple[str, ...] = ("tmp", "new", "cur")) -> list[int]:
    """fds of maildir/<subdirs>, in that order, for the user `owner`: from their home (maildir's
    parent, which must be theirs) each level is opened with O_NOFOLLOW and must be theirs; what is
    missing is made and given to them by descriptor. The caller closes the fds."""
    home_fd = _open_home_cached(maildir.parent, owner[0])
    fds: list[int] = []
    try:
        md_fd = open_users_dir(home_fd, maildir.name, owner, maildir.parent, create=create)
        try:
            for sub in subdirs:
                fds.append(open_users_dir(md_fd, sub, owner, maildir, create=create))
        finally:
            os.close(md_fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(home_fd)
    return fds


# Homes opened by the checked walk from /, kept: that walk is most of a delivery's syscalls. Each
# delivery works on its own dup (closing a shared fd another thread is using could hand that number
# to some other file), and takes it only while the path still leads to that very directory, which
# still exists and is still the user's. Bounded: every entry holds a descriptor open.
_homes: dict[Path, tuple[int, int]] = {}  # home -> (fd, uid)
_homes_lock = threading.Lock()
_HOMES_KEPT = 256


def _open_home_cached(home: Path, uid: int) -> int:
    with _homes_lock:
        cached = _homes.get(home)
        fd = os.dup(cached[0]) if cached and cached[1] == uid else None
    if fd is not None:
        try:
            st = os.fstat(fd)
            now = os.stat(home)  # reads only: it can confirm the checked directory, never replace it
            if st.st_uid == uid and st.st_nlink > 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except OSError:
            pass
        os.close(fd)
    fd = open_home(home, uid)
    with _homes_lock:
        old = _homes.pop(home, None)
        if old is not None:
            os.close(old[0])
        while len(_homes) >= _HOMES_KEPT:
            os.close(_homes.pop(next(iter(_homes)))[0])
        _homes[home] = (os.dup(fd), uid)
    return fd


def unique_name() -> str:
    now = time.time()
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def deliver(maildir: Path, *chunks: bytes, owner: tuple[int, int] | None = None) -> Path:
    """Put the message (the chunks, in order) into maildir/new durably; returns its path.

    Raises OSError (disk full, permissions) with nothing left in new/, and MailsetupError when a real
    user's Maildir is not safe for root to write in (a link, someone else's folder)."""
    return deliver_chunks(maildir, chunks, owner=owner)


def deliver_chunks(maildir: Path, chunks: Iterable[bytes], owner: tuple[int, int] | None = None) -> Path:
    """deliver() from a stream of chunks (a big message read from its spool file piece by piece),
    each written as it comes, so the message is never whole in memory."""
    if owner is not None:
        return _deliver_as(maildir, chunks, owner)
    if maildir not in _known:  # three mkdirs per message cost more than they are worth
        ensure_maildir(maildir)
    name = unique_name()
    tmp = maildir / "tmp" / name
    try:
        write_new_file(tmp, chunks, 0o600)
    except FileNotFoundError:  # removed under us since we last looked (raised by the open, before any chunk is read)
        ensure_maildir(maildir)
        write_new_file(tmp, chunks, 0o600)
    final = maildir / "new" / name
    publish(tmp, final)
    return final


def _deliver_as(maildir: Path, chunks: Iterable[bytes], owner: tuple[int, int]) -> Path:
    # Maildir and its folders are opened afresh for every message (a few dozen µs against a few ms
    # of fsync): a kept descriptor would go on delivering into a Maildir the user has moved away.
    tmp_fd, new_fd, cur_fd = open_users_maildir(maildir, owner)
    os.close(cur_fd)  # only made when missing: readers expect it
    try:
        name = unique_name()
        # Born 0600 with O_EXCL|O_NOFOLLOW in the opened tmp/, given to the user by descriptor.
        write_new_file(name, chunks, 0o600, owner, dir_fd=tmp_fd)
        try:
            publish_in(tmp_fd, new_fd, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp_fd)
            raise
    finally:
        os.close(tmp_fd)
        os.close(new_fd)
    return maildir / "new" / name


def find_delivered(maildir: Path, token: bytes, owner: tuple[int, int] | None = None) -> list[Path]:
    """The messages in maildir/new that hold `token` (the smoke test's own mail). For a real user
    read as it was written: through descriptors from their home down, a link in new/ never followed,
    only their own regular files opened."""
    if owner is None:
        new = maildir / "new"
        return [p for p in new.iterdir() if token in p.read_bytes()] if new.is_dir() else []
    try:
        [new_fd] = open_users_maildir(maildir, owner, create=False, subdirs=("new",))
    except FileNotFoundError:
        return []
    found = []
    try:
        for name in os.listdir(new_fd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=new_fd)
            except OSError:  # a link, or gone meanwhile: not ours
                continue
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == owner[0] and token in os.read(fd, 1 << 20):
                    found.append(maildir / "new" / name)
            finally:
                os.close(fd)
    finally:
        os.close(new_fd)
    return found


def remove_delivered(message: Path, owner: tuple[int, int] | None = None) -> None:
    """Take a message find_delivered found out of new/ again (by its name in the opened new/)."""
    if owner is None:
        message.unlink(missing_ok=True)
        return
    try:
        [new_fd] = open_users_maildir(message.parent.parent, owner, create=False, subdirs=("new",))
    except FileNotFoundError:
        return
    try:
        remove_in(new_fd, message.name)
    finally:
        os.close(new_fd)
