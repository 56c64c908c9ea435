"""Plans and the only code that writes: atomic replace, dated backups, modes born right, undo.

A Plan is a list of FileChange built in memory by the renderers; `apply_plan` writes it or, if any
step fails, puts every file back as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailsetup.errors import MailsetupError


@dataclass(frozen=True)
class FileChange:
    """One file the plan wants on disk: its bytes, its mode, and why it exists."""

    path: Path
    content: bytes
    mode: int
    reason: str
    secret: bool = False  # never shown in a diff, never printed
    # Regexes with a group named "secret": parts of an otherwise showable file never to print.
    redact: tuple[str, ...] = ()
    # For files whose bytes differ on every build with the same meaning (Berkeley DB stamps a
    # random file id): says whether the file on disk already holds what we would write.
    same_meaning: Callable[[Path], bool] | None = None
    summary: str | None = None  # shown instead of a diff (a PEM certificate says nothing line by line)
    # (uid, gid) the file is given, e.g. root and the group of smtpd's lookup process, which must
    # re-read a table; its directory is then made enterable by that group. None: keep/inherit.
    owner: tuple[int, int] | None = None

    def state(self) -> str:
        """'new', 'replaced' or 'unchanged' against what is on disk now. As root, a file another
        user could steer is refused here already, before anything is shown or written."""
        try:
            current = read_current(self.path)
        except OSError:
            return "replaced"
        if current is None:
            return "new"
        data, st = current
        if data != self.content and not (self.same_meaning and self._same_meaning()):
            return "replaced"
        if stat.S_IMODE(st.st_mode) != self.mode:
            return "replaced"
        if self.owner is not None and ((st.st_uid, st.st_gid) != self.owner
                                       or not _group_can_enter(self.path.parent, self.owner[1])):
            return "replaced"
        return "unchanged"

    def _same_meaning(self) -> bool:
        try:
            return bool(self.same_meaning(self.path))
        except Exception:  # an unreadable or foreign file is simply not the same
            return False

    def diff(self) -> str:
        """A unified diff against the file on disk; secrets and binaries are summarised, not shown."""
        if self.secret:
            return f"(secret {self.path} not shown)\n"
        if self.summary:
            return f"({self.path}: {self.summary})\n"
        try:
            current = read_current(self.path)
        except OSError as exc:
            return f"(cannot read {self.path}: {exc.strerror})\n"
        old = current[0] if current else b""
        try:
            old_text = old.decode()
            new_text = self.content.decode()
        except UnicodeDecodeError:
            return f"(binary {self.path}: {len(old)} -> {len(self.content)} bytes)\n"
        for pattern in self.redact:
            old_text, new_text = (_redact(pattern, t) for t in (old_text, new_text))
        if old_text == new_text and old != self.content:
            return f"({self.path}: only a secret in it changes)\n"
        return "".join(
            difflib.unified_diff(
                old_text.splitlines(keepends=True),
                new_text.splitlines(keepends=True),
                fromfile=f"{self.path} (on disk)",
                tofile=f"{self.path} (planned)",
            )
        )


def _redact(pattern: str, text: str) -> str:
    def hide(m: re.Match) -> str:
        start, end = m.span("secret")
        return m.group(0)[: start - m.start()] + "<redacted>" + m.group(0)[end - m.start() :]

    return re.sub(pattern, hide, text)


@dataclass
class Plan:
    """Every file a command will write, in the order it writes them."""

    changes: list[FileChange] = field(default_factory=list)

    def add(self, change: FileChange) -> None:
        if any(c.path == change.path for c in self.changes):
            raise MailsetupError(f"two planned files share the path {change.path}")
        self.changes.append(change)

    def pending(self) -> list[FileChange]:
        return [c for c in self.changes if c.state() != "unchanged"]


@dataclass(frozen=True)
class Applied:
    path: Path
    state: str
    backup: Path | None


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
        self.cond = threading.Condition()
        self.started = 0  # fsyncs started; they run one at a time, so they also end in order
        self.done = 0  # fsyncs ended
        self.failed: dict[int, BaseException] = {}  # number -> what that fsync raised


_commits: dict[object, _Commits] = {}
_commits_lock = threading.Lock()


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
          created: list[Path] | None = None) -> tuple[int, str]:
    """(fd, real path) of `directory`, reached from / through directories no other user controls.

    Symlinks on the way are followed only when root owns them (in a directory only root can change,
    only root could have made them); a missing directory is made when `create`."""
    pending = [p for p in reversed(_absolute(directory).parts) if p != "/"]
    stack: list[tuple[str, int]] = []
    try:
        fd = os.open("/", _DIR_FLAGS)
        stack.append(("/", fd))
        problem = _dir_problem(os.fstat(fd))
        if problem:
            raise _refuse(verb, target, f"/ {problem}")
        links = 0
        while pending:
            name = pending.pop()
            here_dir, fd = stack[-1]
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[1])
                continue
            here = os.path.join(here_dir, name)
            try:
                child = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), here) from None
                # A new directory that holds a private key is not listable by others; 0755 elsewhere.
                try:
                    os.mkdir(name, 0o700 if private and not pending else 0o755, dir_fd=fd)
                    if created is not None:
                        created.append(Path(here))
                except FileExistsError:
                    pass  # made meanwhile: judged below like any other
                child = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(exc.errno, exc.strerror, here) from None
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here) from None
                if st.st_uid != 0:
                    raise _refuse(verb, target, f"{here} is a symbolic link owned by uid {st.st_uid} "
                                                f"({_SWAP})") from None
                links += 1
                if links > _MAX_LINKS:
                    raise _refuse(verb, target, f"too many symbolic links at {here}") from None
                dest = os.readlink(name, dir_fd=fd)
                if dest.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[1])
                pending.extend(p for p in reversed(Path(dest).parts) if p != "/")
                continue
            stack.append((here, child))
            problem = _dir_problem(os.fstat(child))
            if problem:
                raise _refuse(verb, target, f"{here} {problem}")
        here, fd = stack.pop()
        return fd, here
    finally:
        for _, fd in stack:
            os.close(fd)


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
    given to them. The user owns what is below `parent`: each level is opened with O_NOFOLLOW and
    given away with fchown, so a link they put there is refused, never followed."""
    fd, _ = _open_dir(parent, "write in", parent)
    inside = Path(parent)
    try:
        for i, name in enumerate([*path, *leaves]):
            where = inside / name
            if i < len(path):
                inside = where
            parent_fd = fd
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass
            try:
                child = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse("write in", where, "it is not a folder but a link or a file") from None
                raise OSError(exc.errno, exc.strerror, str(where)) from None
            os.fchown(child, *owner)
            if i < len(path):
                os.close(parent_fd)
                fd = child
            else:
                os.close(child)
    finally:
        os.close(fd)


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
    chunks = []
    while chunk := os.read(fd, 1 << 16):
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
            st = os.fstat(fd)
            problem = _file_problem(st, os.path.join(real_dir, current.name))
            if problem:
                raise _refuse("read", path, problem)
            return _read_fd(fd)
        finally:
            os.close(fd)
    raise _refuse("read", path, "too many symbolic links")


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


def _backup_in(dir_fd: int, path: Path, data: bytes, st: os.stat_result) -> Path:
    """A dated copy of `path` beside it, same mode (a key's backup stays private)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{path.name}.{stamp}.bak", 1
    while _exists_in(dir_fd, name):
        name, n = f"{path.name}.{stamp}.{n}.bak", n + 1
    tmp = _tmp_name(name)
    write_new_file(tmp, [data], stat.S_IMODE(st.st_mode), _keep_owner(st), dir_fd=dir_fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return path.with_name(name)


def _exists_in(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _replace(path: Path, content: bytes, mode: int, backup: bool, created: list[Path] | None = None,
             private: bool = False, owner: tuple[int, int] | None = None) -> tuple[Path, Path | None, bool]:
    """Write `content` to `path` atomically (temp file in the same opened directory, fsynced, renamed,
    directory fsynced); returns (file written, backup or None, whether it existed)."""
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
                    saved = _backup_in(dir_fd, target, _read_fd(fd), st)
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
        return target, saved, opened is not None
    except OSError as exc:
        if exc.filename is None or not str(exc.filename).startswith("/"):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        os.close(dir_fd)


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


def apply_plan(plan: Plan | Sequence[FileChange]) -> list[Applied]:
    """Write every pending change; on any failure restore every file touched and re-raise."""
    changes = plan.changes if isinstance(plan, Plan) else list(plan)
    done: list[tuple[Path, Path | None, bool]] = []  # file written, backup, existed
    created_dirs: list[Path] = []
    opened_dirs: list[tuple[Path, int, int, int]] = []
    results: list[Applied] = []
    try:
        for change in changes:
            state = change.state()
            if state == "unchanged":
                results.append(Applied(change.path, state, None))
                continue
            target, backup, existed = _replace(change.path, change.content, change.mode, backup=True,
                                               created=created_dirs, private=change.secret, owner=change.owner)
            done.append((target, backup, existed))
            if change.owner is not None:
                _let_group_enter(target.parent, change.owner[1], opened_dirs)
            results.append(Applied(target, state, backup))
    except BaseException as exc:
        _undo(done, created_dirs)
        for directory, uid, gid, mode in reversed(opened_dirs):
            try:
                os.chown(directory, uid, gid)
                os.chmod(directory, mode)
            except OSError:
                pass
        if isinstance(exc, OSError):
            where = exc.filename or "?"
            raise MailsetupError(
                f"cannot write {where}: {exc.strerror}; every file was put back as it was",
                exit_code=1,
            ) from exc
        raise
    return results


def undo_applied(results: Sequence[Applied]) -> None:
    """Put back what `apply_plan` wrote: restore each backup, remove each new file."""
    _undo([(r.path, r.backup, r.state == "replaced") for r in results if r.state != "unchanged"], [])


def _undo(done: Iterable[tuple[Path, Path | None, bool]], created_dirs: list[Path]) -> None:
    for path, backup, existed in reversed(list(done)):
        # The same checked directory as the write: the backup (it kept mode and owner) is renamed back.
        try:
            dir_fd, _ = _open_dir(path.parent, "restore", path)
        except (OSError, MailsetupError):
            continue
        try:
            if existed and backup is not None:
                os.replace(backup.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            elif not existed:
                os.unlink(path.name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    for d in reversed(created_dirs):
        try:
            d.rmdir()
        except OSError:
            pass
