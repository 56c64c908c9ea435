"""Dated backups kept to a number (certbot's storage.truncate keeps five): the newest N of each file,
N from `init --keep-backups` or the answers file, and only what surely is one of ours is removed."""

from __future__ import annotations

import os
import pwd
import re
import stat
from pathlib import Path

import pytest
from conftest import IS_ROOT, init_args, needs_smtpd, run_cli

KEY = "etc/ssl/private/mail.example.test.key"
CERT = "etc/ssl/certs/mail.example.test.crt"
QKEY = "etc/mailsetup/queue.key"
CONF = "etc/smtpd.conf"
FAST = ("--no-smoke", "--key-type", "ecdsa-p256")


def backups(path: Path) -> set[str]:
    """The names mailsetup gives the dated backups of `path` (NAME.YYYYmmdd-HHMMSS[.N].bak) found beside it."""
    pattern = re.compile(re.escape(path.name) + r"\.\d{8}-\d{6}(\.[1-9]\d*)?\.bak")
    return {p.name for p in path.parent.iterdir() if pattern.fullmatch(p.name)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def rotate_and_track(sandbox: Path, runs: int, files: tuple[str, ...]) -> dict[str, list[tuple[str, bytes]]]:
    """Run `init --rotate` `runs` times; per file, each backup made (name, the bytes it replaced) in order."""
    made: dict[str, list[tuple[str, bytes]]] = {f: [] for f in files}
    for _ in range(runs):
        before = {f: ((sandbox / f).read_bytes(), backups(sandbox / f)) for f in files}
        r = run_cli(*init_args(sandbox, "--rotate", *FAST))
        assert r.code == 0, r.err
        for f in files:
            new = backups(sandbox / f) - before[f][1]
            assert len(new) == 1, (f, new)  # one per run, however many are removed
            made[f].append((new.pop(), before[f][0]))
    return made


def test_seven_rotations_keep_the_five_newest_backups_each_private_one_0600(sandbox: Path):
    assert run_cli(*init_args(sandbox, *FAST)).code == 0
    files = (KEY, CERT, QKEY, CONF)
    made = rotate_and_track(sandbox, 7, files)
    for f in files:
        left = backups(sandbox / f)
        assert left == {name for name, _ in made[f][-5:]}, f  # exactly the five newest
        for name, old in made[f][-5:]:
            assert (sandbox / f).with_name(name).read_bytes() == old  # each still what it replaced
    for f in (KEY, QKEY, CONF):
        assert {mode((sandbox / f).with_name(n)) for n in backups(sandbox / f)} == {0o600}, f
    assert {mode((sandbox / CERT).with_name(n)) for n in backups(sandbox / CERT)} == {0o644}


def test_keep_backups_2_is_recorded_and_a_rerun_keeps_to_it(sandbox: Path):
    r = run_cli(*init_args(sandbox, *FAST, "--keep-backups", "2"))
    assert r.code == 0, r.err
    assert "keep_backups = 2\n" in (sandbox / "etc/mailsetup/answers.toml").read_text()
    made = rotate_and_track(sandbox, 4, (KEY, CERT))  # no flag: the recorded 2 holds
    for f in (KEY, CERT):
        assert backups(sandbox / f) == {name for name, _ in made[f][-2:]}, f
    # The other writing commands keep to the set-up's number too.
    args = ("cert", "--hostname", "mail.example.test", "--os", "debian", "--root", sandbox, "--force",
            "--key-type", "ecdsa-p256")
    conf = sandbox / "rendered.conf"
    creds = sandbox / "etc/mailsetup/credentials"
    for n in range(3):
        r = run_cli(*args)
        assert r.code == 0, r.err
        r = run_cli("user", "add", "bob", "--password-stdin", "--root", sandbox, input="a long password 1\n")
        assert r.code == 0, r.err
        r = run_cli("render", "--domain", "example.test", "--os", "debian", "--root", sandbox, "--out", conf,
                    "--force", "--no-queue-encryption", "--smtp-port", str(2500 + n))
        assert r.code == 0, r.err
    assert len(backups(sandbox / KEY)) == 2 and len(backups(sandbox / CERT)) == 2
    assert len(backups(creds)) == 2 and len(backups(conf)) == 2


def _cert(key: Path, *extra: object):
    return run_cli("cert", "--hostname", "mail.example.test", "--out-cert", key.with_name("c.pem"), "--out-key", key,
                   *extra)


def test_a_command_without_a_set_up_keeps_five(tmp_path: Path):
    key = tmp_path / "k.pem"
    made = []
    for _ in range(7):
        before = backups(key)
        r = _cert(key, "--force")
        assert r.code == 0, r.err
        made += sorted(backups(key) - before)
    assert backups(key) == set(made[-5:]) and len(made) == 6  # the first run replaced nothing
    assert {mode(key.with_name(n)) for n in backups(key)} == {0o600}


@pytest.mark.skipif(not IS_ROOT, reason="another user's file and the trust rules need root")
def test_links_other_users_files_and_look_alikes_are_never_removed(sandbox: Path, tmp_path: Path):
    assert run_cli(*init_args(sandbox, *FAST, "--keep-backups", "1")).code == 0
    key = sandbox / KEY
    target = tmp_path / "precious"
    target.write_text("not a backup\n")
    planted = {
        "link": f"{key.name}.20000101-000000.bak",  # a link named exactly like a backup
        "theirs": f"{key.name}.20000101-000001.bak",  # a regular file another user owns
        "evil": f"{key.name}.20000101-000002.bak.evil",
        "no-stamp": f"{key.name}.2000-01-01.bak",
        "other-file": f"{key.name}x.20000101-000003.bak",
        "zero-number": f"{key.name}.20000101-000004.01.bak",
        "folder": f"{key.name}.20000101-000005.bak",
    }
    key.with_name(planted["link"]).symlink_to(target)
    for what in ("theirs", "evil", "no-stamp", "other-file", "zero-number"):
        key.with_name(planted[what]).write_text(what + "\n")
        os.chmod(key.with_name(planted[what]), 0o600)
    os.chown(key.with_name(planted["theirs"]), 65534, 65534)
    key.with_name(planted["folder"]).mkdir()
    made = rotate_and_track(sandbox, 3, (KEY,))
    left = {p.name for p in key.parent.iterdir()}
    assert set(planted.values()) <= left  # every one still there, though older than any backup
    assert key.with_name(planted["link"]).is_symlink() and target.read_text() == "not a backup\n"
    assert key.with_name(planted["theirs"]).read_text() == "theirs\n"
    assert key.with_name(planted["theirs"]).stat().st_uid == 65534
    ours = {n for n in left if n.endswith(".bak") and n not in planted.values()}
    assert ours == {made[KEY][-1][0]}  # --keep-backups 1: only the newest of ours


@pytest.mark.parametrize(("args", "answers", "error"), [
    (("--keep-backups", "0"), None, "--keep-backups: 0 is too few: keep at least 1 backup of each file"),
    (("--keep-backups", "x"), None, "--keep-backups: 'x' is not a number of backups (1 or more)"),
    ((), 'domain = "example.test"\n\nkeep_backups = -1\n',
     "{answers}:3: --keep-backups: -1 is too few: keep at least 1 backup of each file"),
], ids=["zero", "not-a-number", "answers-file"])
def test_a_bad_number_of_backups_is_one_line_naming_the_flag_or_line(sandbox: Path, tmp_path: Path, args, answers,
                                                                     error):
    extra = list(args)
    path = tmp_path / "answers.toml"
    if answers is not None:
        path.write_text(answers)
        extra += ["--answers", path]
    r = run_cli(*init_args(sandbox, *FAST, *extra))
    assert (r.code, r.err_lines) == (2, ["mailsetup: error: " + error.format(answers=path)])
    assert not sandbox.exists()  # nothing written


def test_a_bad_number_in_the_recorded_answers_names_its_line(sandbox: Path):
    assert run_cli(*init_args(sandbox, *FAST)).code == 0
    answers = sandbox / "etc/mailsetup/answers.toml"
    answers.write_text(answers.read_text() + 'keep_backups = "many"\n')
    line = answers.read_text().count("\n")
    r = run_cli("cert", "--hostname", "mail.example.test", "--os", "debian", "--root", sandbox, "--force")
    assert (r.code, r.err_lines) == (
        2, [f"mailsetup: error: {answers}:{line}: --keep-backups: 'many' is not a number of backups (1 or more)"])


@pytest.mark.skipif(not IS_ROOT, reason="the table is shared with smtpd's group only when root runs mailsetup")
def test_the_credentials_backup_is_0600_though_the_live_table_is_shared_with_smtpd(sandbox: Path):
    try:
        pwd.getpwnam("opensmtpd")
    except KeyError:
        pytest.skip("needs the opensmtpd user (the table is then root:opensmtpd 0640)")
    assert run_cli(*init_args(sandbox, *FAST)).code == 0
    r = run_cli("user", "add", "bob", "--password-stdin", "--root", sandbox, input="a long password 1\n")
    assert r.code == 0, r.err
    creds = sandbox / "etc/mailsetup/credentials"
    [bak] = backups(creds)
    assert mode(creds) == 0o640 and mode(creds.with_name(bak)) == 0o600
    assert creds.with_name(bak).stat().st_gid == creds.stat().st_gid


def test_undo_gives_a_shared_secret_its_mode_back(tmp_path: Path):
    from mailsetup.plan import FileChange, apply_plan, undo_applied

    table = tmp_path / "credentials"
    table.write_text("old\n")
    table.chmod(0o640)
    [applied] = apply_plan([FileChange(table, b"new\n", 0o640, "credentials", secret=True)])
    assert applied.backup is not None and mode(applied.backup) == 0o600
    undo_applied([applied])
    assert table.read_text() == "old\n" and mode(table) == 0o640


def test_a_failed_write_removes_no_backup(tmp_path: Path):
    from mailsetup.errors import MailsetupError
    from mailsetup.plan import FileChange, apply_plan

    conf = tmp_path / "a.conf"
    conf.write_text("now\n")
    old = {f"a.conf.2000010{day}-000000.bak" for day in range(1, 4)}
    for name in old:
        (tmp_path / name).write_text("old\n")
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    plan = [FileChange(conf, b"new\n", 0o644, "a"), FileChange(tmp_path / "blocker/b", b"b", 0o644, "b")]
    with pytest.raises(MailsetupError, match="every file was put back as it was"):
        apply_plan(plan, keep_backups=1)
    assert conf.read_text() == "now\n"
    assert backups(conf) == old


@needs_smtpd
def test_a_run_smtpd_refuses_removes_no_backup(sandbox: Path):
    assert run_cli(*init_args(sandbox, *FAST, "--keep-backups", "1")).code == 0
    rotate_and_track(sandbox, 1, (KEY, CONF))
    conf = sandbox / CONF
    planted = {f"{conf.name}.2000010{day}-000000.bak" for day in range(1, 4)}  # older than any of ours
    for name in planted:
        conf.with_name(name).write_text("an old one\n")
        conf.with_name(name).chmod(0o600)
    before = {f: backups(sandbox / f) for f in (KEY, CONF)}
    r = run_cli(*init_args(sandbox, *FAST, "--rotate", "--no-dkim", "--smtpd-version", "6.0"))  # 6.0: no filters
    assert r.code == 1 and "smtpd -n refused the new configuration, so every file was put back" in r.err
    assert {f: backups(sandbox / f) for f in (KEY, CONF)} == before
    assert planted <= before[CONF]


def test_a_secrets_backup_an_older_run_left_readable_is_made_0600(tmp_path: Path):
    key = tmp_path / "k.pem"
    assert _cert(key).code == 0
    older = key.with_name(f"{key.name}.20000101-000000.bak")  # as an older mailsetup may have left one
    older.write_text("an older key\n")
    older.chmod(0o640)
    r = _cert(key, "--force")
    assert r.code == 0, r.err
    assert len(backups(key)) == 2 and {mode(key.with_name(n)) for n in backups(key)} == {0o600}


@pytest.mark.skipif(not IS_ROOT, reason="a root-owned file hard-linked into a shared folder needs root")
def test_a_hard_link_named_like_a_backup_in_a_sticky_folder_is_neither_chmodded_nor_removed(tmp_path: Path):
    # In a sticky folder like /tmp anyone can plant a name; with fs.protected_hardlinks a user may
    # still hard-link a root-owned file they can read and write (a group-writable one), and without
    # it any root file. The name looks like a backup of a secret, and the file is root's and regular:
    # only its second link says it is not a copy mailsetup made.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "group-file"
    victim.write_text("shared with a group\n")
    victim.chmod(0o664)
    key = shared / "k.pem"
    planted = key.with_name(f"{key.name}.20000101-000000.bak")
    os.link(victim, planted)
    assert _cert(key).code == 0
    for _ in range(7):
        r = _cert(key, "--force")
        assert r.code == 0, r.err
    assert mode(victim) == 0o664  # not taken to 0600 as if it were a backup of the key
    assert planted.exists() and victim.stat().st_nlink == 2
    assert len(backups(key) - {planted.name}) == 5
