"""The guided `mailsetup init`, driven in a real pseudo-terminal as a person types."""

from __future__ import annotations

import re
from pathlib import Path

import pexpect
import pytest
from conftest import MAILSETUP, run_cli, tree

DOWN = "\x1b[B"
PASSWORD = "Secr3t-pass"
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def spawn(*args: object, **env) -> pexpect.spawn:
    child = pexpect.spawn(MAILSETUP, [str(a) for a in args], encoding="utf-8", timeout=30,
                          dimensions=(50, 200), env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "TERM": "xterm",
                                                     "HOME": "/root", "PROMPT_TOOLKIT_NO_CPR": "1", **env})
    child.logfile_read = _Log()
    return child


class _Log:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> None:
        self.parts.append(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return ANSI.sub("", "".join(self.parts))


def answer(child: pexpect.spawn, prompt: str, keys: str) -> None:
    child.expect(prompt)
    child.send(keys)


def finish(child: pexpect.spawn) -> tuple[int, str]:
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    return child.exitstatus if child.exitstatus is not None else 128 + child.signalstatus, child.logfile_read.text()


def first_run(root: Path, domain: str = "example.test", key_type: str = DOWN + DOWN) -> tuple[int, str]:
    """A first run as a person types it (docs/walkthrough.md records one too, with its own domain
    and the default key type)."""
    child = spawn("init", "--root", root, "--os", "debian")
    answer(child, r"Mail domain \(--domain\)", f"{domain}\r")
    answer(child, r"Mail host name, its FQDN \(--hostname\)", "\r")  # accept mail.DOMAIN
    answer(child, r"TLS certificate \(--tls\)", "\r")  # new self-signed
    answer(child, r"Key type \(--key-type\)", key_type + "\r")  # ecdsa-p256 (two down), or Enter: rsa-2048
    answer(child, r"Compress the queue", "y")
    answer(child, r"Encrypt the queue", "y")
    answer(child, r"Import an existing aliases file", "n")
    answer(child, r"\(--admin\)", "alice\r")
    answer(child, r"First mail user .*\(--user\)", "\r")  # default: alice
    answer(child, r"Password for alice", PASSWORD + "\r")
    answer(child, r"Again", PASSWORD + "\r")
    answer(child, r"Sign outgoing mail with DKIM, RSA and Ed25519 \(--dkim\)", "y")
    answer(child, r"IMAP server for reading mail: dovecot or none \(--imap\)", "\r")  # a sandbox: none
    answer(child, r"Run the smoke test", "y")
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    return finish(child)


def test_first_run_asks_only_what_it_must_then_writes_and_smoke_tests(tmp_path: Path):
    root = tmp_path / "root"
    code, text = first_run(root)
    assert code == 0, text
    assert "OS layout" not in text  # --os was given, so it is not asked
    assert "+listen on 0.0.0.0 port 587 tls-require" in text  # the diff was shown before writing
    assert "12/12 passed" in text
    assert "PRIVATE KEY" not in text and PASSWORD not in text
    assert "ecdsa-p256" in (root / "etc/mailsetup/answers.toml").read_text()
    assert (root / "etc/mailsetup/credentials").read_text().count("alice $2b$") == 1
    assert "root: alice" in (root / "etc/aliases").read_text()
    assert PASSWORD not in (root / "etc/mailsetup/answers.toml").read_text()


def test_rerun_shows_the_state_and_keep_changes_nothing(tmp_path: Path):
    root = tmp_path / "root"
    assert first_run(root)[0] == 0
    before = tree(root)
    child = spawn("init", "--root", root)
    child.expect("Found the set-up for example.test")
    answer(child, r"What now\?", "\r")  # keep
    code, text = finish(child)
    assert code == 0, text
    assert "certificate: CN=mail.example.test, ecdsa-p256, expires" in text
    assert "queue key: 0 days old" in text
    assert "mail users: 1; aliases: 3" in text
    assert "Everything is already in place" in text
    assert tree(root) == before


def test_rerun_rotates_the_certificate_keeping_a_dated_backup(tmp_path: Path):
    root = tmp_path / "root"
    assert first_run(root)[0] == 0
    cert = root / "etc/ssl/certs/mail.example.test.crt"
    key = root / "etc/ssl/private/mail.example.test.key"
    old_cert, old_key = cert.read_bytes(), key.read_bytes()
    child = spawn("init", "--root", root)
    answer(child, r"What now\?", DOWN + "\r")  # rotate the certificate
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    code, text = finish(child)
    assert code == 0, text
    assert cert.read_bytes() != old_cert and key.read_bytes() != old_key
    [cert_bak] = cert.parent.glob("mail.example.test.crt.*.bak")
    [key_bak] = key.parent.glob("mail.example.test.key.*.bak")
    assert cert_bak.read_bytes() == old_cert and key_bak.read_bytes() == old_key
    assert (key_bak.stat().st_mode & 0o777) == 0o600
    assert "12/12 passed" in text


def test_rerun_rotates_the_queue_key_when_the_queue_is_empty(tmp_path: Path):
    root = tmp_path / "root"
    assert first_run(root)[0] == 0
    qk = root / "etc/mailsetup/queue.key"
    old = qk.read_text()
    child = spawn("init", "--root", root)
    answer(child, r"What now\?", DOWN + DOWN + "\r")  # rotate the queue key
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    code, text = finish(child)
    assert code == 0, text
    assert "queue is empty: safe to rotate" in text
    assert qk.read_text() != old
    assert old.strip() not in text  # the old key is never printed
    assert qk.read_text().strip() not in text
    [bak] = qk.parent.glob("queue.key.*.bak")
    assert bak.read_text() == old and (bak.stat().st_mode & 0o777) == 0o600
    assert f"queue encryption {qk.read_text().strip()}" in (root / "etc/smtpd.conf").read_text()


def test_ctrl_c_midway_exits_130_and_writes_nothing(tmp_path: Path):
    root = tmp_path / "root"
    child = spawn("init", "--root", root, "--os", "debian")
    answer(child, r"Mail domain \(--domain\)", "example.test\r")
    answer(child, r"--hostname", "\x03")
    code, text = finish(child)
    assert code == 130
    assert "mailsetup: interrupted; nothing was left half-written." in text
    assert "Traceback" not in text
    assert not root.exists()


def test_ctrl_c_at_the_final_confirmation_writes_nothing(tmp_path: Path):
    root = tmp_path / "root"
    child = spawn("init", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "alice",
                  "--hostname", "mail.example.test",
                  "--tls", "self-signed", "--key-type", "rsa-2048", "--queue-compression", "--queue-encryption",
                  "--user", "alice", "--dkim", "--no-smoke")
    answer(child, r"\(--imap\)", "\r")  # a sandbox: none
    answer(child, r"Password for alice", PASSWORD + "\r")
    answer(child, r"Again", PASSWORD + "\r")
    answer(child, r"Write these \d+ file\(s\)\?", "\x03")
    code, _ = finish(child)
    assert code == 130
    assert not root.exists()


def test_mismatched_passwords_are_asked_again(tmp_path: Path):
    root = tmp_path / "root"
    child = spawn("init", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "bob",
                  "--hostname", "mail.example.test",
                  "--tls", "self-signed", "--key-type", "rsa-2048", "--queue-compression", "--queue-encryption",
                  "--user", "bob", "--dkim", "--no-smoke")
    answer(child, r"\(--imap\)", "\r")  # a sandbox: none
    answer(child, r"Password for bob", PASSWORD + "\r")
    answer(child, r"Again", "something else\r")
    answer(child, r"Password for bob", PASSWORD + "\r")
    answer(child, r"Again", PASSWORD + "\r")
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    code, text = finish(child)
    assert code == 0, text
    assert "The two passwords differ" in text
    assert "bob $2b$" in (root / "etc/mailsetup/credentials").read_text()


def test_flags_given_are_not_asked_and_bad_typed_answers_are_explained(tmp_path: Path):
    root = tmp_path / "root"
    child = spawn("init", "--root", root, "--os", "debian", "--hostname", "mx.example.test", "--no-smoke")
    answer(child, r"Mail domain \(--domain\)", "bad domain\r")
    child.expect("contains a space")  # questionary shows the validator's sentence and asks again
    child.send("\x15example.test\r")  # Ctrl-U clears the line
    answer(child, r"TLS certificate", "\x03")
    code, text = finish(child)
    assert code == 130
    assert "--hostname" not in text.split("TLS certificate")[0].split("Mail domain")[1]


@pytest.mark.parametrize("missing,message", [((), "missing --domain")])
def test_without_a_terminal_missing_answers_name_their_flags(tmp_path: Path, missing, message):
    r = run_cli("init", "--root", tmp_path / "root", "--os", "debian")
    assert r.code == 2
    assert len(r.err_lines) == 1 and message in r.err_lines[0]
    assert not (tmp_path / "root").exists()


def test_answers_file_drives_an_unattended_run(tmp_path: Path):
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "example.test"\nadmin = "carol"\nkey_type = "ecdsa-p256"\nsmtp_port = 2525\n')
    root = tmp_path / "root"
    r = run_cli("init", "--yes", "--root", root, "--os", "debian", "--answers", answers, "--no-smoke")
    assert r.code == 0, r.err
    conf = (root / "etc/smtpd.conf").read_text()
    assert "port 2525 tls pki mail.example.test" in conf
    recorded = (root / "etc/mailsetup/answers.toml").read_text()
    assert 'admin = "carol"' in recorded and 'key_type = "ecdsa-p256"' in recorded
    # A flag beats the answers file.
    r = run_cli("init", "--yes", "--root", root, "--os", "debian", "--answers", answers, "--smtp-port", "2626",
                "--no-smoke")
    assert r.code == 0 and "port 2626 tls" in (root / "etc/smtpd.conf").read_text()


@pytest.mark.parametrize(
    "text,message",
    [
        ('domain = "example.test"\nsmtp_port = \n', ":2: "),
        ('domain = "example.test"\npassword = "hunter2"\n', "unknown key 'password'"),
        ('domian = "example.test"\n', "unknown key 'domian'"),
        ('domain = "exa mple.test"\n', "--domain: 'exa mple.test' contains a space"),
    ],
)
def test_bad_answers_files_are_one_line_naming_the_file(tmp_path: Path, text: str, message: str):
    answers = tmp_path / "answers.toml"
    answers.write_text(text)
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--answers", answers,
                "--admin", "alice")
    assert r.code == 2
    assert len(r.err_lines) == 1, r.err
    assert message in r.err_lines[0]
    assert not (tmp_path / "root").exists()


def test_unattended_rotation_refuses_while_mail_is_queued(tmp_path: Path):
    root = tmp_path / "root"
    assert run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin",
                   "alice", "--no-smoke").code == 0
    queue = root / "etc/mailsetup/queue"
    queue.mkdir(mode=0o700)
    (queue / "18f0000000000000abcd").write_bytes(b"MSQ1\x03encrypted")
    old = (root / "etc/mailsetup/queue.key").read_text()
    r = run_cli("init", "--yes", "--root", root, "--rotate-queue-key", "--no-smoke")
    assert r.code == 1
    assert "not rotating the queue key: 1 message(s) in mailsetup's queue" in r.err
    assert (root / "etc/mailsetup/queue.key").read_text() == old
    r = run_cli("init", "--yes", "--root", root, "--rotate-queue-key", "--force-rotate", "--no-smoke")
    assert r.code == 0, r.err
    assert "rotating anyway (--force-rotate)" in r.err
    assert (root / "etc/mailsetup/queue.key").read_text() != old


def test_json_report(tmp_path: Path):
    import json

    r = run_cli("init", "--yes", "--json", "--root", tmp_path / "root", "--os", "debian", "--domain",
                "example.test", "--admin", "alice")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert {f["state"] for f in report["files"]} == {"new"}
    assert report["smtpd_check"]["ok"] is True
    assert all(c["ok"] for c in report["smoke"])
    assert any("IN MX" in s for s in report["next_steps"])


def test_quiet_prints_nothing_on_success(tmp_path: Path):
    r = run_cli("init", "--yes", "--quiet", "--root", tmp_path / "root", "--os", "debian", "--domain",
                "example.test", "--admin", "alice")
    assert r.code == 0, r.err
    assert r.out == ""


def test_unattended_first_user_reads_the_password_from_stdin(tmp_path: Path):
    root = tmp_path / "root"
    r = run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "dave",
                "--user", "dave", "--password-stdin", "--no-smoke", input=PASSWORD + "\n")
    assert r.code == 0, r.err
    assert "dave $2b$" in (root / "etc/mailsetup/credentials").read_text()
    r = run_cli("init", "--yes", "--root", tmp_path / "r2", "--os", "debian", "--domain", "example.test",
                "--admin", "dave", "--user", "dave", "--no-smoke")
    assert r.code == 2 and "--password-stdin" in r.err
    assert not (tmp_path / "r2").exists()


def test_csr_for_a_ca_comes_with_a_stand_in_certificate(tmp_path: Path):
    root = tmp_path / "root"
    r = run_cli("init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "alice",
                "--tls", "csr")
    assert r.code == 0, r.out + r.err
    csr = root / "etc/ssl/certs/mail.example.test.csr"
    assert csr.read_text().startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert "until the CA signs the CSR" in r.out


def test_a_rerun_stops_when_the_last_runs_answers_do_not_load(tmp_path: Path):
    root = tmp_path / "root"
    base = ["init", "--yes", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "alice",
            "--no-smoke"]
    assert run_cli(*base, "--smtp-port", "2525").code == 0
    answers = root / "etc/mailsetup/answers.toml"
    answers.write_text(answers.read_text() + 'note = "x"\n')
    before = tree(root)
    r = run_cli(*base)
    assert r.code == 2
    assert r.err_lines == [f"mailsetup: error: {answers}: unknown key 'note' (known: " + r.err_lines[0].split(
        "(known: ")[1]]
    assert tree(root) == before  # nothing reconfigured behind the user's back


def test_the_installed_smtpd_version_is_only_a_default(tmp_path: Path):
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "example.test"\nadmin = "alice"\nsmtpd_version = "6.3"\n')
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--answers", answers, "--dry-run")
    assert r.code == 0, r.err
    assert "+pki mail.example.test certificate " in r.out  # the answers file's 6.3 grammar, not 7.4's
    assert "+accept from any for domain" in r.out


def test_relative_cert_paths_are_recorded_absolute(tmp_path: Path):
    own = tmp_path / "own"
    own.mkdir()
    assert run_cli("cert", "--hostname", "mail.example.test", "--out-cert", own / "c.crt", "--out-key",
                   own / "c.key").code == 0
    root = tmp_path / "root"
    import subprocess as sp

    from conftest import MAILSETUP

    proc = sp.run([MAILSETUP, "init", "--yes", "--root", str(root), "--os", "debian", "--domain", "example.test",
                   "--admin", "alice", "--cert", "own/c.crt", "--key", "own/c.key", "--no-smoke", "--dry-run"],
                  cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f'cert = "{own / "c.crt"}"' in proc.stdout


def test_a_first_run_over_a_hand_written_config_offers_to_import_it_and_asks_only_what_it_lacks(tmp_path: Path):
    import shutil

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    tutorial = Path(__file__).parent / "data/tutorial-smtpd.conf"
    shutil.copy(tutorial, root / "etc/smtpd.conf")
    child = spawn("init", "--root", root, "--os", "debian")
    answer(child, r"was not written by mailsetup\. Import it", "y")
    child.expect(r"OpenSMTPD 6\.3 and older grammar")
    # the domain, host name, TLS choice and queue settings came from the file: not asked
    answer(child, r"Key type \(--key-type\)", "\r")
    answer(child, r"Import an existing aliases file", "n")
    answer(child, r"\(--admin\)", "alice\r")
    answer(child, r"First mail user .*\(--user\)", "\r")
    answer(child, r"Password for alice", PASSWORD + "\r")
    answer(child, r"Again", PASSWORD + "\r")
    answer(child, r"Run the smoke test", "y")
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    code, text = finish(child)
    assert code == 0, text
    for not_asked in ("(--domain)", "(--hostname)", "(--tls)", "Compress the queue", "Encrypt the queue", "(--dkim)",
                      "(--imap)"):  # DKIM and IMAP stay off, as the old file had them
        assert not_asked not in text
    assert "-accept from any for domain \"ehouse.io\" alias <aliases> deliver to maildir" in text  # the diff
    assert "11/11 passed" in text
    assert next((root / "etc").glob("smtpd.conf.*.bak")).read_bytes() == tutorial.read_bytes()
