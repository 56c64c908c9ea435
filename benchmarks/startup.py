"""Start-up time of the `mailsetup` command (`--help`, `keygen`) as a ratio to its floor, `python -c
"import typer"` measured in the same run (target: <= 1.3x each), plus the slowest imports of `mailsetup keygen`.

Absolute times move from machine to machine (60 ms and 150 ms for the same `--help`); the ratio to
`import typer` on the same interpreter, interleaved, does not. Run from the non-editable install that
scripts/bootstrap makes (.venv from the wheel): an editable install's import finder costs every start.

Run: .venv/bin/python benchmarks/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
MAILSETUP = BIN / "mailsetup"
PYTHON = sys.executable  # the venv's interpreter: the one the `mailsetup` script runs on
TARGET_RATIO = 1.3  # of `import typer`'s median; issue 17
RUN_TIMEOUT = 30.0  # seconds for one start; a hang fails the benchmark instead of stalling it


class BenchError(Exception):
    """A command failed or took too long; the message says which."""


@dataclass
class Case:
    key: str
    label: str
    argv: list[str]
    ours: bool  # held to the target ratio
    times: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000


def cases() -> list[Case]:
    return [
        Case("bare", "python -c pass", [PYTHON, "-c", "pass"], False, []),
        Case("typer", 'python -c "import typer"', [PYTHON, "-c", "import typer"], False, []),
        Case("help", "mailsetup --help", [str(MAILSETUP), "--help"], True, []),
        Case("keygen", "mailsetup keygen", [str(MAILSETUP), "keygen"], True, []),
    ]


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)} took more than {RUN_TIMEOUT:.0f}s") from None
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace")[-400:]
        raise BenchError(f"{' '.join(argv)} exited with {done.returncode}: {detail}")
    return elapsed


def editable_install() -> str | None:
    """Why the mailsetup in this venv is not the wheel's (an editable or missing install), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mailsetup")
    except metadata.PackageNotFoundError:
        return "mailsetup is not installed in this venv"
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return "mailsetup is installed editable (pip install -e): rebuild the venv with scripts/bootstrap"
    return None


def import_times(argv: list[str], env: dict[str, str]) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, module) for every import `python -X importtime` reports."""
    done = subprocess.run([PYTHON, "-X", "importtime", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, timeout=RUN_TIMEOUT, text=True)
    if done.returncode != 0:
        raise BenchError(f"-X importtime {' '.join(argv)} exited with {done.returncode}: {done.stderr[-400:]}")
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append((int(match.group(1)), int(match.group(2)), match.group(4)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="starts per command (default 20); the median counts")
    parser.add_argument("--top", type=int, default=5, help="how many imports to list (default 5)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.top < 1:
        parser.error("--runs and --top must be >= 1")
    if not MAILSETUP.exists():
        parser.error(f"{MAILSETUP} not found: run with the project's venv python (.venv/bin/python)")
    why = editable_install()
    if why:
        parser.error(why)

    # No inherited bytecode or import-time settings that would make one command unlike another.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    all_cases = cases()
    print(f"whole-process wall time, median of {args.runs} starts each, interleaved; interpreter {PYTHON}")
    try:
        for case in all_cases:  # one warm-up start each: page cache and .pyc files, not measured
            time_once(case.argv, env)
        for _ in range(args.runs):
            for case in all_cases:  # round-robin, so drift on a busy machine hits all commands alike
                case.times.append(time_once(case.argv, env))
        rows = import_times([str(MAILSETUP), "keygen"], env)
    except BenchError as exc:
        print(f"FAILED: {exc}")
        return 1

    by_key = {c.key: c for c in all_cases}
    bare, typer_ = by_key["bare"].median_ms, by_key["typer"].median_ms
    print()
    print(f"{'command':<28} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs bare':>8} {'vs typer':>9}  target")
    missed = []
    for case in all_cases:
        ms = case.median_ms
        verdict = ""
        if case.ours:
            met = ms / typer_ <= TARGET_RATIO
            verdict = f"<= {TARGET_RATIO:.2f}x typer " + ("ok" if met else "MISSED")
            if not met:
                missed.append(case.label)
        print(f"{case.label:<28} {ms:>10.1f} {min(case.times) * 1000:>8.1f} {max(case.times) * 1000:>8.1f} "
              f"{ms / bare:>7.2f}x {ms / typer_:>8.2f}x  {verdict}")
    for key in ("help", "keygen"):
        case = by_key[key]
        print(f"{case.label}: {case.median_ms - bare:.1f} ms above a bare interpreter, "
              f"{case.median_ms - typer_:+.1f} ms against `import typer`")

    print()
    print(f"python -X importtime mailsetup keygen: top {args.top} by cumulative time (nested: a parent "
          "includes its children)")
    print(f"  {'cumulative ms':>13} {'self ms':>8}  module")
    for self_us, cum_us, name in sorted(rows, key=lambda r: r[1], reverse=True)[: args.top]:
        print(f"  {cum_us / 1000:>13.1f} {self_us / 1000:>8.1f}  {name}")
    print(f"top {args.top} by self time:")
    for self_us, cum_us, name in sorted(rows, key=lambda r: r[0], reverse=True)[: args.top]:
        print(f"  {cum_us / 1000:>13.1f} {self_us / 1000:>8.1f}  {name}")
    print(f"({len(rows)} modules imported in all, {sum(r[0] for r in rows) / 1000:.1f} ms of import time under "
          "-X importtime, which itself slows imports a little)")
    if missed:
        print(f"MISSED the {TARGET_RATIO:.2f}x `import typer` target: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
