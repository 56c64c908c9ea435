"""Plans and the only code that writes: atomic replace, dated backups, modes born right, undo.

A Plan is a list of FileChange built in memory by the renderers; `apply_plan` writes it or, if any
step fails, puts every file back as it was.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
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
        """'new', 'replaced' or 'unchanged' against what is on disk now."""
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            return "new"
        except OSError:
            return "replaced"
        if current != self.content and not (self.same_meaning and self._same_meaning()):
            return "replaced"
        try:
            st = self.path.stat()
            if stat.S_IMODE(st.st_mode) != self.mode:
                return "replaced"
            if self.owner is not None and ((st.st_uid, st.st_gid) != self.owner
                                           or not _group_can_enter(self.path.parent, self.owner[1])):
                return "replaced"
        except OSError:
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
            old = self.path.read_bytes()
        except FileNotFoundError:
            old = b""
        except OSError as exc:
            return f"(cannot read {self.path}: {exc.strerror})\n"
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


def backup_name(path: Path, now: float | None = None) -> Path:
    """`FILE.YYYYmmdd-HHMMSS.bak` beside FILE, never an existing name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{stamp}.{n}.bak")
        n += 1
    return candidate


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, chunks: Sequence[bytes], mode: int, owner: tuple[int, int] | None = None) -> None:
    """Create `path` (it must not exist) holding `chunks`, fsynced; removed again if anything fails.

    It is born private (O_EXCL, owner-only) and widened to `mode` only once complete, so a secret is
    never readable by others, not even for a moment.
    """
    # Owner bits only at birth (the umask can only take bits away, never add them); no umask
    # juggling, which would race between the MTA's delivery threads.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode & 0o700)
    try:
        data = memoryview(b"".join(chunks)) if len(chunks) != 1 else memoryview(chunks[0])
        while data:
            data = data[os.write(fd, data):]
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # the final mode, once the content is complete
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Move a complete, fsynced file into place and make the move itself durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _make_parents(path: Path, created: list[Path], private: bool) -> None:
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for i, d in enumerate(reversed(missing)):
        # A new directory that holds a private key is not listable by others; 0755 elsewhere.
        d.mkdir(mode=0o700 if private and i == len(missing) - 1 else 0o755)
        created.append(d)


def resolve(path: Path) -> Path:
    """The file a path names: a symlink is written through (the link stays, its target changes)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _owner_of(path: Path) -> tuple[int, int] | None:
    """The owner to keep when replacing `path`: only root can give a file away, and only needs to
    when the file is not already its own."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if os.geteuid() != 0 or (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()):
        return None
    return st.st_uid, st.st_gid


def write_atomic(path: Path, content: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write `content` to `path` so that readers see the old file or the new one, never a mix:
    a temp file beside it, fsynced, renamed over the target, the directory fsynced. A symlink is
    written through, and the replaced file's owner is kept unless `owner` is given."""
    target = resolve(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    write_new_file(tmp, [content], mode, owner or _owner_of(target))
    try:
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _group_can_enter(directory: Path, gid: int, st: os.stat_result | None = None) -> bool:
    st = st or directory.stat()
    if st.st_mode & 0o001:
        return True
    return st.st_gid == gid and bool(st.st_mode & 0o010)


def _let_group_enter(directory: Path, gid: int, changed: list[tuple[Path, int, int, int]]) -> None:
    """Let group `gid` enter a root-owned directory (chgrp + g+x: it may open the files it is
    given, not list the rest); others gain nothing. Recorded in `changed` for undo."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if _group_can_enter(directory, gid, st) or st.st_uid != 0:
            return
        changed.append((directory, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
        os.fchown(fd, 0, gid)
        os.fchmod(fd, (stat.S_IMODE(st.st_mode) & ~0o070) | 0o010)
    finally:
        os.close(fd)


def _copy_backup(path: Path) -> Path:
    """Copy `path` to a dated backup beside it with the same mode and owner (a key's backup stays
    private)."""
    target = backup_name(path)
    st = path.stat()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    write_new_file(tmp, [path.read_bytes()], stat.S_IMODE(st.st_mode), _owner_of(path))
    publish(tmp, target)
    return target


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
            _make_parents(change.path, created_dirs, change.secret)
            target = resolve(change.path)
            if change.owner is not None:
                _let_group_enter(target.parent, change.owner[1], opened_dirs)
            existed = target.exists()
            backup = _copy_backup(target) if existed else None
            done.append((target, backup, existed))
            write_atomic(target, change.content, change.mode, change.owner)
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
        try:
            if existed and backup is not None:
                os.replace(backup, path)  # the backup kept mode and owner
            elif not existed:
                path.unlink(missing_ok=True)
        except OSError:
            pass
    for d in reversed(created_dirs):
        try:
            d.rmdir()
        except OSError:
            pass
