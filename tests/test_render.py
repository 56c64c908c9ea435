"""smtpd.conf from the templates: the real `smtpd -n` over a matrix of options, both grammars, and the
open-relay check that `smtpd -n` does not make.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest
from conftest import SMTPD, init_args, needs_smtpd, run_cli, smtpd_check

from mailsetup.model import build_setup
from mailsetup.opensmtpd import open_relay_rules
from mailsetup.render import render_smtpd_conf

KEY = "0123456789abcdef0123456789abcdef"

MATRIX = list(
    itertools.product(
        ["debian", "rhel", "alpine", "arch", "freebsd"],
        [[], ["--no-queue-encryption"], ["--no-queue-compression"]],
        [[], ["--listen", "127.0.0.1"], ["--listen", "::", "--listen", "0.0.0.0"], ["--listen", "lo"]],
    )
)


@needs_smtpd
@pytest.mark.parametrize("os_name,queue,listen", MATRIX, ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_real_smtpd_accepts_every_rendered_config(os_name: str, queue: list, listen: list, sandbox: Path):
    args = init_args(sandbox, *queue, *listen, "--key-type", "ecdsa-p256", "--no-smoke")
    args[args.index("--os") + 1] = os_name
    r = run_cli(*args)
    assert r.code == 0, r.err
    conf = next(sandbox.rglob("smtpd.conf"))
    check = smtpd_check(conf)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    assert bool(re.search("^queue encryption ", text, re.M)) == ("--no-queue-encryption" not in queue)
    assert bool(re.search("^queue compression$", text, re.M)) == ("--no-queue-compression" not in queue)
    assert open_relay_rules(text) == []


@needs_smtpd
@pytest.mark.parametrize("key_type", ["rsa-2048", "rsa-4096", "ecdsa-p256"])
def test_real_smtpd_loads_each_key_type(key_type: str, sandbox: Path):
    r = run_cli(*init_args(sandbox, "--key-type", key_type, "--no-smoke"))
    assert r.code == 0, r.err
    assert smtpd_check(sandbox / "etc/smtpd.conf").returncode == 0


RELAYING = [["--relay-tls", "verify"], ["--backup-for", "a.test"],
            ["--relay-tls", "verify", "--backup-for", "a.test", "--backup-for", "x.test"]]


@needs_smtpd
@pytest.mark.parametrize("relaying", RELAYING, ids="-".join)
def test_real_smtpd_accepts_verified_relaying_and_a_backup_mx(relaying: list, sandbox: Path):
    r = run_cli(*init_args(sandbox, *relaying, "--no-smoke"))
    assert r.code == 0, r.err
    conf = sandbox / "etc/smtpd.conf"
    check = smtpd_check(conf)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    verify = "verify" in relaying
    assert ('action "outbound" relay tls helo mail.example.test\n' in text) == verify
    assert ('action "outbound" relay helo mail.example.test\n' in text) == (not verify)
    if "--backup-for" in relaying:
        assert f'action "backup" relay backup mx mail.example.test{" tls" if verify else ""} helo mail.example.test\n' \
            in text
        assert 'match from any for domain <backup_domains> action "backup"\n' in text
    assert open_relay_rules(text) == []


def test_the_smoke_tests_sink_is_not_asked_for_a_verified_certificate():
    """The loopback smtpd of `smoke --engine opensmtpd` relays to a plain-SMTP sink: `tls` there
    would fail the smoke test of every set-up with --relay-tls verify."""
    setup = build_setup({"domain": "ehouse.io", "os": "debian", "relay_tls": "verify", "backup_for": ["a.test"]})
    text = render_smtpd_conf(setup, KEY, relay_host="smtp://127.0.0.1:2526")
    assert 'action "outbound" relay host smtp://127.0.0.1:2526 helo mail.ehouse.io\n' in text


def test_legacy_grammar_says_tls_verify_and_relay_backup():
    """Before 6.4 (smtpd.conf(5) of 6.0.3): `relay tls verify`, `relay backup NAME`, inline tables."""
    setup = build_setup({"domain": "ehouse.io", "os": "freebsd", "smtpd_version": "6.0.3", "relay_tls": "verify",
                         "backup_for": ["a.test", "x.test"]})
    text = render_smtpd_conf(setup, KEY)
    assert 'table backup_domains { "a.test", "x.test" }\n' in text
    assert "accept from any for domain <backup_domains> relay backup mail.ehouse.io tls verify\n" in text
    assert text.endswith("accept from local for any relay tls verify\n")
    assert open_relay_rules(text) == []
    plain = render_smtpd_conf(build_setup({"domain": "ehouse.io", "os": "freebsd", "smtpd_version": "6.0.3"}), KEY)
    assert plain.endswith("accept from local for any relay\n") and "backup" not in plain


def test_modern_config_holds_what_the_tutorial_asked_for():
    setup = build_setup({"domain": "ehouse.io", "hostname": "mail.ehouse.io", "os": "debian"})
    text = render_smtpd_conf(setup, KEY)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [
        'pki mail.ehouse.io cert "/etc/ssl/certs/mail.ehouse.io.crt"',
        'pki mail.ehouse.io key "/etc/ssl/private/mail.ehouse.io.key"',
        "queue compression",
        f"queue encryption {KEY}",
        "smtp max-message-size 36700160",
        'table aliases "db:/etc/aliases.db"',
        'table creds "file:/etc/mailsetup/credentials"',
        "listen on 0.0.0.0 port 25 tls pki mail.ehouse.io auth-optional <creds> hostname mail.ehouse.io",
        "listen on 0.0.0.0 port 587 tls-require pki mail.ehouse.io auth <creds> hostname mail.ehouse.io",
        'action "local_mail" maildir alias <aliases>',
        'action "outbound" relay helo mail.ehouse.io',
        'match from any for domain "ehouse.io" action "local_mail"',
        'match for local action "local_mail"',
        'match auth from any for any action "outbound"',
        'match from local for any action "outbound"',
    ]


def test_openbsd_listens_on_egress_and_lo0():
    setup = build_setup({"domain": "ehouse.io", "os": "openbsd"})
    text = render_smtpd_conf(setup, KEY)
    assert "listen on lo0 hostname mail.ehouse.io\n" in text
    assert "listen on egress port 25 tls pki mail.ehouse.io auth-optional <creds>" in text
    assert 'table aliases "db:/etc/mail/aliases.db"' in text


def test_specific_address_keeps_a_localhost_listener():
    text = render_smtpd_conf(build_setup({"domain": "ehouse.io", "os": "debian", "listen": ["192.0.2.1"]}), KEY)
    assert "listen on localhost hostname mail.ehouse.io\n" in text


def test_legacy_grammar_for_smtpd_before_6_4():
    setup = build_setup({"domain": "ehouse.io", "os": "freebsd", "smtpd_version": "6.0.3"})
    text = render_smtpd_conf(setup, KEY)
    assert 'pki mail.ehouse.io certificate "/usr/local/etc/ssl/certs/mail.ehouse.io.crt"' in text
    assert f"queue encryption key {KEY}" in text
    assert 'accept from any for domain "ehouse.io" alias <aliases> deliver to maildir\n' in text
    assert "accept for local alias <aliases> deliver to maildir\n" in text
    assert "accept from local for any relay\n" in text
    assert "auth <creds> hostname mail.ehouse.io\n" in text
    assert "match " not in text and "action " not in text
    assert open_relay_rules(text) == []


def test_file_table_when_no_db_writer():
    text = render_smtpd_conf(build_setup({"domain": "ehouse.io", "os": "debian"}), KEY, aliases_format="file")
    assert 'table aliases "file:/etc/aliases"' in text


def test_render_command_prints_the_config_and_needs_a_queue_key(tmp_path: Path):
    r = run_cli("render", "--domain", "example.test", "--os", "debian", "--root", tmp_path)
    assert r.code == 2
    assert r.err_lines[0].startswith("mailsetup: error: --queue-key-file: no queue key at ")
    keyfile = tmp_path / "qk"
    assert run_cli("keygen", "--out", keyfile).code == 0
    r = run_cli("render", "--domain", "example.test", "--os", "debian", "--queue-key-file", keyfile)
    assert r.code == 0, r.err
    assert f"queue encryption {keyfile.read_text().strip()}" in r.out
    out = tmp_path / "smtpd.conf"
    r = run_cli("render", "--domain", "example.test", "--os", "debian", "--queue-key-file", keyfile, "--out", out)
    assert r.code == 0 and (out.stat().st_mode & 0o777) == 0o600
    r = run_cli("render", "--domain", "example.test", "--os", "debian", "--queue-key-file", keyfile, "--out", out)
    assert r.code == 2 and "pass --force" in r.err


# --- the open-relay check -----------------------------------------------------------------------

OPEN = [
    'action "relay" relay\nmatch from any for any action "relay"',
    'action "r" relay host smtp://192.0.2.1\nmatch from src 0.0.0.0/0 for any action "r"',
    'action "r" relay\nmatch from any for ! local action "r"',
    'action "r" relay\nmatch !auth from any for any action "r"',
    "accept from any for any relay",
]
CLOSED = [
    'action "relay" relay\nmatch from local for any action "relay"',
    'action "relay" relay\nmatch auth from any for any action "relay"',
    'action "relay" relay\nmatch from any auth for any action "relay"',
    'action "relay" relay\nmatch for any action "relay"',
    'action "relay" relay\nmatch from any for domain "example.org" action "relay"',
    'action "local" maildir\nmatch from any for any action "local"',
    'action "relay" relay\n# match from any for any action "relay"',
    "accept for any relay",
]


@pytest.mark.parametrize("conf", OPEN)
def test_open_relay_rules_are_found(conf: str):
    findings = open_relay_rules(conf)
    assert len(findings) == 1
    assert "open relay" in findings[0].why
    assert findings[0].line == len(conf.splitlines())


@pytest.mark.parametrize("conf", CLOSED)
def test_safe_rules_are_not_flagged(conf: str):
    assert open_relay_rules(conf) == []


@pytest.mark.skipif(SMTPD is None, reason="needs OpenSMTPD")
def test_real_smtpd_n_accepts_an_open_relay_so_our_check_must(tmp_path: Path):
    conf = tmp_path / "open.conf"
    conf.write_text('listen on 127.0.0.1 port 12525\naction "relay" relay\nmatch from any for any action "relay"\n')
    proc = subprocess.run([SMTPD, "-n", "-f", conf], capture_output=True, text=True)
    assert proc.returncode == 0  # smtpd calls it fine...
    assert open_relay_rules(conf.read_text())  # ...we do not


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "lo"])
def test_a_loopback_listener_on_25_replaces_listen_on_localhost(address: str):
    # smtpd -n accepts both together, but the daemon cannot bind 127.0.0.1:25 twice.
    text = render_smtpd_conf(build_setup({"domain": "ehouse.io", "os": "debian", "listen": [address]}), KEY)
    assert "listen on localhost" not in text
    assert f"listen on {address} port 25 tls" in text
