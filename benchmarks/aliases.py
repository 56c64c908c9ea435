"""Building aliases.db: `mailsetup aliases FILE --out DB` against the real `makemap -t aliases -o DB
FILE`, measured in the same run, on 1,000,000 entries (time, file size, each process's own peak
memory) and on 10,000 (the whole process, start-up included); both databases compared record by
record; a cProfile of the streamed build when mailsetup is the slower one.

Run: .venv/bin/python benchmarks/aliases.py [--entries N]
(internal: `--in-process FILE OUT` and `--profile FILE` run in a child; the benchmark starts them.)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
MAILSETUP = BIN / "mailsetup"
MAKEMAP = "/usr/sbin/makemap"
DB_DUMP = shutil.which("db_dump")
DB_STAT = shutil.which("db_stat")
HERE = Path(__file__).resolve()


class BenchError(Exception):
    """A step failed, took too long or gave a wrong answer; the message says which."""


@dataclass
class Run:
    label: str
    seconds: float
    peak_rss_kib: int


# ------------------------------------------------------------------------------ the aliases file


def write_aliases(path: Path, entries: int, seed: int = 1) -> int:
    """A realistic aliases(5) file: role aliases, then N user aliases to local users, remote
    addresses, small lists, the odd file, pipe or include. Names are unique (case-insensitively);
    every line is one makemap accepts. Returns the number of entries."""
    rng = random.Random(seed)
    first = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
             "oscar", "peggy", "trent", "victor", "walter"]
    domains = ["example.org", "example.net", "mail.example.com", "lists.example.edu", "corp.example.co.uk"]
    locals_ = [f"{rng.choice(first)}{n}" for n in range(5000)] + first
    head = [
        "# /etc/aliases -- generated for the mailsetup aliases benchmark",
        "postmaster: root", "abuse: root", "hostmaster: root", "webmaster: root", "mailer-daemon: postmaster",
        "root: alice",
        "",
    ]

    def target() -> str:
        roll = rng.random()
        if roll < 0.45:
            return rng.choice(locals_)
        if roll < 0.93:
            return f"{rng.choice(first)}{rng.randrange(100000)}@{rng.choice(domains)}"
        if roll < 0.96:
            return f"/var/mail/archive/{rng.choice(locals_)}"
        if roll < 0.98:
            return f":include:/etc/mail/lists/list{rng.randrange(500)}"
        return f'"|/usr/bin/vacation -a {rng.choice(locals_)}"'

    written = len([line for line in head if ":" in line])
    with path.open("w", encoding="utf-8") as out:
        out.write("\n".join(head) + "\n")
        chunk = []
        for i in range(entries - written):
            name = f"user{i:06d}" if i % 97 else f"User{i:06d}"  # some mixed case: makemap lower-cases keys
            k = rng.choices((1, 2, 3, 5), weights=(60, 30, 8, 2))[0]
            chunk.append(f"{name}: {', '.join(target() for _ in range(k))}\n")
            if len(chunk) >= 10000:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    return max(entries, written)


# ------------------------------------------------------------------------------ running children


GNU_TIME = "/usr/bin/time"


def timed_child(argv: list[str], what: str, timeout: float, stdout=subprocess.DEVNULL) -> tuple[float, int, bytes]:
    """Runs argv; returns (wall seconds, the command's own peak RSS in KiB, stdout).

    The peak is GNU time's %M: time(1) is a small C program, so the figure is the command's own.
    (wait4's ru_maxrss of a child forked from this Python counts this interpreter's pages too, from
    before the exec: that once reported makemap at 158 MiB, when it peaks at about 6 MiB.) A timer
    kills the child's process group when the time runs out."""
    out_file = tempfile.TemporaryFile()
    peak_file = tempfile.NamedTemporaryFile(prefix="mailsetup-bench-peak-")
    start = time.perf_counter()
    proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", peak_file.name, *argv], stdin=subprocess.DEVNULL,
                            stdout=out_file, stderr=subprocess.PIPE, start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        stderr = proc.stderr.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    except BaseException:
        kill()
        raise
    finally:
        timer.cancel()
        proc.stderr.close()
        proc.returncode = 0  # reaped by wait4 above (or killed); keeps Popen from waiting again
    out_file.seek(0)
    output = out_file.read()
    out_file.close()
    if expired.is_set():
        raise BenchError(f"{what} took more than {timeout:.0f}s and was killed")
    del usage  # see above: not the command's own peak
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{what} exited with {code}: {stderr.decode(errors='replace').strip()[-600:]}")
    peak = int(Path(peak_file.name).read_text().split()[-1])
    peak_file.close()
    return elapsed, peak, output


def profile(source: Path, limit: int) -> None:
    """Child: cProfile of the streamed build (write_aliases_db_file) on the first `limit` entries."""
    import cProfile
    import pstats

    from mailsetup import aliases as aliases_mod

    with tempfile.TemporaryDirectory(prefix="mailsetup-bench-prof-") as tmp:
        part = Path(tmp) / "aliases"
        with source.open("rb") as src, part.open("wb") as dst:
            for n, line in enumerate(src):
                if n >= limit:
                    break
                dst.write(line)
        prof = cProfile.Profile()
        prof.enable()
        entries, _missing = aliases_mod.write_aliases_db_file(part, Path(tmp) / "aliases.db", (7, 4), None)
        prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({func})" if filename != "~" else func
        rows.append((tottime, cumtime, ncalls, where))
    print(f"cProfile of write_aliases_db_file on {entries} entries: {total:.2f}s under the "
          "profiler (it inflates per-call costs; read the shares)")
    print(f"  {'own s':>7} {'own %':>6} {'cum s':>7} {'calls':>9}  function")
    for tottime, cumtime, ncalls, where in sorted(rows, reverse=True)[:16]:
        print(f"  {tottime:>7.2f} {100 * tottime / total:>5.1f}% {cumtime:>7.2f} {ncalls:>9}  {where}")


# ------------------------------------------------------------------------------ checking the result


def compare_dbs(ours: Path, theirs: Path) -> int:
    """Every record of one db is in the other with the same value, and the counts match; returns the count."""
    import dbm.ndbm as ndbm

    if getattr(ndbm, "library", "") != "Berkeley DB":
        raise BenchError("this Python's dbm.ndbm is not Berkeley DB; cannot compare the databases")
    # ndbm appends ".db" itself, so open by the name without it
    a = ndbm.open(str(ours.with_suffix("")), "r")
    b = ndbm.open(str(theirs.with_suffix("")), "r")
    try:
        keys = b.keys()
        if len(a) != len(keys):
            raise BenchError(f"{ours.name} holds {len(a)} records, {theirs.name} {len(keys)}")
        for key in keys:
            if key not in a:
                raise BenchError(f"{ours.name} lacks the key {key!r} that {theirs.name} has")
            if a[key] != b[key]:
                raise BenchError(f"{key!r}: {ours.name} has {a[key]!r}, {theirs.name} {b[key]!r}")
        return len(keys)
    finally:
        a.close()
        b.close()


def db_dump_lines(path: Path) -> int | None:
    if not DB_DUMP:
        return None
    proc = subprocess.Popen([DB_DUMP, "-p", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = 0
    while chunk := proc.stdout.read(1 << 20):
        lines += chunk.count(b"\n")
    if proc.wait(timeout=120) != 0:
        raise BenchError(f"db_dump -p {path} failed")
    return lines


def db_layout(path: Path) -> str:
    if not DB_STAT:
        return ""
    done = subprocess.run([DB_STAT, "-d", str(path)], capture_output=True, text=True, timeout=60)
    wanted = {"Number of pages in the database": "pages", "Specified fill factor": "fill factor",
              "Number of hash buckets": "buckets", "Number of bucket overflow pages": "overflow pages"}
    found = []
    for line in done.stdout.splitlines():
        value, _, name = line.partition("\t")
        if name in wanted:
            found.append(f"{wanted[name]} {value}")
    return ", ".join(found)


# ------------------------------------------------------------------------------ main


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="aliases in the file (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=1, help="time each builder this many times, best counts (1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per step (default 600)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="cProfile the parse and build: when mailsetup is slower (auto), always, never")
    parser.add_argument("--profile-entries", type=int, default=200_000,
                        help="entries the profile runs on (default 200,000; the profiler is slow)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--small", type=int, default=10_000, help="entries of the start-up-bound case (10,000)")
    parser.add_argument("--small-rounds", type=int, default=15,
                        help="rounds of the small case, median counts (15: a 0.1 s run is noisy)")
    parser.add_argument("--profile-child", nargs=2, metavar=("FILE", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_child:
        profile(Path(args.profile_child[0]), int(args.profile_child[1]))
        return 0
    if args.entries < 10 or args.rounds < 1:
        parser.error("--entries must be >= 10, --rounds >= 1")
    if not MAILSETUP.exists():
        parser.error(f"{MAILSETUP} not found: run with the project's venv python (.venv/bin/python)")
    if not os.path.exists(MAKEMAP):
        print(f"FAILED: {MAKEMAP} is not installed; it is the peer this benchmark compares with")
        return 1
    if not os.path.exists(GNU_TIME):
        print(f"FAILED: {GNU_TIME} (Debian's package `time`) is not installed; it measures each process's peak")
        return 1

    def bail(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bail)

    work = Path(tempfile.mkdtemp(prefix="mailsetup-bench-aliases-"))
    try:
        return bench(work, args)
    except BenchError as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def build_both(source: Path, ours_db: Path, theirs_db: Path, timeout: float) -> tuple[Run, Run]:
    for path in (ours_db, theirs_db):
        path.unlink(missing_ok=True)  # each round builds from nothing, as a first run would
    secs, rss, _ = timed_child([MAKEMAP, "-t", "aliases", "-o", str(theirs_db), str(source)], "makemap -t aliases",
                               timeout)
    theirs = Run("makemap -t aliases -o DB FILE", secs, rss)
    secs, rss, _ = timed_child([str(MAILSETUP), "aliases", str(source), "--out", str(ours_db)], "mailsetup aliases",
                               timeout)
    return Run("mailsetup aliases FILE --out DB", secs, rss), theirs


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def bench(work: Path, args: argparse.Namespace) -> int:
    source = work / "aliases"
    t0 = time.perf_counter()
    count = write_aliases(source, args.entries)
    size = source.stat().st_size
    print(f"aliases file: {count} entries, {size / 1e6:.1f} MB (written in {time.perf_counter() - t0:.1f}s); "
          f"sample: {source.read_text().splitlines()[9]!r}")
    ours_db, theirs_db = work / "ours.db", work / "makemap.db"
    runs: dict[str, list[Run]] = {"makemap": [], "ours": []}
    for rnd in range(args.rounds):
        ours, theirs = build_both(source, ours_db, theirs_db, args.timeout)
        runs["ours"].append(ours)
        runs["makemap"].append(theirs)
        print(f"  round {rnd + 1}/{args.rounds}: makemap {theirs.seconds:.2f}s, mailsetup {ours.seconds:.2f}s",
              flush=True)
    # Honesty: both databases hold the same records, and as many as the source has.
    records = compare_dbs(ours_db, theirs_db)
    if records != count:
        raise BenchError(f"the databases hold {records} records, the source has {count} entries")
    best = {key: min(rs, key=lambda r: r.seconds) for key, rs in runs.items()}
    print()
    print(f"{'builder':<36} {'seconds':>8} {'entries/s':>10} {'peak RSS':>9} {'file':>9}")
    for run, path in ((best["makemap"], theirs_db), (best["ours"], ours_db)):
        print(f"{run.label:<36} {run.seconds:>8.2f} {count / run.seconds:>10,.0f} {mib(run.peak_rss_kib):>9} "
              f"{path.stat().st_size / 2**20:>5.0f} MiB")
    ratio = best["ours"].seconds / best["makemap"].seconds
    size_ratio = ours_db.stat().st_size / theirs_db.stat().st_size
    peak_mib = best["ours"].peak_rss_kib / 1024
    print(f"mailsetup/makemap  {ratio:.2f}x time (target: <= 1.00x, {verdict(ratio <= 1.0)}); "
          f"{size_ratio:.2f}x file size (target: within 10%, {verdict(abs(size_ratio - 1) <= 0.10)}); "
          f"peak {peak_mib:.0f} MiB (target: < 100 MiB, {verdict(peak_mib < 100)})")
    for name, path in (("ours", ours_db), ("makemap", theirs_db)):
        layout = db_layout(path)
        if layout:
            print(f"  {name:<8} {layout}")
    print(f"same records: yes, {records} key/value pairs compared one by one")
    small_ratio = bench_small(work, args)
    if args.profile == "always" or (args.profile == "auto" and ratio > 1.0):
        print()
        limit = min(args.profile_entries, count)
        _s, _r, out = timed_child([sys.executable, str(HERE), "--profile-child", str(source), str(limit)],
                                  "cProfile run", args.timeout)
        print(out.decode().rstrip())
    return 0 if ratio <= 1.0 and abs(size_ratio - 1) <= 0.10 and peak_mib < 100 and small_ratio <= 2.0 else 1


def bench_small(work: Path, args: argparse.Namespace) -> float:
    """The size most sites have: the whole process, interpreter start-up and all, median of rounds."""
    source = work / "small-aliases"
    count = write_aliases(source, args.small)
    ours_db, theirs_db = work / "small-ours.db", work / "small-makemap.db"
    pairs = [build_both(source, ours_db, theirs_db, args.timeout) for _ in range(args.small_rounds)]
    if compare_dbs(ours_db, theirs_db) != count:
        raise BenchError("the small databases differ")
    ours = statistics.median(p[0].seconds for p in pairs)
    theirs = statistics.median(p[1].seconds for p in pairs)
    ratio = ours / theirs
    print()
    print(f"{count:,} entries, whole process, median of {args.small_rounds}: makemap {theirs * 1000:.0f} ms, "
          f"mailsetup {ours * 1000:.0f} ms: {ratio:.2f}x (target: <= 2.00x, {verdict(ratio <= 2.0)})")
    return ratio


if __name__ == "__main__":
    sys.exit(main())
