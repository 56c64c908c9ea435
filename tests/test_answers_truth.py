"""Answers that look right but are not: an admin nobody delivers to, a recorded smtpd version that
no longer matches the installed one, DNS records for addresses smtpd does not listen on, next steps
that do not fit the host, and errors that quote the files they read.

Real-host runs happen as root inside a private mount namespace over a copy of /etc and an empty
/home, so nothing on this machine changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pexpect
import pytest
from conftest import IS_ROOT, MAILSETUP, SMTPD, Run, init_args, own_var, run_cli, tree

needs_root_ns = pytest.mark.skipif(
    not (IS_ROOT and shutil.which("unshare")), reason="needs root and unshare for a private mount namespace"
)


class Host:
    """This host seen through a private mount namespace: /etc is a copy, /home is empty, and with
    `systemd` a tmpfs /run holds /run/systemd/system. Each call is a fresh namespace over the same
    copies, so what one call writes the next one sees."""

    def __init__(self, base: Path, systemd: bool = False):
        self.etc, self.home = base / "etc", base / "home"
        subprocess.run(["cp", "-a", "/etc", str(self.etc)], check=True)
        self.home.mkdir()
        self.systemd = systemd

    def command(self, *args: object) -> list[str]:
        """`args` run as root on this host as the test sees it."""
        mounts = f"mount --bind {self.etc} /etc && mount --bind {self.home} /home && " + own_var(
            f"{self.etc}.var", f"{self.etc}.var-work")
        if self.systemd:
            mounts += " && mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system"
        else:  # whatever this machine runs, the host under test has no systemd
            mounts += " && mount -t tmpfs tmpfs /run"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh",
                *map(str, args)]

    def run(self, *args: object, input: str | None = None) -> Run:
        proc = subprocess.run(
            self.command(*args), capture_output=True, text=True, input=input,
            env=dict(os.environ, NO_COLOR="1"), timeout=180,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def init(self, *args: object) -> Run:
        # --no-preflight: on a real host init would ask the world's DNS and port 25 (test_preflight.py
        # runs it against servers on loopback)
        return self.run(MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--no-smoke",
                        "--no-preflight", *args)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


# --- 1. an admin smtpd delivers to -------------------------------------------------------------


@needs_root_ns
def test_admin_who_is_no_account_here_is_refused_and_nothing_is_written(host: Host):
    before = tree(host.etc)
    r = host.init("--admin", "nosuchuser")
    assert r.code == 2, r.out + r.err
    assert r.err_lines == [
        "mailsetup: error: --admin: 'nosuchuser' is not an account on this host, so smtpd would not deliver "
        "root's mail to it; name a person's account (uid from UID_MIN on, with a home) or an address such as "
        "you@example.org"
    ]
    assert tree(host.etc) == before  # no smtpd.conf, no key, no answers.toml


ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow", "subuid", "subgid", "pwd.lock")


@needs_root_ns
def test_admin_must_be_a_persons_account_but_an_address_is_fine(host: Host):
    before = tree(host.etc)
    r = host.init("--admin", "daemon", "--dry-run")
    assert r.code == 2 and "--admin: 'daemon' is a system account (uid 1; people's accounts start at" in r.err
    r = host.init("--admin", "nohome9", "--dry-run")
    assert r.code == 2 and "--admin: 'nohome9' is not an account on this host" in r.err
    assert host.run("useradd", "-M", "nohome9").code == 0  # in the copy of /etc only
    r = host.init("--admin", "nohome9", "--dry-run")
    assert r.code == 2 and "--admin: 'nohome9' has no home directory (/home/nohome9 does not exist)" in r.err
    assert host.run("useradd", "-m", "person9").code == 0
    r = host.init("--admin", "person9", "--dry-run")
    assert r.code == 0, r.err
    assert "root: person9" in r.out  # the diff of the aliases
    r = host.init("--admin", "ops@example.org", "--dry-run")
    assert r.code == 0, r.err
    after = tree(host.etc)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.lstrip(".").startswith(ACCOUNT_FILES) for k in changed), changed  # useradd's only


def test_in_a_sandbox_the_admin_is_a_name_there(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--admin", "nosuchuser", "--no-smoke"))
    assert r.code == 0, r.err
    assert "root: nosuchuser" in (sandbox / "etc/aliases").read_text()


@needs_root_ns
def test_the_wizard_asks_again_for_an_admin_nobody_delivers_to(host: Host):
    """On a real host the admin question holds to the same rule as --admin: it shows why and asks
    again; an address is taken. (Left with Ctrl-C before anything is planned.)"""
    before = tree(host.etc)
    cmd = host.command(MAILSETUP, "init", "--os", "debian", "--domain", "example.test", "--hostname",
                       "mail.example.test", "--tls", "self-signed", "--key-type", "rsa-2048", "--queue-compression",
                       "--queue-encryption")
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=30, dimensions=(50, 200),
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "TERM": "xterm", "HOME": "/root"})
    try:
        child.expect(r"Import an existing aliases file")
        child.send("n")
        child.expect(r"\(--admin\)")
        child.send("nosuchuser\r")
        child.expect(r"'nosuchuser' is not an account on this host")
        child.send("\x15" + "ops@example.org\r")  # Ctrl-U clears the line
        child.expect(r"First mail user")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130 or child.signalstatus is not None
    assert tree(host.etc) == before


# --- 2. the installed smtpd decides the grammar ------------------------------------------------

needs_smtpd_74 = pytest.mark.skipif(
    not (SMTPD and IS_ROOT), reason="needs OpenSMTPD installed and root (smtpd -n checks the key's owner)"
)


def _installed() -> str:
    out = subprocess.run([SMTPD, "-h"], capture_output=True, text=True)
    m = re.search(r"OpenSMTPD\s+(\d+\.\d+)", out.stdout + out.stderr)
    assert m, out
    return m.group(1)


def _record_version(sandbox: Path, version: str) -> None:
    answers = sandbox / "etc/mailsetup/answers.toml"
    text = re.sub(r'(?m)^smtpd_version = ".*"$', f'smtpd_version = "{version}"', answers.read_text())
    assert f'smtpd_version = "{version}"' in text
    answers.write_text(text)


@needs_smtpd_74
@pytest.mark.parametrize("recorded", ["6.8", "6.0"])
def test_a_recorded_smtpd_version_gives_way_to_the_installed_one(sandbox: Path, recorded: str):
    installed = _installed()
    assert run_cli(*init_args(sandbox, "--no-smoke")).code == 0
    _record_version(sandbox, recorded)  # as a run under the older smtpd left it
    r = run_cli(*init_args(sandbox, "--no-smoke"))
    assert r.code == 0, r.err
    assert f"smtpd_version: recorded {recorded} replaced by installed {installed}" in r.out
    assert f"smtpd {installed}" in r.out.splitlines()[0]
    assert f'smtpd_version = "{installed}"' in (sandbox / "etc/mailsetup/answers.toml").read_text()
    assert "action " in (sandbox / "etc/smtpd.conf").read_text()  # the modern grammar


@needs_smtpd_74
def test_an_explicit_smtpd_version_still_wins_and_a_refusal_says_why(sandbox: Path):
    installed = _installed()
    r = run_cli(*init_args(sandbox, "--no-smoke", "--smtpd-version", "6.0"))
    assert r.code == 1
    assert (f"(it was rendered for smtpd 6.0 but the installed smtpd is {installed}; leave out the smtpd "
            "version you gave (--smtpd-version, or in --answers) to render for the installed one)") in r.err
    assert "replaced by installed" not in r.out
    assert tree(sandbox) == {}


# --- 3. DNS records for the addresses smtpd listens on ------------------------------------------


def _provision(sandbox: Path, *listen: str) -> None:
    extra = [x for a in listen for x in ("--listen", a)]
    r = run_cli(*init_args(sandbox, "--no-smoke", *extra))
    assert r.code == 0, r.err


def test_no_aaaa_is_recommended_when_smtpd_listens_only_on_ipv4(sandbox: Path):
    _provision(sandbox)  # the default: 0.0.0.0
    r = run_cli("dns", "--root", sandbox, "--ip", "192.0.2.10", "--ip", "2001:db8::10")
    assert r.code == 0, r.err
    assert "mail.example.test.               3600 IN A     192.0.2.10" in r.out
    assert "AAAA" not in r.out.replace("; no AAAA", "")
    assert ("; no AAAA for 2001:db8::10: smtpd listens on 0.0.0.0 only (IPv4); to take mail over IPv6, "
            "re-run init with --listen 0.0.0.0 --listen ::") in r.out
    assert "ip6.arpa" not in r.out  # no PTR advice for an address that gets no mail
    import json

    payload = json.loads(run_cli("dns", "--root", sandbox, "--ip", "2001:db8::10", "--json").out)
    assert [rec["type"] for rec in payload["records"] if rec["group"] == "routing"] == ["MX"]  # no AAAA
    assert payload["left_out"] == [{"ip": "2001:db8::10", "why": payload["left_out"][0]["why"]}]


def test_aaaa_is_recommended_when_smtpd_listens_on_ipv6_too(sandbox: Path):
    _provision(sandbox, "0.0.0.0", "::")
    r = run_cli("dns", "--root", sandbox, "--ip", "192.0.2.10", "--ip", "2001:db8::10")
    assert r.code == 0, r.err
    assert "mail.example.test.               3600 IN A     192.0.2.10" in r.out
    assert "mail.example.test.               3600 IN AAAA  2001:db8::10" in r.out
    assert "; no " not in r.out


def test_records_come_from_the_listen_addresses_when_no_ip_is_given(sandbox: Path):
    _provision(sandbox, "192.0.2.10")
    r = run_cli("dns", "--root", sandbox)
    assert r.code == 0, r.err
    assert "mail.example.test.               3600 IN A     192.0.2.10" in r.out
    assert "pass --ip" not in r.out
    r = run_cli("dns", "--root", sandbox, "--ip", "198.51.100.7")
    assert "IN A     198.51.100.7" not in r.out
    assert ("; no A for 198.51.100.7: smtpd does not listen on it (it listens on 192.0.2.10); re-run init with "
            "--listen 198.51.100.7, or give --ip 192.0.2.10") in r.out


# --- 4. next steps that fit the host, warnings last ---------------------------------------------


def test_next_steps_in_a_sandbox_say_how_to_run_smtpd_there(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--no-smoke"))
    assert r.code == 0, r.err
    steps = r.out[r.out.index("Next steps:"):]
    assert f"smtpd -d -f {sandbox}/etc/smtpd.conf" in steps
    assert f"mailsetup smoke --root {sandbox} --engine opensmtpd" in steps
    assert "On the Debian / Ubuntu host itself: systemctl restart opensmtpd" in steps


@needs_root_ns
def test_next_steps_without_systemd_use_the_service_command(host: Host):
    assert host.run("useradd", "-m", "person9").code == 0
    script = host.etc / "init.d/opensmtpd"  # Debian's package ships it; make sure the copy has one
    script.parent.mkdir(exist_ok=True)
    script.touch()
    r = host.init("--admin", "person9")
    assert r.code == 0, r.err
    steps = r.out[r.out.index("Next steps:"):]
    assert ("Restart OpenSMTPD: service opensmtpd restart" in steps
            or "Restart OpenSMTPD: /etc/init.d/opensmtpd restart" in steps), steps
    assert "systemctl" not in steps
    script.unlink()
    r = host.init("--admin", "person9")
    assert r.code == 0, r.err
    assert ("Restart OpenSMTPD: no systemd and no init script for smtpd here: stop the running smtpd, then "
            "start it with `smtpd`") in r.out


@needs_root_ns
def test_next_steps_with_systemd_use_systemctl(tmp_path: Path):
    host = Host(tmp_path, systemd=True)
    assert host.run("useradd", "-m", "person9").code == 0
    r = host.init("--admin", "person9")
    assert r.code == 0, r.err
    assert "Restart OpenSMTPD: systemctl restart opensmtpd" in r.out


def test_warnings_come_last_where_a_person_reads_them(sandbox: Path, tmp_path: Path):
    aliases = tmp_path / "aliases"
    aliases.write_text("root: alice\n")  # no postmaster or abuse: a warning
    proc = subprocess.run([MAILSETUP, *map(str, init_args(sandbox, "--aliases", aliases, "--no-smoke"))],
                          capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([MAILSETUP, *map(str, init_args(sandbox, "--aliases", aliases, "--no-smoke"))],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, NO_COLOR="1"), stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines.index("Next steps:") < lines.index("Warnings:")
    assert lines[-2:] == ["Warnings:", f"  ! {aliases} has no postmaster or abuse alias (RFC 2142); added "
                          "'postmaster: root' and the rest"]
    assert sum("has no postmaster" in line for line in lines) == 1


def test_unit_restart_command_per_host(tmp_path: Path):
    from mailsetup.platforms import get_layout, restart_command

    no_systemd, initd = tmp_path / "nothing", tmp_path / "init.d"
    initd.mkdir()
    deb, arch = get_layout("debian"), get_layout("arch")
    assert restart_command(deb, systemd=tmp_path) == "systemctl restart opensmtpd"
    assert restart_command(arch, systemd=no_systemd, initd=initd).startswith("no systemd and no init script")
    (initd / "opensmtpd").touch()
    assert restart_command(deb, systemd=no_systemd, initd=initd) in (
        "service opensmtpd restart", f"{initd}/opensmtpd restart")
    for name in ("alpine", "freebsd", "openbsd"):  # not systemd's to begin with
        assert restart_command(get_layout(name), systemd=no_systemd, initd=initd) == get_layout(name).restart


# --- 5. errors name the file and line, never its content ----------------------------------------

HASH_LINE = "alice $2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW"


def _quotes(err: str, line: str) -> list[str]:
    """Any 5 characters in a row of `line` that appear in `err`."""
    return [line[i:i + 5] for i in range(len(line) - 4) if line[i:i + 5] in err]


@pytest.mark.parametrize("line", [HASH_LINE, "alice: $2b$12$R9h/cIPz0gi.URNNX3kh2OPST9",
                                  "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9", "bob: x,,y$2b$12$R9h/cIPz0g"])
def test_an_aliases_error_names_file_and_line_but_quotes_nothing(tmp_path: Path, sandbox: Path, line: str):
    path = tmp_path / "secret"
    path.write_text(f"root: alice\n{line}\n")
    r = run_cli("aliases", path, "--check")
    assert r.code == 2
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith(f"mailsetup: error: {path}:2: invalid entry")
    assert _quotes(r.err, line) == []
    r = run_cli(*init_args(sandbox, "--aliases", path))
    assert r.code == 2 and r.err_lines[0].startswith(f"mailsetup: error: {path}:2: ")
    assert _quotes(r.err + r.out, line) == []
    assert tree(sandbox) == {}


def test_a_duplicate_and_a_bad_byte_are_named_without_quoting(tmp_path: Path):
    path = tmp_path / "aliases"
    path.write_text("root: alice\nsecretname: bob\nSecretName: carol\n")
    r = run_cli("aliases", path, "--check")
    assert r.err_lines == [f"mailsetup: error: {path}:3: duplicate entry: the same name as line 2 (names are "
                           "compared case-insensitively)"]
    path.write_bytes(b"root: alice\nx: caf\xe9\n")
    r = run_cli("aliases", path, "--check")
    assert r.err_lines == [f"mailsetup: error: {path}:2: not valid UTF-8 (column 7); save the file as UTF-8"]


def test_a_credentials_error_quotes_no_user(tmp_path: Path):
    from mailsetup.credentials import parse_credentials
    from mailsetup.errors import MailsetupError

    with pytest.raises(MailsetupError) as err:
        parse_credentials("secretuser $2b$12$abc\nsecretuser $2b$12$def\n", "creds")
    assert str(err.value) == "creds:2: duplicate user (also on line 1)"


@pytest.mark.parametrize("value", ["true", "365.9"])
def test_days_in_an_answers_file_must_be_a_whole_number_not_a_boolean_or_a_fraction(tmp_path: Path, value: str):
    """`days = true` made a certificate valid for one day (int(True) is 1) and recorded `days = 1`;
    `days = 365.9` was cut to 365. Both are bad input: one line, exit 2, nothing written."""
    answers = tmp_path / "answers.toml"
    answers.write_text(f'domain = "example.test"\nadmin = "alice"\ndays = {value}\n')
    root = tmp_path / "root"
    r = run_cli("init", "--yes", "--root", root, "--os", "debian", "--answers", answers, "--no-smoke")
    assert r.code == 2, r.out + r.err
    assert r.err_lines == [f"mailsetup: error: {answers}:3: --days: {value.title() if value == 'true' else value} "
                           "is not a number of days"]
    assert not root.exists()


@pytest.mark.parametrize("version", ["7.4 evil", "7.4;", "7", "seven"])
def test_a_version_with_anything_after_it_is_refused_not_cut_short(tmp_path: Path, version: str):
    """`smtpd_version = "7.4 evil"` was read as 7.4. A version is the digits smtpd -h prints
    (7.4.0-portable, 6.8.0p2) or a short one (7.4), nothing more; a refusal names it, writes nothing."""
    answers = tmp_path / "answers.toml"
    answers.write_text(f'domain = "example.test"\nadmin = "alice"\nsmtpd_version = "{version}"\n')
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--answers", answers, "--no-smoke")
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: {answers}:3: --smtpd-version: {version!r} is not a version like 7.4 or "
                           "6.0.3"]
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("version", ["7.4.0-portable", "6.8.0p2", " 7.4 ", "7.6"])
def test_versions_as_smtpd_prints_them_are_taken(tmp_path: Path, version: str):
    aliases = tmp_path / "aliases"
    aliases.write_text("root: alice\npostmaster: root\nabuse: root\n")
    r = run_cli("aliases", "--check", "--smtpd-version", version, aliases)
    assert r.code == 0, r.err
