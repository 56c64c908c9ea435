"""Wall time of an unattended `mailsetup init` (with and without its smoke test) against the
tutorial's hand steps done by the real tools (openssl, makemap, smtpd -n), measured in the same run.

Run: .venv/bin/python benchmarks/init.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
MAILSETUP = BIN / "mailsetup"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
MAKEMAP = "/usr/sbin/makemap"
SMTPD = "/usr/sbin/smtpd"
DOMAIN = "example.test"
HOSTNAME = f"mail.{DOMAIN}"
ADMIN = "alice"
TARGET_S = 2.0
STEP_TIMEOUT = 120.0  # seconds for any one command


class BenchError(Exception):
    """A step failed or took too long; the message says which."""


@dataclass
class Series:
    label: str
    times: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=dict)  # per-step times, where known

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, stdin=subprocess.DEVNULL,
                              **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took more than {STEP_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"{what} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}")
    return done


# ------------------------------------------------------------------------------ ours


def init_once(work: Path, smoke: bool) -> tuple[float, str]:
    root = work / "root"
    argv = [str(MAILSETUP), "init", "--yes", "--domain", DOMAIN, "--os", "debian", "--admin", ADMIN,
            "--root", str(root)]
    if not smoke:
        argv.append("--no-smoke")
    start = time.perf_counter()
    done = run(argv, "mailsetup init" + ("" if smoke else " --no-smoke"))
    elapsed = time.perf_counter() - start
    for path in ("etc/smtpd.conf", "etc/aliases.db", f"etc/ssl/private/{HOSTNAME}.key"):
        if not (root / path).is_file():
            raise BenchError(f"mailsetup init did not write {path}")
    if smoke and not re.search(r"\d+/\d+ passed", done.stdout):
        raise BenchError(f"mailsetup init printed no smoke-test summary: {done.stdout[-600:]}")
    return elapsed, done.stdout


SMOKE_STEP = re.compile(r"^\s+\S+ (?P<name>[^:]+): .*\((?P<secs>\d+\.\d+)s\)\s*$")


def smoke_steps(stdout: str) -> dict[str, float]:
    """The smoke test's own per-check times from init's report (`  ✓ name: detail (0.35s)`)."""
    steps = {}
    for line in stdout.splitlines():
        match = SMOKE_STEP.match(line)
        if match:
            steps[match["name"]] = float(match["secs"])
    return steps


# ------------------------------------------------------------------------------ the hand steps


def hand_config(cert: Path, key: Path, queue_key: str, aliases_db: Path) -> str:
    # The modern grammar from reference/opensmtpd.md, cut to what a single-domain server needs.
    return (
        f'pki {HOSTNAME} cert "{cert}"\n'
        f'pki {HOSTNAME} key "{key}"\n'
        "queue compression\n"
        f"queue encryption {queue_key}\n"
        f'table aliases "db:{aliases_db}"\n'
        "listen on localhost\n"
        f"listen on 0.0.0.0 port 25 tls pki {HOSTNAME} auth-optional\n"
        f"listen on 0.0.0.0 port submission tls-require pki {HOSTNAME} auth\n"
        'action "local_mail" maildir alias <aliases>\n'
        'action "outbound" relay\n'
        f'match from any for domain "{DOMAIN}" action "local_mail"\n'
        'match for local action "local_mail"\n'
        'match auth from any for any action "outbound"\n'
        'match from local for any action "outbound"\n'
    )


def hand_once(work: Path, steps: dict[str, list[float]]) -> float:
    """The tutorial by hand: key+cert, queue key, aliases.db, smtpd.conf checked by smtpd -n."""
    etc = work / "etc"
    (etc / "ssl" / "private").mkdir(parents=True)
    (etc / "ssl" / "certs").mkdir()
    key, cert = etc / "ssl" / "private" / f"{HOSTNAME}.key", etc / "ssl" / "certs" / f"{HOSTNAME}.crt"
    aliases, conf = etc / "aliases", etc / "smtpd.conf"

    def step(name: str, func):
        t0 = time.perf_counter()
        out = func()
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    start = time.perf_counter()
    step("openssl req (rsa-2048 key + self-signed cert)", lambda: run(
        [OPENSSL, "req", "-new", "-x509", "-days", "3650", "-nodes", "-newkey", "rsa:2048",
         "-subj", f"/CN={HOSTNAME}", "-keyout", str(key), "-out", str(cert)], "openssl req"))
    os.chmod(key, 0o600)  # the tutorial's chmod: smtpd refuses a key readable by others
    queue_key = step("openssl rand -hex 16", lambda: run([OPENSSL, "rand", "-hex", "16"], "openssl rand")).stdout
    queue_key = queue_key.strip()

    def make_aliases():
        aliases.write_text(f"postmaster: root\nabuse: root\nroot: {ADMIN}\n")
        return run([MAKEMAP, "-t", "aliases", str(aliases)], "makemap -t aliases")
    step("makemap -t aliases", make_aliases)

    def check_conf():
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the queue key
        with os.fdopen(fd, "w") as out:
            out.write(hand_config(cert, key, queue_key, etc / "aliases.db"))
        return run([SMTPD, "-n", "-f", str(conf)], "smtpd -n")
    step("write smtpd.conf + smtpd -n", check_conf)
    elapsed = time.perf_counter() - start
    if len(queue_key) != 32:
        raise BenchError(f"openssl rand -hex 16 gave {queue_key!r}")
    st = key.stat()
    if st.st_mode & 0o777 != 0o600 or st.st_uid != 0:
        raise BenchError(f"{key} is mode {st.st_mode & 0o777:o}, uid {st.st_uid}; smtpd wants 0600 and root")
    return elapsed


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5); the median counts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if not MAILSETUP.exists():
        parser.error(f"{MAILSETUP} not found: run with the project's venv python (.venv/bin/python)")
    hand = Series("hand steps (openssl, makemap, smtpd -n)")
    skip_hand = None
    if os.geteuid() != 0:
        skip_hand = "not root: smtpd -n insists on a root-owned key"
    for tool in (OPENSSL, MAKEMAP, SMTPD):
        if not os.path.exists(tool):
            skip_hand = f"{tool} is not installed"

    def bail(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bail)

    smoke = Series("mailsetup init --yes (with smoke test)")
    nosmoke = Series("mailsetup init --yes --no-smoke")
    print(f"unattended provisioning of {DOMAIN} into a fresh --root each time, {args.runs} runs each, interleaved")
    work = Path(tempfile.mkdtemp(prefix="mailsetup-bench-init-"))
    last_stdout = ""
    try:
        for i in range(args.runs):
            for series, smoke_on in ((smoke, True), (nosmoke, False)):
                d = work / f"{'smoke' if smoke_on else 'nosmoke'}.{i}"
                d.mkdir()
                elapsed, out = init_once(d, smoke_on)
                series.times.append(elapsed)
                if smoke_on:
                    last_stdout = out
                    for name, secs in smoke_steps(out).items():
                        series.steps.setdefault(name, []).append(secs)
                if not args.keep:
                    shutil.rmtree(d)
            if skip_hand is None:
                d = work / f"hand.{i}"
                d.mkdir()
                hand.times.append(hand_once(d, hand.steps))
                if not args.keep:
                    shutil.rmtree(d)
            print(f"  run {i + 1}/{args.runs}: init {smoke.times[-1]:.2f}s, --no-smoke {nosmoke.times[-1]:.2f}s"
                  + (f", hand steps {hand.times[-1]:.2f}s" if hand.times else ""), flush=True)
    except BenchError as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'what':<44} {'median s':>9} {'min s':>7} {'max s':>7}  target")
    for series in (smoke, nosmoke, hand):
        if not series.times:
            continue
        verdict = ""
        if series is smoke:
            verdict = f"< {TARGET_S:.0f} s " + ("ok" if series.median < TARGET_S else "MISSED")
        print(f"{series.label:<44} {series.median:>9.3f} {min(series.times):>7.3f} {max(series.times):>7.3f}  "
              f"{verdict}")
    if skip_hand:
        print(f"hand steps skipped: {skip_hand}")
    else:
        print(f"init/hand-steps            {smoke.median / hand.median:.2f}x  (with smoke test)")
        print(f"init --no-smoke/hand-steps {nosmoke.median / hand.median:.2f}x")
        print("hand steps, median per step:")
        for name, times in hand.steps.items():
            print(f"  {statistics.median(times):>7.3f}s  {name}")
    print(f"smoke test cost (median init - median --no-smoke): {smoke.median - nosmoke.median:.3f}s; "
          "its checks, median of their own times:")
    for name, times in sorted(smoke.steps.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(times):>7.3f}s  {name}")
    if not smoke.steps and last_stdout:
        print("  (no per-check times found in init's output)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
