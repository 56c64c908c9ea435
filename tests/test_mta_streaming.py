"""`mailsetup serve` streams DATA: a message near the size limit passes through without the server
ever holding it whole, and arrives byte-exact in the Maildir and at the relay host."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest
from mta_kit import Serve, Sink, maildir_new, provision

SIZE = 34 * 1024 * 1024  # under the default limit of 35 MiB, as in the measurement


def status_kib(pid: int, name: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1))


def big_message(size: int) -> bytes:
    """A message of `size` bytes with what the DATA path must get right: lines that start with a
    dot (stuffed on the wire, unstuffed on arrival), a line of 998 characters, and bytes above 127."""
    head = (b"From: <sender@example.net>\r\nTo: <alice@example.test>, <friend@example.net>\r\n"
            b"Subject: big streamed message\r\nMessage-ID: <big.1@example.net>\r\n\r\n")
    lines = [b".starts with a dot\r\n", b"..two dots\r\n", b"." * 998 + b"\r\n", b"\xc3\xa9t\xc3\xa9 \xe2\x82\xac\r\n"]
    lines += [b"line %07d of the body, streamed to a spool file as it arrives\r\n" % i for i in range(64)]
    block = b"".join(lines)
    body = block * ((size - len(head)) // len(block) + 1)
    message = (head + body)[: size - 3] + b"\r\n"
    return message[:-3] + b".\r\n"  # it even ends with a dot line that is not the end of DATA


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return provision(tmp_path_factory.mktemp("stream") / "root")


def test_a_34_mb_message_is_streamed_byte_exact_to_the_maildir_and_the_relay(root: Path):
    message = big_message(SIZE)
    with Sink(data_size_limit=2 * SIZE) as sink, Serve(root, relay_port=sink.port, remote=False) as served:
        pid = served.proc.pid
        rcpts = ["alice@example.test", "friend@example.net"]
        # A small message first: the server's one-time costs (the crypto library for the queue)
        # are paid before the start is measured.
        with smtplib.SMTP("127.0.0.1", served.smtp, timeout=120) as client:
            client.sendmail("sender@example.net", rcpts, b"Subject: warm-up\r\n\r\nhello\r\n")
        sink.wait_for(1)
        start_kib = status_kib(pid, "VmRSS")
        with smtplib.SMTP("127.0.0.1", served.smtp, timeout=120) as client:
            refused = client.sendmail("sender@example.net", rcpts, message)
        assert refused == {}
        sink.wait_for(2, timeout=120)
        peak_kib = status_kib(pid, "VmHWM")

    path = max(maildir_new(root, "alice"), key=lambda p: p.stat().st_size)
    stored = path.read_bytes()
    assert stored.startswith(b"Return-Path: <sender@example.net>\nDelivered-To: alice\nReceived: from ")
    # Everything after our three header lines is the message as sent, with Unix line ends.
    assert stored.endswith(b"\n" + message.replace(b"\r\n", b"\n"))
    assert len(stored) - len(message) + message.count(b"\r\n") < 400

    mail_from, to, relayed = sink.messages[1]
    assert (mail_from, to) == ("sender@example.net", ["friend@example.net"])
    assert relayed.startswith(b"Received: from ")
    assert relayed.endswith(b"\r\n" + message)
    assert len(relayed) - len(message) < 300

    # The server grew by less than one copy of the message: it never held it whole (before
    # streaming, one such message took it up by ~170 MB).
    grown_mib = (peak_kib - start_kib) / 1024
    assert grown_mib < SIZE / 2**20 / 2, f"peak RSS {peak_kib / 1024:.0f} MiB, {grown_mib:.0f} MiB over the start"
