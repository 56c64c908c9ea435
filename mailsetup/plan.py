"""Plans of files: FileChange (one file's bytes, mode and why), Plan (every file a command writes, in
order), and `apply_plan`, which writes a plan through files.py or, if any step fails, puts every
file back as it was.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.files import (
    _chmod_in,
    _group_can_enter,
    _let_group_enter,
    _open_dir,
    _prune_backups_of,
    _replace,
    read_current,
)


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
    # The disk is read once to show the plan (its listing, diff summary and JSON all ask), and once
    # more, fresh, by apply_plan right before it writes.
    _judged: list[str] = field(default_factory=list, compare=False, repr=False)

    def state(self, fresh: bool = False) -> str:
        """'new', 'replaced' or 'unchanged' against what is on disk (read on the first call, or now
        when `fresh`). As root, a file another user could steer is refused here already, before
        anything is shown or written."""
        if fresh or not self._judged:
            self._judged[:] = [self._judge()]
        return self._judged[0]

    def _judge(self) -> str:
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
    mode_before: int | None = None  # of the file replaced (undo gives it back); None: there was none
    secret: bool = False  # its backups are its owner's alone


def apply_plan(plan: Plan | Sequence[FileChange], keep_backups: int | None = None) -> list[Applied]:
    """Write every pending change; on any failure restore every file touched and re-raise. With
    `keep_backups`, once every file is in place, only the newest that many backups of each are kept."""
    changes = plan.changes if isinstance(plan, Plan) else list(plan)
    done: list[tuple[Path, Path | None, int | None]] = []  # file written, backup, mode of the one replaced
    created_dirs: list[Path] = []
    opened_dirs: list[tuple[Path, int, int, int]] = []
    results: list[Applied] = []
    try:
        for change in changes:
            state = change.state(fresh=True)
            if state == "unchanged":
                results.append(Applied(change.path, state, None))
                continue
            target, backup, before = _replace(change.path, change.content, change.mode, backup=True,
                                              created=created_dirs, private=change.secret, owner=change.owner)
            done.append((target, backup, before))
            if change.owner is not None:
                _let_group_enter(target.parent, change.owner[1], opened_dirs)
            results.append(Applied(target, state, backup, before, change.secret))
            change._judged.clear()  # the disk now holds it: the next state() looks again
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
    if keep_backups is not None:
        prune_backups(results, keep_backups)
    return results


def undo_applied(results: Sequence[Applied]) -> None:
    """Put back what `apply_plan` wrote: restore each backup, remove each new file."""
    _undo([(r.path, r.backup, r.mode_before) for r in results if r.state != "unchanged"], [])


def _undo(done: Iterable[tuple[Path, Path | None, int | None]], created_dirs: list[Path]) -> None:
    for path, backup, mode_before in reversed(list(done)):
        # The same checked directory as the write: the backup (it kept owner and group) is renamed back.
        try:
            dir_fd, _ = _open_dir(path.parent, "restore", path)
        except (OSError, MailsetupError):
            continue
        try:
            if mode_before is not None and backup is not None:
                os.replace(backup.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                _chmod_in(dir_fd, path.name, mode_before)  # a secret's backup was kept tighter
            elif mode_before is None:
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


def prune_backups(results: Sequence[Applied], keep: int) -> list[Path]:
    """Remove all but the newest `keep` (at least 1) backups of each file in `results` that was just
    replaced; the backup just made is always among those kept, and a secret's kept backups are made
    its owner's alone (one an older mailsetup left 0640). Best effort once the new files are in
    place: a folder that can no longer be trusted, or a backup that cannot be removed, stays as it is.
    Returns what was removed."""
    keep = max(1, keep)
    removed: list[Path] = []
    for result in results:
        if result.backup is not None:
            removed += _prune_backups_of(Path(result.path), result.backup.name, keep, result.secret)
    return removed
