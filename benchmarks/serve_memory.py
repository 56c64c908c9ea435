"""Memory of `mailsetup serve` against the plain aiosmtpd Maildir server of serve_throughput.py,
measured the same way in the same run, in three cases: a long local-delivery load (RSS sampled every
0.5 s), 8 big messages in parallel, and 500 idle connections.

Run: .venv/bin/python benchmarks/serve_memory.py [--cases long,big,idle] [--messages N] [--sessions S]
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_throughput.py sits beside this script

from serve_throughput import (  # noqa: E402
    HOST,
    MAILSETUP,
    RCPT,
    SENDER,
    BenchError,
    count_new,
    free_port,
    make_messages,
    make_sandbox,
    stop,
    tail,
    wait_ready,
)

THROUGHPUT = Path(__file__).resolve().parent / "serve_throughput.py"
BIG_TARGET_MIB = 150.0  # peak with --big-parallel (8) messages of --big-size (34 MB) in flight
IDLE_TARGET_MIB = 100.0  # peak with --idle (500) connections open
SAMPLE_EVERY = 0.5  # seconds between RSS samples
TARGET_MIB = 100.0
FLAT_SHARE = 0.10  # "flat": RSS after the last checkpoint at most 10% above the first checkpoint's


@dataclass
class Trace:
    name: str
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, delivered, VmRSS KiB)
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (delivered, VmRSS KiB)
    start_kib: int = 0
    peak_kib: int = 0  # VmHWM just before the server is stopped
    seconds: float = 0.0


def status_kib(pid: int, field_name: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else None


class Sampler(threading.Thread):
    """Reads the server's VmRSS every SAMPLE_EVERY seconds, with the Maildir's count at that moment."""

    def __init__(self, trace: Trace, maildir: Path) -> None:
        super().__init__(daemon=True)
        self.trace, self.maildir = trace, maildir
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            rss = status_kib(self.trace.pid, "VmRSS")
            if rss is not None:
                self.trace.samples.append((time.monotonic() - self.t0, count_new(self.maildir), rss))
            self.halt.wait(SAMPLE_EVERY)


def send_in_phases(port: int, messages: list[bytes], sessions: int, every: int, timeout: float,
                   checkpoint) -> None:
    """Sends over `sessions` connections kept open for the whole run, in phases of `every` messages;
    between phases the clients wait while checkpoint(delivered) reads the server's RSS.

    Keeping the same connections for all phases is deliberate: a leak tied to a session would
    be hidden if the clients reconnected at each checkpoint.
    """
    phases = [messages[i:i + every] for i in range(0, len(messages), every)]
    barrier = threading.Barrier(sessions + 1)
    errors: list[str] = []

    def check(step: str, code: int, reply: bytes) -> None:
        if code != 250:
            raise BenchError(f"{step} answered {code} {reply.decode(errors='replace')}")

    def session(index: int) -> None:
        client = None
        try:
            client = smtplib.SMTP(HOST, port, local_hostname="client.example.net", timeout=timeout)
            client.ehlo()
            for phase in phases:
                barrier.wait(timeout)
                for msg in phase[index::sessions]:
                    check("MAIL", *client.mail(SENDER))
                    check("RCPT", *client.rcpt(RCPT))
                    check("DATA", *client.data(msg))
                barrier.wait(timeout)
            client.quit()
        except threading.BrokenBarrierError:
            pass  # another session failed or the main thread gave up; its error is the one to report
        except (BenchError, OSError, smtplib.SMTPException) as exc:
            errors.append(f"session {index}: {type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            if client is not None:
                client.close()

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    sent = 0
    try:
        for phase in phases:
            barrier.wait(timeout)  # go
            barrier.wait(timeout)  # every session has its 250s for this phase
            sent += len(phase)
            checkpoint(sent)
    except threading.BrokenBarrierError:
        barrier.abort()
        raise BenchError(errors[0] if errors else f"clients stalled for more than {timeout:.0f}s") from None
    except BaseException:
        barrier.abort()
        raise
    for t in threads:
        t.join(timeout)


def measure(trace: Trace, proc: subprocess.Popen, port: int, maildir: Path, messages: list[bytes],
            sessions: int, every: int, timeout: float) -> Trace:
    if count_new(maildir):
        raise BenchError(f"{trace.name}: {maildir}/new is not empty before the run")
    time.sleep(1.0)  # let the server settle after its first connection (wait_ready's probe)
    trace.start_kib = status_kib(proc.pid, "VmRSS") or 0
    sampler = Sampler(trace, maildir)
    sampler.start()
    start = time.monotonic()

    def checkpoint(sent: int) -> None:
        deadline = time.monotonic() + timeout
        while (got := count_new(maildir)) < sent:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError(f"{trace.name}: only {got} of {sent} messages delivered")
            time.sleep(0.005)
        trace.checkpoints.append((sent, status_kib(proc.pid, "VmRSS") or 0))
        print(f"    {trace.name}: {sent:>6} delivered, RSS {trace.checkpoints[-1][1] / 1024:.1f} MiB", flush=True)

    try:
        send_in_phases(port, messages, sessions, every, timeout, checkpoint)
        trace.seconds = time.monotonic() - start
        time.sleep(SAMPLE_EVERY * 2)  # a last sample or two once the load is gone
    finally:
        sampler.halt.set()
        sampler.join()
    if proc.poll() is not None:
        raise BenchError(f"{trace.name} exited during the run")
    trace.peak_kib = status_kib(proc.pid, "VmHWM") or 0
    return trace


def run_server(name: str, argv: list[str], log: Path, port: int, maildir: Path, args) -> Trace:
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready(port, proc, log, name)
        messages = make_messages(args.messages, args.size)
        return measure(Trace(name, proc.pid), proc, port, maildir, messages, args.sessions, args.every,
                       args.timeout)
    except BenchError as exc:
        raise BenchError(f"{exc} {tail(log, 300)}") from None
    finally:
        stop(proc)


def bench_ours(work: Path, args) -> Trace:
    root = make_sandbox(work)
    port, sub_port = free_port(), free_port()
    argv = [str(MAILSETUP), "serve", "--root", str(root), "--listen", HOST, "--smtp-port", str(port),
            "--submission-port", str(sub_port)]
    return run_server("ours (mailsetup serve)", argv, work / "serve.log", port,
                      root / "home" / "bench" / "Maildir", args)


def bench_plain(work: Path, args) -> Trace:
    maildir = work / "plain" / "Maildir"
    port = free_port()
    argv = [sys.executable, str(THROUGHPUT), "--plain-server", str(port), str(maildir)]
    return run_server("plain aiosmtpd + Maildir", argv, work / "plain.log", port, maildir, args)


# ------------------------------------------------------------------------------ big and idle


@dataclass
class Snapshot:
    name: str
    start_kib: int = 0
    during_kib: int = 0  # VmRSS with the load in place (idle: all connections open)
    peak_kib: int = 0  # VmHWM
    seconds: float = 0.0


def send_big(port: int, message: bytes, parallel: int, timeout: float) -> None:
    """`parallel` clients, each one message, all DATA phases overlapping."""
    errors: list[str] = []
    barrier = threading.Barrier(parallel)

    def one(index: int) -> None:
        try:
            with smtplib.SMTP(HOST, port, local_hostname="client.example.net", timeout=timeout) as client:
                client.ehlo()
                barrier.wait(timeout)
                client.sendmail(SENDER, [RCPT], message)
        except (OSError, smtplib.SMTPException, threading.BrokenBarrierError) as exc:
            errors.append(f"client {index}: {type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise BenchError(errors[0])
    if any(t.is_alive() for t in threads):
        raise BenchError(f"clients still sending after {timeout:.0f}s")


def hold_idle(port: int, count: int, timeout: float) -> list[socket.socket]:
    """`count` connections, each greeted and past EHLO, then left idle (the caller closes them)."""
    socks = []
    try:
        for i in range(count):
            sock = socket.create_connection((HOST, port), timeout=timeout)
            socks.append(sock)
            reader = sock.makefile("rb")
            banner = reader.readline()
            if not banner.startswith(b"220"):
                raise BenchError(f"connection {i + 1}: no banner ({banner[:80]!r})")
            sock.sendall(b"EHLO client.example.net\r\n")
            while (line := reader.readline()).startswith(b"250-"):
                pass
            if not line.startswith(b"250 "):
                raise BenchError(f"connection {i + 1}: EHLO answered {line[:80]!r}")
            reader.close()
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def run_snapshot(name: str, argv: list[str], log: Path, port: int, maildir: Path, case: str, args) -> Snapshot:
    proc = None
    snap = Snapshot(name)
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready(port, proc, log, name)
        time.sleep(1.0)  # settle after wait_ready's probe
        snap.start_kib = status_kib(proc.pid, "VmRSS") or 0
        start = time.monotonic()
        if case == "big":
            [message] = make_messages(1, args.big_size)
            send_big(port, message, args.big_parallel, args.timeout)
            deadline = time.monotonic() + args.timeout
            while count_new(maildir) < args.big_parallel:
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: only {count_new(maildir)} of {args.big_parallel} delivered")
                time.sleep(0.01)
            snap.during_kib = status_kib(proc.pid, "VmRSS") or 0
        else:
            socks = hold_idle(port, args.idle, args.timeout)
            try:
                time.sleep(1.0)
                snap.during_kib = status_kib(proc.pid, "VmRSS") or 0
            finally:
                for sock in socks:
                    sock.close()
        snap.seconds = time.monotonic() - start
        if proc.poll() is not None:
            raise BenchError(f"{name} exited during the run")
        snap.peak_kib = status_kib(proc.pid, "VmHWM") or 0
        print(f"  {case}: {name}: VmRSS {mib(snap.start_kib)} -> {mib(snap.during_kib)} MiB, "
              f"VmHWM {mib(snap.peak_kib)} MiB ({snap.seconds:.1f}s)", flush=True)
        return snap
    except BenchError as exc:
        raise BenchError(f"{exc} {tail(log, 300)}") from None
    finally:
        stop(proc)


def snapshot_ours(work: Path, case: str, args) -> Snapshot:
    root = work / "sandbox"  # one set-up for every case (bench_ours makes it too)
    if not root.exists():
        make_sandbox(work)
    maildir = root / "home" / "bench" / "Maildir"
    shutil.rmtree(maildir, ignore_errors=True)
    port, sub_port = free_port(), free_port()
    argv = [str(MAILSETUP), "serve", "--root", str(root), "--listen", HOST, "--smtp-port", str(port),
            "--submission-port", str(sub_port)]
    if case == "idle":
        argv += ["--max-connections", str(max(500, args.idle))]
    return run_snapshot("ours (mailsetup serve)", argv, work / f"serve-{case}.log", port, maildir, case, args)


def snapshot_plain(work: Path, case: str, args) -> Snapshot:
    maildir = work / f"plain-{case}" / "Maildir"
    port = free_port()
    argv = [sys.executable, str(THROUGHPUT), "--plain-server", str(port), str(maildir)]
    return run_snapshot("plain aiosmtpd + Maildir", argv, work / f"plain-{case}.log", port, maildir, case, args)


def report_snapshots(case: str, snaps: dict[str, Snapshot], args) -> None:
    what = (f"{args.big_parallel} parallel messages of {args.big_size} bytes" if case == "big"
            else f"{args.idle} idle connections (after EHLO)")
    print(f"\n{what}")
    print(f"{'VmRSS MiB':<26} {'start':>6} {'loaded':>7} {'VmHWM':>6} {'seconds':>8}")
    for snap in snaps.values():
        print(f"{snap.name:<26} {mib(snap.start_kib):>6} {mib(snap.during_kib):>7} {mib(snap.peak_kib):>6} "
              f"{snap.seconds:>8.1f}")
    ours, plain = snaps.get("ours"), snaps.get("plain")
    target = BIG_TARGET_MIB if case == "big" else IDLE_TARGET_MIB
    if ours:
        ok = ours.peak_kib / 1024 < target
        print(f"target: peak under {target:.0f} MiB: {'ok' if ok else 'MISSED'} ({mib(ours.peak_kib)} MiB)")
    if ours and plain:
        print(f"ours/plain  {ours.peak_kib / plain.peak_kib:.2f}x peak RSS (VmHWM)")


# ------------------------------------------------------------------------------ report


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def report(traces: dict[str, Trace]) -> None:
    print()
    marks = [n for n, _ in next(iter(traces.values())).checkpoints]
    header = f"{'VmRSS MiB':<26} {'start':>6} " + " ".join(f"{f'@{n}':>7}" for n in marks)
    print(header + f" {'max sample':>10} {'VmHWM':>6} {'growth':>14} {'msg/s':>6}")
    for trace in traces.values():
        cps = [kib for _, kib in trace.checkpoints]
        sampled = max((kib for _, _, kib in trace.samples), default=0)
        growth = cps[-1] - cps[0] if len(cps) > 1 else 0
        share = growth / cps[0] if cps and cps[0] else 0.0
        print(f"{trace.name:<26} {mib(trace.start_kib):>6} " + " ".join(f"{mib(k):>7}" for k in cps)
              + f" {mib(sampled):>10} {mib(trace.peak_kib):>6} {f'{growth / 1024:+.1f} ({share:+.0%})':>14}"
              + f" {trace.checkpoints[-1][0] / trace.seconds if trace.seconds else 0:>6.0f}")
    print(f"(growth: from @{marks[0]} to @{marks[-1]}; {len(next(iter(traces.values())).samples)} samples every "
          f"{SAMPLE_EVERY}s for the first server)")
    ours, plain = traces.get("ours"), traces.get("plain")
    if ours:
        cps = [kib for _, kib in ours.checkpoints]
        growth = (cps[-1] - cps[0]) / cps[0] if cps and cps[0] else 0.0
        under = ours.peak_kib / 1024 < TARGET_MIB
        flat = growth <= FLAT_SHARE
        print(f"target: peak under {TARGET_MIB:.0f} MiB: {'ok' if under else 'MISSED'} ({mib(ours.peak_kib)} MiB); "
              f"flat (growth <= {FLAT_SHARE:.0%} from @{marks[0]} to @{marks[-1]}): "
              f"{'ok' if flat else 'MISSED'} ({growth:+.1%})")
    if ours and plain:
        print(f"ours/plain  {ours.peak_kib / plain.peak_kib:.2f}x peak RSS (VmHWM), "
              f"{(ours.checkpoints[-1][1] - ours.start_kib) / 1024:+.1f} MiB vs "
              f"{(plain.checkpoints[-1][1] - plain.start_kib) / 1024:+.1f} MiB from start to the last checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per server (default 10000)")
    parser.add_argument("--sessions", type=int, default=4, help="client sessions, open for the whole run (4)")
    parser.add_argument("--size", type=int, default=10240, help="bytes per message (default 10240)")
    parser.add_argument("--every", type=int, default=2000, help="read RSS after every N messages (default 2000)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds allowed per phase (default 120)")
    parser.add_argument("--only", default="ours,plain", help="comma-separated subset of ours,plain")
    parser.add_argument("--cases", default="long,big,idle", help="comma-separated subset of long,big,idle")
    parser.add_argument("--big-size", type=int, default=34_000_000, help="bytes per big message (34 MB)")
    parser.add_argument("--big-parallel", type=int, default=8, help="big messages sent at once (8)")
    parser.add_argument("--idle", type=int, default=500, help="idle connections held open (500)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, Maildirs)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.every < 1 or args.size < 512:
        parser.error("--messages, --sessions and --every must be >= 1, --size >= 512")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    if set(wanted) - {"ours", "plain"} or not wanted:
        parser.error("--only takes ours, plain or both")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(cases) - {"long", "big", "idle"} or not cases:
        parser.error("--cases takes long, big, idle or a comma-separated list of them")
    if args.big_size < 512 or args.big_parallel < 1 or args.idle < 1:
        parser.error("--big-size must be >= 512, --big-parallel and --idle >= 1")
    if not MAILSETUP.exists():
        parser.error(f"{MAILSETUP} not found: run with the project's venv python (.venv/bin/python)")

    def bail(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bail)

    work = Path(tempfile.mkdtemp(prefix="mailsetup-bench-mem-"))
    traces: dict[str, Trace] = {}
    snapshots: dict[str, dict[str, Snapshot]] = {}
    failed = False
    try:
        if "long" in cases:
            print(f"long: {args.messages} messages of {args.size} bytes per server over {args.sessions} sessions "
                  f"kept open, plain SMTP on {HOST}, RSS after every {args.every} delivered and sampled every "
                  f"{SAMPLE_EVERY}s")
            for key, bench in (("ours", bench_ours), ("plain", bench_plain)):
                if key not in wanted:
                    continue
                try:
                    traces[key] = bench(work, args)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    print(f"  {key}: FAILED: {exc}", flush=True)
                    failed = True
        for case in [c for c in ("big", "idle") if c in cases]:
            for key, bench in (("ours", snapshot_ours), ("plain", snapshot_plain)):
                if key not in wanted:
                    continue
                try:
                    snapshots.setdefault(case, {})[key] = bench(work, case, args)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    print(f"  {case}: {key}: FAILED: {exc}", flush=True)
                    failed = True
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if traces:
        report(traces)
    for case, snaps in snapshots.items():
        report_snapshots(case, snaps, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
