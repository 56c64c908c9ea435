"""Hostile values for every flag: one line naming the flag, exit 2, nothing written, nothing injected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import init_args, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsetup.errors import MailsetupError
from mailsetup.model import build_setup, validate_dns_name
from mailsetup.render import render_smtpd_conf

INJECTIONS = [
    'example.org"\nmatch from any for any action "outbound',
    "example.org\naction x relay",
    "example.org\r\nlisten on 0.0.0.0",
    "example.org # comment",
    "exa mple.org",
    "example.org{",
    "example.org}",
    "-example.org",
    "example.org$x",
    "example.org;",
    "example.org'",
    "exam\\ple.org",
    "example.org\x01",  # (argv cannot carry NUL; the property tests below cover it)
    "example.org\t",
    "<aliases>.org",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("flag", ["--domain", "--hostname"])
def test_hostile_names_are_refused_naming_the_flag(flag: str, value: str, sandbox: Path):
    args = init_args(sandbox)
    if flag == "--domain":
        args[args.index("--domain") + 1] = value
    else:
        args += ["--hostname", value]
    r = run_cli(*args)
    assert r.code == 2, r.out
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith(f"mailsetup: error: {flag}: ")
    assert not sandbox.exists()


PATH_INJECTIONS = ["/tmp/a\nb", '/tmp/a"b', "/tmp/a b", "/tmp/a#b", "/tmp/{a}", "/tmp/$a"]


@pytest.mark.parametrize("value", PATH_INJECTIONS)
def test_hostile_root_is_refused(value: str):
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", value)
    assert r.code == 2
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("mailsetup: error: --root: ")
    assert not Path(value).exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--os", "plan9", "--os: unknown OS 'plan9'"),
        ("--os", "debian\nx", "--os: "),
        ("--listen", "egress", "--listen: 'egress' is an OpenBSD interface group"),
        ("--listen", "0.0.0.0 port 25 tls", "--listen: "),
        ("--listen", "eth0\nmatch", "--listen: "),
        ("--listen", "999.1.1.1", "--listen: "),
        ("--smtp-port", "0", "--smtp-port: 0 is not a port number"),
        ("--smtp-port", "70000", "--smtp-port: 70000"),
        ("--submission-port", "25", "--submission-port: 25 is also the SMTP port"),
        ("--key-type", "dsa-1024", "--key-type: 'dsa-1024' is not one of"),
        ("--days", "0", "--days: 0 is outside"),
        ("--smtpd-version", "banana", "--smtpd-version: 'banana' is not a version"),
        ("--admin", 'alice"\nmatch', "--admin: "),
        ("--admin", "alice,|/tmp/x", "--admin: 'alice,|/tmp/x' is neither a local user name nor a plain address"),
        ("--admin", ":include:/etc/passwd", "--admin: "),
        ("--admin", "root", "--admin: smtpd never delivers to root"),
        ("--cert", "/nonexistent/c.pem", "--cert and --key: give both"),
    ],
)
def test_every_flag_refuses_bad_values_in_one_line(flag: str, value: str, message: str, sandbox: Path):
    r = run_cli(*init_args(sandbox, flag, value))
    assert r.code == 2, (r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith(f"mailsetup: error: {message}"), r.err_lines[0]
    assert "Traceback" not in r.err
    assert not sandbox.exists()


def test_typo_in_option_name_is_a_usage_error(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--domian", "x"))
    assert r.code == 2
    assert "No such option: --domian" in r.err
    assert not sandbox.exists()


def test_idn_domain_becomes_punycode(sandbox: Path):
    r = run_cli(*init_args(sandbox, "--dry-run", domain="bücher.example"))
    assert r.code == 0, r.err
    assert "xn--bcher-kva.example" in r.out
    assert "mail.xn--bcher-kva.example" in r.out


# --- properties: whatever the text, either a clean refusal or a config with no injected line ------

_BASE = {"domain": "example.test", "os": "debian", "root": "/srv/mail"}


def _render(**over) -> str:
    return render_smtpd_conf(build_setup({**_BASE, **over}), "0" * 32)


def _shape(line: str) -> str:
    return re.sub(r'"[^"]*"', '"X"', line)


_RULES = [_shape(line) for line in _render().splitlines() if line.startswith("match")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=0, max_size=60), st.sampled_from(["domain", "hostname", "listen", "root", "os"]))
def test_any_value_for_any_field_is_refused_or_renders_without_injection(value: str, field: str):
    try:
        text = _render(**{field: value})
    except MailsetupError as exc:
        assert "\n" not in exc.message.replace("\\n", "")  # one line
        return
    # Same rules as the baseline; every line one of ours, with balanced quotes.
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [_shape(line) for line in lines if line.startswith("match")] == _RULES
    assert len([line for line in lines if line.startswith("action")]) == 2
    for line in lines:
        assert line.split(" ")[0] in {"pki", "queue", "smtp", "table", "listen", "match", "action"}, line
        assert line.count('"') % 2 == 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_dns_validator_only_returns_safe_names(value: str):
    try:
        name = validate_dns_name(value, "--domain")
    except MailsetupError as exc:
        assert exc.message.startswith("--domain: ")
        return
    assert name == name.lower()
    assert all(c.isalnum() or c in ".-" for c in name) and name.isascii()
    assert "." in name


ALL_FIELDS = ["domain", "hostname", "listen", "root", "os", "tls", "key_type", "days", "cert", "key", "smtp_port",
              "submission_port", "smtpd_version", "queue_compression", "queue_encryption", "max_message_size"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_FIELDS), st.one_of(st.text(max_size=60), st.integers(), st.booleans()))
def test_no_value_of_any_answer_injects_into_smtpd_conf(field: str, value):
    try:
        text = _render(**{field: value})
    except MailsetupError as exc:
        assert exc.message and "\n" not in exc.message.replace("\\n", "")
        return
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [_shape(line) for line in lines if line.startswith("match")] == _RULES
    for line in lines:
        assert line.split(" ")[0] in {"pki", "queue", "smtp", "table", "listen", "match", "action"}, line
        assert line.count('"') % 2 == 0


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_answers_file_loads_or_fails_in_one_line(tmp_path_factory, text: str):
    from mailsetup.answers import load_answers

    path = tmp_path_factory.mktemp("answers") / "answers.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        answers = load_answers(path)
    except MailsetupError as exc:
        assert exc.message.startswith(str(path))
        assert "\n" not in exc.message
        return
    try:
        build_setup({**answers, "domain": answers.get("domain", "example.test")})
    except MailsetupError as exc:
        assert "\n" not in exc.message
