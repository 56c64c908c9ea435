"""`init` as its steps: one table of questions, answers kept in layers, one validator per value,
one model that carries every choice and is what the answers file records."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import init_args, run_cli


def test_the_answers_layers_know_where_each_value_came_from():
    from mailsetup.questions import Answers

    answers = Answers(flags={"domain": "flag.test"}, file={"domain": "file.test", "admin": "carol"},
                      last_run={"admin": "alice", "smtp_port": 2525, "smtpd_version": "6.8"},
                      detected={"smtpd_version": "7.4", "smtp_port": 25})
    assert answers["domain"] == "flag.test" and answers.source("domain") == "flags"
    assert answers["admin"] == "carol" and answers.source("admin") == "file"
    assert answers["smtp_port"] == 2525 and answers.source("smtp_port") == "last run"
    assert answers.source("hostname") is None and "hostname" not in answers
    answers.answer("admin", "dave")  # typed in the wizard: over the file, under a flag
    answers.answer("domain", "typed.test")
    assert (answers["admin"], answers["domain"]) == ("dave", "flag.test")
    # The installed smtpd replaces the version the last run recorded, and says so.
    assert answers.installed_version_wins() == "smtpd_version: recorded 6.8 replaced by installed 7.4"
    assert answers["smtpd_version"] == "7.4" and answers.source("smtpd_version") == "detected"


def test_a_version_chosen_for_this_run_beats_the_installed_one():
    from mailsetup.questions import Answers

    answers = Answers(file={"smtpd_version": "6.3"}, last_run={"smtpd_version": "6.8"},
                      detected={"smtpd_version": "7.4"})
    assert answers.installed_version_wins() is None
    assert answers["smtpd_version"] == "6.3"


def test_every_question_names_a_flag_init_takes():
    from mailsetup.questions import QUESTIONS

    helptext = run_cli("init", "--help", env={"COLUMNS": "200"}).out
    for q in QUESTIONS:
        assert f"({q.flag})" in q.prompt, q
        assert q.flag in helptext, q.flag


def test_without_a_terminal_the_missing_answer_names_its_flag_from_the_table(tmp_path: Path):
    from mailsetup.errors import MailsetupError
    from mailsetup.questions import require_answers

    with pytest.raises(MailsetupError) as err:
        require_answers({"admin": "alice"})
    assert err.value.message == "missing --domain (the mail domain, e.g. --domain example.org)"
    require_answers({"domain": "example.test"})


@pytest.mark.parametrize("spelling", ["ECDSA-P256", "ecdsa-p256"])
def test_cert_takes_the_key_types_init_takes(tmp_path: Path, spelling: str):
    """One validator for the key type: `cert` used to refuse what `init` accepts."""
    key, crt = tmp_path / "k.key", tmp_path / "c.crt"
    r = run_cli("cert", "--hostname", "mail.example.test", "--key-type", spelling, "--out-key", key,
                "--out-cert", crt)
    assert r.code == 0, r.err
    assert "ecdsa-p256" in r.out
    r = run_cli("cert", "--hostname", "mail.example.test", "--key-type", "dsa", "--out-key", tmp_path / "x",
                "--out-cert", tmp_path / "y")
    assert r.err_lines == ["mailsetup: error: --key-type: 'dsa' is not one of rsa-2048, rsa-4096, ecdsa-p256"]


def test_one_listen_address_in_an_answers_file_is_recorded_as_a_list(tmp_path: Path, sandbox: Path):
    """The answers file records the model's choices, not the raw text: a single address given as a
    string used to be recorded letter by letter, and the next run failed on it."""
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "example.test"\nadmin = "alice"\nlisten = "192.0.2.1"\n')
    base = ["init", "--yes", "--root", sandbox, "--os", "debian", "--no-smoke"]
    r = run_cli(*base, "--answers", answers)
    assert r.code == 0, r.err
    recorded = (sandbox / "etc/mailsetup/answers.toml").read_text()
    assert 'listen = ["192.0.2.1"]' in recorded
    r = run_cli(*base)
    assert r.code == 0, r.err
    assert "Everything is already in place" in r.out


def test_the_answers_file_records_choices_and_leaves_defaults_out(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--no-smoke", "--smtp-port", "2525", "--user", "dave", "--password-stdin"),
                input="Secr3t-pass\n")
    assert r.code == 0, r.err
    recorded = (sandbox / "etc/mailsetup/answers.toml").read_text()
    assert "smtp_port = 2525" in recorded and 'admin = "alice"' in recorded
    for default in ("submission_port", "listen", "days", "tls ", "queue_", "max_message_size"):
        assert default not in recorded  # a default stays a default, following the layout next time
    for never in ("user", "smoke", "Secr3t", "root ="):
        assert never not in recorded


def test_a_rerun_that_changes_settings_asks_again_and_records_the_new_choice(tmp_path: Path):
    """The re-run's "change settings": every question no flag answered, the last run's answers as
    defaults; the model is built again from the new answers (no path covered this before)."""
    from test_wizard import DOWN, answer, finish, first_run, spawn

    root = tmp_path / "root"
    assert first_run(root)[0] == 0
    child = spawn("init", "--root", root)
    answer(child, r"What now\?", DOWN * 4 + "\r")  # change settings
    for prompt in (r"Mail domain \(--domain\)", r"--hostname", r"OS layout", r"TLS certificate", r"Key type"):
        answer(child, prompt, "\r")  # keep the last run's answer
    answer(child, r"Compress the queue", "y")
    answer(child, r"Encrypt the queue", "y")
    answer(child, r"Import an existing aliases file", "n")
    answer(child, r"\(--admin\)", "\x15bob\r")
    answer(child, r"First mail user", "\x15\r")  # none this time
    answer(child, r"Sign outgoing mail with DKIM", "\r")  # keep it on
    answer(child, r"IMAP server for reading mail", "\r")  # keep none
    answer(child, r"Run the smoke test when done \(--smoke\)", "n")
    answer(child, r"Write these 3 file\(s\)\?", "y")
    code, text = finish(child)
    assert code == 0, text
    assert "root's mail now goes to bob (was alice)" in text and "Smoke test skipped." in text
    recorded = (root / "etc/mailsetup/answers.toml").read_text()
    assert 'admin = "bob"' in recorded and 'key_type = "ecdsa-p256"' in recorded


def _trace_init(flags: dict, monkeypatch, stdin: str = "") -> list[str]:
    """The modules `init`'s steps call into, in order (each entry is a call made by initflow itself
    into another mailsetup module; consecutive calls into one module count once)."""
    import io
    import sys

    from mailsetup import initflow

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    entered: list[str] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        module, caller = frame.f_globals.get("__name__", ""), frame.f_back.f_globals.get("__name__", "")
        if caller == "mailsetup.initflow" and module.startswith("mailsetup.") and module != caller:
            if not entered or entered[-1] != module:
                entered.append(module)

    opts = initflow.InitOptions(yes=True, as_json=True, interactive=False, password_stdin=bool(stdin),
                                rotate_cert="rotate" in flags, rotate_queue_key="rotate" in flags)
    sys.setprofile(profile)
    try:
        code = initflow.run_init({k: v for k, v in flags.items() if k != "rotate"}, opts, {"smtpd_version": "7.4"})
    finally:
        sys.setprofile(None)
    assert code == 0
    return [m.removeprefix("mailsetup.") for m in entered]


def test_following_init_from_its_flags_to_the_files_no_step_goes_back(sandbox: Path, monkeypatch, capsys):
    """resolve → plan → confirm → apply → prove → report: each module is entered once, in the order
    of the steps. `report` is the one output object, which every step talks through (a person must
    see the plan before saying yes), so it is left out of the count. A first run looks for an
    smtpd.conf mailsetup did not write (importconf) right after reading the last run's answers."""
    flags = {"domain": "example.test", "admin": "alice", "root": str(sandbox), "os": "debian", "user": "dave"}
    first = [m for m in _trace_init(flags, monkeypatch, stdin="Secr3t-pass\n") if m != "report"]
    assert first == ["answers", "importconf", "questions", "model", "credentials", "dns", "provision", "plan", "apply",
                     "smoke"]
    again = [m for m in _trace_init({**flags, "rotate": True}, monkeypatch, stdin="Secr3t-pass\n") if m != "report"]
    assert len(again) == len(set(again)), again
    assert again[:3] == ["answers", "questions", "model"] and again[-2:] == ["apply", "smoke"], again
    assert '"ok": true' in capsys.readouterr().out


@pytest.mark.parametrize(("line", "error"), [
    ("days = true", "--days: True is not a number of days"),
    ("smtp_port = 70000", "--smtp-port: 70000 is not a port number (1-65535)"),
    ('listen = "all"', "--listen: 'all' is an OpenBSD interface group"),
    ('tls = "acme-later"', "--tls: 'acme-later' is not self-signed, existing, csr or acme"),
    ("queue_encryption = \"maybe\"", "--queue-encryption: 'maybe' is not yes or no"),
])
def test_a_bad_value_in_an_answers_file_is_named_by_file_and_line(tmp_path: Path, line: str, error: str):
    """Every answers key is a row of the question table with its validator: a bad value in an
    --answers file stops the run before anything is asked or written, naming the file and line."""
    answers = tmp_path / "answers.toml"
    answers.write_text(f'# mine\ndomain = "example.test"\nadmin = "alice"\n{line}\n')
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--answers", answers, "--no-smoke")
    assert r.code == 2, r.out + r.err
    assert r.err_lines[0].startswith(f"mailsetup: error: {answers}:4: {error}"), r.err_lines
    assert len(r.err_lines) == 1 and not (tmp_path / "root").exists()


@pytest.mark.parametrize(("flag", "value"), [("--listen", "all"), ("--tls", "acme-later")])
def test_the_same_bad_value_given_as_a_flag_is_named_by_the_flag(tmp_path: Path, flag: str, value: str):
    answers = tmp_path / "answers.toml"
    answers.write_text('domain = "example.test"\nadmin = "alice"\n')
    r = run_cli("init", "--yes", "--root", tmp_path / "root", "--os", "debian", "--answers", answers, "--no-smoke",
                flag, value)
    assert r.code == 2 and r.err_lines[0].startswith(f"mailsetup: error: {flag}: {value!r} "), r.err_lines


def test_a_hand_edited_bad_value_in_answers_toml_is_named_by_its_line(sandbox: Path):
    assert run_cli(*init_args(sandbox, "--no-smoke")).code == 0
    recorded = sandbox / "etc/mailsetup/answers.toml"
    lines = recorded.read_text().splitlines()
    lines.append("smtp_port = 0")
    recorded.write_text("\n".join(lines) + "\n")
    r = run_cli("doctor", "--root", sandbox)
    assert r.code == 2, r.out + r.err
    assert r.err_lines == [f"mailsetup: error: {recorded}:{len(lines)}: --smtp-port: 0 is not a port number (1-65535)"]
