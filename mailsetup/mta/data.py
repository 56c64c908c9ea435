"""A message's DATA as it arrives: read in blocks of whole lines, unstuffed, kept in a Spool (memory
while small, then an unnamed file), so a 35 MB message costs the server a few hundred KiB of RAM.
"""

from __future__ import annotations

import asyncio
import enum
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

READ_SIZE = 256 * 1024  # one read from the connection (the transport reads up to 256 KiB at a time)
IN_MEMORY = 512 * 1024  # a message up to this size is never written to a spool file
CHUNK = 128 * 1024  # what the spool hands out at a time


class Spool:
    """The message as received (CRLF line ends, dots unstuffed). Up to IN_MEMORY bytes it stays in
    memory; beyond that it goes to an unnamed file (O_TMPFILE: nothing to clean up after a crash,
    and nobody else can open it) in a private directory, written off the event loop."""

    def __init__(self, directory: Path | None, in_memory: int = IN_MEMORY):
        self.dir = directory
        self.in_memory = in_memory
        self.buf = bytearray()
        self.fd: int | None = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= self.in_memory:
            await asyncio.to_thread(self._spill)

    def _spill(self) -> None:
        if self.fd is None:
            # Mode 0600 and unlinked (O_TMPFILE where it exists; otherwise a dot name the queue ignores).
            f = tempfile.TemporaryFile(prefix=".spool-", suffix=".tmp", dir=self.dir)
            self.fd = os.dup(f.fileno())
            f.close()
        view = memoryview(self.buf)
        while view:
            view = view[os.write(self.fd, view):]
        view.release()
        self.buf = bytearray()

    async def finish(self) -> None:
        """Everything received is in the file (when there is one)."""
        if self.fd is not None and self.buf:
            await asyncio.to_thread(self._spill)

    @property
    def in_file(self) -> bool:
        return self.fd is not None

    def getvalue(self) -> bytes:
        """The whole message in memory: only for one that never left it."""
        assert self.fd is None
        return bytes(self.buf)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The message from its start, `size` bytes at a time (blocking reads: call from a thread)."""
        if self.fd is None:
            if self.buf:
                yield bytes(self.buf)
            return
        offset = 0
        while True:
            chunk = os.pread(self.fd, size, offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk
        if self.buf:  # not reached after finish(); kept for a spool read before it
            yield bytes(self.buf)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.buf = bytearray()


class DataState(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()  # 500 Line too long
    TOO_MUCH = enum.auto()  # 552 Too much mail data


def normalise_line_ends(data: bytes) -> bytes:
    """Every line end CRLF: a bare LF or CR becomes CRLF, as smtpd 7.4 does with a bare LF (measured:
    it relays `hi\nthere` as `hi\r\nthere`; a bare CR it passes on unchanged, which we do not). So
    no end-of-data look-alike (`\n.\n`, `\r.\r`) is stored, or relayed to a next hop that splits
    lines its own way; the relay client dot-stuffs the lines that now start with a dot. Works on a
    whole message or on any run of CRLF-ended lines (a DATA path that streams can call it per line)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data  # the usual case: nothing to do, no copy
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def check_lines(lines: list[bytes], line_limit: int) -> DataState:
    """The one place every DATA line passes (without its CRLF, before unstuffing), a block at a
    time. Same rule as aiosmtpd: a line longer than line_limit with its CRLF is refused."""
    if max(map(len, lines)) + 2 > line_limit:
        return DataState.TOO_LONG
    return DataState.NOMINAL


async def receive_data(reader: asyncio.StreamReader, store: Callable, size_limit: int | None,
                       line_limit: int, check: Callable[[list[bytes], int], DataState] = check_lines,
                       ) -> DataState | None:
    """Reads DATA up to its lone-dot line, passing each block of whole, unstuffed lines to
    `await store(block)` while the message is acceptable. The result says how it ended; None: the
    connection was closed before the end.

    Same semantics as aiosmtpd's own smtp_DATA (which collects the whole message in memory):
    RFC 5321 4.5.2 dot-unstuffing, the size limit counted on the lines as sent (552 once over, read
    to the end anyway), line_limit (500), the first problem met being the one answered.
    """
    state = DataState.NOMINAL
    received = 0  # bytes of the lines as sent, as aiosmtpd counts them
    pending = b""  # the start of a line whose CRLF has not arrived yet
    midline = False  # pending was too long and cut: its start is gone
    while True:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            return None
        buf = pending + chunk if pending else chunk
        # The end of DATA: a line that is just ".", i.e. "\r\n.\r\n", or ".\r\n" at a line start.
        if not midline and buf.startswith(b".\r\n"):
            end, rest = 0, buf[3:]
        else:
            at = buf.find(b"\r\n.\r\n")
            end, rest = (at + 2, buf[at + 5:]) if at >= 0 else (-1, b"")
        if end >= 0:
            block, pending = buf[:end], b""
        else:
            last_crlf = buf.rfind(b"\r\n")
            cut = last_crlf + 2 if last_crlf >= 0 else 0  # 0: no line is complete yet
            block, pending = buf[:cut], buf[cut:]
        if block:
            received += len(block)
            lines = block.split(b"\r\n")
            lines.pop()  # the empty piece after the block's last CRLF
            if state is DataState.NOMINAL:
                state = check(lines, line_limit)
            if state is DataState.NOMINAL and size_limit and received > size_limit:
                state = DataState.TOO_MUCH
            if state is DataState.NOMINAL:
                if not midline and block.startswith(b"."):
                    block = block[1:]
                await store(block.replace(b"\r\n.", b"\r\n"))
            midline = False
        if end >= 0:
            if rest:
                # Pipelined commands after the dot: give them back to the reader for the command
                # loop (it reads with readuntil from the same buffer).
                reader._buffer[:0] = rest  # noqa: SLF001 - StreamReader has no public unread
            return state
        if len(pending) > line_limit:  # this line is too long whatever follows
            received += len(pending) - 1
            if state is DataState.NOMINAL:
                state = DataState.TOO_LONG
            pending, midline = pending[-1:], True  # keep a trailing CR: its LF may come next


def lf_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF -> LF over a stream of chunks (Maildir readers expect Unix line ends), with a CR at the
    end of one chunk carried over in case its LF starts the next."""
    carry = b""
    for chunk in chunks:
        if carry:
            chunk = carry + chunk
        if chunk.endswith(b"\r"):
            chunk, carry = chunk[:-1], b"\r"
        else:
            carry = b""
        yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry
