"""The durable outbound queue and the relay worker.

Each message is one file, compressed then encrypted with AES-256-GCM under the queue key (OpenSMTPD's
order), fsynced before the sender hears 250; the worker relays, retries with backoff, and picks the
whole queue up again after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import smtplib
import ssl
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from mailsetup.files import fsync_dir, make_dirs, publish, write_new_file

log = logging.getLogger("mailsetup.mta")

MAGIC = b"MSQ1"
FLAG_COMPRESSED = 1
FLAG_ENCRYPTED = 2


@dataclass(frozen=True)
class QueuedMail:
    id: str
    mail_from: str
    rcpts: tuple[str, ...]
    message: bytes


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
        qid = f"{time.time_ns():x}{secrets.token_hex(4)}"
        data = self.encode(qid, mail_from, rcpts, message)
        tmp = self.dir / f".{qid}.tmp"
        write_new_file(tmp, [data], 0o600)
        publish(tmp, self.dir / qid)
        return qid

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def path(self, qid: str) -> Path:
        return self.dir / qid

    def load(self, qid: str) -> QueuedMail:
        return self.decode(qid, self.path(qid).read_bytes())

    def remove(self, qid: str) -> None:
        self.path(qid).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def fail(self, qid: str) -> None:
        publish(self.path(qid), self.failed_dir / qid)
        fsync_dir(self.dir)


class PermanentFailure(Exception):
    pass


def send_via(host: str, port: int, helo: str, mail: QueuedMail, timeout: float = 30) -> None:
    """One SMTP delivery to the relay host; PermanentFailure on 5xx, other exceptions are temporary."""
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
            refused = client.sendmail(mail.mail_from, list(mail.rcpts), mail.message)
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
                mail = self.queue.load(qid)
            except (QueueError, OSError, ValueError) as exc:
                log.error("queue %s: %s; moved to failed/", qid, exc)
                self.queue.fail(qid)
                continue
            host, port = self.relay_host
            try:
                await asyncio.to_thread(send_via, host, port, self.helo, mail)
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
