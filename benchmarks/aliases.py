"""Building a large aliases.db: `mailsetup aliases FILE --out DB` against the real
`makemap -t aliases -o DB FILE`, measured in the same run, with the in-process pieces
(parse_aliases_file, build_aliases_db) timed apart, both databases compared record by record,
and a cProfile of the parse and build when mailsetup is the slower one.

Run: .venv/bin/python benchmarks/aliases.py [--entries N]
(internal: `--in-process FILE OUT` and `--profile FILE` run in a child; the benchmark starts them.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import signal
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


def timed_child(argv: list[str], what: str, timeout: float, stdout=subprocess.DEVNULL) -> tuple[float, int, bytes]:
    """Runs argv; returns (wall seconds, the child's own peak RSS in KiB from wait4, stdout).

    os.wait4 gives this child's rusage alone (RUSAGE_CHILDREN would mix in earlier children); a
    timer kills the child's process group when the time runs out."""
    out_file = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_file, stderr=subprocess.PIPE,
                            start_new_session=True)
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
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{what} exited with {code}: {stderr.decode(errors='replace').strip()[-600:]}")
    return elapsed, usage.ru_maxrss, output


def in_process(source: Path, out: Path) -> None:
    """Child: the CLI's pieces one by one, as `mailsetup aliases` calls them, timed apart."""
    from mailsetup import aliases as aliases_mod

    figures: dict[str, float | int | str] = {"backend": aliases_mod.db_backend()}
    t0 = time.perf_counter()
    import mailsetup.cli  # noqa: F401  -- the CLI's import cost, for the comparison with the process

    t1 = time.perf_counter()
    entries = aliases_mod.parse_aliases_file(source)
    t2 = time.perf_counter()
    figures["rss_after_parse_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    aliases_mod.missing_rfc2142(entries)
    db = aliases_mod.build_aliases_db(entries)
    t3 = time.perf_counter()
    figures["rss_after_build_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_bytes(db)
    t4 = time.perf_counter()
    figures.update(entries=len(entries), import_cli=t1 - t0, parse=t2 - t1, build=t3 - t2, write=t4 - t3,
                   db_bytes=len(db))
    del entries, db
    # The same parse without the cyclic GC: how much of it is collections triggered by a million
    # new objects (a gc.freeze()/gc.disable() around the parse, or fewer objects, would save that).
    gc.collect()
    gc.disable()
    t5 = time.perf_counter()
    aliases_mod.parse_aliases_file(source)
    figures["parse_gc_off"] = time.perf_counter() - t5
    gc.enable()
    print(json.dumps(figures))


def profile(source: Path, limit: int) -> None:
    """Child: cProfile of parse_aliases_file + build_aliases_db on the first `limit` entries."""
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
        entries = aliases_mod.parse_aliases_file(part)
        aliases_mod.build_aliases_db(entries)
        prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({func})" if filename != "~" else func
        rows.append((tottime, cumtime, ncalls, where))
    print(f"cProfile of parse_aliases_file + build_aliases_db on {len(entries)} entries: {total:.2f}s under the "
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
    parser.add_argument("--in-process", nargs=2, metavar=("FILE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", nargs=2, metavar=("FILE", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        in_process(Path(args.in_process[0]), Path(args.in_process[1]))
        return 0
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


def bench(work: Path, args: argparse.Namespace) -> int:
    source = work / "aliases"
    t0 = time.perf_counter()
    count = write_aliases(source, args.entries)
    size = source.stat().st_size
    print(f"aliases file: {count} entries, {size / 1e6:.1f} MB (written in {time.perf_counter() - t0:.1f}s); "
          f"sample: {source.read_text().splitlines()[9]!r}")

    ours_db, theirs_db, piece_db = work / "ours.db", work / "makemap.db", work / "inproc.db"
    runs: dict[str, list[Run]] = {"makemap": [], "ours": []}
    for rnd in range(args.rounds):
        for path in (ours_db, theirs_db):
            path.unlink(missing_ok=True)  # each round builds from nothing, as a first run would
        secs, rss, _ = timed_child([MAKEMAP, "-t", "aliases", "-o", str(theirs_db), str(source)],
                                   "makemap -t aliases", args.timeout)
        runs["makemap"].append(Run("makemap -t aliases -o DB FILE", secs, rss))
        secs, rss, _ = timed_child([str(MAILSETUP), "aliases", str(source), "--out", str(ours_db)],
                                   "mailsetup aliases", args.timeout)
        runs["ours"].append(Run("mailsetup aliases FILE --out DB", secs, rss))
        print(f"  round {rnd + 1}/{args.rounds}: makemap {runs['makemap'][-1].seconds:.2f}s, "
              f"mailsetup {runs['ours'][-1].seconds:.2f}s", flush=True)

    _secs, piece_rss, out = timed_child([sys.executable, str(HERE), "--in-process", str(source), str(piece_db)],
                                        "in-process parse/build", args.timeout)
    pieces = json.loads(out.decode().strip().splitlines()[-1])

    # Honesty: both databases hold the same records, and as many as the source has.
    records = compare_dbs(ours_db, theirs_db)
    if records != count:
        raise BenchError(f"the databases hold {records} records, the source has {count} entries")
    dumps = {name: db_dump_lines(path) for name, path in (("ours", ours_db), ("makemap", theirs_db))}

    best = {key: min(rs, key=lambda r: r.seconds) for key, rs in runs.items()}
    print()
    print(f"{'builder':<36} {'seconds':>8} {'entries/s':>10} {'peak RSS':>9}")
    for run in best.values():
        print(f"{run.label:<36} {run.seconds:>8.2f} {count / run.seconds:>10,.0f} {mib(run.peak_rss_kib):>9}")
    ratio = best["ours"].seconds / best["makemap"].seconds
    verdict = "ok" if ratio <= 1.0 else "MISSED"
    print(f"mailsetup/makemap  {ratio:.2f}x time (target: <= 1.00x, {verdict}); "
          f"{best['ours'].peak_rss_kib / max(best['makemap'].peak_rss_kib, 1):.0f}x peak RSS")
    print()
    print(f"where mailsetup's time goes (in-process, backend {pieces['backend']!r}, one run, "
          f"peak RSS {mib(piece_rss)}):")
    accounted = 0.0
    for key, label in (("import_cli", "import mailsetup.cli (typer, click)"),
                       ("parse", "parse_aliases_file"),
                       ("build", "build_aliases_db (dbm.ndbm + read back)"),
                       ("write", "write the db bytes")):
        accounted += pieces[key]
        print(f"  {pieces[key]:>7.2f}s  {label}")
    print(f"  {accounted:>7.2f}s  sum (the CLI adds interpreter start and apply_plan's temp file, fsync, rename)")
    print(f"  ({pieces['parse_gc_off']:.2f}s: parse_aliases_file again with the cyclic GC off)")
    print(f"  peak RSS after parse {mib(pieces['rss_after_parse_kib'])}, after build "
          f"{mib(pieces['rss_after_build_kib'])}")
    print()
    print(f"same records: yes, {records} key/value pairs compared one by one (dbm.ndbm)" +
          (f"; db_dump -p lines: ours {dumps['ours']}, makemap {dumps['makemap']}"
           if dumps["ours"] is not None else ""))
    for name, path in (("ours", ours_db), ("makemap", theirs_db)):
        layout = db_layout(path)
        print(f"  {name:<8} {path.stat().st_size / 1e6:>7.1f} MB" + (f"  ({layout})" if layout else ""))
    if dumps["ours"] is not None and dumps["ours"] != dumps["makemap"]:
        raise BenchError("db_dump -p prints a different number of lines for the two databases")

    if args.profile == "always" or (args.profile == "auto" and ratio > 1.0):
        print()
        limit = min(args.profile_entries, count)
        _s, _r, out = timed_child([sys.executable, str(HERE), "--profile-child", str(source), str(limit)],
                                  "cProfile run", args.timeout)
        print(out.decode().rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
