"""The embedded MTA's Policy, without sockets: what is delivered, relayed or refused, and why."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsetup.mta.policy import Policy

ALIASES = {
    "root": "alice",
    "postmaster": "root",
    "abuse": "root",
    "team": "alice, bob, friend@elsewhere.org",
    "pipe": "|/usr/bin/procmail",
    "file": "/var/log/mail.copy",
    "loop1": "loop2",
    "loop2": "loop1, bob",
    "deep": "team@example.test",
    "gone": "error:550 5.1.1 this address is gone",
    "bad": '"|/bin/echo unbalanced',
}
USERS = {"alice", "bob"}


def policy(local_peers=frozenset()) -> Policy:
    return Policy(frozenset({"example.test", "mail.example.test", "localhost"}), ALIASES,
                  lambda u: u in USERS, local_peers)


STRANGER = "198.51.100.7"


@pytest.mark.parametrize(
    "rcpt,users,relay",
    [
        ("alice@example.test", ("alice",), ()),
        ("Alice@EXAMPLE.test", ("alice",), ()),
        ("postmaster@example.test", ("alice",), ()),
        ("postmaster", ("alice",), ()),  # RFC 5321: <postmaster> without a domain
        ("abuse@mail.example.test", ("alice",), ()),
        ("team@example.test", ("alice", "bob"), ("friend@elsewhere.org",)),
        ("loop1@example.test", ("bob",), ()),
        ("deep@example.test", ("alice", "bob"), ("friend@elsewhere.org",)),
    ],
)
def test_local_mail_is_expanded_through_the_aliases(rcpt, users, relay):
    d = policy().check_rcpt(rcpt, authenticated=False, peer_ip=STRANGER)
    assert d.code == 250, d
    assert d.local_users == users
    assert d.relay_to == relay


@pytest.mark.parametrize(
    "rcpt,code,words",
    [
        ("nobody@example.test", 550, "invalid recipient"),
        ("pipe@example.test", 550, "never runs"),
        ("file@example.test", 550, "never runs"),
        ("gone@example.test", 550, "this address is gone"),
        ("bad@example.test", 451, "expansion problem"),
    ],
)
def test_local_mail_that_cannot_be_delivered_is_refused_with_a_reason(rcpt, code, words):
    d = policy().check_rcpt(rcpt, peer_ip=STRANGER)
    assert d.code == code and words in d.message


def test_root_without_alias_is_refused_like_smtpd():
    p = Policy(frozenset({"example.test"}), {}, lambda u: True, frozenset())
    d = p.check_rcpt("root@example.test", peer_ip=STRANGER)
    assert d.code == 550 and "does not deliver to root" in d.message


TRICKS = [
    "victim@example.net",
    "victim%example.net@example.test",
    '"victim@example.net"@example.test',
    '"victim%example.net"@example.test',
    "@example.test:victim@example.net",
    "@example.test,@x:victim@example.net",
    "victim@example.net@example.test",
    "example.net!victim@example.test",
    "victim@[192.0.2.1]",
    "victim@[IPv6:2001:db8::1]",
    "victim@example.net.",
    "victim@example.test.",
    "VICTIM@EXAMPLE.NET",
    "victim@example.test.example.net",
    "victim@",
    "@example.net",
    "victim@example.net>",
    "<>",
    "",
]


@pytest.mark.parametrize("rcpt", TRICKS)
def test_every_relay_trick_is_refused_for_a_stranger(rcpt):
    d = policy().check_rcpt(rcpt, authenticated=False, peer_ip=STRANGER)
    assert d.code >= 500, d
    assert not d.relay_to


def test_authenticated_or_local_senders_may_relay():
    p = policy(local_peers=frozenset({"127.0.0.1"}))
    assert p.check_rcpt("friend@example.net", authenticated=True, peer_ip=STRANGER).relay_to == ("friend@example.net",)
    assert p.check_rcpt("friend@example.net", authenticated=False, peer_ip="127.0.0.1").relay_to == (
        "friend@example.net",
    )
    assert p.check_rcpt("friend@example.net", authenticated=False, peer_ip=STRANGER).code == 550


def test_tricks_are_refused_even_when_authenticated():
    p = policy()
    for rcpt in ("victim%example.net@example.test", "example.net!victim@example.test", '"a@b"@example.test'):
        assert p.check_rcpt(rcpt, authenticated=True, peer_ip=STRANGER).code >= 500


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_no_address_a_stranger_sends_is_ever_relayed(rcpt: str):
    d = policy().check_rcpt(rcpt, authenticated=False, peer_ip=STRANGER)
    if d.accepted:
        assert d.local_users, d
        # Only admin-configured forwarding (the 'team' alias) ever leaves the host.
        assert set(d.relay_to) <= {"friend@elsewhere.org"}


def test_a_path_is_never_a_local_user_in_a_sandbox(tmp_path):
    from mailsetup.model import build_setup
    from mailsetup.mta.policy import local_user_check

    setup = build_setup({"domain": "example.test", "os": "debian", "root": str(tmp_path)})
    (tmp_path / "home/alice").mkdir(parents=True)
    is_user = local_user_check(setup, {"root": "alice"}, {})
    assert is_user("alice")
    for name in ("/tmp", "/etc", "../..", "..", "/", "root", "ALICE/x"):
        assert not is_user(name), name
    p = Policy(frozenset({"example.test"}), {"root": "alice"}, is_user, frozenset())
    assert p.check_rcpt("/tmp@example.test", peer_ip=STRANGER).code == 550


def test_on_a_real_host_only_peoples_accounts_get_mail(tmp_path):
    import pwd
    import subprocess

    from conftest import IS_ROOT

    from mailsetup.model import build_setup
    from mailsetup.mta.policy import local_user_check, uid_min

    setup = build_setup({"domain": "example.test", "os": "debian"})  # no --root: the real host
    is_user = local_user_check(setup, {}, {})
    for system in ("root", "nobody", "daemon", "sys", "bin", "www-data", "/tmp"):
        assert not is_user(system), system
    if IS_ROOT:
        try:
            pwd.getpwnam("mspolicy")
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/usr/sbin/nologin", "mspolicy"], check=True)
        assert pwd.getpwnam("mspolicy").pw_uid >= uid_min()
        assert is_user("mspolicy")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
def test_a_real_users_maildir_and_mail_belong_to_them(tmp_path):
    from mailsetup.mta import maildir

    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 4242, 4243)  # a real user's home is theirs (another's is refused)
    path = maildir.deliver(home / "Maildir", b"Subject: x\n\nhi\n", owner=(4242, 4243))
    for p in (home / "Maildir", home / "Maildir/new", home / "Maildir/tmp", home / "Maildir/cur", path):
        assert (p.stat().st_uid, p.stat().st_gid) == (4242, 4243), p
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("rcpt,users", [("team+x@example.test", ("alice", "bob")),
                                        ("alice+tag@example.test", ("alice",)),
                                        ("postmaster+x@example.test", ("alice",))])
def test_a_plus_detail_is_looked_up_as_smtpd_does(rcpt, users):
    """smtpd's aliases_get tries the name, then the name cut at the first '+'; a user gets alice+tag."""
    d = policy().check_rcpt(rcpt, peer_ip=STRANGER)
    assert d.code == 250 and d.local_users == users, d


def test_a_plus_detail_of_no_one_is_refused():
    assert policy().check_rcpt("+x@example.test", peer_ip=STRANGER).code == 550
    assert policy().check_rcpt("nobody+x@example.test", peer_ip=STRANGER).code == 550
