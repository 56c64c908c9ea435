"""Root never writes, or reads a secret, where a normal user steers: a user's folder on the way, a
symlink planted at a file, a file another user owns (issue 9, item 5). A normal user on their own
sandbox still can."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, init_args, own_var, run_cli, tree

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the trust rules apply to root")

NOBODY = pwd.getpwnam("nobody")
SWAP = "(a user other than root could swap it)"
KEY = "etc/ssl/private/mail.example.test.key"
CERT = "etc/ssl/certs/mail.example.test.crt"


def users_dir(path: Path, mode: int = 0o755) -> Path:
    """A folder a normal user (nobody) owns, as their home or their folder in /tmp would be."""
    path.mkdir(parents=True)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(mode)
    return path


def users_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(mode)
    return path


def one_error(r, pattern: str) -> None:
    assert r.code == 2, r.out + r.err
    assert len(r.err_lines) == 1 and re.fullmatch("mailsetup: error: " + pattern, r.err_lines[0]), r.err
    assert "Traceback" not in r.err


# --- the sandbox itself ------------------------------------------------------------------------


def test_a_root_folder_a_user_owns_is_refused_and_nothing_is_written(tmp_path: Path):
    base = users_dir(tmp_path / "home")
    r = run_cli(*init_args(base / "root"))
    one_error(r, f"refusing to (read|write) {re.escape(str(base))}/root/\\S+: {re.escape(str(base))} is owned by "
                 f"uid {NOBODY.pw_uid} {re.escape(SWAP)}")
    assert list(base.iterdir()) == []


def test_a_root_folder_under_a_folder_others_can_write_is_refused(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may rename what root makes in it
    (shared / "deep").mkdir()
    r = run_cli(*init_args(shared / "deep" / "root"))
    one_error(r, f"refusing to (read|write) \\S+: {re.escape(str(shared))} is writable by group and others "
                 f"\\(mode 0777; a user other than root could swap it\\)")
    assert tree(shared) == {} and list((shared / "deep").iterdir()) == []


def test_a_symlink_a_user_planted_on_the_way_is_refused(tmp_path: Path):
    base = users_dir(tmp_path / "home")
    (tmp_path / "root").symlink_to(base)
    os.lchown(tmp_path / "root", NOBODY.pw_uid, NOBODY.pw_gid)
    r = run_cli(*init_args(tmp_path / "root"))
    one_error(r, f"refusing to (read|write) \\S+: {re.escape(str(tmp_path / 'root'))} is a symbolic link owned by uid "
                 f"{NOBODY.pw_uid} {re.escape(SWAP)}")
    assert list(base.iterdir()) == []


def test_an_empty_root_is_refused_never_the_current_folder(tmp_path: Path):
    proc = subprocess.run([MAILSETUP, *init_args("")], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mailsetup: error: --root: a path is required (a sandbox folder; leave --root "
                                   "out for this host)")
    assert list(tmp_path.iterdir()) == []


def test_tmp_itself_is_a_fine_parent_when_the_entry_is_roots():
    """/tmp is root's and sticky: what root makes in it, no other user can rename or replace."""
    out = Path("/tmp") / f"mailsetup-trust-{secrets.token_hex(4)}.key"
    root = Path("/tmp") / f"mailsetup-trust-{secrets.token_hex(4)}"
    try:
        r = run_cli("keygen", "--out", out)
        assert r.code == 0, r.err
        assert out.stat().st_uid == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
        r = run_cli(*init_args(root, "--no-smoke"))
        assert r.code == 0, r.out + r.err
        assert (root / KEY).stat().st_uid == 0
    finally:
        out.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


# --- symlinks and other users' files at a secret's path ----------------------------------------


@pytest.fixture
def provisioned(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke"))
    assert r.code == 0, r.out + r.err
    return root


def plant_link(link: Path, target: Path, user_owned: bool = False) -> None:
    link.unlink()
    link.symlink_to(target)
    if user_owned:
        os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)


def test_a_symlink_at_the_queue_key_is_neither_read_nor_written_through(provisioned: Path, tmp_path: Path):
    chosen = users_file(tmp_path / "mine", b"a" * 32 + b"\n")
    link = provisioned / "etc/mailsetup/queue.key"
    plant_link(link, chosen)
    # A re-run would have taken the user's key as the queue key.
    one_error(run_cli(*init_args(provisioned, "--no-smoke")),
              f"refusing to read {re.escape(str(link))}: {re.escape(str(chosen))} is owned by uid {NOBODY.pw_uid} "
              "\\(a user other than root could have written it\\)")
    # A rotation would have written root's new key into the user's file.
    one_error(run_cli(*init_args(provisioned, "--no-smoke", "--rotate-queue-key")),
              f"refusing to write {re.escape(str(link))}: it is a symbolic link \\(root never writes through a link\\)")
    assert chosen.read_bytes() == b"a" * 32 + b"\n" and chosen.stat().st_uid == NOBODY.pw_uid
    assert link.is_symlink()


def test_a_symlink_at_the_credentials_table_cannot_add_a_login(provisioned: Path, tmp_path: Path):
    users = b"mallory $2b$10$" + b"x" * 53 + b"\n"
    chosen = users_file(users_dir(tmp_path / "u") / "creds", users)
    link = provisioned / "etc/mailsetup/credentials"
    plant_link(link, chosen, user_owned=True)
    r = run_cli("user", "add", "bob", "--password-stdin", "--root", provisioned, "--os", "debian",
                input="a good password\n")
    one_error(r, f"refusing to read {re.escape(str(link))}: {re.escape(str(link))} is a symbolic link owned by "
                 f"uid {NOBODY.pw_uid} {re.escape(SWAP)}")
    one_error(run_cli(*init_args(provisioned, "--no-smoke")), f"refusing to read {re.escape(str(link))}: .*")
    assert chosen.read_bytes() == users


def test_a_symlink_at_the_private_key_never_receives_a_new_key(provisioned: Path, tmp_path: Path):
    readable = users_file(users_dir(tmp_path / "u") / "key.pem", b"")
    link = provisioned / KEY
    plant_link(link, readable)
    one_error(run_cli(*init_args(provisioned, "--no-smoke", "--rotate-cert")),
              f"refusing to write {re.escape(str(link))}: it is a symbolic link \\(root never writes through a link\\)")
    assert readable.read_bytes() == b""
    assert not any(p.name.startswith(".") for p in (provisioned / "etc/ssl/private").iterdir())


def test_a_key_file_a_user_owns_is_refused_at_the_plan(provisioned: Path):
    key = provisioned / KEY
    os.chown(key, NOBODY.pw_uid, NOBODY.pw_gid)
    before = key.read_bytes()
    one_error(run_cli(*init_args(provisioned, "--no-smoke", "--rotate-cert")),
              f"refusing to write {re.escape(str(key))}: it is owned by uid {NOBODY.pw_uid} "
              "\\(a user other than root could have written it\\)")
    assert key.read_bytes() == before


def test_existing_cert_and_key_a_user_controls_are_refused(tmp_path: Path):
    mine = tmp_path / "made"
    mine.mkdir()
    assert run_cli("cert", "--hostname", "mail.example.test", "--out-cert", mine / "c.pem",
                   "--out-key", mine / "k.pem").code == 0
    udir = users_dir(tmp_path / "u")
    user_key = users_file(udir / "k.pem", (mine / "k.pem").read_bytes(), 0o600)
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke", "--cert", mine / "c.pem", "--key", user_key))
    one_error(r, f"refusing to read {re.escape(str(user_key))}: {re.escape(str(udir))} is owned by uid "
                 f"{NOBODY.pw_uid} {re.escape(SWAP)}")
    owned = mine / "owned.pem"
    owned.write_bytes((mine / "k.pem").read_bytes())
    os.chown(owned, NOBODY.pw_uid, NOBODY.pw_gid)
    one_error(run_cli(*init_args(root, "--no-smoke", "--cert", mine / "c.pem", "--key", owned)),
              f"refusing to read {re.escape(str(owned))}: {re.escape(str(owned))} is owned by uid {NOBODY.pw_uid} "
              "\\(a user other than root could have written it\\)")
    link = mine / "link.pem"
    link.symlink_to(mine / "c.pem")
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)
    one_error(run_cli(*init_args(root, "--no-smoke", "--cert", link, "--key", mine / "k.pem")),
              f"refusing to read {re.escape(str(link))}: {re.escape(str(link))} is a symbolic link owned by uid "
              f"{NOBODY.pw_uid} {re.escape(SWAP)}")
    assert not root.exists()


def test_roots_own_links_to_its_certificate_are_followed_as_certbot_makes_them(tmp_path: Path):
    """Let's Encrypt's live/*.pem are root's symlinks into archive/: only root could have made them."""
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    assert run_cli("cert", "--hostname", "mail.example.test", "--out-cert", archive / "fullchain1.pem",
                   "--out-key", archive / "privkey1.pem").code == 0
    (live / "fullchain.pem").symlink_to("../archive/fullchain1.pem")
    (live / "privkey.pem").symlink_to("../archive/privkey1.pem")
    r = run_cli(*init_args(tmp_path / "root", "--no-smoke", "--cert", live / "fullchain.pem",
                           "--key", live / "privkey.pem"))
    assert r.code == 0, r.out + r.err


# --- the commands that write one file ----------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["keygen", "--out", "{d}/queue.key"],
    ["render", "--domain", "example.test", "--os", "debian", "--no-queue-encryption", "--out", "{d}/smtpd.conf"],
    ["cert", "--hostname", "mail.example.test", "--out-key", "{d}/k.pem", "--out-cert", "{d}/c.pem"],
])
def test_out_into_a_folder_a_user_can_write_is_refused(tmp_path: Path, command: list[str]):
    udir = users_dir(tmp_path / "u")
    r = run_cli(*[c.format(d=udir) for c in command])
    one_error(r, f"refusing to write {re.escape(str(udir))}/\\S+: {re.escape(str(udir))} is owned by uid "
                 f"{NOBODY.pw_uid} {re.escape(SWAP)}")
    assert list(udir.iterdir()) == []


def test_keygen_out_a_symlink_is_refused(tmp_path: Path):
    udir = users_dir(tmp_path / "u")
    dangling = tmp_path / "queue.key"
    dangling.symlink_to(udir / "stolen.key")
    one_error(run_cli("keygen", "--out", dangling),
              f"refusing to write {re.escape(str(dangling))}: it is a symbolic link \\(root never writes through "
              "a link\\)")
    existing = tmp_path / "other.key"
    target = users_file(udir / "readable", b"old\n")
    existing.symlink_to(target)
    one_error(run_cli("keygen", "--out", existing, "--force"), f"refusing to write {re.escape(str(existing))}: .*")
    assert list(udir.iterdir()) == [target] and target.read_bytes() == b"old\n"


def test_aliases_db_planted_as_a_symlink_is_refused(tmp_path: Path):
    source = tmp_path / "aliases"
    source.write_text("root: alice\npostmaster: root\nabuse: root\n")
    udir = users_dir(tmp_path / "u")
    (tmp_path / "aliases.db").symlink_to(udir / "db")
    one_error(run_cli("aliases", source),
              f"refusing to write {re.escape(str(tmp_path / 'aliases.db'))}: it is a symbolic link .*")
    assert list(udir.iterdir()) == []


def test_doctor_will_not_let_smtpd_judge_a_config_a_user_planted(provisioned: Path, tmp_path: Path):
    conf = provisioned / "etc/smtpd.conf"
    planted = users_file(users_dir(tmp_path / "u") / "smtpd.conf", conf.read_bytes(), 0o600)
    plant_link(conf, planted, user_owned=True)
    r = run_cli("doctor", "--root", provisioned, "--os", "debian")
    assert r.code == 1
    assert f"refusing to read {conf}: {conf} is a symbolic link owned by uid {NOBODY.pw_uid}" in r.out


# --- check and write are one step --------------------------------------------------------------


def test_swapping_a_folder_for_a_symlink_while_init_runs_never_lands_roots_write(tmp_path: Path):
    """A user flips their folder between a real one and a link to a folder of root's, as fast as they
    can, while root runs init on it: init refuses each time, and nothing reaches root's folder."""
    udir = users_dir(tmp_path / "u", 0o777)
    victim = tmp_path / "victim"
    victim.mkdir()
    real = udir / "root"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            try:
                if real.is_symlink():
                    real.unlink()
                    real.mkdir()
                else:
                    shutil.rmtree(real, ignore_errors=True)
                    real.symlink_to(victim)
            except OSError:
                pass

    swapper = threading.Thread(target=flip, daemon=True)
    swapper.start()
    try:
        for _ in range(4):
            r = run_cli(*init_args(real, "--no-smoke"))
            assert r.code == 2 and "refusing to" in r.err, r.out + r.err
    finally:
        stop.set()
        swapper.join()
    assert list(victim.iterdir()) == []


# --- the rule applies to root; a normal user keeps their own sandbox ---------------------------


def as_nobody(code: str, cwd: Path) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.skipif(not shutil.which("runuser"), reason="needs runuser to become nobody")
def test_a_normal_user_still_writes_through_their_own_symlink():
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mailsetup-nobody-", dir="/tmp"))
    try:
        os.chown(base, NOBODY.pw_uid, NOBODY.pw_gid)
        proc = as_nobody(
            "from pathlib import Path\n"
            "from mailsetup.plan import FileChange, apply_plan, undo_applied\n"
            "real = Path('real'); real.mkdir(); (real / 'smtpd.conf').write_text('old\\n')\n"
            "link = Path('smtpd.conf'); link.symlink_to(real.absolute() / 'smtpd.conf')\n"
            "results = apply_plan([FileChange(link.absolute(), b'new\\n', 0o600, 'conf')])\n"
            "assert link.is_symlink() and (real / 'smtpd.conf').read_text() == 'new\\n'\n"
            "undo_applied(results)\n"
            "assert link.is_symlink() and (real / 'smtpd.conf').read_text() == 'old\\n'\n",
            base,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("smtpd") and not Path("/usr/sbin/smtpd").exists(), reason="needs OpenSMTPD")
def test_the_real_smtpd_smoke_never_gives_a_folder_of_roots_to_the_user_through_a_link():
    """In a sandbox, the smoke test hands the alias target a Maildir; a link they put in its place
    must not make root give away (or fill) the folder it points to."""
    import tempfile

    from test_real_smtpd import ensure_system_user

    base = Path(tempfile.mkdtemp(prefix="mailsetup-real-", dir="/tmp"))
    try:
        base.chmod(0o755)  # smtpd's unprivileged processes must reach aliases.db
        ensure_system_user("alice")
        alice = pwd.getpwnam("alice")
        root = base / "root"
        assert run_cli(*init_args(root, "--no-smoke")).code == 0
        victim = base / "victim"
        victim.mkdir(mode=0o700)
        home = root / "home/alice"
        home.mkdir(parents=True)
        os.chown(home, alice.pw_uid, alice.pw_gid)
        (home / "Maildir").symlink_to(victim)
        os.lchown(home / "Maildir", alice.pw_uid, alice.pw_gid)
        r = run_cli("smoke", "--root", root, "--engine", "opensmtpd")
        assert r.code == 1
        assert f"refusing to write in {home / 'Maildir'}: it is not a folder but a link or a file" in r.out
        assert victim.stat().st_uid == 0 and list(victim.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the real host's paths (no --root), in a private mount namespace over a throwaway /etc -------


def on_this_host(tmp_path: Path, prepare: str, *args: object) -> tuple[subprocess.CompletedProcess, Path]:
    """`mailsetup ARGS` as root with /etc an overlay whose writes land in tmp_path/upper, after the
    shell commands `prepare` ran in it: the machine's own /etc never changes."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    script = ('mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc || exit 99; '
              + own_var("$1.var", "$2.var") + ' || exit 99; ' + prepare + '; shift 2; exec "$@"')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           str(upper), str(work), MAILSETUP, *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, NO_COLOR="1"),
                          stdin=subprocess.DEVNULL)
    if proc.returncode == 99:
        pytest.skip("no overlay mounts here: " + proc.stderr.strip())
    return proc, upper


# --no-preflight: a real host's init would ask the world's DNS and port 25
HOST_INIT = ("init", "--yes", "--domain", "example.test", "--os", "debian", "--admin", "alice", "--no-smoke",
             "--no-preflight")


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
def test_on_this_host_a_key_folder_a_user_owns_is_refused(tmp_path: Path):
    proc, upper = on_this_host(tmp_path, "mkdir -p /etc/ssl/private && chown nobody /etc/ssl/private", *HOST_INIT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("mailsetup: error: refusing to write /etc/ssl/private/mail.example.test.key: "
                                   f"/etc/ssl/private is owned by uid {NOBODY.pw_uid} {SWAP}")
    written = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
    assert written == ["ssl", "ssl/private"], written  # only what the test itself changed


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
def test_on_this_host_roots_own_tree_is_written(tmp_path: Path):
    proc, upper = on_this_host(tmp_path, "true", *HOST_INIT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    key = upper / "ssl/private/mail.example.test.key"
    assert key.stat().st_uid == 0 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (upper / "mailsetup/queue.key").exists() and (upper / "smtpd.conf").exists()
    policy = upper.with_name("upper.var") / "www/mta-sts/.well-known/mta-sts.txt"  # /var/www, in the overlay
    assert policy.stat().st_uid == 0 and stat.S_IMODE(policy.stat().st_mode) == 0o644
