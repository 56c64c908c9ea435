"""`mailsetup aliases` without Typer (issue 17: 10,000 entries in at most twice makemap's whole run,
start-up included). entry.py takes the aliases command line itself when it can read it whole and
hands everything else to Typer; either way a user must see the same thing. Each case here runs the
installed `mailsetup` (the Typer-free way) and one that calls mailsetup.cli (Typer's, as before) on
the same files and compares what each printed, its exit code and the database each wrote.

The installed smtpd's version is read by `smtpd -h` started first thing (smtpdversion.VersionProbe),
in parallel with the imports: it is checked against a real smtpd, and against fake ones that hang,
never stop talking, or are not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MAILSETUP, SMTPD
from test_import_time import _IMPORT_LINE

from mailsetup.aliases import read_aliases_db
from mailsetup.entry import aliases_arguments
from mailsetup.opensmtpd import smtpd_version
from mailsetup.smtpdversion import VersionProbe

GOOD = "# roles\npostmaster: root\nabuse: root\nhostmaster: root\nwebmaster: root\nroot: alice\nteam: alice, bob\n"


def _files(where: Path) -> Path:
    where.mkdir()
    (where / "aliases").write_text(GOOD)
    (where / "bad").write_text(GOOD + "broken line without a colon\n")
    (where / "norfc").write_text("root: alice\n")
    (where / "sub").mkdir()
    return where


def _run(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env=dict(os.environ, NO_COLOR="1", **(env or {})))
    return proc.returncode, proc.stdout, proc.stderr


def _databases(where: Path) -> dict[str, dict[str, str]]:
    return {p.name: read_aliases_db(p) for p in sorted(where.glob("*.db"))}


# What the Typer-free reader takes: every form of the four options, in any order.
TAKEN = [
    ["aliases"],
    ["aliases", "--check"],
    ["--check", "aliases"],
    ["aliases", "--out", "x.db", "--smtpd-version", "7.6"],
    ["--smtpd-version=7.4", "--out=x.db", "aliases"],
    ["aliases", "--debug", "--check"],
    ["bad"],
    ["norfc"],
    ["missing"],
    ["sub"],
    ["aliases", "--smtpd-version", "7.4 evil"],
    ["aliases", "--out", "nodir/x.db"],
]
# What it leaves to Typer: the same output must still come (usage errors, help).
LEFT = [
    [],
    ["--help"],
    ["aliases", "--out"],
    ["aliases", "--out", "a.db", "--out", "b.db"],
    ["aliases", "--out", "--check"],
    ["aliases", "--out="],
    ["aliases", "--bogus"],
    ["aliases", "-x"],
    ["aliases", "other"],
    ["aliases", "--check=yes"],
    ["--", "aliases"],
]


def _typer_mailsetup(tmp_path: Path) -> str:
    """A `mailsetup` that always goes through Typer, as the installed one did before entry.py (named
    mailsetup: click's usage lines name the program)."""
    bin_dir = tmp_path / "typer-bin"
    bin_dir.mkdir()
    script = bin_dir / "mailsetup"
    script.write_text(f"#!{sys.executable}\nfrom mailsetup.cli import main\n\nmain()\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("args", TAKEN + LEFT, ids=lambda a: " ".join(a) or "(none)")
def test_aliases_reads_the_same_with_and_without_typer(tmp_path: Path, args: list[str]):
    fast, typer_way = _files(tmp_path / "fast"), _files(tmp_path / "typer")
    ours = _run([MAILSETUP, "aliases", *args], fast)
    theirs = _run([_typer_mailsetup(tmp_path), "aliases", *args], typer_way)
    code, out, err = theirs
    assert ours == (code, out.replace(str(typer_way), str(fast)), err.replace(str(typer_way), str(fast)))
    assert _databases(fast) == _databases(typer_way)
    if args in (["aliases"], ["aliases", "--out", "x.db", "--smtpd-version", "7.6"]):
        assert ours[0] == 0 and _databases(fast), ours  # a case that writes did write
    if args == ["bad"]:
        assert ours[0] == 2 and "bad:8" in ours[2], ours  # a user's mistake: one line, file and line


def test_the_cases_above_do_take_both_ways():
    """TAKEN really is read by entry.py, LEFT really goes to Typer: else the comparison proves little."""
    assert all(aliases_arguments(args) is not None for args in TAKEN)
    assert all(aliases_arguments(args) is None for args in LEFT)


def test_the_aliases_command_runs_without_typer_dataclasses_or_subprocess(tmp_path: Path):
    """The point of the Typer-free way: what loads. Typer and click (~50 ms here), dataclasses (it
    loads inspect), subprocess: none of them on the way that builds a database."""
    where = _files(tmp_path / "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-X", "importtime", MAILSETUP, "aliases", "aliases", "--out", "x.db"],
                          cwd=where, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0 and "wrote x.db: 6 aliases" in proc.stdout, proc.stderr[-2000:]
    modules = {m.group(1) for line in proc.stderr.splitlines() if (m := _IMPORT_LINE.match(line))}
    assert "mailsetup.aliases" in modules and "mailsetup.files" in modules  # the parse saw the imports
    assert not modules & {"typer", "click", "dataclasses", "subprocess", "mailsetup.cli", "mailsetup.model"}, sorted(
        modules & {"typer", "click", "dataclasses", "subprocess", "mailsetup.cli", "mailsetup.model"})


def _fake_smtpd(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "smtpd"
    fake.write_text("#!/bin/sh\n" + body + "\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize(("said", "version_flag"), [("version: OpenSMTPD 7.6.0p1", "7.6"),
                                                      ("version: OpenSMTPD 7.4.0-portable", "7.4")])
def test_aliases_follows_the_installed_smtpds_version(tmp_path: Path, said: str, version_flag: str):
    """With no --smtpd-version, the grammar is the installed smtpd's (here a stand-in on PATH that
    prints what `smtpd -h` prints): the same answer as naming that version."""
    fake = _fake_smtpd(tmp_path, f"echo '{said}'\necho 'usage: smtpd [-dFhnv]' >&2")
    where = tmp_path / "w"
    where.mkdir()
    (where / "aliases").write_text("# the team\nteam: alice # and more soon\n")
    path = f"{fake.parent}:{os.environ.get('PATH', '')}"
    found = _run([MAILSETUP, "aliases", "--check", "aliases"], where, {"PATH": path})
    named = _run([MAILSETUP, "aliases", "--check", "--smtpd-version", version_flag, "aliases"], where, {"PATH": path})
    assert found == named
    assert found[0] == (2 if version_flag == "7.6" else 0), found


@pytest.mark.skipif(not SMTPD, reason="needs OpenSMTPD installed")
def test_the_probe_reads_the_real_smtpd_as_the_subprocess_way_does():
    assert VersionProbe(SMTPD).result() == smtpd_version(SMTPD) is not None


def test_the_probe_gives_none_for_a_missing_or_unrunnable_smtpd(tmp_path: Path):
    assert VersionProbe(str(tmp_path / "absent")).result() is None
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\necho 'version: OpenSMTPD 7.6.0'\n")
    assert VersionProbe(str(plain)).result() is None
    assert VersionProbe(str(_fake_smtpd(tmp_path, "echo 'no version here'"))).result() is None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("body", ["exec sleep 60", "exec yes OpenSMTPD"], ids=["hangs", "never stops talking"])
def test_the_probe_kills_an_smtpd_that_hangs_or_floods(tmp_path: Path, body: str):
    probe = VersionProbe(str(_fake_smtpd(tmp_path, body)), timeout=1.0)
    pid = probe.pid
    started = time.monotonic()
    assert probe.result() is None
    assert time.monotonic() - started < 5
    assert pid is not None and _gone(pid)  # killed and reaped: no zombie, no orphan


def test_the_probe_stops_an_smtpd_left_unread(tmp_path: Path):
    """A caller leaving early (an error, Ctrl-C) closes the probe: the child does not outlive it."""
    probe = VersionProbe(str(_fake_smtpd(tmp_path, "exec sleep 60")))
    pid = probe.pid
    probe.close()
    assert pid is not None and _gone(pid) and probe.result() is None


def test_the_probe_hands_smtpd_no_descriptor_of_its_caller(tmp_path: Path):
    """As subprocess's close_fds: a descriptor the caller left inheritable does not reach smtpd."""
    listing = tmp_path / "fds"
    fake = _fake_smtpd(tmp_path, f"ls /proc/$$/fd > {listing}\necho 'version: OpenSMTPD 7.4.0'")
    opened = os.open(os.devnull, os.O_RDONLY)
    os.dup2(opened, 57, inheritable=True)
    try:
        assert VersionProbe(str(fake)).result() == (7, 4, "7.4.0")
    finally:
        os.close(57)
        os.close(opened)
    fds = listing.read_text().split()
    assert "0" in fds and "57" not in fds, fds


def _ignoring_sigchld() -> None:
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def test_aliases_works_when_started_with_sigchld_ignored(tmp_path: Path):
    """A parent that ignores SIGCHLD (Perl's $SIG{CHLD}='IGNORE', then system()) passes that on: the
    kernel then reaps `smtpd -h` itself, and waiting for it must not fail."""
    where = _files(tmp_path / "w")
    fake = _fake_smtpd(tmp_path, "echo 'version: OpenSMTPD 7.4.0'")
    proc = subprocess.run([MAILSETUP, "aliases", "aliases", "--check"], cwd=where, capture_output=True, text=True,
                          preexec_fn=_ignoring_sigchld, timeout=60,
                          env=dict(os.environ, NO_COLOR="1", PATH=f"{fake.parent}:{os.environ['PATH']}"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "aliases: 6 aliases, OK\n", "")


def test_a_reader_gone_away_ends_aliases_quietly_as_typer_does(tmp_path: Path):
    """`mailsetup aliases … | head -0`: exit 1 and no traceback, on both ways."""
    where = _files(tmp_path / "w")
    results = []
    for program in (MAILSETUP, _typer_mailsetup(tmp_path)):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([program, "aliases", "aliases", "--check"], cwd=where, stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        results.append((proc.returncode, proc.stderr))
    assert results[0] == results[1] == (1, "")


def test_an_ascii_only_output_gets_a_question_mark_not_a_traceback(tmp_path: Path):
    where = _files(tmp_path / "w")
    (where / "é").write_text(GOOD)
    code, out, err = _run([MAILSETUP, "aliases", "é", "--check"], where, {"PYTHONIOENCODING": "ascii"})
    assert (code, out, err) == (0, "?: 6 aliases, OK\n", "")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser")
def test_a_source_its_user_cannot_read_is_answered_as_typer_answers():
    """Typer's Path refuses an existing file its user cannot read (root reads any): entry.py leaves
    that case to Typer, so a normal user sees the same usage error either way."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mailsetup-entry-", dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        base.chmod(0o755)
        results = [_as_nobody_on_an_unreadable_source(base, name, program)
                   for name, program in (("fast", MAILSETUP), ("typer", _typer_mailsetup(base)))]
    finally:
        shutil.rmtree(base)
    assert results[0] == results[1] and results[0][0] == 2, results
    assert "is not readable" in results[0][2]


def _as_nobody_on_an_unreadable_source(base: Path, name: str, program: str) -> tuple[int, str, str]:
    where = base / name
    where.mkdir()
    (where / "aliases").write_text(GOOD)
    (where / "aliases").chmod(0)
    for p in (where, where / "aliases"):
        os.chown(p, 65534, 65534)
    code, out, err = _run([shutil.which("runuser"), "-u", "nobody", "--", program, "aliases", "aliases", "--check"],
                          where)
    return code, out, err.replace(str(where), "WHERE")
