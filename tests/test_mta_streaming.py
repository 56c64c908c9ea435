"""`mailsetup serve` streams DATA: a message near the size limit passes through without the server
ever holding it whole, and arrives byte-exact in the Maildir and at the relay host."""

from __future__ import annotations

import re
import smtplib
import socket
import time
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


def _talk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def _replies(reader, n: int) -> list[bytes]:
    out = []
    while len(out) < n:
        line = reader.readline()
        assert line, f"connection closed after {out}"
        if line[3:4] != b"-":
            out.append(line)
    return out


def test_data_edges_match_aiosmtpd(root: Path):
    """The streaming DATA reader keeps aiosmtpd's rules: the end-of-data dot split over packets,
    commands pipelined right after it, a line longer than 1001 bytes (500) and dots unstuffed."""
    with Serve(root, remote=False) as served, socket.create_connection(("127.0.0.1", served.smtp), 10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        _talk(sock, b"EHLO client.example.net\r\n")
        _replies(reader, 1)

        # 1. The final ".\r\n" arrives in pieces, with a dot-stuffed line just before it.
        _talk(sock, b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(reader, 3)] == [b"250", b"250", b"354"]
        _talk(sock, b"Subject: split-end\r\n\r\n..dot\r\n.")
        time.sleep(0.2)
        _talk(sock, b"\r")
        time.sleep(0.2)
        _talk(sock, b"\n")
        assert _replies(reader, 1)[0].startswith(b"250 ")

        # 2. Everything in one packet, pipelined: the next transaction's commands follow the dot.
        _talk(sock, b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(reader, 3)] == [b"250", b"250", b"354"]
        _talk(sock, b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
                    b"MAIL FROM:<b@example.net>\r\nRCPT TO:<alice@example.test>\r\n")
        assert [r[:3] for r in _replies(reader, 3)] == [b"250", b"250", b"250"]

        # 3. A line of 1000 characters (1002 with its CRLF) is refused with 500; the session goes on.
        _talk(sock, b"DATA\r\n")
        assert _replies(reader, 1)[0].startswith(b"354")
        _talk(sock, b"Subject: too-long\r\n\r\n" + b"y" * 1000 + b"\r\nafter\r\n.\r\n")
        assert _replies(reader, 1)[0].startswith(b"500 ")
        _talk(sock, b"QUIT\r\n")
        assert _replies(reader, 1)[0].startswith(b"221")

    stored = {}
    for path in maildir_new(root, "alice"):
        data = path.read_bytes()
        stored[data.split(b"Subject: ")[1].split(b"\n")[0]] = data
    assert stored[b"split-end"].endswith(b"Subject: split-end\n\n.dot\n")
    assert stored[b"pipelined"].endswith(b"Subject: pipelined\n\nbody\n")
    assert b"too-long" not in stored


def _reference(stream: bytes, size_limit: int, line_limit: int):
    """aiosmtpd's DATA rules on a whole stream: (state, content, what follows the end)."""
    at = 0
    content, state, received = [], "ok", 0
    while True:
        end = stream.index(b"\r\n", at) + 2
        line = stream[at:end]
        at = end
        if line == b".\r\n":
            return state, b"".join(content), stream[at:]
        received += len(line)
        if state == "ok" and len(line) > line_limit:
            state = "too long"
        if state == "ok" and received > size_limit:
            state = "too much"
        content.append(line[1:] if line.startswith(b".") else line)


@pytest.mark.parametrize("seed", range(40))
def test_streamed_data_reader_agrees_with_aiosmtpds_rules(seed: int):
    import asyncio
    import random

    from mailsetup.mta.data import DataState, receive_data

    rnd = random.Random(seed)
    pieces = [b".", b"..", b"\r\n", b"\r", b"\n", b"a", b"x" * 300, b"\r\n.\r", b".\r\n.", b"\xff"]
    lines = []
    for _ in range(rnd.randint(0, 60)):
        lines.append(b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 5))).replace(b"\r\n", b"") + b"\r\n")
    body = b"".join(ln for ln in lines if ln != b".\r\n")
    stream = body + b".\r\nQUIT\r\n"
    size_limit = rnd.choice([0, 200, 2000, 10**6])
    line_limit = 1001
    want_state, want_content, want_rest = _reference(stream, size_limit or 10**9, line_limit)

    async def run():
        reader = asyncio.StreamReader(limit=line_limit)

        async def feed() -> None:
            at = 0
            while at < len(stream):  # in random pieces, as TCP may deliver them
                n = rnd.randint(1, 700)
                reader.feed_data(stream[at:at + n])
                at += n
                await asyncio.sleep(0)
            reader.feed_eof()

        got = []

        async def store(block: bytes) -> None:
            got.append(block)

        feeder = asyncio.create_task(feed())
        state = await receive_data(reader, store, size_limit, line_limit)
        await feeder
        return state, b"".join(got), await reader.read()

    state, content, rest = asyncio.run(run())
    names = {DataState.NOMINAL: "ok", DataState.TOO_LONG: "too long", DataState.TOO_MUCH: "too much"}
    assert rest == want_rest
    if want_state == "ok":
        assert names[state] == "ok" and content == want_content
    else:  # a message both too big and with a long line may be refused for either
        assert names[state] != "ok"


def test_queue_files_of_the_earlier_format_still_relay_and_a_tampered_segment_is_set_aside(tmp_path: Path):
    from mailsetup import queuekey
    from mailsetup.mta.queue import SEGMENT, MailQueue

    root = provision(tmp_path / "root")
    queue_dir = root / "etc/mailsetup/queue"
    key = queuekey.read_queue_key(root / "etc/mailsetup/queue.key")
    queue = MailQueue(queue_dir, key, compression=True)
    # A message queued by an earlier version: MSQ1, the whole payload sealed at once.
    old_id = "18e0000000000000aaaa0001"
    old = queue.encode(old_id, "alice@example.test", ("friend@example.net",), b"Subject: from-msq1\r\n\r\nhi\r\n")
    (queue_dir / old_id).write_bytes(old)
    # A message in the streamed format over several segments, one of them altered on disk.
    import random

    hexed = random.Random(1).randbytes(4 * SEGMENT).hex().encode()  # compresses to about half: 4+ segments
    noise = b"".join(hexed[i:i + 76] + b"\r\n" for i in range(0, len(hexed), 76))
    bad_id = queue.put_chunks("alice@example.test", ("friend@example.net",), [b"Subject: tampered\r\n\r\n", noise])
    data = bytearray((queue_dir / bad_id).read_bytes())
    data[len(data) // 2] ^= 1
    (queue_dir / bad_id).write_bytes(bytes(data))
    good_id = queue.put_chunks("alice@example.test", ("friend@example.net",), [b"Subject: streamed\r\n\r\n", noise])

    with Sink() as sink, Serve(root, relay_port=sink.port) as served:
        sink.wait_for(2)
        deadline = time.monotonic() + 10

        def settled() -> bool:  # a relayed file is removed just after the relay's 250
            return ((queue_dir / "failed" / bad_id).exists() and not (queue_dir / old_id).exists()
                    and not (queue_dir / good_id).exists())
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = served.log_text()
    subjects = sorted(m[2].split(b"\r\n")[0] for m in sink.messages)
    assert subjects == [b"Subject: from-msq1", b"Subject: streamed"]
    assert [m[2] for m in sink.messages if m[2].startswith(b"Subject: streamed")] == [
        b"Subject: streamed\r\n\r\n" + noise]
    assert (queue_dir / "failed" / bad_id).exists()
    assert f"{bad_id}: does not decrypt with this queue key" in log
    assert not (queue_dir / old_id).exists() and not (queue_dir / good_id).exists()


def test_concurrent_deliveries_share_a_directory_fsync_that_starts_after_each_arrives():
    """Group commit: 16 threads that each need the directory durable after their rename get it
    from fewer fsyncs, and none returns before an fsync that began after it asked; a failed fsync
    reaches every caller it was meant to cover."""
    import threading

    from mailsetup import files

    starts: list[float] = []
    lock = threading.Lock()

    def slow_sync() -> None:
        with lock:
            starts.append(time.monotonic())
        time.sleep(0.02)

    covered: list[tuple[float, float]] = []

    def caller() -> None:
        asked = time.monotonic()
        files._group_commit("test-dir", slow_sync)
        with lock:
            covered.append((asked, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(covered) == 16
    assert len(starts) < 16
    for asked, returned in covered:  # some fsync started after the ask and before the return
        assert any(asked <= s and s + 0.02 <= returned for s in starts)

    def failing() -> None:
        time.sleep(0.02)
        raise OSError(5, "Input/output error")

    errors: list[BaseException] = []

    def failing_caller() -> None:
        try:
            files._group_commit("test-dir-2", failing)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=failing_caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 4
