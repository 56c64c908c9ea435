"""The durable outbound queue and the relay worker.

Each message is one file, compressed then encrypted with AES-256-GCM under the queue key (OpenSMTPD's
order), written and read a 64 KiB segment at a time (a big message is never whole in memory),
fsynced before the sender hears 250; the worker relays, retries with backoff, and picks the
whole queue up again after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import smtplib
import ssl
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailsetup.files import fsync_dir, make_dirs, publish, write_new_file

log = logging.getLogger("mailsetup.mta")

MAGIC = b"MSQ1"  # one piece: MAGIC, flags, then [nonce] + the whole (compressed) payload sealed at once
MAGIC2 = b"MSQ2"  # streamed, written since: MAGIC2, flags, then segments (below)
FLAG_COMPRESSED = 1
FLAG_ENCRYPTED = 2
# MSQ2 segments: a 4-byte big-endian length (top bit: the last segment) then that many bytes: the
# next SEGMENT bytes of the (compressed) payload, or when encrypted a fresh 12-byte nonce and their
# AES-256-GCM seal, with the queue id, the segment's number and the last-segment bit as associated
# data, so segments cannot be dropped, reordered, cut short or moved to another file.
SEGMENT = 64 * 1024
_LAST = 0x80000000


@dataclass(frozen=True)
class QueuedMail:
    id: str
    mail_from: str
    rcpts: tuple[str, ...]
    message: bytes  # or, from RelayWorker, an iterator of chunks read from the queue file


class QueueError(Exception):
    pass


class MailQueue:
    def __init__(self, directory: Path, key: str | None, compression: bool = True):
        self.dir = Path(directory)
        self.failed_dir = self.dir / "failed"
        self.key = key.encode() if key else None
        self.compression = compression
        for d in (self.dir, self.failed_dir):
            make_dirs(d, private=True)  # as root, only under directories no other user controls
        self._sweep_temp_files()

    def _sweep_temp_files(self) -> None:
        # A temp file is a message that was never acknowledged: the sender will retry it.
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _aead(self):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM(self.key)

    def encode(self, qid: str, mail_from: str, rcpts: tuple[str, ...], message: bytes) -> bytes:
        head = json.dumps({"from": mail_from, "rcpts": list(rcpts), "queued": time.time()}).encode()
        payload = head + b"\n" + message
        flags = 0
        if self.compression:
            payload = zlib.compress(payload, 6)
            flags |= FLAG_COMPRESSED
        if self.key:
            nonce = secrets.token_bytes(12)
            payload = nonce + self._aead().encrypt(nonce, payload, MAGIC + qid.encode())
            flags |= FLAG_ENCRYPTED
        return MAGIC + bytes([flags]) + payload

    def _aad(self, qid: str, index: int, last: bool) -> bytes:
        return MAGIC2 + qid.encode() + index.to_bytes(8, "big") + (b"\1" if last else b"\0")

    def encode_stream(self, qid: str, mail_from: str, rcpts: tuple[str, ...],
                      chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The MSQ2 file for a message given as a stream of chunks, produced piece by piece (a
        35 MB message is compressed and sealed SEGMENT bytes at a time, never held whole)."""
        head = json.dumps({"from": mail_from, "rcpts": list(rcpts), "queued": time.time()}).encode()
        flags = (FLAG_COMPRESSED if self.compression else 0) | (FLAG_ENCRYPTED if self.key else 0)
        yield MAGIC2 + bytes([flags])
        squeeze = zlib.compressobj(6) if self.compression else None
        aead = self._aead() if self.key else None
        pending = bytearray()
        index = 0

        def seal(piece: bytes, last: bool) -> bytes:
            if aead is not None:
                nonce = secrets.token_bytes(12)
                piece = nonce + aead.encrypt(nonce, piece, self._aad(qid, index, last))
            return (len(piece) | (_LAST if last else 0)).to_bytes(4, "big") + piece

        for chunk in itertools.chain((head + b"\n",), chunks):
            pending += squeeze.compress(chunk) if squeeze else chunk
            while len(pending) > SEGMENT:  # more than one segment: this one is not the last
                yield seal(bytes(pending[:SEGMENT]), False)
                del pending[:SEGMENT]
                index += 1
        if squeeze:
            pending += squeeze.flush()
        while len(pending) > SEGMENT:
            yield seal(bytes(pending[:SEGMENT]), False)
            del pending[:SEGMENT]
            index += 1
        yield seal(bytes(pending), True)

    def _segments(self, qid: str, flags: int, read: Callable[[int], bytes]) -> Iterator[bytes]:
        """The payload of an MSQ2 file (after its 5-byte header), segment by segment, checked."""
        aead = None
        if flags & FLAG_ENCRYPTED:
            if not self.key:
                raise QueueError(f"{qid}: encrypted, but no queue key is configured")
            aead = self._aead()
        from cryptography.exceptions import InvalidTag

        index = 0
        while True:
            word = read(4)
            if len(word) < 4:
                raise QueueError(f"{qid}: cut short (segment {index} missing)")
            size = int.from_bytes(word, "big")
            last, size = bool(size & _LAST), size & ~_LAST
            piece = read(size)
            if len(piece) < size:
                raise QueueError(f"{qid}: cut short in segment {index}")
            if aead is not None:
                try:
                    piece = aead.decrypt(piece[:12], piece[12:], self._aad(qid, index, last))
                except InvalidTag:
                    raise QueueError(f"{qid}: does not decrypt with this queue key (was the key rotated?)") from None
            yield piece
            if last:
                if read(1):
                    raise QueueError(f"{qid}: data after the last segment")
                return
            index += 1

    def open(self, qid: str) -> tuple[dict, Iterator[bytes]]:
        """A queued message's envelope and its content as a stream of chunks, read, decrypted and
        decompressed a segment at a time (the relay sends a 35 MB message without holding it).
        The file is read as the stream is consumed; reading it to the end closes it."""
        fh = self.path(qid).open("rb")
        try:
            magic = fh.read(5)
            if magic[:4] == MAGIC:  # the one-piece format of earlier versions
                mail = self.decode(qid, magic + fh.read())
                fh.close()
                return {"from": mail.mail_from, "rcpts": list(mail.rcpts)}, _one(mail.message)
            if magic[:4] != MAGIC2 or len(magic) < 5:
                raise QueueError(f"{qid}: not a queue file")
            plain = self._plain_stream(qid, magic[4], self._segments(qid, magic[4], fh.read))
            head = bytearray()
            for piece in plain:
                head += piece
                if b"\n" in head:
                    break
            line, sep, rest = bytes(head).partition(b"\n")
            if not sep:
                raise QueueError(f"{qid}: no envelope")
            meta = json.loads(line)
        except BaseException:
            fh.close()
            raise

        def body() -> Iterator[bytes]:
            with fh:
                if rest:
                    yield rest
                yield from plain
        return meta, body()

    @staticmethod
    def _plain_stream(qid: str, flags: int, segments: Iterator[bytes]) -> Iterator[bytes]:
        if not flags & FLAG_COMPRESSED:
            yield from segments
            return
        unsqueeze = zlib.decompressobj()
        try:
            for piece in segments:
                # At most 2*SEGMENT bytes out per step: a segment of a repetitive message can
                # inflate a thousandfold.
                while piece:
                    out = unsqueeze.decompress(piece, SEGMENT * 2)
                    piece = unsqueeze.unconsumed_tail
                    if out:
                        yield out
            tail = unsqueeze.flush()
        except zlib.error as exc:
            raise QueueError(f"{qid}: does not decompress ({exc})") from None
        if tail:
            yield tail

    def decode(self, qid: str, data: bytes) -> QueuedMail:
        if data[:4] != MAGIC or len(data) < 5:
            raise QueueError(f"{qid}: not a queue file")
        flags, payload = data[4], data[5:]
        if flags & FLAG_ENCRYPTED:
            if not self.key:
                raise QueueError(f"{qid}: encrypted, but no queue key is configured")
            from cryptography.exceptions import InvalidTag

            try:
                payload = self._aead().decrypt(payload[:12], payload[12:], MAGIC + qid.encode())
            except InvalidTag:
                raise QueueError(f"{qid}: does not decrypt with this queue key (was the key rotated?)") from None
        if flags & FLAG_COMPRESSED:
            payload = zlib.decompress(payload)
        head, _, message = payload.partition(b"\n")
        meta = json.loads(head)
        return QueuedMail(qid, meta["from"], tuple(meta["rcpts"]), message)

    def put(self, mail_from: str, rcpts: tuple[str, ...], message: bytes) -> str:
        """Store durably; when this returns, a crash cannot lose the message."""
        return self.put_chunks(mail_from, rcpts, (message,))

    def put_chunks(self, mail_from: str, rcpts: tuple[str, ...], chunks: Iterable[bytes]) -> str:
        """put() from a stream of chunks, compressed, sealed and written as they come."""
        qid = f"{time.time_ns():x}{secrets.token_hex(4)}"
        tmp = self.dir / f".{qid}.tmp"
        write_new_file(tmp, self.encode_stream(qid, mail_from, rcpts, chunks), 0o600)
        publish(tmp, self.dir / qid)
        return qid

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def path(self, qid: str) -> Path:
        return self.dir / qid

    def load(self, qid: str) -> QueuedMail:
        """The whole message in memory (the relay uses open() instead)."""
        meta, body = self.open(qid)
        return QueuedMail(qid, meta["from"], tuple(meta["rcpts"]), b"".join(body))

    def remove(self, qid: str) -> None:
        self.path(qid).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def fail(self, qid: str) -> None:
        publish(self.path(qid), self.failed_dir / qid)
        fsync_dir(self.dir)


def _one(message: bytes) -> Iterator[bytes]:
    yield message  # a generator, like the streamed body: it has close()


class PermanentFailure(Exception):
    pass


def send_via(host: str, port: int, helo: str, mail: QueuedMail, timeout: float = 30) -> None:
    """One SMTP delivery to the relay host; PermanentFailure on 5xx, other exceptions are temporary.
    The content (mail.message: bytes, or an iterable of chunks) is sent as it is read."""
    chunks = (mail.message,) if isinstance(mail.message, bytes | bytearray) else mail.message
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout) as client:
        client.ehlo()
        if client.has_extn("starttls"):
            # The relay host is the admin's own choice; its certificate is often self-signed.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            client.starttls(context=ctx)
            client.ehlo()
        try:
            refused = _transaction(client, mail.mail_from, list(mail.rcpts), chunks)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {code for code, _ in exc.recipients.values()}
            if all(500 <= c < 600 for c in codes):
                raise PermanentFailure(str(exc.recipients)) from None
            raise
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise PermanentFailure(f"{exc.smtp_code} {exc.smtp_error!r}") from None
            raise
        if refused:
            log.warning("relay %s: some recipients refused: %s", mail.id, refused)


def _transaction(client: smtplib.SMTP, mail_from: str, rcpts: list[str], chunks: Iterable[bytes]) -> dict:
    """smtplib's sendmail() for a message given as a stream: the same replies and exceptions, the
    same dot-stuffing (a dot after any LF) and final CRLF, but chunk by chunk."""
    code, resp = client.mail(mail_from)
    if code != 250:
        _rset(client, code)
        raise smtplib.SMTPSenderRefused(code, resp, mail_from)
    refused = {}
    for rcpt in rcpts:
        code, resp = client.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, resp)
        if code == 421:
            client.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(rcpts):
        _rset(client, code)
        raise smtplib.SMTPRecipientsRefused(refused)
    code, resp = client.docmd("data")
    if code != 354:
        _rset(client, code)
        raise smtplib.SMTPDataError(code, resp)
    tail = b""  # the last two bytes sent; the message starts at a line start
    try:
        for chunk in chunks:
            if not chunk:
                continue
            stuffed = chunk.replace(b"\n.", b"\n..")
            if (not tail or tail.endswith(b"\n")) and chunk.startswith(b"."):
                stuffed = b"." + stuffed
            client.send(stuffed)
            tail = chunk[-2:] if len(chunk) > 1 else tail[-1:] + chunk
    except BaseException:
        # The relay must never see a lone dot after part of a message: hang up without QUIT.
        client.close()
        raise
    client.send(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
    code, resp = client.getreply()
    if code != 250:
        _rset(client, code)
        raise smtplib.SMTPDataError(code, resp)
    return refused


def _rset(client: smtplib.SMTP, code: int) -> None:
    if code == 421:
        client.close()
    else:
        try:
            client.rset()
        except smtplib.SMTPServerDisconnected:
            pass


class RelayWorker:
    """Relays queued mail to one smarthost, with exponential backoff, until stopped."""

    def __init__(self, queue: MailQueue, relay_host: tuple[str, int] | None, helo: str,
                 first_retry: float = 1.0, max_retry: float = 300.0):
        self.queue = queue
        self.relay_host = relay_host
        self.helo = helo
        self.first_retry = first_retry
        self.max_retry = max_retry
        self._wake = asyncio.Event()
        self._next: dict[str, tuple[float, float]] = {}  # id -> (due time, current delay)
        self.relayed = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        if self.relay_host is None:
            n = len(self.queue.ids())
            log.info("no relay host: outbound mail stays queued (%d queued now)", n)
            return
        while True:
            self._wake.clear()
            await self._pass()
            timeout = self._sleep_time()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _sleep_time(self) -> float:
        if not self._next:
            return 5.0
        return max(0.05, min(due for due, _ in self._next.values()) - time.monotonic())

    async def _pass(self) -> None:
        now = time.monotonic()
        for qid in self.queue.ids():
            due, delay = self._next.get(qid, (0.0, self.first_retry))
            if due > now:
                continue
            try:
                meta, body = self.queue.open(qid)
                mail = QueuedMail(qid, meta["from"], tuple(meta["rcpts"]), body)
            except (QueueError, OSError, ValueError, KeyError) as exc:
                log.error("queue %s: %s; moved to failed/", qid, exc)
                self.queue.fail(qid)
                continue
            host, port = self.relay_host
            try:
                await asyncio.to_thread(send_via, host, port, self.helo, mail)
            except (QueueError, ValueError) as exc:  # found while streaming it: the relay got no dot
                log.error("%s; moved to failed/", exc)
                self.queue.fail(qid)
                self._next.pop(qid, None)
                continue
            except PermanentFailure as exc:
                log.error("relay %s to %s: refused for good (%s); moved to failed/", qid, mail.rcpts, exc)
                self.queue.fail(qid)
                self._next.pop(qid, None)
            except (OSError, smtplib.SMTPException) as exc:
                self._next[qid] = (time.monotonic() + delay, min(delay * 2, self.max_retry))
                log.info("relay %s: temporary failure (%s); retry in %.1fs", qid, exc, delay)
            else:
                self.queue.remove(qid)
                self._next.pop(qid, None)
                self.relayed += 1
                log.info("relay %s: delivered to %s:%d for %s", qid, host, port, ",".join(mail.rcpts))
            finally:
                body.close()  # the queue file, when not read to its end
