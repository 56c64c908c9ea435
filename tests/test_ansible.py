"""contrib/ansible's role, run by the real ansible-playbook as root on a host seen through a private
mount namespace the test makes (a copy of /etc, an empty /home, /var under an overlay, a tmpfs /run):
it provisions, reports `changed` only when mailsetup changed a file, dry-runs in check mode, keeps
the password off every command line and log, and fails with mailsetup's own line.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import smtplib
import ssl
import subprocess
import tomllib
from pathlib import Path

import bcrypt
import pytest
from ansible_kit import ANSIBLE_PLAYBOOK, playbook_argv, playbook_env, recap
from conftest import IS_ROOT, MAILSETUP, SMTPD, own_var, tree
from mta_kit import free_port, wait_port

pytestmark = [
    pytest.mark.skipif(
        not (IS_ROOT and shutil.which("unshare") and SMTPD and Path(ANSIBLE_PLAYBOOK).exists()),
        reason="needs root, unshare, OpenSMTPD and ansible-playbook (the test extra) for a real-host run"),
    # ~115 s of the role's own behaviour (idempotence, check mode, vault, bad values) with PyPI's
    # ansible-core: the same on every release. The second release's small internet provisions its
    # three hosts through this role anyway.
    pytest.mark.once,
]

PASSWORD = "Tr0ub4dor&3-vault-only"
ANSWERS = {"domain": "example.test", "os": "debian", "admin": "ops@example.org", "listen": ["127.0.0.1"]}


class Host:
    """This machine as a fresh host: each command runs as root in a new private mount namespace over
    the same copies, so what one run writes the next one sees and the real /etc, /var never change."""

    def __init__(self, base: Path):
        self.base = base
        self.etc, self.home, self.var = base / "etc", base / "home", base / "var"
        subprocess.run(["cp", "-a", "/etc", str(self.etc)], check=True)
        self.home.mkdir()

    def command(self, *args: object) -> list[str]:
        mounts = (f"mount --bind {self.etc} /etc && mount --bind {self.home} /home && "
                  + own_var(str(self.var), f"{self.base}/var-work") + " && mount -t tmpfs tmpfs /run")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh",
                *map(str, args)]

    def playbook(self, variables: dict, *extra: str, check: bool = False,
                 log: Path | None = None) -> subprocess.CompletedProcess:
        vars_file = self.base / "vars.json"
        vars_file.write_text(json.dumps(variables))
        return subprocess.run(self.command(*playbook_argv("mx.example.test", vars_file, check), *extra),
                              capture_output=True, text=True, env=playbook_env(log), timeout=300,
                              stdin=subprocess.DEVNULL)

    def run(self, *args: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=60)


def role_vars(**answers: object) -> dict:
    return {
        "mailsetup_command": MAILSETUP,  # the wheel this suite installed: the role installs nothing
        "mailsetup_answers": {**ANSWERS, **answers},
        "mailsetup_users": [{"name": "alice", "password": PASSWORD}],
        "mailsetup_init_args": ["--no-smoke", "--no-preflight"],  # preflight would ask the world's DNS
    }


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def _said(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_first_run_provisions_and_an_unchanged_rerun_reports_nothing_changed(host: Host):
    # init's own smoke test this time: it delivers postmaster's mail to the admin's Maildir
    assert host.run("useradd", "-m", "postie9").returncode == 0  # in the host's copy of /etc
    variables = {**role_vars(admin="postie9"), "mailsetup_init_args": ["--no-preflight"]}
    first = host.playbook(variables)
    assert first.returncode == 0, _said(first)
    counts = recap(first.stdout)
    assert counts["failed"] == 0 and counts["changed"] >= 1, counts
    # where Dovecot is installed, init serves IMAP by default and its smoke test reads the mail back too
    checks = 13 if shutil.which("doveconf") else 12
    assert f"smoke test: all {checks} checks passed" in first.stdout
    conf = host.etc / "smtpd.conf"
    assert "example.test" in conf.read_text()
    check = host.run(SMTPD, "-n", "-f", "/etc/smtpd.conf")  # in the host's /etc, with its keys
    assert check.returncode == 0 and "configuration OK" in check.stdout + check.stderr, check
    answers = host.etc / "mailsetup-ansible.toml"
    assert answers.stat().st_mode & 0o777 == 0o600 and answers.stat().st_uid == 0
    assert PASSWORD not in answers.read_text()

    before = tree(host.etc)
    second = host.playbook(variables)
    assert second.returncode == 0, _said(second)
    assert recap(second.stdout)["changed"] == 0, second.stdout
    assert f"smoke test: all {checks} checks passed" in second.stdout
    assert tree(host.etc) == before


def test_check_mode_on_a_fresh_host_reports_changes_and_writes_nothing(host: Host):
    etc, var = tree(host.etc), tree(host.var)
    tmp_before = set(Path("/tmp").glob("mailsetup-answers.*"))
    run = host.playbook(role_vars(), check=True)
    assert run.returncode == 0, _said(run)
    assert recap(run.stdout)["changed"] >= 1
    assert "/etc/smtpd.conf: replaced" in run.stdout and "would add alice" in run.stdout  # what a real run does
    assert tree(host.etc) == etc and tree(host.var) == var  # no /etc/mailsetup, no answers file, no policy
    assert set(Path("/tmp").glob("mailsetup-answers.*")) == tmp_before  # the dry run's answers are gone


def test_a_changed_inventory_value_is_applied_and_reported(host: Host):
    assert recap(host.playbook(role_vars()).stdout)["failed"] == 0
    changed = host.playbook(role_vars(max_message_size=12345678))
    assert changed.returncode == 0, _said(changed)
    assert recap(changed.stdout)["changed"] >= 1
    assert "/etc/smtpd.conf: replaced" in changed.stdout
    assert "max-message-size 12345678" in (host.etc / "smtpd.conf").read_text()
    assert "max_message_size = 12345678" in (host.etc / "mailsetup/answers.toml").read_text()
    again = host.playbook(role_vars(max_message_size=12345678), check=True)  # and check mode sees no more to do
    assert recap(again.stdout)["changed"] == 0, again.stdout


@contextlib.contextmanager
def _serving(host: Host):
    """`mailsetup serve` on the host's files, on free loopback ports; stopped afterwards."""
    smtp, submission = free_port(), free_port()
    proc = subprocess.Popen(host.command(MAILSETUP, "serve", "--smtp-port", smtp, "--submission-port", submission),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(submission)
        yield submission
    finally:
        proc.terminate()
        proc.wait(10)


def _login(port: int, password: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the host's self-signed certificate
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        try:
            return client.login("alice", password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error


def _vaulted(host: Host, name: str, secret: str) -> list[str]:
    """ansible-playbook's arguments for a variable `name` holding `secret` in a vault, as docs/ansible.md
    tells people to keep passwords."""
    key = host.base / "vault-key"
    key.write_text("vault key of the test\n")
    made = subprocess.run([str(Path(ANSIBLE_PLAYBOOK).with_name("ansible-vault")), "encrypt_string",
                           "--vault-password-file", str(key), "--name", name, secret],
                          capture_output=True, text=True, env=playbook_env(), check=True)
    assert secret not in made.stdout and "!vault" in made.stdout
    (host.base / "vault.yml").write_text(made.stdout)
    return ["--vault-password-file", str(key), "-e", f"@{host.base / 'vault.yml'}"]


def test_the_password_reaches_mailsetup_on_stdin_only_and_the_user_can_log_in(host: Host):
    log = host.base / "ansible.log"
    variables = {**role_vars(), "mailsetup_users": [{"name": "alice", "password": "{{ vault_alice_password }}"}]}
    run = host.playbook(variables, "-vvv", *_vaulted(host, "vault_alice_password", PASSWORD), log=log)
    assert run.returncode == 0, _said(run)
    # -vvv shows every command ansible runs (the argv of each process) and every task's arguments
    assert "EXEC" in run.stdout
    assert PASSWORD not in _said(run)
    assert log.stat().st_size > 0 and PASSWORD not in log.read_text()
    assert "censored" in run.stdout  # the user-add task's own result
    for left in Path(playbook_env()["HOME"]).rglob("*"):  # ansible's module files carried the password
        assert not left.is_file() or PASSWORD.encode() not in left.read_bytes(), left
    table = (host.etc / "mailsetup/credentials").read_text()
    alice = next(line.split()[1] for line in table.splitlines() if line.startswith("alice "))
    assert bcrypt.checkpw(PASSWORD.encode(), alice.encode())
    with _serving(host) as port:
        assert _login(port, PASSWORD)[0] == 235
        assert _login(port, PASSWORD + "x")[0] == 535

    # a password mailsetup refuses: its reason and the user's name, not the password
    refused = {**role_vars(), "mailsetup_users": [{"name": "bob", "password": "Sh0rt!"}]}
    run = host.playbook(refused, "-vvv", log=log)
    assert recap(run.stdout)["failed"] == 1
    assert ('"msg": "mailsetup user add bob failed: mailsetup: error: password: at least 8 characters, please"'
            in run.stdout)
    assert "Sh0rt!" not in _said(run) + log.read_text()


HOSTILE = 'mail.example.test"\nadmin = "evil\x7f \u00fc \U0001f600'  # TOML injection, DEL, non-ASCII, astral


@pytest.mark.parametrize("key, value, where, why", [
    ("max_message_size", "lots", "5: --max-message-size: ", "'lots' is not a number of bytes"),
    ("hostname", HOSTILE, "4: --hostname: ", "contains a double quote, which is not allowed here"),
], ids=["not-a-number", "toml-injection"])
def test_a_bad_answers_value_fails_the_play_with_mailsetups_line(host: Host, key: str, value: str, where: str,
                                                                  why: str):
    before = tree(host.etc)
    run = host.playbook(role_vars(**{key: value}))
    assert run.returncode != 0
    assert recap(run.stdout)["failed"] == 1
    msg = next(line for line in run.stdout.splitlines() if line.startswith("fatal: "))
    assert f'"msg": "mailsetup init failed (exit 2): mailsetup: error: /etc/mailsetup-ansible.toml:{where}' in msg
    assert msg.endswith(f'{why}"}}'), msg
    written = host.etc / "mailsetup-ansible.toml"
    assert tomllib.loads(written.read_text()) == {**ANSWERS, key: value}  # the value as given, quoted, one key
    after = tree(host.etc)
    assert set(after) - set(before) == {"mailsetup-ansible.toml"}  # the input only; mailsetup wrote nothing
    assert all(after[k] == before[k] for k in before)

CHECKOUT = Path(__file__).resolve().parent.parent
WHEELS = sorted((CHECKOUT / ".build/dist").glob("mailsetup-*.whl"))


def _installed(*packages: str) -> bool:
    return subprocess.run(["dpkg", "-s", *packages], capture_output=True).returncode == 0


@pytest.mark.once  # ~46 s, most of it pip fetching mailsetup's dependencies: the same on every release
@pytest.mark.skipif(not WHEELS, reason="no wheel in .build/dist (scripts/bootstrap builds it)")
@pytest.mark.skipif(not _installed("python3-venv", "python3-packaging"),
                    reason="the role's apt task would install python3-venv / python3-packaging on this machine")
def test_the_role_installs_mailsetup_from_a_wheel_into_its_venv(host: Host, tmp_path: Path):
    venv = tmp_path / "opt-mailsetup"
    variables = {**role_vars(), "mailsetup_command": "", "mailsetup_package": str(WHEELS[-1]),
                 "mailsetup_venv": str(venv), "mailsetup_install_opensmtpd": False,
                 "mailsetup_apt_cache_valid_time": 10 ** 9}  # apt finds its packages in place: no update
    checked = host.playbook(variables, check=True)
    assert checked.returncode == 0, _said(checked)
    assert "is not installed yet" in checked.stdout and not venv.exists()
    first = host.playbook(variables)
    assert first.returncode == 0, _said(first)
    assert recap(first.stdout)["changed"] >= 2  # the venv and mailsetup's files
    assert (venv / "bin/mailsetup").exists() and (host.etc / "smtpd.conf").exists()
    again = host.playbook(variables)
    assert recap(again.stdout)["changed"] == 0, again.stdout
