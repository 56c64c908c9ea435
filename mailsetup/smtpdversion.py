"""Where smtpd is and which version it is, without the subprocess module: `mailsetup aliases` starts
`smtpd -h` first thing and reads its answer only when it needs the version, so the two run side by
side (opensmtpd.py reads the version the same way, through version_in_help)."""

from __future__ import annotations

import os
import re
import select
import signal
import time

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin", "/usr/bin")
_HELP_LIMIT = 1 << 16  # `smtpd -h` prints a few hundred bytes


def find_binary(name: str) -> str | None:
    """The executable `name` in PATH, then in the sbin folders a non-root PATH often lacks. As
    shutil.which looks, without loading shutil (and the bz2 and lzma it loads), but never in a
    relative PATH entry ("" or "."): root must not run whatever file of that name the current
    folder holds."""
    path = os.environ.get("PATH") or os.defpath
    for d in (*path.split(os.pathsep), *_SBIN):
        candidate = os.path.join(d, name)
        if os.path.isabs(d) and os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def version_in_help(text: str) -> tuple[int, int, str] | None:
    """(major, minor, full text) from what `smtpd -h` prints; None when it names no version."""
    m = re.search(r"OpenSMTPD\s+(\d+)\.(\d+)(\S*)", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), f"{m.group(1)}.{m.group(2)}{m.group(3)}"


class VersionProbe:
    """`smtpd -h`, started now as subprocess would start it (stdin /dev/null, its output on a pipe,
    no other descriptor of ours, SIGPIPE and SIGXFSZ at their defaults); `result()` waits for it, at
    most `timeout` seconds from the start, and gives version_in_help's answer: None when smtpd is
    absent, cannot start, hangs or floods (it is killed) or names no version. `close()` stops it
    unread (for a caller leaving early)."""

    def __init__(self, smtpd: str | None = None, timeout: float = 10.0):
        self.deadline = time.monotonic() + timeout
        self.pid: int | None = None
        self.fd = -1
        self.found: tuple[int, int, str] | None = None
        path = smtpd or find_binary("smtpd")
        if path is None:
            return
        read_fd, write_fd = os.pipe()  # both close-on-exec; the child gets write_fd as 1 and 2 only
        try:
            self.pid = os.posix_spawn(path, [path, "-h"], os.environ, file_actions=[
                *_close_inherited(),
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_fd, 1),
                (os.POSIX_SPAWN_DUP2, write_fd, 2),
            ], setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError:
            os.close(read_fd)
            return
        finally:
            os.close(write_fd)
        self.fd = read_fd

    def result(self) -> tuple[int, int, str] | None:
        if self.pid is not None:
            out = None
            try:
                out = self._read()
            finally:
                self._end(kill=out is None)  # hung, far too talkative, or we were interrupted
            self.found = version_in_help(out.decode(errors="replace")) if out is not None else None
        return self.found

    def close(self) -> None:
        if self.pid is not None:
            self._end(kill=True)

    def _read(self) -> bytes | None:
        """Everything smtpd printed, to its end; None past the deadline or the limit."""
        out = bytearray()
        poller = select.poll()  # not select(): a descriptor number past 1023 is fine
        poller.register(self.fd, select.POLLIN)
        while len(out) <= _HELP_LIMIT:
            left = self.deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(self.fd, _HELP_LIMIT)
            if not chunk:
                return bytes(out)
            out += chunk
        return None

    def _end(self, kill: bool) -> None:
        os.close(self.fd)
        pid, self.pid = self.pid, None
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:  # still running (only then may it be signalled)
                if kill:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # SIGCHLD ignored by whoever started us: the kernel reaped it already


def _close_inherited() -> list[tuple]:
    """posix_spawn file actions closing every descriptor a child would inherit beyond 0, 1 and 2
    (subprocess's close_fds): ours are close-on-exec already, a caller's may not be."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    actions = []
    for fd in fds:
        try:
            if fd > 2 and os.get_inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return actions
