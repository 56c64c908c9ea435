"""OS layouts and detection; the plan writer's backups and undo."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from mailsetup.errors import MailsetupError
from mailsetup.plan import FileChange, Plan, apply_plan, undo_applied
from mailsetup.platforms import detect_os, get_layout

OS_RELEASES = {
    'ID=debian\nVERSION_CODENAME=bookworm\n': "debian",
    'ID=ubuntu\nID_LIKE=debian\n': "debian",
    'ID="rocky"\nID_LIKE="rhel centos fedora"\n': "rhel",
    'ID=fedora\n': "rhel",
    'ID="almalinux"\nID_LIKE="rhel centos fedora"\n': "rhel",
    'ID=alpine\n': "alpine",
    'ID=arch\n': "arch",
    'ID=manjaro\nID_LIKE=arch\n': "arch",
    'ID=linuxmint\nID_LIKE="ubuntu debian"\n': "debian",
    'ID=plan9\n': None,
}


@pytest.mark.parametrize("text,expected", list(OS_RELEASES.items()))
def test_detects_layout_from_os_release(tmp_path: Path, text: str, expected: str | None):
    f = tmp_path / "os-release"
    f.write_text(text)
    assert detect_os(f, system="Linux") == expected


def test_bsds_are_detected_by_uname(tmp_path: Path):
    assert detect_os(tmp_path / "missing", system="OpenBSD") == "openbsd"
    assert detect_os(tmp_path / "missing", system="FreeBSD") == "freebsd"


@pytest.mark.parametrize(
    "name,conf,aliases,restart",
    [
        ("debian", "/etc/smtpd.conf", "/etc/aliases", "systemctl restart opensmtpd"),
        ("ubuntu", "/etc/smtpd.conf", "/etc/aliases", "systemctl restart opensmtpd"),
        ("centos", "/etc/opensmtpd/smtpd.conf", "/etc/aliases", "systemctl restart opensmtpd"),
        ("alpine", "/etc/smtpd/smtpd.conf", "/etc/smtpd/aliases", "rc-service smtpd restart"),
        ("arch", "/etc/smtpd/smtpd.conf", "/etc/smtpd/aliases", "systemctl restart smtpd"),
        ("freebsd", "/usr/local/etc/mail/smtpd.conf", "/usr/local/etc/mail/aliases", "service smtpd restart"),
        ("openbsd", "/etc/mail/smtpd.conf", "/etc/mail/aliases", "rcctl restart smtpd"),
    ],
)
def test_each_os_layout(name: str, conf: str, aliases: str, restart: str):
    layout = get_layout(name)
    assert str(layout.smtpd_conf) == conf
    assert str(layout.aliases) == aliases
    assert layout.restart == restart


def test_init_tells_the_os_restart_command(tmp_path: Path):
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "freebsd", "--root", tmp_path, "--no-smoke",
                "--admin", "alice")
    assert r.code == 0, r.err
    assert "service smtpd restart" in r.out
    assert (tmp_path / "usr/local/etc/mail/smtpd.conf").is_file()


def test_unknown_os_lists_the_choices():
    with pytest.raises(MailsetupError, match="--os: unknown OS 'beos'; choose one of: .*debian"):
        get_layout("beos")


def test_plan_undo_restores_replaced_and_removes_new(tmp_path: Path):
    old = tmp_path / "a.conf"
    old.write_text("old\n")
    old.chmod(0o640)
    plan = Plan()
    plan.add(FileChange(old, b"new\n", 0o600, "replace"))
    plan.add(FileChange(tmp_path / "sub/b.key", b"k", 0o600, "new", secret=True))
    results = apply_plan(plan)
    assert old.read_text() == "new\n" and stat.S_IMODE(old.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o700
    backup = results[0].backup
    assert backup is not None and backup.read_text() == "old\n" and stat.S_IMODE(backup.stat().st_mode) == 0o640
    undo_applied(results)
    assert old.read_text() == "old\n"
    assert not (tmp_path / "sub/b.key").exists()


def test_plan_refuses_two_changes_to_one_path(tmp_path: Path):
    plan = Plan()
    plan.add(FileChange(tmp_path / "x", b"1", 0o644, "one"))
    with pytest.raises(MailsetupError, match="two planned files share the path"):
        plan.add(FileChange(tmp_path / "x", b"2", 0o644, "two"))


def test_diff_never_shows_secrets(tmp_path: Path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("queue encryption 0123456789abcdef0123456789abcdef\nqueue compression\n")
    from mailsetup.provision import QUEUE_KEY_REDACT

    change = FileChange(conf, b"queue encryption ffffffffffffffffffffffffffffffff\n", 0o600, "c",
                        redact=(QUEUE_KEY_REDACT,))
    diff = change.diff()
    assert "0123456789abcdef" not in diff and "ffffffff" not in diff
    assert "queue encryption <redacted>" in diff and "-queue compression" in diff
    conf.write_text("queue encryption 0123456789abcdef0123456789abcdef\n")
    assert "only a secret in it changes" in change.diff()
    secret = FileChange(tmp_path / "k", b"PRIVATE", 0o600, "k", secret=True)
    assert "PRIVATE" not in secret.diff()


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust rules apply to root")
def test_as_root_a_symlinked_file_is_refused_not_written_through(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "smtpd.conf").write_text("old\n")
    link = tmp_path / "smtpd.conf"
    link.symlink_to(real / "smtpd.conf")
    with pytest.raises(MailsetupError, match=f"^refusing to write {link}: it is a symbolic link"):
        apply_plan([FileChange(link, b"new\n", 0o600, "conf")])
    assert link.is_symlink() and (real / "smtpd.conf").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "smtpd.conf"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust rules apply to root")
def test_as_root_another_users_file_is_refused_and_roots_file_keeps_its_group(tmp_path: Path):
    f = tmp_path / "credentials"
    f.write_text("old\n")
    os.chown(f, 65534, 65534)
    f.chmod(0o640)
    with pytest.raises(MailsetupError, match="it is owned by uid 65534"):
        apply_plan([FileChange(f, b"new\n", 0o640, "creds")])
    assert f.read_text() == "old\n" and f.stat().st_uid == 65534
    os.chown(f, 0, 65534)  # root's, group ssl-cert-like: the group stays
    [applied] = apply_plan([FileChange(f, b"new\n", 0o640, "creds")])
    assert (f.stat().st_uid, f.stat().st_gid) == (0, 65534)
    assert (applied.backup.stat().st_gid, stat.S_IMODE(applied.backup.stat().st_mode)) == (65534, 0o640)


def test_a_plan_reads_each_file_once_to_show_it_and_once_more_to_write_it(tmp_path: Path, monkeypatch):
    """Listing a plan, its JSON and its diff summary all ask each file's state: the disk is read
    once for all of them, and once more, fresh, right before the write (it may have changed)."""
    from mailsetup import plan as plans

    reads: list[Path] = []
    real = plans.read_current
    monkeypatch.setattr(plans, "read_current", lambda path: reads.append(path) or real(path))
    (tmp_path / "old").write_bytes(b"old\n")
    plan = plans.Plan()
    for name in ("new", "old"):
        plan.add(plans.FileChange(tmp_path / name, b"content\n", 0o644, "test"))
    assert [c.state() for c in plan.pending()] == ["new", "replaced"]
    assert [c.state() for c in plan.changes] * 3 == ["new", "replaced"] * 3
    plans.apply_plan(plan)
    assert sorted(reads) == sorted([tmp_path / "new", tmp_path / "old"] * 2)
    assert [c.state() for c in plan.changes] == ["unchanged", "unchanged"]
