"""Local-delivery throughput of `mailsetup serve` against a plain aiosmtpd Maildir server and the real
OpenSMTPD, measured in the same run on loopback, with the ratios between them.

Run: .venv/bin/python benchmarks/serve_throughput.py [--messages N] [--sessions S]
(internal: `--plain-server PORT MAILDIR` runs the plain peer; the benchmark starts it itself.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.realsmtpd import RealSmtpd

BIN = Path(sys.executable).parent
MAILSETUP = BIN / "mailsetup"
SMTPD = "/usr/sbin/smtpd"
MAKEMAP = "/usr/sbin/makemap"
SMTPD_USER = "msbench"  # smtpd refuses to deliver to root; mail goes to this system user
DOMAIN = "example.test"
RCPT = f"postmaster@{DOMAIN}"  # postmaster -> root -> (bench | msbench) through the aliases
SENDER = "sender@client.example.net"
HOST = "127.0.0.1"
PLAIN_SIZE_LIMIT = 35 * 1024 * 1024  # as mailsetup's default (aiosmtpd's own is 32 MiB)


class BenchError(Exception):
    """A step failed or took too long; the message says which."""


class Skip(Exception):
    """A peer cannot run here; the message says why."""


@dataclass
class Result:
    name: str
    messages: int
    seconds: float  # from the first connection to the last message in new/
    accepted: float  # from the first connection to the last 250 after DATA
    reconnects: int = 0  # sessions re-opened after a 452 to MAIL
    peak_rss_kib: int | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


# ------------------------------------------------------------------------------ the plain peer


def run_plain_server(port: int, maildir: Path) -> None:
    """aiosmtpd with a handle_DATA that only writes the message durably into a Maildir."""
    from aiosmtpd.smtp import SMTP

    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    host = socket.gethostname()
    counter = iter(range(1 << 62))

    def store(data: bytes) -> None:
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(counter)}.{host}"
        tmp = maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, maildir / "new" / name)
        dfd = os.open(maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            # Off the event loop, like mailsetup's handler, so both servers overlap fsyncs alike.
            await asyncio.to_thread(store, envelope.original_content or b"")
            return "250 2.0.0 Ok: delivered"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(lambda: SMTP(handler, hostname="plain.example.test",
                                                                  data_size_limit=PLAIN_SIZE_LIMIT), HOST, port,
                                          reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        await server.wait_closed()

    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(main())


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def wait_ready(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 30) -> None:
    """Until the port answers with a 220 banner; fails if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening: {tail(log)}")
        try:
            with smtplib.SMTP(HOST, port, timeout=5) as client:
                client.noop()
            return
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not accept connections on port {port} within {timeout:.0f}s: "
                                 f"{tail(log)}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM to the process group we started (smtpd forks), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def peak_rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else None


def count_new(maildir: Path) -> int:
    try:
        return len(os.listdir(maildir / "new"))
    except FileNotFoundError:
        return 0


def make_messages(n: int, size: int) -> list[bytes]:
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\r\n"
    out = []
    for i in range(n):
        head = (
            f"From: Bench <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: throughput {i}\r\n"
            f"Message-ID: <bench.{i}.{os.getpid()}@client.example.net>\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
        ).encode()
        body = line * ((size - len(head)) // len(line) + 1)
        out.append((head + body)[: size - 2] + b"\r\n")
    return out


def send_all(port: int, messages: list[bytes], sessions: int, timeout: float) -> tuple[float, int]:
    """Sends from `sessions` threads, one connection each; returns (time every DATA had its 250, reconnects).

    A session reconnects only when the server answers MAIL with 452 (smtpd's default cap of 100
    messages per session, `smtp limit max-mails`), as a real client does; the count is reported.
    """
    errors: list[str] = []
    reconnects = [0] * sessions
    shares = [messages[i::sessions] for i in range(sessions)]

    def connect() -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, port, local_hostname="client.example.net", timeout=timeout)
        client.ehlo()
        return client

    def check(step: str, code: int, reply: bytes) -> None:
        if code != 250:
            raise BenchError(f"{step} answered {code} {reply.decode(errors='replace')}")

    def session(index: int, share: list[bytes]) -> None:
        client = None
        try:
            client = connect()
            fresh = True
            for msg in share:
                code, reply = client.mail(SENDER)
                if code == 452 and not fresh:
                    client.quit()
                    client = connect()
                    reconnects[index] += 1
                    code, reply = client.mail(SENDER)
                fresh = False
                check("MAIL", code, reply)
                check("RCPT", *client.rcpt(RCPT))
                check("DATA", *client.data(msg))
            client.quit()
        except (BenchError, OSError, smtplib.SMTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if client is not None:
                client.close()

    threads = [threading.Thread(target=session, args=(i, s), daemon=True) for i, s in enumerate(shares)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise BenchError(f"clients still sending after {timeout:.0f}s")
    if errors:
        raise BenchError(f"{len(errors)} session(s) failed, first: {errors[0]}")
    return time.monotonic(), sum(reconnects)


def measure(name: str, port: int, maildir: Path, messages: list[bytes], sessions: int, timeout: float) -> Result:
    before = count_new(maildir)
    if before:
        raise BenchError(f"{name}: {maildir}/new is not empty before the run ({before} files)")
    start = time.monotonic()
    done, reconnects = send_all(port, messages, sessions, timeout)
    accepted = done - start
    deadline = start + timeout
    n = len(messages)
    while (got := count_new(maildir)) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: only {got} of {n} messages in {maildir}/new after {timeout:.0f}s")
        time.sleep(0.005)
    seconds = time.monotonic() - start
    if got != n:
        raise BenchError(f"{name}: {got} messages in {maildir}/new, expected {n}")
    sample = next(os.scandir(maildir / "new")).path
    if b"Subject: throughput " not in Path(sample).read_bytes():
        raise BenchError(f"{name}: {sample} is not one of the benchmark's messages")
    return Result(name, n, seconds, accepted, reconnects)


# ------------------------------------------------------------------------------ the three servers


def make_sandbox(work: Path) -> Path:
    root = work / "sandbox"
    init = subprocess.run(
        [str(MAILSETUP), "init", "--yes", "--no-smoke", "--domain", DOMAIN, "--os", "debian",
         "--root", str(root), "--admin", "bench"],
        capture_output=True, text=True, timeout=120,
    )
    if init.returncode != 0:
        raise BenchError(f"mailsetup init failed ({init.returncode}): {(init.stderr or init.stdout)[-600:]}")
    return root


def bench_ours(work: Path, rnd: int, messages: list[bytes], sessions: int, timeout: float) -> Result:
    root = work / "sandbox"
    maildir = root / "home" / "bench" / "Maildir"
    if maildir.exists():
        # The previous round's mail, moved aside (one rename), not deleted: deleting 2,000 files
        # just before the clock starts loads the journal that this round's fsyncs wait on. The
        # work directory goes at the end.
        maildir.rename(work / f"ours-maildir-before-round-{rnd}")
    port, sub_port = free_port(), free_port()
    log = work / f"serve.{rnd}.log"
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(MAILSETUP), "serve", "--root", str(root), "--listen", HOST,
                 "--smtp-port", str(port), "--submission-port", str(sub_port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_ready(port, proc, log, "mailsetup serve")
        result = measure("ours (mailsetup serve)", port, maildir, messages, sessions, timeout)
        result.peak_rss_kib = peak_rss_kib(proc.pid)
        if proc.poll() is not None:
            raise BenchError(f"mailsetup serve exited during the run: {tail(log)}")
        return result
    finally:
        stop(proc)


def bench_plain(work: Path, rnd: int, messages: list[bytes], sessions: int, timeout: float) -> Result:
    maildir = work / f"plain.{rnd}" / "Maildir"
    port = free_port()
    log = work / f"plain.{rnd}.log"
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--plain-server", str(port), str(maildir)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_ready(port, proc, log, "plain aiosmtpd server")
        result = measure("plain aiosmtpd + Maildir", port, maildir, messages, sessions, timeout)
        result.peak_rss_kib = peak_rss_kib(proc.pid)
        return result
    finally:
        stop(proc)


def smtpd_config(rendered: str, port: int, aliases_db: Path, home_pattern: str) -> str:
    """The sandbox's smtpd.conf with only the listeners, the aliases table and the Maildir path changed."""
    lines = []
    listen_done = False
    for line in rendered.splitlines():
        if line.startswith("listen on "):
            if not listen_done:
                lines.append(f"listen on {HOST} port {port}")
                listen_done = True
            continue
        if line.startswith("table aliases "):
            line = f'table aliases "db:{aliases_db}"'
        elif line.startswith("action ") and " maildir " in line:
            line = re.sub(r'maildir "[^"]*"', f'maildir "{home_pattern}"', line)
        lines.append(line)
    conf = "\n".join(lines) + "\n"
    for needed in ("queue compression", "queue encryption ", f"listen on {HOST} port {port}", "alias <aliases>"):
        if needed not in conf:
            raise BenchError(f"derived smtpd.conf lacks {needed!r}; has the template changed?\n{conf}")
    return conf


def smtpd_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SMTPD_USER)
    except KeyError:
        pass
    made = subprocess.run(["useradd", "-m", "-s", "/usr/sbin/nologin", SMTPD_USER], capture_output=True, text=True)
    if made.returncode != 0:
        raise Skip(f"cannot create the delivery user {SMTPD_USER}: {made.stderr.strip()}")
    print(f"(created system user {SMTPD_USER} for smtpd's deliveries; `userdel -r {SMTPD_USER}` removes it)")
    return pwd.getpwnam(SMTPD_USER)


def bench_smtpd(work: Path, rnd: int, messages: list[bytes], sessions: int, timeout: float) -> Result:
    if not os.path.exists(SMTPD):
        raise Skip(f"{SMTPD} is not installed")
    if os.geteuid() != 0:
        raise Skip("smtpd must be started as root")
    if not os.path.exists(MAKEMAP):
        raise Skip(f"{MAKEMAP} is not installed (needed for the aliases db)")
    user = smtpd_user()
    base = work / f"smtpd.{rnd}"
    base.mkdir()
    # smtpd's unprivileged processes and the delivery user must traverse to their files.
    for d in (work, base):
        d.chmod(0o755)
    aliases = base / "aliases"
    aliases.write_text(f"postmaster: root\nabuse: root\nroot: {SMTPD_USER}\n")
    made = subprocess.run([MAKEMAP, "-t", "aliases", "-o", str(base / "aliases.db"), str(aliases)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise BenchError(f"makemap failed: {made.stderr.strip()}")
    home = base / "home" / SMTPD_USER
    maildir = home / "Maildir"
    for d in (home, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, user.pw_uid, user.pw_gid)
    (base / "home").chmod(0o755)
    port = free_port()
    rendered = (work / "sandbox" / "etc" / "smtpd.conf").read_text()
    conf = smtpd_config(rendered, port, base / "aliases.db", f"{base}/home/%{{user.username}}/Maildir")
    # mailsetup's own runner: smtpd -n first, then smtpd -d in a private mount namespace (its own
    # spool and control socket, so no clash with another smtpd), stopped on the way out.
    server = RealSmtpd(SMTPD, conf, (port,))
    try:
        try:
            server.start()
        except MailsetupError as exc:
            raise BenchError(f"smtpd: {exc.message}") from None
        where = "private spool" if server.isolated else "system spool /var/spool/smtpd"
        result = measure(f"opensmtpd ({where})", port, maildir, messages, sessions, timeout)
        if server.proc.poll() is not None:
            raise BenchError(f"smtpd exited during the run: {server.log_tail()}")
        return result
    finally:
        server.stop()


# ------------------------------------------------------------------------------ main


def report(runs: dict[str, list[Result]]) -> None:
    if not runs:
        return
    # The median round by msg/s stands for the server; the range shows the noise between rounds.
    results = {key: sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for key, rs in runs.items()}
    several = any(len(rs) > 1 for rs in runs.values())
    print()
    print(f"{'server':<38} {'messages':>8} {'seconds':>8} {'msg/s':>8} {'all 250s at':>12} {'reconnects':>10}"
          + (f" {'rounds':>6} {'msg/s range':>15}" if several else ""))
    for key, r in results.items():
        line = (f"{r.name:<38} {r.messages:>8} {r.seconds:>8.2f} {r.rate:>8.1f} {r.accepted:>11.2f}s "
                f"{r.reconnects:>10}")
        if several:
            rates = [x.rate for x in runs[key]]
            line += f" {len(rates):>6} {f'{min(rates):.0f}-{max(rates):.0f}':>15}"
        print(line)
    ours = results.get("ours")
    if ours:
        for key, label in (("plain", "ours/plain"), ("smtpd", "ours/smtpd")):
            if key in results:
                line = f"{label:<11} {ours.rate / results[key].rate:.2f}x msg/s"
                pairs = list(zip(runs["ours"], runs[key], strict=False))
                if len(pairs) > 1:
                    # Each round's servers ran back to back: on a machine whose load drifts, the
                    # ratio within a round is steadier than the ratio of the two medians.
                    ratios = sorted(o.rate / p.rate for o, p in pairs)
                    line += (f"  (within each round: median {ratios[len(ratios) // 2]:.2f}x, "
                             f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
                print(line)
    for key, label in (("ours", "mailsetup serve"), ("plain", "the plain server")):
        peaks = [r.peak_rss_kib for r in runs.get(key, []) if r.peak_rss_kib]
        if peaks:
            print(f"peak RSS of {label} (VmHWM): {max(peaks) / 1024:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per server (default 2000)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent client sessions (default 4)")
    parser.add_argument("--size", type=int, default=10240, help="bytes per message (default 10240)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds allowed per server (default 180)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every server this many times, interleaved, and report the median (default 1)")
    parser.add_argument("--only", default="ours,plain,smtpd", help="comma-separated subset of ours,plain,smtpd")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, Maildirs)")
    parser.add_argument("--plain-server", nargs=2, metavar=("PORT", "MAILDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_server:
        run_plain_server(int(args.plain_server[0]), Path(args.plain_server[1]))
        return 0
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1 or args.size < 512:
        parser.error("--messages, --sessions and --rounds must be >= 1, --size >= 512")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(wanted) - {"ours", "plain", "smtpd"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    if not MAILSETUP.exists():
        parser.error(f"{MAILSETUP} not found: run with the project's venv python (.venv/bin/python)")

    # SIGTERM/SIGHUP unwind through the finally blocks, so servers stop and temp dirs go.
    def bail(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bail)

    messages = make_messages(args.messages, args.size)
    print(f"{args.messages} messages of {args.size} bytes per server, {args.sessions} sessions, "
          f"plain SMTP on {HOST}, one recipient ({RCPT}), durable Maildir delivery")
    work = Path(tempfile.mkdtemp(prefix="mailsetup-bench-"))
    runs: dict[str, list[Result]] = {}
    failed = False
    try:
        if "ours" in wanted or "smtpd" in wanted:
            try:
                make_sandbox(work)  # ours serves it; smtpd's config is derived from its smtpd.conf
            except (BenchError, subprocess.TimeoutExpired) as exc:
                print(f"FAILED: {exc}", flush=True)
                return 1
        benches = {"ours": bench_ours, "plain": bench_plain, "smtpd": bench_smtpd}
        for rnd in range(1, args.rounds + 1):
            for key in [k for k in benches if k in wanted]:
                label = f"{key}" + (f" (round {rnd}/{args.rounds})" if args.rounds > 1 else "")
                try:
                    result = benches[key](work, rnd, messages, args.sessions, args.timeout)
                except Skip as exc:
                    print(f"  {label}: skipped: {exc}", flush=True)
                    wanted.remove(key)
                    continue
                except BenchError as exc:
                    print(f"  {label}: FAILED: {exc}", flush=True)
                    wanted.remove(key)
                    failed = True
                    continue
                runs.setdefault(key, []).append(result)
                print(f"  {label}: {result.rate:.1f} msg/s", flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
