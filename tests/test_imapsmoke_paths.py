"""The smoke test's IMAP read-back as root: the Dovecot it starts reads (and writes its indexes in) the
Maildir with its owner's rights, and with root's in the user namespace it uses for a root-owned one. A
Maildir whose path another user steers must not point that Dovecot at someone else's mail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import IS_ROOT

from mailsetup.imapsmoke import serving_plan

needs_root = pytest.mark.skipif(not IS_ROOT, reason="judges paths as root does")
NOBODY = 65534


def _maildir(at: Path, owner: int) -> Path:
    for sub in ("", "new", "cur", "tmp"):
        (at / sub).mkdir(parents=True, exist_ok=True)
        os.chown(at / sub, owner, owner)
    return at


@needs_root
def test_a_maildir_a_user_links_to_roots_mail_is_not_served(tmp_path: Path):
    tmp_path.chmod(0o755)
    secret = _maildir(tmp_path / "root-mail", 0)  # root's: served by the rootless, userns Dovecot
    home = tmp_path / "home-bob"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    link = home / "Maildir"
    link.symlink_to(secret)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    plan = serving_plan(link)
    assert isinstance(plan, str) and "controls its path" in plan, plan


@needs_root
def test_a_maildir_a_user_links_to_another_users_mail_is_not_served(tmp_path: Path):
    tmp_path.chmod(0o755)
    alice = _maildir(tmp_path / "alice-mail", 4242)
    home = tmp_path / "home-bob"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    (home / "Maildir").symlink_to(alice)
    os.chown(home / "Maildir", NOBODY, NOBODY, follow_symlinks=False)
    assert isinstance(serving_plan(home / "Maildir"), str)


@needs_root
def test_a_users_own_maildir_and_roots_own_sandbox_maildir_are_still_served(tmp_path: Path):
    tmp_path.chmod(0o755)
    home = tmp_path / "home-bob"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    assert serving_plan(_maildir(home / "Maildir", NOBODY))[:3] == ([], NOBODY, NOBODY)
    plan = serving_plan(_maildir(tmp_path / "sandbox-mail", 0))
    assert not isinstance(plan, str) or "user namespace" in plan, plan  # unshare may be refused here
