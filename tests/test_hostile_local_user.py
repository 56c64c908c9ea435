"""What a hostile local user can still try against a root run (found in review of issue 9), each refused."""

from __future__ import annotations

import os
import pwd
import re
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, SMTPD, init_args, own_var, run_cli

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the attacks are on root's runs")

NOBODY = pwd.getpwnam("nobody")
SECRET = "Hunter2SECRETvalue"


def users_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def roots_secret(path: Path) -> Path:
    """A root-only file that happens to parse as aliases(5): `name: word` lines, as a YAML file of
    credentials does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.write_text(f"db_user: appuser\ndb_password: {SECRET}\n")
    path.chmod(0o600)
    return path


def world_readable_files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and p.stat().st_mode & stat.S_IROTH
            and needle.encode() in p.read_bytes()]


# --- 1. the smoke test on a real host delivers through the admin's own links ------------------------


# In a private mount namespace: the host's /etc under an overlay (upper and work dirs $1, $2: what
# the run writes stays out of the real /etc) and a tmpfs /home with alice's home in it; the test's
# own steps follow.
_OWN_ETC_AND_HOME = ('mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc || exit 99; '
                     'mount -t tmpfs -o mode=0755 tmpfs /home || exit 99; '
                     + own_var("$1.var", "$2.var") + ' || exit 99; '
                     'mkdir -m 700 /home/alice && chown alice:alice /home/alice && ')


def _overlay_dirs(tmp_path: Path) -> tuple[Path, Path]:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    return upper, work


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
def test_init_on_a_real_host_never_follows_the_admins_maildir_link_into_a_folder_of_roots(tmp_path: Path):
    """`mailsetup init` as root on a real host ends with the embedded smoke test, which delivers
    postmaster's mail to --admin's ~/Maildir through plain paths (mkdir/chown/open by name, O_NOFOLLOW
    only on the last part). The admin user points ~/Maildir at a root-only folder: root makes
    tmp/, new/, cur/ there and gives them to that user (and `mailsetup serve` then writes mail the
    sender chose into them). The real-smtpd smoke refuses exactly this link; the embedded one does not."""
    from test_real_smtpd import ensure_system_user

    ensure_system_user("alice")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    upper, work = _overlay_dirs(tmp_path)
    script = (_OWN_ETC_AND_HOME +
              'runuser -u alice -- ln -s "$3" /home/alice/Maildir || exit 98; '
              'shift 3; exec "$@"')
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(upper), str(work),
         str(victim), MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--admin", "alice",
         "--no-preflight"],  # a real host's init would ask the world's DNS and port 25
        capture_output=True, text=True, timeout=180, env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL)
    if proc.returncode in (98, 99):
        pytest.skip("could not set up the namespace: " + proc.stderr.strip())
    made = sorted(f"{p.name} uid={p.stat().st_uid}" for p in victim.iterdir())
    assert made == [], f"root made {made} inside a root-only folder through alice's link:\n{proc.stdout}"
    assert victim.stat().st_uid == 0


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
@pytest.mark.once  # ~20 s of our own path handling's time-out: the same on every release
def test_init_on_a_real_host_is_not_hung_by_a_fifo_in_the_admins_maildir(tmp_path: Path):
    """The smoke test looks for its message by reading every file in ~alice/Maildir/new as root
    (`p.read_bytes()` for p in new.iterdir()): alice leaves a FIFO there and root's `mailsetup init`
    hangs for ever after writing (a link to /dev/zero there eats root's memory instead). Expected: the
    smoke test ends (a FIFO is not a message) and init exits."""
    from test_real_smtpd import ensure_system_user

    ensure_system_user("alice")
    upper, work = _overlay_dirs(tmp_path)
    script = (_OWN_ETC_AND_HOME +
              "runuser -u alice -- sh -c 'mkdir -p ~/Maildir/new ~/Maildir/tmp ~/Maildir/cur && "
              "mkfifo ~/Maildir/new/fifo' || exit 98; "
              'shift 2; exec "$@"')
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(upper), str(work),
             MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--admin", "alice",
             "--no-preflight"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("root's `mailsetup init` hung for 60 s on a FIFO alice left in ~/Maildir/new")
    if proc.returncode in (98, 99):
        pytest.skip("could not set up the namespace: " + proc.stderr.strip())


# alice's side: a FIFO named like root's file waits in ~/Maildir/new; root's probe reads it; she feeds
# it the smoke message (it holds the token), so the probe counts it as delivered; then she points new/
# at root's folder before the clean-up unlinks "delivered" files by path.
ATTACKER = r"""
import os, sys, time
victim, new = sys.argv[1], "/home/alice/Maildir/new"
os.mkfifo(os.path.join(new, "precious"))
deadline = time.time() + 90
while not [f for f in os.listdir(new) if f != "precious"]:
    if time.time() > deadline:
        sys.exit("no mail came")
    time.sleep(0.005)
mail = [f for f in os.listdir(new) if f != "precious"][0]
data = open(os.path.join(new, mail), "rb").read()
# Feed the FIFO once root's probe opens it for reading (ENXIO until then); a root that never reads
# it leaves the attacker waiting only so long.
deadline = time.time() + 20
while time.time() < deadline:
    try:
        fd = os.open(os.path.join(new, "precious"), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        time.sleep(0.005)
        continue
    try:
        os.write(fd, data)
    except OSError:
        pass
    os.close(fd)
    break
time.sleep(0.2)
os.rename(new, new + ".old")
os.symlink(victim, new)
"""


@pytest.mark.once
@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
def test_init_on_a_real_host_never_lets_the_admin_make_root_delete_a_file(tmp_path: Path):
    """The smoke test's clean-up unlinks every file it counted as delivered by its path through
    ~alice/Maildir/new. It counts any file there holding the token (read as root, FIFOs included), and
    alice can feed one the token; she then makes new/ a link to a folder of root's, and root's
    `mailsetup init` deletes root's file of the same name there (here victim/precious; /etc/shadow
    just as well). Expected: root's file is still there."""
    from test_real_smtpd import ensure_system_user

    ensure_system_user("alice")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("root's data\n")
    (victim / "precious").chmod(0o600)
    upper, work = _overlay_dirs(tmp_path)
    script = (_OWN_ETC_AND_HOME +
              "runuser -u alice -- sh -c 'mkdir -p ~/Maildir/new ~/Maildir/tmp ~/Maildir/cur' || exit 98; "
              'runuser -u alice -- python3 -c "$4" "$3" & sleep 0.5; '
              'shift 4; "$@"; rc=$?; wait; exit $rc')
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(upper), str(work),
         str(victim), ATTACKER, MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian",
         "--admin", "alice", "--no-preflight"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL)
    if proc.returncode in (98, 99):
        pytest.skip("could not set up the namespace: " + proc.stderr.strip())
    assert (victim / "precious").exists(), f"root deleted victim/precious through alice's link:\n{proc.stdout}"


# --- 2. --aliases and `mailsetup aliases SOURCE` follow a user's link to root's secret ------------


def test_aliases_from_a_users_link_never_publish_a_root_only_file(tmp_path: Path):
    """The admin imports a user's aliases file (`--aliases /home/bob/aliases`); bob made it a link to a
    root-only file. Root reads through the link and writes the secret into aliases (0644) and
    aliases.db (0644), and prints it in the diff. Expected: the link refused (as read_secret does for
    a link another user owns), nothing of the secret in any output or world-readable file."""
    secret = roots_secret(tmp_path / "rootonly" / "app.yaml")
    bob = users_dir(tmp_path / "bob")
    link = bob / "aliases"
    link.symlink_to(secret)
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke", "--diff", "--aliases", link, "--admin", "alice"))
    assert SECRET not in r.out + r.err
    assert world_readable_files_holding(root, SECRET) == []
    assert r.code == 2 and "refusing to read" in r.err, r.out + r.err

    db = tmp_path / "out" / "aliases.db"
    db.parent.mkdir()
    r = run_cli("aliases", link, "--out", db)
    assert not (db.exists() and SECRET.encode() in db.read_bytes()), "the secret is in a 0644 aliases.db"
    assert r.code == 2 and "refusing to read" in r.err, r.out + r.err


# --- 3. a read path that is not a regular file --------------------------------------------------


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # /dev/zero must not eat the machine


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_aliases_file_that_is_a_fifo_or_a_device_is_one_line_not_a_hang_or_a_traceback(tmp_path: Path, kind: str):
    """A user's --aliases FILE (or `mailsetup aliases FILE`) replaced by a FIFO hangs root's run for
    ever; a link to /dev/zero, or a sparse 8 GB file (also as --answers), is read whole into memory:
    MemoryError and a traceback (without a memory limit, all of root's memory). read_secret opens
    O_NONBLOCK and refuses what is not a regular file; these reads (aliases._read,
    provision._aliases_source, answers.load_answers) do not, and none bounds the size."""
    bob = users_dir(tmp_path / "bob")
    path = bob / "aliases"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:  # 8 GB that take no disk: read whole into memory (an --answers file too)
        with open(path, "wb") as f:
            f.truncate(8 << 30)
    os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    for args in (["aliases", path, "--check"], init_args(tmp_path / "root", "--no-smoke", "--aliases", path),
                 init_args(tmp_path / "root", "--no-smoke", "--answers", path)):
        try:
            p = subprocess.run([MAILSETUP, *map(str, args)], capture_output=True, text=True, timeout=20,
                               stdin=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"), preexec_fn=_limited)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mailsetup {args[0]} hung for 20 s reading the {kind} {path}")
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("mailsetup: error: "), p.stderr[-2000:]


# --- 4. --drain: a signal after the queue drained leaves smtpd paused ----------------------------

SLOW_SMTPCTL = r"""#!/bin/sh
# The real smtpctl; the second time `show queue` finds the queue empty (the check _drain makes after
# the drain loop returned, outside the try that resumes smtpd) it takes a few seconds, as a loaded
# smtpd can. The test sends SIGTERM then.
out=$(/usr/sbin/smtpctl "$@"); rc=$?
[ -n "$out" ] && printf '%s\n' "$out"
if [ "$1 $2" = "show queue" ] && [ -z "$out" ]; then
    n=$(cat "$MARK/empty" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$MARK/empty"
    if [ "$n" -eq 2 ]; then touch "$MARK/slow"; sleep 8; fi
fi
exit $rc
"""


@pytest.mark.skipif(not (SMTPD and shutil.which("nsenter")), reason="needs OpenSMTPD and nsenter")
def test_a_kill_right_after_the_queue_drained_still_resumes_intake(tmp_path: Path):
    """`init --rotate-queue-key --drain`: drain_opensmtpd returns with smtpd paused, then _drain asks
    queued_mail() again (two more smtpctl calls) before initflow enters the try that resumes smtpd. A
    SIGTERM (or Ctrl-C) in that window exits 130 with smtpd's intake still paused and no word of it:
    an MX that takes no mail until someone notices."""
    from test_queue_rotation import KEY, Host, intake_open

    h = Host()
    cli = None
    try:
        h.provision_with_stuck_mail()
        key = h.path(KEY).read_text()
        wrap = h.base / "wrap"
        wrap.mkdir()
        (wrap / "smtpctl").write_text(SLOW_SMTPCTL)
        (wrap / "smtpctl").chmod(0o755)
        cli = subprocess.Popen(
            h.cmd("env", "NO_COLOR=1", f"MARK={wrap}", f"PATH={wrap}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                  MAILSETUP, "init", "--yes", "--rotate-queue-key", "--no-smoke", "--drain", "--drain-timeout", "60"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 20
        while "SMTP paused" not in h.status():
            assert cli.poll() is None and time.monotonic() < deadline, "the drain never paused smtpd"
            time.sleep(0.1)
        assert h.run("smtpctl", "remove", "all").returncode == 0  # the queue drains
        deadline = time.monotonic() + 20
        while not (wrap / "slow").exists():
            assert cli.poll() is None and time.monotonic() < deadline, "the post-drain check never ran"
            time.sleep(0.05)
        cli.send_signal(signal.SIGTERM)  # nsenter execs: this is mailsetup itself
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
        assert h.path(KEY).read_text() == key
        assert "SMTP paused" not in h.status(), f"smtpd's intake was left paused; mailsetup said:\n{err}"
        assert intake_open(h)
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        h.close()


# --- 5. the diff shows the queue key when the line on disk is spaced differently -------------------


@pytest.mark.parametrize("line", ["queue encryption  {key}", "\tqueue encryption {key}", "queue  encryption {key}"],
                         ids=["two-spaces", "indented", "two-spaces-before-encryption"])
def test_the_diff_never_shows_the_queue_key_however_the_line_on_disk_is_spaced(tmp_path: Path, line: str):
    """smtpd accepts `queue encryption  KEY` and an indented line (smtpd -n: configuration OK); the
    redaction pattern wants exactly `^queue encryption ` so `init --dry-run` (or --diff, or the
    wizard's review) prints the live queue key on the '-' line of the smtpd.conf diff."""
    root = tmp_path / "root"
    assert run_cli(*init_args(root, "--no-smoke")).code == 0
    conf = root / "etc/smtpd.conf"
    key = (root / "etc/mailsetup/queue.key").read_text().strip()
    text = conf.read_text()
    conf.write_text(re.sub(r"(?m)^queue encryption \S+$", line.format(key=key), text))
    if SMTPD:
        check = subprocess.run([SMTPD, "-n", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr  # a line smtpd takes
    r = run_cli("init", "--root", root, "--dry-run")
    assert r.code == 0, r.err
    assert key not in r.out + r.err, "the queue key is printed in the diff"


# --- 6. errors that still quote a secret file ------------------------------------------------------


def test_a_credentials_table_that_is_not_utf8_is_named_by_line_not_by_its_bytes(tmp_path: Path):
    """read_credentials puts the UnicodeDecodeError itself in the message: "'utf-8' codec can't decode
    byte 0xe9 in position 16" — a byte of a password hash. aliases were fixed to say file:line (column)."""
    root = tmp_path / "root"
    assert run_cli(*init_args(root, "--no-smoke")).code == 0
    creds = root / "etc/mailsetup/credentials"
    creds.write_bytes(b"alice $2b$10$abc\xe9" + b"d" * 50 + b"\n")
    r = run_cli("init", "--root", root, "--dry-run")
    assert r.code != 0
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith(f"mailsetup: error: {creds}:1"), r.err
    assert "0xe9" not in r.err and "codec" not in r.err, r.err


# --- 7. one line, even when a file name has a newline ------------------------------------------


INIT = ["init", "--root", "{root}", "--domain", "example.test", "--yes", "--no-smoke"]


@pytest.mark.parametrize("args", [["aliases", "{p}"], [*INIT, "--admin", "alice", "--aliases", "{p}"],
                                  [*INIT, "--answers", "{p}"]],
                         ids=["aliases", "init-aliases", "init-answers"])
def test_a_file_name_with_a_newline_cannot_add_a_line_to_the_error(tmp_path: Path, args: list[str]):
    """--root refuses a newline; --aliases, --answers and `aliases SOURCE` print the name raw, so a
    name a user chose ("x\\nmailsetup: wrote ...") forges a second line under root's error."""
    p = str(tmp_path / "x\nmailsetup: everything is fine")
    r = run_cli(*[a.format(p=p, root=tmp_path / "root") for a in args])
    assert r.code == 2
    assert len(r.err_lines) == 1, r.err


# --- 8. TMPDIR from a user's environment -----------------------------------------------------------


@pytest.mark.skipif(not SMTPD, reason="needs OpenSMTPD")
def test_root_never_works_in_a_tmpdir_another_user_owns(tmp_path: Path):
    """tempfile honours TMPDIR, which root inherits from a user's session with `su` (no dash) or
    pam_tmpdir. The real-smtpd smoke test then makes its working folder — smtpd.conf with the queue
    key, the spool smtpd runs on, smtpd.log opened by path — inside a folder that user owns: they can
    rename it and put a link or their own smtpd.conf in its place before `smtpd -d -f` reads it
    (aliases.py's build/read temp folders likewise). Expected: an untrusted TMPDIR is not used."""
    import threading

    base = Path(tempfile.mkdtemp(prefix="mailsetup-review-", dir="/tmp"))
    try:
        base.chmod(0o755)  # smtpd's unprivileged lookup must reach aliases.db
        root = base / "root"
        assert run_cli(*init_args(root, "--no-smoke")).code == 0
        users_tmp = users_dir(base / "bobs-tmp")
        seen: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.update(os.listdir(users_tmp))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            run_cli("smoke", "--root", root, "--engine", "opensmtpd", env={"TMPDIR": str(users_tmp)})
            run_cli(*init_args(root, "--no-smoke", "--rotate-queue-key"), env={"TMPDIR": str(users_tmp)})
        finally:
            stop.set()
            watcher.join()
        assert seen == set(), f"root worked in {users_tmp}, a folder nobody owns: {sorted(seen)}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
