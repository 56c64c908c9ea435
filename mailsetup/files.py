"""The only code that writes, and the reads root must trust: atomic replace, dated backups (kept to
a number), modes born right, the checked walk down to a file. Plans of files (FileChange, Plan,
apply_plan, undo) are plan.py's, over these; `mailsetup aliases` loads this module alone."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from _thread import allocate_lock
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailsetup.errors import MailsetupError

if TYPE_CHECKING:
    from typing import TypeVar

    _T = TypeVar("_T")


def fsync_dir(directory: Path) -> None:
    """Make what was done in `directory` so far durable. Concurrent callers (the MTA's delivery
    threads, each after its rename) share one fsync: a group commit."""
    def sync() -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _group_commit(str(directory), sync)


def fsync_dir_fd(dir_fd: int) -> None:
    """fsync_dir() for a directory opened already, shared with concurrent callers the same way."""
    st = os.fstat(dir_fd)
    _group_commit((st.st_dev, st.st_ino), lambda: os.fsync(dir_fd))


class _Commits:
    """The fsyncs of one directory, one at a time. A caller needs one that starts after it arrives
    (its rename is then covered); whoever arrives while none runs starts it for all waiting, so N
    concurrent deliveries into one Maildir cost one directory fsync instead of N."""

    def __init__(self) -> None:
        import threading  # here: only the MTA's deliveries share fsyncs; a command loads it on none

        self.cond = threading.Condition()
        self.started = 0  # fsyncs started; they run one at a time, so they also end in order
        self.done = 0  # fsyncs ended
        self.failed: dict[int, BaseException] = {}  # number -> what that fsync raised


_commits: dict[object, _Commits] = {}
_commits_lock = allocate_lock()  # threading.Lock itself, without loading threading


def _group_commit(key: object, sync: Callable[[], None]) -> None:
    with _commits_lock:
        group = _commits.get(key) or _commits.setdefault(key, _Commits())
    with group.cond:
        ticket = group.started  # the first fsync to start from now on covers this caller
        while group.done <= ticket:
            if group.started > group.done:  # one is running: it may have begun before our rename
                group.cond.wait()
                continue
            number = group.started  # == ticket: nothing ran since we arrived
            group.started += 1
            group.cond.release()
            error: BaseException | None = None
            try:
                sync()
            except BaseException as exc:  # noqa: BLE001 - handed to every caller this fsync covers
                error = exc
            finally:
                group.cond.acquire()
                if error is not None:
                    group.failed[number] = error
                    while len(group.failed) > 64:
                        group.failed.pop(min(group.failed))
                group.done += 1
                group.cond.notify_all()
        error = group.failed.get(ticket)
    if error is not None:
        raise error


# --- paths root can trust ---------------------------------------------------------------------
# As root, mailsetup writes and reads secrets only where no other user can steer it (OpenSSH's
# StrictModes): every directory from / down is root's and not writable by group or others (a
# root-owned sticky directory such as /tmp is fine: its other entries must still be root's), and
# the file itself is root's and never a symlink. Directories are opened one by one with O_NOFOLLOW
# and every file is made, read and renamed relative to the opened directory (dir_fd), so nothing
# can be swapped between the check and the use. A normal user running mailsetup on their own
# sandbox can only touch what they could touch anyway: no checks, and a symlinked file is written
# through.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_MAX_LINKS = 40
_NOBODY = 65534  # read as nobody where anyone may write on the way
_SWAP = "a user other than root could swap it"


def strict() -> bool:
    """True when the trust rules apply: mailsetup runs as root."""
    return os.geteuid() == 0


def _refuse(verb: str, target: Path | str, why: str) -> MailsetupError:
    return MailsetupError(f"refusing to {verb} {target}: {why}")


def _absolute(path: Path) -> Path:
    # No lexical normalisation: `..` is walked for real, after any link it follows.
    path = Path(path)
    return path if path.is_absolute() else Path.cwd() / path


def _writers(mode: int) -> str:
    return "group and others" if mode & 0o022 == 0o022 else "group" if mode & 0o020 else "others"


def _dir_problem(st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid} ({_SWAP})"
    if mode & 0o022 and not mode & stat.S_ISVTX:
        return f"is writable by {_writers(mode)} (mode {mode:04o}; {_SWAP})"
    return None


def _file_problem(st: os.stat_result, whose: str = "it") -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return f"{whose} is a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"{whose} is not a regular file"
    if st.st_uid != 0:
        return f"{whose} is owned by uid {st.st_uid} (a user other than root could have written it)"
    if mode & 0o022:
        return (f"{whose} is writable by {_writers(mode)} (mode {mode:04o}; a user other than root could have "
                "written it)")
    return None


def _walk(directory: Path, verb: str, target: Path, create: bool = False, private: bool = False,
          created: list[Path] | None = None, last_uid: int | None = None) -> tuple[int, str]:
    """(fd, real path) of `directory`, reached from / through directories no other user controls.

    Symlinks on the way are followed only when root owns them (in a directory only root can change,
    only root could have made them); a missing directory is made when `create`. With `last_uid`,
    `directory` itself must instead belong to that user (a home: theirs to change, not root's)."""
    pending = [p for p in reversed(_absolute(directory).parts) if p != "/"]
    stack: list[tuple[str, int]] = []  # (path, fd) of each directory entered, / first
    try:
        stack.append(("/", os.open("/", _DIR_FLAGS)))
        problem = _dir_problem(os.fstat(stack[0][1]))
        if problem:
            raise _refuse(verb, target, f"/ {problem}")
        links = 0
        while pending:
            name = pending.pop()
            if name in ("", ".", ".."):
                if name == ".." and len(stack) > 1:
                    os.close(stack.pop()[1])
                continue
            here = os.path.join(stack[-1][0], name)
            child = _open_step(stack[-1][1], name, here, create, private and not pending, created)
            if child is None:  # a link of root's: its destination's parts are walked in its place
                links += 1
                pending.extend(_link_parts(stack, name, here, verb, target, links))
                continue
            stack.append((here, child))
            problem = _step_problem(os.fstat(child), last_uid if not pending else None)
            if problem:
                raise _refuse(verb, target, f"{here} {problem}")
        here, fd = stack.pop()
        return fd, here
    finally:
        for _, fd in stack:
            os.close(fd)


def _open_step(fd: int, name: str, here: str, create: bool, private: bool, created: list[Path] | None) -> int | None:
    """fd of the directory `name` in `fd` (which is `here`'s parent), made when missing and `create`;
    None when `name` is a link or a file, which _link_parts judges."""
    try:
        return os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), here) from None
        return _make_step(fd, name, here, private, created)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, exc.strerror, here) from None
        return None


def _make_step(fd: int, name: str, here: str, private: bool, created: list[Path] | None) -> int:
    # A new directory that holds a private key is not listable by others; 0755 elsewhere.
    try:
        os.mkdir(name, 0o700 if private else 0o755, dir_fd=fd)
        if created is not None:
            created.append(Path(here))
    except FileExistsError:
        pass  # made meanwhile: judged by the walk like any other
    return os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)


def _link_parts(stack: list[tuple[str, int]], name: str, here: str, verb: str, target: Path,
                links: int) -> list[str]:
    """The parts to walk instead of `name` in the last directory of `stack`, a symbolic link root
    owns (refused otherwise), in the order they are popped; an absolute one takes the walk back to /."""
    fd = stack[-1][1]
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here)
    if st.st_uid != 0:
        raise _refuse(verb, target, f"{here} is a symbolic link owned by uid {st.st_uid} ({_SWAP})")
    if links > _MAX_LINKS:
        raise _refuse(verb, target, f"too many symbolic links at {here}")
    dest = os.readlink(name, dir_fd=fd)
    if dest.startswith("/"):
        while len(stack) > 1:
            os.close(stack.pop()[1])
    return [p for p in reversed(Path(dest).parts) if p != "/"]


def _step_problem(st: os.stat_result, owner: int | None) -> str | None:
    """Why a directory on the walk cannot be trusted: the last one of a home must be its user's
    (`owner`); every other one must pass _dir_problem."""
    if owner is None:
        return _dir_problem(st)
    return None if st.st_uid == owner else f"is owned by uid {st.st_uid}, not by its user (uid {owner})"


def _open_dir(directory: Path, verb: str, target: Path, create: bool = False, private: bool = False,
              created: list[Path] | None = None) -> tuple[int, str]:
    """(fd, path) of the directory a file is made, read or renamed in; checked when `strict()`."""
    if strict():
        return _walk(directory, verb, target, create, private, created)
    if create:
        _make_dirs(Path(directory), created if created is not None else [], private)
    return os.open(directory, _DIR_FLAGS), str(directory)


def _make_dirs(directory: Path, created: list[Path], private: bool) -> None:
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for i, m in enumerate(reversed(missing)):
        m.mkdir(mode=0o700 if private and i == len(missing) - 1 else 0o755)
        created.append(m)


def make_dirs(directory: Path, private: bool = False) -> None:
    """Make `directory` and its missing parents; as root, only under directories no user controls."""
    fd, _ = _open_dir(directory, "write in", directory, create=True, private=private)
    os.close(fd)


def make_users_dirs(parent: Path, path: Sequence[str], leaves: Sequence[str], owner: tuple[int, int]) -> None:
    """parent/path[0]/path[1]…, each then each of `leaves` in the last, made (0700) for `owner` and
    given to them, one level at a time by open_users_dir: a link they put there is refused, never
    followed, and nothing of anyone else's is ever given to them."""
    fd, _ = _open_dir(parent, "write in", parent)
    inside = Path(parent)
    try:
        for name in path:
            child = open_users_dir(fd, name, owner, inside, "write in")
            inside = inside / name
            os.close(fd)
            fd = child
        for name in leaves:
            os.close(open_users_dir(fd, name, owner, inside, "write in"))
    finally:
        os.close(fd)


# --- a user's own directories, as root ----------------------------------------------------------
# Root delivering into a user's home must not be steered by what that user controls (smtpd's
# mail.maildir runs as the user; we run as root). So no path below the home is ever walked: each
# level is opened relative to the one above with O_NOFOLLOW|O_DIRECTORY (a link or a file is
# refused, never followed), must be the user's own, and what root makes there is given away by its
# descriptor (fchown), never by name: a rename race can swap a name, not an open descriptor.


def open_home(home: Path, uid: int, verb: str = "deliver to") -> int:
    """fd of the home of user `uid`, which must be theirs. As root it is reached from / through
    directories only root controls (a root-owned link such as /home -> /srv/home is followed)."""
    if strict():
        fd, _ = _walk(home, verb, home, last_uid=uid)
    else:
        fd = os.open(home, _DIR_FLAGS)
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise _refuse(verb, home, f"it is owned by uid {st.st_uid}, not by its user (uid {uid})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_users_dir(parent_fd: int, name: str, owner: tuple[int, int], parent: Path, verb: str = "deliver to",
                   create: bool = True) -> int:
    """fd of the directory `name` in `parent_fd` (which is `parent`), which belongs to `owner`: made
    (0700) and given to them when missing (and `create`). A link or a file there is refused, so is a
    directory of anyone else's; a root-owned one is given to them only when nothing is in it (one we
    just made, or an empty one: nothing to gain) or when only root could have put it there."""
    try:
        fd = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(parent / name)) from None
        with contextlib.suppress(FileExistsError):  # made meanwhile: judged below like any other
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        return open_users_dir(parent_fd, name, owner, parent, verb, create=False)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(verb, parent / name, "it is not a folder but a link or a file") from None
        raise OSError(exc.errno, exc.strerror, str(parent / name)) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != owner[0]:
            if st.st_uid != 0 or not (_dir_problem(os.fstat(parent_fd)) is None or not os.listdir(fd)):
                raise _refuse(verb, parent / name,
                              f"it is owned by uid {st.st_uid}, not by its user (uid {owner[0]})")
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def publish_in(tmp_fd: int, new_fd: int, name: str) -> None:
    """Move the complete, fsynced file `name` from one opened directory to another, durably."""
    os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
    fsync_dir_fd(new_fd)  # shared with concurrent deliveries into the same folder


def remove_in(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _open_existing(dir_fd: int, name: str, verb: str, target: Path) -> tuple[int, os.stat_result] | None:
    """An fd of the file `name` in the directory and its stat; None when there is none. As root a
    link, another user's file or one others can write is refused."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP and strict():
            raise _refuse(verb, target, "it is a symbolic link (root never writes through a link)") from None
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):  # a mistake, not a threat: the write fails and is undone
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    if strict():
        problem = _file_problem(st)
    else:
        problem = None if stat.S_ISREG(st.st_mode) else "it is not a regular file"
    if problem:
        os.close(fd)
        raise _refuse(verb, target, problem)
    return fd, st


def _read_fd(fd: int) -> bytes:
    # The size it has now in one read, so that a big file is one bytes object (joining one chunk
    # copies nothing): a 42 MB aliases file must not cost twice that at its peak.
    chunks = [os.read(fd, max(os.fstat(fd).st_size, 0) + 1)]
    while chunks[-1] and (chunk := os.read(fd, 1 << 16)):
        chunks.append(chunk)
    return b"".join(chunks)


def read_current(path: Path, verb: str = "write") -> tuple[bytes, os.stat_result] | None:
    """What a file to be replaced holds now, read the way it will be written: None when it (or its
    folder) does not exist yet; a refusal, as root, when another user could steer it."""
    target = _target(path)
    try:
        dir_fd, _ = _open_dir(target.parent, verb, path)
    except FileNotFoundError:
        return None
    try:
        opened = _open_existing(dir_fd, target.name, verb, path)
    finally:
        os.close(dir_fd)
    if opened is None:
        return None
    fd, st = opened
    try:
        return _read_fd(fd), st
    finally:
        os.close(fd)


def read_secret(path: Path) -> bytes:
    """A key, a certificate, a credentials table or a config root will act on. As root: only from a
    regular file of root's that no other user can write, reached through directories no other user
    controls; a link is followed only when it is root's own (as Let's Encrypt's live/ links are).
    OSError when it cannot be read (FileNotFoundError when it is not there)."""
    path = Path(path)
    if not strict():
        return path.read_bytes()
    fd = _open_trusted(path)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _open_trusted(path: Path) -> int:
    """read_secret's open, as root: the descriptor of the file read_secret would read."""
    current = _absolute(path)
    for _ in range(_MAX_LINKS):
        dir_fd, real_dir = _walk(current.parent, "read", path)
        try:
            try:
                fd = os.open(current.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise OSError(exc.errno, exc.strerror, str(path)) from None
                st = os.stat(current.name, dir_fd=dir_fd, follow_symlinks=False)
                if st.st_uid != 0:
                    raise _refuse("read", path, f"{os.path.join(real_dir, current.name)} is a symbolic link "
                                                f"owned by uid {st.st_uid} ({_SWAP})") from None
                current = Path(real_dir) / os.readlink(current.name, dir_fd=dir_fd)
                continue
        finally:
            os.close(dir_fd)
        try:
            problem = _file_problem(os.fstat(fd), os.path.join(real_dir, current.name))
        except BaseException:
            os.close(fd)
            raise
        if problem:
            os.close(fd)
            raise _refuse("read", path, problem)
        return fd
    raise _refuse("read", path, "too many symbolic links")


def use_trusted_tempdir() -> None:
    """As root, work (smtpd's loopback copy of the config, temporary databases) only in a temporary
    folder no other user controls: a TMPDIR that fails the checks is passed over for /tmp. Judged
    here, before tempfile's own probe would write a file into it."""
    import tempfile

    candidates = [os.environ[v] for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)] + ["/tmp"]
    for candidate in candidates:
        try:
            fd, _ = _walk(Path(candidate), "work in", Path(candidate))
        except (MailsetupError, OSError):
            continue
        os.close(fd)
        tempfile.tempdir = candidate
        return
    raise MailsetupError("no temporary folder that only root controls: /tmp and TMPDIR are not safe to work in")


INPUT_LIMIT = 256 << 20  # an aliases file of millions of entries is tens of MiB


def read_input(path: Path, limit: int = INPUT_LIMIT) -> bytes:
    """A file root reads because it was named (`--aliases`, `--answers`, `aliases SOURCE`). A path
    only root controls is read as root; a path a user controls (a folder, a link or the file is
    theirs, or anyone may write on the way) is read with that user's privileges, so it can never
    hand root's secrets to what mailsetup publishes. Only a regular file of at most `limit` bytes:
    a FIFO, a device or a huge file is refused, never waited on or read whole. OSError as open(2)
    gives it (FileNotFoundError, IsADirectoryError); MailsetupError for a refusal."""
    path = Path(path)
    if not strict():
        return _read_regular(path, limit)
    controllers = _controllers(path)
    if not controllers:
        data = read_secret(path)
        if len(data) > limit:
            raise _refuse("read", path, f"it is larger than {limit >> 20} MiB")
        return data
    if len(controllers) > 1:
        raise _refuse("read", path, f"users {', '.join(map(str, sorted(controllers)))} all control its path")
    return _read_as(controllers.pop(), path, limit)


def read_input_blocks(path: Path, limit: int = INPUT_LIMIT, block: int = 1 << 20) -> Iterator[bytes]:
    """read_input's bytes, a block at a time, for a file too big to hold whole (a million aliases):
    the same checks (a regular file of at most `limit` bytes; as root, read through the trusted walk,
    or, where a user controls the path, read with that user's privileges, whole, by read_input)."""
    path = Path(path)
    if strict() and _controllers(path):
        yield read_input(path, limit)
        return
    fd = _open_trusted(path) if strict() else os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _check_input(fd, path, limit)
        total = 0
        while data := os.read(fd, block):
            total += len(data)
            if total > limit:
                raise _refuse("read", path, f"it is larger than {limit >> 20} MiB")
            yield data
    finally:
        os.close(fd)


def _controllers(path: Path) -> set[int]:
    """The uids other than root that could steer `path`: owners of the folders, links and file on
    the way, or nobody's uid where a folder is writable by anyone (and not a sticky folder of root's)."""
    owners: set[int] = set()
    pending = [p for p in reversed(_absolute(path).parts) if p != "/"]
    current, links = "/", 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        here = os.path.join(current, name)
        try:
            st = os.lstat(here)
        except OSError:
            break  # the read itself says what is missing
        if st.st_uid != 0:
            owners.add(st.st_uid)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise _refuse("read", path, "too many symbolic links")
            dest = os.readlink(here)
            current = "/" if dest.startswith("/") else current
            pending.extend(p for p in reversed(Path(dest).parts) if p != "/")
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
            owners.add(_NOBODY)
        current = here
    return owners


def _check_input(fd: int, path: Path, limit: int) -> None:
    """A named input is a regular file of at most `limit` bytes: a FIFO or a device is never waited
    on, a directory is IsADirectoryError, anything else one refusal."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(st.st_mode):
        raise _refuse("read", path, "it is not a regular file")
    if st.st_size > limit:
        raise _refuse("read", path, f"it is larger than {limit >> 20} MiB")


def _read_regular(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _check_input(fd, path, limit)
        data = _read_fd_bounded(fd, limit)  # the size may grow while we read
        if len(data) > limit:
            raise _refuse("read", path, f"it is larger than {limit >> 20} MiB")
        return data
    finally:
        os.close(fd)


def _read_fd_bounded(fd: int, limit: int) -> bytes:
    first = os.read(fd, min(max(os.fstat(fd).st_size, 0), limit) + 1)  # one object for the usual case
    chunks, size = [first], len(first)
    while first and size <= limit and (chunk := os.read(fd, 1 << 20)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_as(uid: int, path: Path, limit: int) -> bytes:
    """`path` read by a child that has become `uid` (with that user's groups); its bytes or why not."""
    import pwd

    try:
        pw = pwd.getpwuid(uid)
        user, gid = pw.pw_name, pw.pw_gid
    except KeyError:
        user, gid = None, _NOBODY
    data_r, data_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, read, send the bytes or "errno\0message", never return
        code = 0
        try:
            os.close(data_r)
            os.setgroups(os.getgrouplist(user, gid) if user else [])
            os.setgid(gid)
            os.setuid(uid)
            try:
                data = _read_regular(path, limit)
            except OSError as exc:
                data, code = f"{exc.errno}\0{exc.strerror}".encode(), 1
            except MailsetupError as exc:
                data, code = f"0\0{exc.message.rpartition(': ')[2]}".encode(), 1
            view = memoryview(data)
            while view:
                view = view[os.write(data_w, view):]
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
            code = 2
        os._exit(code)
    os.close(data_w)
    with os.fdopen(data_r, "rb") as fh:
        data = fh.read(limit + 4096)  # the child sends at most `limit` bytes, or one error
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    who = f"uid {uid}" + (f" ({user})" if user else "")
    if code == 0:
        return data
    if code == 1:
        num, _, why = data.decode(errors="replace").partition("\0")
        if num in (str(errno.ENOENT), str(errno.EISDIR), str(errno.ENOTDIR)):
            raise OSError(int(num), why, str(path))
        raise _refuse("read", path, f"{who}, who controls its path, cannot read it: {why}")
    raise _refuse("read", path, f"could not read it as {who}, who controls its path")


def write_new_file(path: Path | str, chunks: Iterable[bytes], mode: int, owner: tuple[int, int] | None = None,
                   dir_fd: int | None = None) -> None:
    """Create `path` (it must not exist; a name in `dir_fd` when given) holding `chunks` (written one
    by one as they come: a stream of a big message is never joined in memory), fsynced; removed
    again if anything fails.

    It is born private (O_EXCL, owner-only) and widened to `mode` only once complete, so a secret is
    never readable by others, not even for a moment.
    """
    # Owner bits only at birth (the umask can only take bits away, never add them); no umask
    # juggling, which would race between the MTA's delivery threads.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, mode & 0o700,
                 dir_fd=dir_fd)
    try:
        for chunk in chunks:
            data = memoryview(chunk)
            while data:
                data = data[os.write(fd, data):]
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # the final mode, once the content is complete
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Move a complete, fsynced file into place and make the move itself durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def resolve(path: Path) -> Path:
    """For a normal user, a symlink is written through (the link stays, its target changes)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _target(path: Path) -> Path:
    """The file a write replaces: as root the path itself (a link there is refused, not followed)."""
    return Path(path) if strict() else resolve(Path(path))


def _keep_owner(st: os.stat_result | None) -> tuple[int, int] | None:
    """As root, a replaced file keeps its group (a key's group may be ssl-cert); its owner is root,
    the only owner a file root replaces may have."""
    if st is None or not strict() or st.st_gid == os.getegid():
        return None
    return 0, st.st_gid


def _tmp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp"


def _backup_in(dir_fd: int, path: Path, data: bytes, st: os.stat_result, private: bool = False) -> Path:
    """A dated copy of `path` beside it (NAME.YYYYmmdd-HHMMSS.bak, NAME.YYYYmmdd-HHMMSS.N.bak when
    that is taken), same mode and group; a secret's (`private`) is its owner's alone (0600 at most), even
    where the live file is shared with a group: nothing needs to read an old key or password."""
    name = _backup_name(dir_fd, path)
    tmp = _tmp_name(name)
    mode = stat.S_IMODE(st.st_mode) & (0o600 if private else 0o7777)
    write_new_file(tmp, [data], mode, _keep_owner(st), dir_fd=dir_fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return path.with_name(name)


def _exists_in(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _replace(path: Path, content: bytes, mode: int, backup: bool, created: list[Path] | None = None,
             private: bool = False, owner: tuple[int, int] | None = None) -> tuple[Path, Path | None, int | None]:
    """Write `content` to `path` atomically (temp file in the same opened directory, fsynced, renamed,
    directory fsynced); returns (file written, backup or None, mode of the file replaced or None)."""
    target = _target(path)
    dir_fd, _ = _open_dir(target.parent, "write", path, create=created is not None, private=private,
                          created=created)
    try:
        opened = _open_existing(dir_fd, target.name, "write", path)
        st = None
        saved = None
        if opened is not None:
            fd, st = opened
            try:
                if backup:
                    saved = _backup_in(dir_fd, target, _read_fd(fd), st, private)
            finally:
                os.close(fd)
        tmp = _tmp_name(target.name)
        try:
            write_new_file(tmp, [content], mode, owner or _keep_owner(st), dir_fd=dir_fd)
            os.replace(tmp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
        return target, saved, None if st is None else stat.S_IMODE(st.st_mode)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        os.close(dir_fd)


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` naming the file a person asked for, when it names none or only a relative entry."""
    if exc.filename is None or not str(exc.filename).startswith("/"):
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


def replace_built(path: Path, build: Callable[[str], _T], mode: int, keep_backups: int | None = None) -> _T:
    """Replace `path` with a file a library writes by name (a Berkeley DB): `build(name)` makes it as
    a temporary file inside the directory opened and checked as _replace does (as root: one only root
    controls, so its name cannot be steered); then it gets `mode`, is fsynced, the old file becomes a
    dated backup (a hard link: never read into memory) and the new one is renamed into place.
    Anything failing removes the temporary file and the backup and leaves the old one as it was."""
    target = _target(path)
    dir_fd, real_dir = _open_dir(target.parent, "write", path)
    backup = None
    try:
        opened = _open_existing(dir_fd, target.name, "write", path)
        st = None
        if opened is not None:
            os.close(opened[0])
            st = opened[1]
        tmp = _tmp_name(target.name)
        try:
            result = build(os.path.join(real_dir, tmp))
            _finish_built(dir_fd, tmp, mode, _keep_owner(st), path)
            if st is not None:
                backup = _link_backup_in(dir_fd, target)
            os.replace(tmp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.unlink(backup.name, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        os.close(dir_fd)
    if keep_backups is not None and backup is not None:
        _prune_backups_of(target, backup.name, max(1, keep_backups))
    return result


def _finish_built(dir_fd: int, name: str, mode: int, owner: tuple[int, int] | None, shown: Path) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse("write", shown, "the file built is not a regular file")
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup_name(dir_fd: int, path: Path) -> str:
    """NAME.YYYYmmdd-HHMMSS.bak beside `path`, or NAME.YYYYmmdd-HHMMSS.N.bak when that is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{path.name}.{stamp}.bak", 1
    while _exists_in(dir_fd, name):
        name, n = f"{path.name}.{stamp}.{n}.bak", n + 1
    return name


def _link_backup_in(dir_fd: int, path: Path) -> Path:
    """A dated backup of `path` that is the old file itself (a second name for it, made before the new
    file is renamed over the first): same bytes, mode and owner, at no cost in memory or disk."""
    name = _backup_name(dir_fd, path)
    os.link(path.name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    return path.with_name(name)


def write_atomic(path: Path, content: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write `content` to `path` so that readers see the old file or the new one, never a mix. As
    root, only where no other user can steer the write (see above). `owner` (uid, gid) is given to
    the new file; without it a replaced file keeps its group."""
    _replace(path, content, mode, backup=False, owner=owner)


def _group_can_enter(directory: Path, gid: int, st: os.stat_result | None = None) -> bool:
    st = st or directory.stat()
    if st.st_mode & 0o001:
        return True
    return st.st_gid == gid and bool(st.st_mode & 0o010)


def _let_group_enter(directory: Path, gid: int, changed: list[tuple[Path, int, int, int]]) -> None:
    """Let group `gid` enter a root-owned directory (chgrp + g+x: it may open the files it is
    given, not list the rest); others gain nothing. Recorded in `changed` for undo."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        st = os.fstat(fd)
        if _group_can_enter(directory, gid, st) or st.st_uid != 0:
            return
        changed.append((directory, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
        os.fchown(fd, 0, gid)
        os.fchmod(fd, (stat.S_IMODE(st.st_mode) & ~0o070) | 0o010)
    finally:
        os.close(fd)


def _chmod_in(dir_fd: int, name: str, mode: int) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


# --- backups kept to a number -----------------------------------------------------------------
# Every replaced file leaves a dated backup beside it; like certbot's storage.truncate (which keeps
# the last five versions) only the newest few of each file are kept. As root a backup is removed
# only when it is surely one we made: a regular file of ours, named exactly as _backup_in names that
# file's backups, in the directory the write itself went through (reached by the same trusted walk).
# A link, another user's file, or a name that merely looks like one is never touched.


def _prune_backups_of(path: Path, fresh: str, keep: int, secret: bool = False) -> list[Path]:
    try:
        dir_fd, _ = _open_dir(path.parent, "remove old backups in", path)
    except (OSError, MailsetupError):
        return []
    removed: list[Path] = []
    try:
        older = sorted((b for b in _own_backups(dir_fd, path.name) if b[2] != fresh), reverse=True)
        for _, _, name in older[:keep - 1] if secret else ():
            with contextlib.suppress(OSError):
                _owner_only_in(dir_fd, name)
        for _, _, name in older[keep - 1:]:  # newest first: the fresh one and keep - 1 of these stay
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(path.with_name(name))
        if removed:
            os.fsync(dir_fd)
    except OSError:
        pass  # the listing failed, or the fsync: what was removed stays removed, nothing else is
    finally:
        os.close(dir_fd)
    return removed


def _owner_only_in(dir_fd: int, name: str) -> None:
    """Take group's and others' bits off a backup of a secret: opened without following a link, and
    changed only when it is a regular file of ours."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1 and st.st_mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o600)
    finally:
        os.close(fd)


def _own_backups(dir_fd: int, name: str) -> list[tuple[str, int, str]]:
    """(stamp, number, entry) of each backup of the file `name` in the directory: exactly
    NAME.YYYYmmdd-HHMMSS.bak or NAME.YYYYmmdd-HHMMSS.N.bak, a regular file (never a link) owned by
    whoever runs mailsetup, with no other name: a backup is a fresh copy, so a second link is a file
    of root's someone hard-linked here (a group-writable one, in a sticky folder), not ours. In a
    directory only root can change (or a sticky one, where no one else can rename root's files)
    what is judged here is what gets removed."""
    pattern = re.compile(re.escape(name) + r"\.(\d{8}-\d{6})(?:\.([1-9]\d{0,5}))?\.bak")
    found = []
    for entry in os.listdir(dir_fd):
        m = pattern.fullmatch(entry)
        if not m:
            continue
        try:
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
            found.append((m.group(1), int(m.group(2) or 0), entry))
    return found
