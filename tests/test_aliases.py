"""aliases: our parser and db writer against the real makemap, db_dump and smtpd.

Every expectation here was measured on the real tools (OpenSMTPD 7.4.0p1 on Debian 12, 7.6.0p1 on
Debian 13); the matrix runs them again on each test run, and on each root the installed makemap
decides which semantics the parser must follow (scripts/test runs the suite on both roots).
"""

from __future__ import annotations

import dbm
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsetup import aliases
from mailsetup.aliases import (
    ALIASES_MODE,
    AliasEntry,
    DbmUnavailable,
    build_aliases_db,
    build_aliases_db_with_makemap,
    db_backend,
    lookup,
    missing_rfc2142,
    parse_aliases,
    parse_aliases_file,
    read_aliases_db,
    render_file_table,
    target_kind,
)
from mailsetup.errors import MailsetupError
from mailsetup.opensmtpd import smtpd_version

MAKEMAP = shutil.which("makemap") or shutil.which("makemap", path="/usr/sbin")
DB_DUMP = shutil.which("db_dump")
SMTPD = shutil.which("smtpd") or shutil.which("smtpd", path="/usr/sbin")

_FOUND = smtpd_version(SMTPD) if SMTPD else None
# The installed makemap's rules: the same package as smtpd, whose `smtpd -h` names the version.
INSTALLED = (_FOUND[0], _FOUND[1]) if _FOUND else aliases.DEFAULT_SYNTAX

needs_makemap = pytest.mark.skipif(
    MAKEMAP is None or DB_DUMP is None, reason="needs OpenSMTPD's makemap and db_dump (db-util)"
)
needs_smtpd = pytest.mark.skipif(SMTPD is None, reason="needs OpenSMTPD's smtpd")
needs_dbm = pytest.mark.skipif(db_backend() not in ("bdb", "dbm"),
                               reason="no Berkeley DB writer here (a binding, or a Berkeley-DB dbm.ndbm)")
HAS_BDB = aliases._bsddb() is not None
HAS_NDBM = aliases._ndbm() is not None


@pytest.fixture(params=["bdb", "ndbm"])
def writer(request, monkeypatch):
    """Each Berkeley DB writer in turn: the binding (as makemap writes), and dbm.ndbm (the fallback)."""
    if request.param == "bdb" and not HAS_BDB:
        pytest.skip("no Berkeley DB binding (python3-bsddb3) here")
    if request.param == "ndbm":
        if not HAS_NDBM:
            pytest.skip("this Python's dbm.ndbm is not Berkeley DB")
        monkeypatch.setattr(aliases, "_bsddb", lambda: None)
    return request.param


# ------------------------------------------------------------------------------------ helpers


def _unescape_db_dump(field: bytes) -> bytes:
    # db_dump -p prints printable bytes as-is, "\\" for a backslash and "\hh" for anything else
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\":
            if field[i + 1 : i + 2] == b"\\":
                out.append(0x5C)
                i += 2
            else:
                out.append(int(field[i + 1 : i + 3], 16))
                i += 3
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def db_dump_records(path: Path) -> list[tuple[bytes, bytes]]:
    """The (key, value) byte pairs exactly as stored, NULs included, sorted."""
    out = subprocess.run([DB_DUMP, "-p", str(path)], capture_output=True, check=True).stdout
    lines = out.split(b"\n")
    body = lines[lines.index(b"HEADER=END") + 1 : lines.index(b"DATA=END")]
    fields = [_unescape_db_dump(line[1:]) for line in body]
    return sorted(zip(fields[0::2], fields[1::2], strict=True))


def run_makemap(data: bytes) -> tuple[int, str, list[tuple[bytes, bytes]] | None]:
    """Run the real `makemap -t aliases` on `data`: (exit code, stderr, stored records or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "aliases")
        source.write_bytes(data)
        proc = subprocess.run([MAKEMAP, "-t", "aliases", str(source)], capture_output=True)
        stderr = proc.stderr.decode(errors="replace").replace(tmp + "/", "").strip()
        records = db_dump_records(Path(tmp, "aliases.db")) if proc.returncode == 0 else None
        return proc.returncode, stderr, records


def our_records(entries: list[AliasEntry]) -> list[tuple[bytes, bytes]]:
    return sorted((e.name.encode() + b"\0", e.value.encode() + b"\0") for e in entries)


def physical_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


# Inputs makemap 7.4.0p1 accepts (7.6 refuses some; the installed makemap decides which the test expects).
ACCEPTED = {
    "comment-only": b"# only a comment\n",
    "empty-file": b"",
    "blank-lines-and-comments": b"\n\n# c\na: b\n\n  \n# d\n",
    "leading-whitespace": b"  a: b\n",
    "continuation-line": b"a: b,\\\n  c\n",
    "continuation-three-lines": b"a: b, \\\n c, \\\n d\n",
    "continuation-at-eof": b"a: b\\",
    "continuation-then-blank": b"a: b\\\n\\\n\n",
    "continuation-inside-name": b"a\\\n: b\n",
    "two-targets": b"team: alice, bob\n",
    "pipe-quoted": b'a: "|/usr/bin/cmd arg"\n',
    "pipe-bare": b"a: |/usr/bin/cmd arg\n",
    "pipe-quoted-empty": b'a: "|"\n',
    "file-target": b"a: /var/mail/file\n",
    "include-colon": b"a: :include:/etc/list\n",
    "include-plain": b"a: include:/etc/list\n",
    "include-upper": b"a: INCLUDE:/x\n",
    "error": b"a: error:550 no such user\n",
    "error-colon": b"a: :error:550 no such user\n",
    "error-upper": b"a: ERROR:550 Gone\n",
    "error-non-ascii-text": "a: error:550 xé\n".encode(),
    "uppercase-name": b"Root: Alice\n",
    "no-colon": b"a b\n",
    "no-space-after-colon": b"a:b\n",
    "double-colon": b"a::b\n",
    "colon-before-value": b"a: :b\n",
    "empty-name": b": b\n",
    "trailing-spaces-kept": b"a: b   \n",
    "tabs": b"a:\tb\t\n",
    "tab-before-colon": b"a\t:\tb\n",
    "crlf": b"a: b\r\nb: c\r\n",
    "no-final-newline": b"a: b\nc: d",
    "inline-comment": b"a: b # comment\n",
    "escaped-hash-in-name": b"\\#a: b\n",
    "escaped-hash-in-pipe": b"a: |/bin/x \\#c\n",
    "double-backslash-before-hash": b"a: |/bin/x \\\\#c\n",
    "backslash-in-name": b"a\\b: c\n",
    "nul-truncates-line": b"a: b\x00c\n",
    "address": b"a: alice@example.com\n",
    "address-odd-local-part": b"a: b!c@example.com\n",
    "address-bad-domain-becomes-user": b"a: alice@bad_domain.com\n",
    "address-literal-becomes-user": b"a: b@[127.0.0.1], c\n",
    "address-two-ats": b"a: x@y@z\n",
    "name-is-address": b"a@example.com: b\n",
    "name-with-plus": b"a+tag: b\n",
    "non-ascii-names-not-lowercased": "café: b\nÉ: c\n".encode(),
    "vertical-tab-in-name": b"a\x0b: b\n",
    "form-feed-in-value": b"a: b\x0c\n",
    "username-255": b"a: " + b"u" * 255 + b"\n",
    "pipe-1023": b"a: |" + b"x" * 1023 + b"\n",
    "long-address": b"a: " + b"u" * 300 + b"@example.com\n",
    "long-name": b"k" * 3000 + b": b\n",
    "very-long-line": b"a: " + b", ".join(b"user%d" % i for i in range(2000)) + b"\n",
    "many-kinds": b"a: b@ex.com, |/x, /y, error:550 z, :include:/w\n",
    "space-before-comma": b"a: b ,c\n",
    "unbalanced-quote-in-pipe": b"a: |/bin/echo it's\n",
    "escaped-comma-in-pipe": b"a: |/bin/echo a\\,b\n",
}

# Inputs makemap 7.4.0p1 refuses (7.6 accepts some).
REFUSED = {
    "continued-with-comma": b"a: b,\n  c\n",
    "comment-ends-continuation": b"a: b, \\\n# comment\n c\n",
    "include-relative": b"a: :include:relative\n",
    "error-without-text": b"a: error:550\n",
    "error-bad-code": b"a: error:650 x\n",
    "error-text-starts-non-alnum": b"a: error:550 -x\n",
    "duplicate": b"a: b\na: c\n",
    "duplicate-case": b"A: b\n\n\na: c\n",
    "duplicate-before-bad-value": b"a: b\na: ,,\n",
    "no-value": b"a\n",
    "colon-no-value": b"a:\n",
    "colon-space-no-value": b"a: \n",
    "value-with-space": b"a b c\n",
    "name-with-space": b"first last: x\n",
    "cr-only-name": b"a\r\n",
    "double-comma": b"a: b,,c\n",
    "trailing-comma": b"a: b,\n",
    "leading-comma": b"a: ,b\n",
    "quoted-user": b'a: "b c"\n',
    "comma-in-quoted-pipe": b'a: "|/bin/echo a, b"\n',
    "unterminated-quoted-pipe": b'a: "|/bin/cmd\n',
    "quoted-path": b'a: "/path"\n',
    "address-empty-local": b"a: @example.com\n",
    "address-empty-domain": b"a: alice@\n",
    "non-ascii-user": "a: café\n".encode(),
    "escaped-hash-then-words": b"a: b \\# not comment\n",
    "double-backslash-user": b"a: b\\\\\n",
    "nul-in-name": b"a\x00b: c\n",
    "username-256": b"a: " + b"u" * 256 + b"\n",
    "path-1024": b"a: /" + b"x" * 1023 + b"\n",
    "continuation-joins-next-entry": b"a: b\\\nc: d\n",
    "comment-cuts-continuation": b"a: b # x \\\n c\n",
    "backslash-space-is-not-continuation": b"a: b, \\  \n c\n",
    "crlf-blocks-continuation": b"a: b\\\r\nc\n",
    "continuation-into-eof": b"x: y\nc\\\n",
    "control-char": b"a: b\x1f\n",
}


# Inputs where OpenSMTPD >= 7.5's parse_table_line differs from 7.4's fparseln (measured on 7.6.0p1).
TABLE_LINE = {
    "bracket-name": b"[a b]: c\n",
    "bracket-name-unclosed": b"[a b: c\n",
    "bracket-then-any-separator": b"[a]xb: c\n",
    "bracket-at-end": b"[a]\n",
    "colon-then-tab-colon": b"a:\t:b\n",
    "space-colon": b"a :b\n",
    "nul-after-blank": b"a: b \x00c\n",
    "blank-nul-line": b"   \x00 x\n",
    "cr-in-value-then-blank": b"a: b\r \n",
    "hash-after-name": b"a# b: c\n",
    "indented-comment-tab": b"\t# c\na: b\n",
    "backslash-at-end-7x": b"a: |/bin/x \\\n",
    "value-vertical-tab-lead": b"a:\vb\n",
}
EVERY_INPUT = {**ACCEPTED, **REFUSED, **TABLE_LINE}


# ----------------------------------------------------------------------- parser vs real makemap


def assert_agrees_with_makemap(data: bytes, source: str = "/etc/aliases") -> None:
    """Our parser, following the installed smtpd's version, stores what the installed makemap stores,
    or refuses what it refuses naming the same line, in one line that never quotes the file."""
    rc, stderr, expected = run_makemap(data)
    try:
        entries = parse_aliases(data.decode(), source=source, smtpd_version=INSTALLED)
    except MailsetupError as err:
        assert rc == 1, f"we refused what makemap {INSTALLED} stored: {err}"
        makemap_line = int(stderr.split("aliases:")[1].split(":")[0])
        # makemap counts one line past EOF when a continuation runs into the end; we name the last real one
        line = min(makemap_line, physical_lines(data))
        assert str(err).startswith(f"{source}:{line}: ")
        assert "\n" not in str(err)
        kind = "duplicate entry" if "duplicate" in stderr else "invalid entry"
        assert kind in str(err)
    else:
        assert rc == 0, f"we accepted what makemap {INSTALLED} refused: {stderr}"
        assert our_records(entries) == expected


@needs_makemap
@pytest.mark.parametrize("data", EVERY_INPUT.values(), ids=EVERY_INPUT.keys())
def test_parser_agrees_with_the_installed_makemap(data):
    assert_agrees_with_makemap(data)


@needs_makemap
@needs_dbm
@pytest.mark.parametrize("data", EVERY_INPUT.values(), ids=EVERY_INPUT.keys())
def test_our_db_dumps_identically_to_makemaps(data, tmp_path, writer):
    rc, _stderr, expected = run_makemap(data)
    if rc != 0:
        return  # refused: nothing to compare (the test above checks that we refuse it too)
    ours = tmp_path / "aliases.db"
    ours.write_bytes(build_aliases_db(parse_aliases(data.decode(), smtpd_version=INSTALLED)))
    assert db_dump_records(ours) == expected


def test_the_7_4_inputs_keep_their_7_4_meaning():
    # pinned without makemap, so both versions' rules are checked on either root
    for data in ACCEPTED.values():
        parse_aliases(data.decode(), smtpd_version=(7, 4))
    for data in REFUSED.values():
        with pytest.raises(MailsetupError):
            parse_aliases(data.decode(), smtpd_version=(7, 4))


# What makemap 7.6.0p1 does with inputs whose meaning changed in 7.5: the records it stores, or the line
# of its "invalid entry" (measured in a Debian 13 root).
MEASURED_7_6 = {
    "continuation-line": 1,
    "inline-comment": 1,
    "double-colon": 1,
    "tab-before-colon": 1,
    "colon-before-value": 1,
    "comment-ends-continuation": 1,
    "continuation-joins-next-entry": 1,
    "trailing-spaces-kept": [(b"a\0", b"b\0")],
    "crlf": [(b"a\0", b"b\0"), (b"b\0", b"c\0")],
    "form-feed-in-value": [(b"a\0", b"b\0")],
    "escaped-hash-then-words": 1,
    "double-backslash-user": 1,
    "escaped-hash-in-pipe": [(b"a\0", b"|/bin/x \\#c\0")],
    "bracket-name": [(b"[a b]\0", b"c\0")],
    "bracket-name-unclosed": 1,
    "nul-after-blank": [(b"a\0", b"b \0")],
    "continued-with-comma": 1,
    "cr-only-name": 1,
}


@pytest.mark.parametrize("name", MEASURED_7_6)
def test_7_6_rules_match_what_makemap_7_6_did(name):
    data = EVERY_INPUT[name]
    expected = MEASURED_7_6[name]
    if isinstance(expected, int):
        with pytest.raises(MailsetupError, match=rf"^aliases:{expected}: (invalid|duplicate) entry"):
            parse_aliases(data.decode(), smtpd_version=(7, 6))
    else:
        assert our_records(parse_aliases(data.decode(), smtpd_version=(7, 6))) == expected


def test_7_6_errors_say_why_an_old_file_no_longer_works():
    with pytest.raises(MailsetupError, match=r"^aliases:1: invalid entry: .*no comments after an entry"):
        parse_aliases("a: b # the team\n", smtpd_version=(7, 6))
    with pytest.raises(MailsetupError, match=r"^aliases:1: invalid entry: .*do not continue an entry"):
        parse_aliases("team: alice,\\\n  bob\n", smtpd_version=(7, 6))


def test_duplicate_message_names_both_lines_and_case_rule():
    with pytest.raises(MailsetupError) as err:
        parse_aliases("Postmaster: root\n# staff\npostmaster: alice\n")
    assert str(err.value) == (
        "aliases:3: duplicate entry: the same name as line 1 (names are compared case-insensitively)"
    )


def test_name_with_blank_gets_a_hint():
    with pytest.raises(MailsetupError, match=r"^aliases:1: .*cannot contain blanks"):
        parse_aliases("first last: x\n")


def test_entry_line_is_where_the_name_is():
    entries = parse_aliases("# header\n\nteam: alice,\\\n  bob\nsolo: carol\n")
    assert [(e.name, e.line) for e in entries] == [("team", 3), ("solo", 5)]


def test_stored_value_keeps_what_makemap_keeps():
    (entry,) = parse_aliases("Sales:: :include:/etc/sales  # the list\n")
    assert entry == AliasEntry(name="sales", value="include:/etc/sales  ", line=1)


# ------------------------------------------------------------------------------- reading files


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(MailsetupError) as err:
        parse_aliases_file(tmp_path / "nope")
    assert str(err.value) == f"{tmp_path / 'nope'}: no such aliases file"


def test_directory_is_one_line(tmp_path):
    with pytest.raises(MailsetupError, match="is a directory"):
        parse_aliases_file(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "aliases"
    path.write_text("a: b\n")
    path.chmod(0)
    with pytest.raises(MailsetupError, match="cannot read"):
        parse_aliases_file(path)


def test_latin1_file_names_path_and_line(tmp_path):
    path = tmp_path / "aliases"
    path.write_bytes(b"root: alice\ncaf\xe9: bob\n")
    with pytest.raises(MailsetupError) as err:
        parse_aliases_file(path)
    assert str(err.value) == f"{path}:2: not valid UTF-8 (column 4); save the file as UTF-8"


def test_file_errors_name_the_path(tmp_path):
    path = tmp_path / "aliases"
    path.write_text("root: alice\nbad\n")
    with pytest.raises(MailsetupError, match=rf"^{path}:2: invalid entry: expected 'name: destination, ...'$"):
        parse_aliases_file(path)


def test_crlf_file_values_keep_the_cr_like_makemap(tmp_path):
    path = tmp_path / "aliases"
    path.write_bytes(b"root: alice\r\n")
    assert parse_aliases_file(path) == [AliasEntry("root", "alice\r", 1)]


# ------------------------------------------------------------------------- smtpd's expansion


def test_targets_split_like_smtpd():
    (entry,) = parse_aliases('team: alice , "|/usr/bin/x a" ,bob@example.com,\t/var/mail/t\n')
    assert entry.targets == ("alice", '"|/usr/bin/x a"', "bob@example.com", "/var/mail/t")
    assert entry.expansion_problem is None


def test_escaped_comma_is_one_target_for_smtpd():
    (entry,) = parse_aliases("a: |/bin/echo a\\,b\n")
    assert entry.targets == ("|/bin/echo a,b",)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("|/bin/echo it's", "unbalanced quote"),
        (", ".join(["root"] * 500), "2048 bytes"),
    ],
)
def test_values_makemap_accepts_but_smtpd_cannot_expand(value, problem):
    (entry,) = parse_aliases(f"a: {value}\n")
    assert entry.targets == ()
    assert problem in entry.expansion_problem


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("alice", "username"),
        ("alice@example.com", "address"),
        ("alice@[192.0.2.1]", "username"),  # smtpd cuts at '@' before rejecting the domain
        ("|/bin/cat", "filter"),
        ('"|/bin/cat"', "filter"),
        ("/var/mail/x", "filename"),
        (":include:/etc/list", "include"),
        ("error:550 Gone", "error"),
        ("al ice", None),
    ],
)
def test_target_kind(target, kind):
    assert target_kind(target) == kind


def test_lookup_lowercases_and_strips_subaddress():
    mapping = {e.name: e.value for e in parse_aliases("Team: alice\nteam+ops: bob\n")}
    assert lookup(mapping, "TEAM") == "alice"
    assert lookup(mapping, "team+ops") == "bob"
    assert lookup(mapping, "team+sales") == "alice"
    assert lookup(mapping, "nobody") is None


def test_missing_rfc2142_names():
    entries = parse_aliases("Postmaster: root\n")
    assert missing_rfc2142(entries) == ["abuse"]
    assert missing_rfc2142(entries, local_users={"abuse"}) == []
    assert missing_rfc2142([]) == ["postmaster", "abuse"]


# ------------------------------------------------------------------------------ db round trips


@needs_dbm
def test_db_round_trip_and_mode():
    entries = parse_aliases("Root: alice\nteam: alice, bob\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "aliases.db")
        path.write_bytes(build_aliases_db(entries))
        assert read_aliases_db(path) == {"root": "alice", "team": "alice, bob"}
    assert ALIASES_MODE == 0o644


@needs_dbm
@needs_makemap
def test_copied_db_reads_the_same_anywhere(tmp_path):
    data = build_aliases_db(parse_aliases("team: alice, bob\n"))
    first, second = tmp_path / "a" / "aliases.db", tmp_path / "b" / "other-name.db"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(data)
    assert db_dump_records(first) == db_dump_records(second) == [(b"team\0", b"alice, bob\0")]
    assert read_aliases_db(second) == {"team": "alice, bob"}


def test_read_db_refuses_a_text_file(tmp_path):
    path = tmp_path / "aliases.db"
    path.write_text("team: alice\n")
    with pytest.raises(MailsetupError) as err:
        read_aliases_db(path)
    assert str(err.value) == f"{path}: not a Berkeley DB hash file (build it with makemap -t aliases)"


def test_read_db_missing_is_one_line(tmp_path):
    with pytest.raises(MailsetupError, match="no such aliases database"):
        read_aliases_db(tmp_path / "aliases.db")


@needs_makemap
def test_read_db_reads_makemaps_file(tmp_path):
    source = tmp_path / "aliases"
    source.write_text("Team: alice, bob\nroot: |/usr/bin/x\n")
    subprocess.run([MAKEMAP, "-t", "aliases", str(source)], check=True)
    assert read_aliases_db(tmp_path / "aliases.db") == {"team": "alice, bob", "root": "|/usr/bin/x"}


def test_build_refuses_duplicate_entries():
    with pytest.raises(MailsetupError, match="duplicate entry"):
        build_aliases_db([AliasEntry("a", "b", 1), AliasEntry("a", "c", 2)])


# ---------------------------------------------------------------------------- fallback paths


def _without_berkeley_dbm(monkeypatch):
    # Nothing real can make this interpreter lose its dbm, so only the selection is forced here.
    monkeypatch.setattr(aliases, "_bsddb", lambda: None)
    fake = types.SimpleNamespace(library="GNU gdbm")
    monkeypatch.setattr(dbm, "ndbm", fake, raising=False)
    monkeypatch.setitem(sys.modules, "dbm.ndbm", fake)


def test_gdbm_backed_ndbm_is_not_used(monkeypatch):
    _without_berkeley_dbm(monkeypatch)
    with pytest.raises(DbmUnavailable) as err:
        build_aliases_db(parse_aliases("a: b\n"))
    assert "not Berkeley DB" in str(err.value)
    assert isinstance(err.value, MailsetupError)


@needs_makemap
def test_backend_falls_back_to_makemap_which_builds_the_same_records(monkeypatch, tmp_path):
    _without_berkeley_dbm(monkeypatch)
    assert db_backend() == "makemap"
    text = ACCEPTED["many-kinds"].decode() + "Root: alice\n"
    path = tmp_path / "aliases.db"
    path.write_bytes(build_aliases_db_with_makemap(text))
    entries = parse_aliases(text, smtpd_version=INSTALLED)
    assert db_dump_records(path) == our_records(entries)
    # and without dbm the reader goes through `makemap -U`
    assert read_aliases_db(path) == {e.name: e.value for e in entries}


@needs_makemap
def test_makemap_fallback_reports_makemaps_own_error():
    with pytest.raises(MailsetupError) as err:
        build_aliases_db_with_makemap("a: b\na: c\n")
    assert str(err.value) == "aliases:2: duplicate entry for a"


def test_without_dbm_or_makemap_the_backend_is_a_file_table(monkeypatch):
    _without_berkeley_dbm(monkeypatch)
    monkeypatch.setattr(aliases, "_makemap_path", lambda: None)
    assert db_backend() == "file"
    with pytest.raises(DbmUnavailable, match="makemap is not installed"):
        build_aliases_db_with_makemap("a: b\n")


def test_file_table_text():
    entries = parse_aliases("Team: alice, bob   \nroot: |/usr/bin/x # not kept\n")
    assert render_file_table(entries).decode().splitlines()[1:] == ["team: alice, bob   ", "root: |/usr/bin/x "]


def test_file_table_cannot_hold_a_hash_name():
    with pytest.raises(MailsetupError, match="starts with '#'"):
        render_file_table(parse_aliases("\\#a: b\n"))


# ------------------------------------------------------------------------------- real smtpd


def _config(table: str, port: int = 2525, maildir: str = "/tmp/unused") -> str:
    return (
        f"table aliases {table}\n"
        f"listen on 127.0.0.1 port {port}\n"
        f'action "local" maildir "{maildir}/%{{user.username}}" alias <aliases>\n'
        'match from any for domain "example.test" action "local"\n'
        'match for local action "local"\n'
    )


@needs_smtpd
@needs_dbm
def test_smtpd_accepts_our_db_in_its_config(tmp_path):
    db = tmp_path / "aliases.db"
    db.write_bytes(build_aliases_db(parse_aliases("postmaster: root\nabuse: root\n")))
    conf = tmp_path / "smtpd.conf"
    conf.write_text(_config(f"db:{db}"))
    result = subprocess.run([SMTPD, "-n", "-f", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout + result.stderr


@needs_smtpd
def test_smtpd_accepts_our_file_table_in_its_config(tmp_path):
    table = tmp_path / "aliases"
    table.write_bytes(render_file_table(parse_aliases("postmaster: root\nabuse: root\n")))
    conf = tmp_path / "smtpd.conf"
    conf.write_text(_config(f"file:{table}"))
    result = subprocess.run([SMTPD, "-n", "-f", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DELIVERY_ALIASES = (
    "Team: nobody\nquirk: nobody@[192.0.2.1]\nsq: |/bin/echo it's\nlong: " + ", ".join(["nobody"] * 400) + "\n"
)


@needs_smtpd
@pytest.mark.skipif(os.geteuid() != 0, reason="the smtpd daemon must start as root")
@pytest.mark.parametrize("kind", ["db", "ndbm", "makemap", "file"])
def test_smtpd_delivers_through_our_table_and_refuses_what_we_predict(kind, monkeypatch):
    # db: our dbm.ndbm writes it (Debian 13: Python 3.13's Berkeley DB 5.3 read by smtpd 7.6);
    # makemap: the fallback path, the installed makemap after our check
    entries = parse_aliases(DELIVERY_ALIASES, smtpd_version=INSTALLED)
    if kind == "db" and not HAS_BDB:
        pytest.skip("no Berkeley DB binding (python3-bsddb3) here")
    if kind == "ndbm":
        if not HAS_NDBM:
            pytest.skip("this Python's dbm.ndbm is not Berkeley DB")
        monkeypatch.setattr(aliases, "_bsddb", lambda: None)
    # not tmp_path: smtpd delivers as "nobody", who cannot enter pytest's 0700 directories
    work = Path(tempfile.mkdtemp(prefix="mailsetup-aliases-e2e-"))
    work.chmod(0o755)
    proc = None
    try:
        maildir = work / "md"
        maildir.mkdir()
        maildir.chmod(0o1777)
        if kind in ("db", "ndbm"):
            table = work / "aliases.db"
            table.write_bytes(build_aliases_db(entries))
        elif kind == "makemap":
            if MAKEMAP is None:
                pytest.skip("needs OpenSMTPD's makemap")
            table = work / "aliases.db"
            table.write_bytes(build_aliases_db_with_makemap(DELIVERY_ALIASES, entries))
        else:
            table = work / "aliases"
            table.write_bytes(render_file_table(entries))
        port = _free_port()
        conf = work / "smtpd.conf"
        conf.write_text(_config(f"{'file' if kind == 'file' else 'db'}:{table}", port, str(maildir)))
        log = (work / "log").open("w")
        proc = subprocess.Popen([SMTPD, "-d", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"smtpd did not start: {(work / 'log').read_text()[-300:]}")
                time.sleep(0.1)
        with smtp:
            smtp.ehlo("client.example.test")
            smtp.mail("sender@example.test")
            codes = {r: smtp.rcpt(f"{r}@example.test")[0] for r in ("TEAM", "quirk", "sq", "long")}
            smtp.data(b"Subject: aliases test\r\n\r\nhello\r\n")
        assert codes == {"TEAM": 250, "quirk": 250, "sq": 424, "long": 424}
        assert [e.expansion_problem is not None for e in entries] == [False, False, True, True]
        new = maildir / "nobody" / "new"
        deadline = time.monotonic() + 15
        while not (new.is_dir() and len(list(new.iterdir())) >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        # one copy per accepted recipient: TEAM via the lower-cased key, quirk via the '@[...]' quirk
        messages = list(new.iterdir())
        assert len(messages) == 2
        assert all(b"hello" in m.read_bytes() for m in messages)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------- fuzzing

FUZZ_ALPHABET = "aB: ,#\\\n\t\r|/\"'@.:-e0r5!é\x00"


@given(st.text())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_gives_entries_or_one_clear_error(text):
    try:
        entries = parse_aliases(text)
    except MailsetupError as err:
        assert str(err).startswith("aliases:") and "\n" not in str(err)
    else:
        assert all(isinstance(e, AliasEntry) for e in entries)


@given(st.binary())
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_file_gives_entries_or_one_clear_error(tmp_path, data):
    path = tmp_path / "aliases"
    path.write_bytes(data)
    try:
        parse_aliases_file(path)
    except MailsetupError as err:
        assert str(err).startswith(f"{path}") and "\n" not in str(err)


@needs_dbm
@given(st.text(alphabet=FUZZ_ALPHABET, max_size=60))
@settings(max_examples=300)
def test_round_trip_through_our_db(text):
    try:
        entries = parse_aliases(text)
    except MailsetupError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "aliases.db")
        path.write_bytes(build_aliases_db(entries))
        assert read_aliases_db(path) == {e.name: e.value for e in entries}


@needs_makemap
@given(st.text(alphabet=FUZZ_ALPHABET, max_size=40))
@settings(max_examples=300, deadline=None)
def test_fuzzed_text_agrees_with_real_makemap(text):
    assert_agrees_with_makemap(text.encode(), source="aliases")


_FRAGMENTS = [
    "alice",
    "Bob",
    "x@ex.com",
    "x@[1.2.3.4]",
    "|/bin/cat",
    '"|/bin/x y"',
    "/var/m",
    ":include:/l",
    "include:/l",
    "error:550 No",
    "ERROR:450 x y",
    ":error:5",
    "a.b+c",
    "é",
    "'",
    "\\,",
    "\\#",
]


@st.composite
def _alias_line(draw):
    targets = draw(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=4))
    value = targets[0]
    for target in targets[1:]:
        value += draw(st.sampled_from([",", ", ", " ,", ",\\\n ", ",\t", " ,  "])) + target
    indent = draw(st.sampled_from(["", " ", "\t"]))
    name = draw(st.sampled_from(["a", "A", "b", "Root", "x+y", "a@b", "\\#h", ""]))
    colon = draw(st.sampled_from([":", ": ", " : ", "::", "\t", " ", ":\\\n "]))
    tail = draw(st.sampled_from(["", " ", "\r", " # c", "\\", "  \\# x"]))
    return indent + name + colon + value + tail


_ALIAS_FILES = st.lists(st.one_of(_alias_line(), st.sampled_from(["", "# c", "  ", "\\"])), max_size=5).map(
    lambda lines: "\n".join(lines) + "\n"
)


@needs_makemap
@given(_ALIAS_FILES)
@settings(max_examples=300, deadline=None)
def test_fuzzed_alias_files_agree_with_real_makemap(text):
    test_fuzzed_text_agrees_with_real_makemap.hypothesis.inner_test(text)


# ------------------------------------------------------------------------- fast path vs exact


SYNTAXES = pytest.mark.parametrize("syntax", [(7, 4), (7, 6)], ids=["7.4", "7.6"])


def _simple(text: str, syntax: tuple[int, int] = (7, 4)) -> list[AliasEntry] | None:
    return aliases._parse_simple(text, aliases._pick(syntax)[0])


def _exact(text: str, syntax: tuple[int, int] = (7, 4)) -> list[AliasEntry] | str:
    """The exact parser's answer: the entries, or the error message."""
    try:
        return aliases._pick(syntax)[1](text.encode(), "aliases")
    except MailsetupError as err:
        return str(err)


def _fast_shaped_file(lines: int, seed: int, modern: bool = False) -> str:
    """Lines the fast path covers: every target shape, mixed case, comments, blanks, CRLF, limits.
    `modern`: only lines that OpenSMTPD >= 7.5 accepts too (one separator, no comment after an entry)."""
    rng = __import__("random").Random(seed)
    targets = [
        "alice", "Bob.Smith", "x+y", "a-b_c", "u" * 255, "bob@example.com", "It's!x@ex-1.org", "|a@b",
        "/var/mail/x", "/" + "p" * 1022, ":include:/etc/l", "INCLUDE:/x", ":Include:/" + "q" * 1022,
        '"|/usr/bin/vacation -a x"', '"|"', '"|' + "c" * 1022 + '"', "|/bin/cat", "|", "|" + "z" * 1023,
    ]
    seps = [": ", ":", " ", "\t", ":\t "] if modern else [": ", ":", "::", " ", "\t", " : ", ":\t: "]
    tails = ["", " ", "\t", "\r", " \r"] if modern else ["", " ", "\t", "\r", " # note", "#x", " \r"]
    out = []
    for i in range(lines):
        roll = rng.random()
        if roll < 0.05:
            out.append(rng.choice(["", "  ", "# comment", "   # indented comment", "\r", "#"]))
            continue
        name = rng.choice(["user", "User", "ROLE", "a.b", "x@y", "ü-", "n\"q"]) + str(i)
        value = rng.choice(targets)
        for _ in range(rng.randrange(4)):
            value += rng.choice([",", ", ", " ,", " ,\t"]) + rng.choice(targets)
        tail = rng.choice(tails)
        out.append(rng.choice(["", " ", "\t "]) + name + rng.choice(seps) + value + tail)
    return "\n".join(out) + rng.choice(["\n", ""])


@SYNTAXES
def test_fast_path_agrees_with_exact_parser_on_a_generated_file(syntax):
    text = _fast_shaped_file(3000, seed=7, modern=syntax >= (7, 5))
    fast = _simple(text, syntax)
    assert fast is not None, "the generated file should be covered by the fast path"
    assert fast == _exact(text, syntax) == parse_aliases(text, smtpd_version=syntax)
    assert [e.line for e in fast] == [e.line for e in _exact(text, syntax)]


@pytest.mark.parametrize(
    "odd_line",
    [
        "a0: b c",  # a blank inside a value: refused
        "DUP: again",  # a duplicate name (case-insensitively) of the first line
        "x1: b,\\\n c",  # continuation
        "x2: |/bin/echo a\\,b",  # escape
        "x3: b\0c",  # NUL
        "x4: |/bin/cmd with args",  # unquoted command with blanks: valid, not the plain shape
        "x5: error:550 gone",
        "x6: bob@[192.0.2.1]",
        "\vx7: b",
        "x8 :\vb",
        ": empty-name",
        "x9: café",
        "x10: " + "u" * 256,
        "x11: /" + "p" * 1023,
        "x12: b,,c",
        "x13:",
        "x14: #",
        'x15: "|a"b"',
    ],
)
@SYNTAXES
def test_a_line_outside_the_fast_path_sends_the_whole_file_to_the_exact_parser(odd_line, syntax):
    lines = ["dup: first", *_fast_shaped_file(400, seed=3, modern=syntax >= (7, 5)).splitlines()]
    lines.insert(200, odd_line)
    text = "\n".join(lines) + "\n"
    assert _simple(text, syntax) is None
    try:
        got = parse_aliases(text, smtpd_version=syntax)
    except MailsetupError as err:
        got = str(err)
    assert got == _exact(text, syntax)


@given(_ALIAS_FILES)
@settings(max_examples=400, deadline=None)
@SYNTAXES
def test_fast_path_never_disagrees_with_the_exact_parser(syntax, text):
    fast = _simple(text, syntax)
    if fast is not None:
        assert fast == _exact(text, syntax)


_PLAIN_FRAGMENTS = [f for f in _FRAGMENTS if "\\" not in f] + ['"|a b"', '"|a"b"', "|a b", "u" * 256, ":x", "", " "]


@st.composite
def _plain_line(draw):
    targets = draw(st.lists(st.sampled_from(_PLAIN_FRAGMENTS), min_size=1, max_size=4))
    value = targets[0]
    for target in targets[1:]:
        value += draw(st.sampled_from([",", ", ", " ,", ",\t", ",,"])) + target
    indent = draw(st.sampled_from(["", " ", "\t", "\v"]))
    name = draw(st.sampled_from(["a", "A", "b", "Root", "x+y", "a@b", "é", "", "#c", "a\r"]))
    colon = draw(st.sampled_from([":", ": ", " : ", "::", "\t", " ", ": :", ":\v"]))
    tail = draw(st.sampled_from(["", " ", "\r", " # c", "#", "\f", " x"]))
    return indent + name + colon + value + tail


_PLAIN_FILES = st.lists(st.one_of(_plain_line(), st.sampled_from(["", "# c", "  ", "\r"])), max_size=6).map(
    lambda lines: "\n".join(lines) + "\n"
)


@given(_PLAIN_FILES)
@settings(max_examples=400, deadline=None)
@SYNTAXES
def test_fast_path_never_disagrees_on_plain_files(syntax, text):
    fast = _simple(text, syntax)
    if fast is not None:
        assert fast == _exact(text, syntax)


@given(st.text(alphabet=FUZZ_ALPHABET + "Iinclude\v\f ", max_size=80))
@settings(max_examples=400, deadline=None)
@SYNTAXES
def test_fast_path_never_disagrees_on_fuzzed_text(syntax, text):
    fast = _simple(text, syntax)
    if fast is not None:
        assert fast == _exact(text, syntax)


@needs_makemap
@needs_dbm
def test_fast_path_file_matches_real_makemap(tmp_path):
    text = _fast_shaped_file(3000, seed=11, modern=INSTALLED >= aliases.TABLE_LINE_SYNTAX)
    assert _simple(text, INSTALLED) is not None
    rc, stderr, expected = run_makemap(text.encode())
    assert rc == 0, stderr
    entries = parse_aliases(text, smtpd_version=INSTALLED)
    assert our_records(entries) == expected
    ours = tmp_path / "aliases.db"
    ours.write_bytes(build_aliases_db(entries))
    assert db_dump_records(ours) == expected


@pytest.mark.parametrize("target", ["/x@y", "|x@y", "x@y", "u" * 255, ":include:/x@y", '"|a b"'])
@SYNTAXES
def test_fast_path_fails_a_long_bad_line_quickly(target, syntax):
    # a target two alternatives of the expression matched whole made this take 2**n steps (n=24: ~9 s)
    text = "a: " + ", ".join([target] * 24) + " bad\n"
    start = time.perf_counter()
    assert _simple(text, syntax) is None
    assert time.perf_counter() - start < 1
    assert _simple(text.replace(" bad", ""), syntax) is not None


# ------------------------------------------------------------------ per-version CLI and makemap path

# The other side of 7.5's change from the installed smtpd: its rules differ from the installed makemap's.
OTHER = "7.6" if INSTALLED < aliases.TABLE_LINE_SYNTAX else "7.4"


@pytest.mark.parametrize(
    ("version", "code", "line"),
    [("7.4", 0, "aliases: 1 aliases, OK"),
     ("7.6", 2, "mailsetup: error: {path}:2: invalid entry: the destination is not a user, address, /file, "
                "|command, :include:/file or error:NNN text (OpenSMTPD 7.5 and later have no comments after "
                "an entry: '#' is only a comment first on a line)")],
)
def test_aliases_command_checks_with_the_given_versions_rules(tmp_path, version, code, line):
    source = tmp_path / "aliases"
    source.write_text("# the team\nteam: alice # and more soon\n")
    r = run_cli("aliases", "--check", "--smtpd-version", version, source)
    assert r.code == code, r.err
    assert (r.out.strip() if code == 0 else r.err.strip()) == line.format(path=source).replace(
        "aliases: 1", f"{source}: 1")


# Hides dbm.ndbm from the mailsetup process it is put in front of, as on a Python built without it.
_NO_NDBM = "import sys\nfor m in ('dbm.ndbm', 'bsddb3', 'berkeleydb'):\n    sys.modules[m] = None\n"


@needs_makemap
def test_aliases_command_without_dbm_builds_with_makemap(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_NO_NDBM)
    source = tmp_path / "aliases"
    text = ACCEPTED["many-kinds"].decode() + "Root: alice\nteam: alice, bob   \n"
    source.write_text(text)
    r = run_cli("aliases", source, env={"PYTHONPATH": str(hide)})
    assert r.code == 0, r.err
    assert "using makemap" in r.err
    assert db_dump_records(tmp_path / "aliases.db") == our_records(parse_aliases(text, smtpd_version=INSTALLED))


@needs_makemap
def test_makemap_path_refuses_a_file_the_installed_makemap_reads_otherwise(tmp_path):
    # trailing blanks: 7.4 keeps them in the value, 7.5+ trims them -- both accept the file
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_NO_NDBM)
    source = tmp_path / "aliases"
    source.write_text("root: alice   \n")
    r = run_cli("aliases", "--smtpd-version", OTHER, source, env={"PYTHONPATH": str(hide)})
    assert r.code == 2
    errors = [line for line in r.err_lines if line.startswith("mailsetup: error:")]
    assert errors == ["mailsetup: error: the installed makemap reads the aliases differently from the target "
                      "smtpd version (OpenSMTPD 7.5 changed the aliases syntax)"]
    assert not (tmp_path / "aliases.db").exists()


# ------------------------------------------------------------- the streamed Berkeley DB writer


def _many_aliases(n: int) -> str:
    head = "postmaster: root\nabuse: root\nroot: alice\n# generated\n\n"
    return head + "".join(f"user{i:06d}: u{i % 97}, x{i}@example.net, /var/mail/archive/{i}\n" for i in range(n))


@needs_makemap
@pytest.mark.skipif(not HAS_BDB, reason="no Berkeley DB binding (python3-bsddb3) here")
def test_the_aliases_command_streams_a_big_file_into_makemaps_records_at_makemaps_size(tmp_path):
    source = tmp_path / "aliases"
    source.write_text(_many_aliases(50_000))
    r = run_cli("aliases", source)
    assert r.code == 0, r.err
    assert r.out.strip() == f"wrote {tmp_path / 'aliases.db'}: 50003 aliases"
    theirs = tmp_path / "theirs.db"
    subprocess.run([MAKEMAP, "-t", "aliases", "-o", str(theirs), str(source)], check=True)
    assert db_dump_records(tmp_path / "aliases.db") == db_dump_records(theirs)
    ours_size, their_size = (tmp_path / "aliases.db").stat().st_size, theirs.stat().st_size
    assert abs(ours_size - their_size) <= their_size // 10, (ours_size, their_size)
    assert (tmp_path / "aliases.db").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(not HAS_BDB, reason="no Berkeley DB binding (python3-bsddb3) here")
def test_a_rebuild_keeps_the_old_database_as_a_backup_and_leaves_no_temporary_file(tmp_path):
    source = tmp_path / "aliases"
    source.write_text("postmaster: root\nabuse: root\nroot: alice\n")
    assert run_cli("aliases", source).code == 0
    before = (tmp_path / "aliases.db").read_bytes()
    source.write_text("postmaster: root\nabuse: root\nroot: bob\n")
    assert run_cli("aliases", source).code == 0
    [backup] = tmp_path.glob("aliases.db.*.bak")
    assert backup.read_bytes() == before
    assert read_aliases_db(tmp_path / "aliases.db")["root"] == "bob"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aliases", "aliases.db", backup.name]


@pytest.mark.skipif(not HAS_BDB, reason="no Berkeley DB binding (python3-bsddb3) here")
def test_a_duplicate_in_a_streamed_file_names_both_lines_and_changes_nothing(tmp_path):
    source = tmp_path / "aliases"
    source.write_text("postmaster: root\nabuse: root\nroot: alice\n")
    assert run_cli("aliases", source).code == 0
    before = (tmp_path / "aliases.db").read_bytes()
    source.write_text(_many_aliases(3000) + "User000007: someone\n")
    r = run_cli("aliases", source)
    assert r.code == 2
    assert r.err_lines[-1] == (f"mailsetup: error: {source}:3006: duplicate entry: the same name as line 13 "
                               "(names are compared case-insensitively)")
    assert (tmp_path / "aliases.db").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aliases", "aliases.db"]  # no temporary file left


@needs_makemap
@pytest.mark.skipif(not HAS_BDB, reason="no Berkeley DB binding (python3-bsddb3) here")
def test_a_file_the_plain_patterns_do_not_cover_takes_the_exact_parser_and_still_matches_makemap(tmp_path):
    source = tmp_path / "aliases"
    # 7.4: a continuation line; 7.5 and later: a name in brackets (each is the exact parser's alone)
    text = ("postmaster: root\nabuse: root\nroot: alice,\\\n  bob\n" if INSTALLED < aliases.TABLE_LINE_SYNTAX
            else "postmaster: root\nabuse: root\n[root]: alice\nroot: bob\n")
    source.write_text(text)
    r = run_cli("aliases", source)
    rc, _err, expected = run_makemap(text.encode())
    assert r.code == 0 and rc == 0, r.err
    assert db_dump_records(tmp_path / "aliases.db") == expected


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_lines_cut_across_blocks_anywhere_come_out_whole(size):
    text = _many_aliases(200).encode() + b"last: final, entry@example.org"  # no newline at the end
    blocks = [text[i:i + size] for i in range(0, len(text), size)]
    rows = [r for keys, values in aliases._plain_rows(blocks, (7, 4)) for r in zip(keys, values, strict=True)]
    whole = [r for keys, values in aliases._plain_rows([text], (7, 4)) for r in zip(keys, values, strict=True)]
    expected = [(e.name.encode() + b"\0", e.value.encode() + b"\0") for e in parse_aliases(text.decode())]
    assert rows == whole == expected


@pytest.mark.skipif(not HAS_BDB, reason="no Berkeley DB binding (python3-bsddb3) here")
def test_a_berkeley_db_refusal_is_an_os_error_naming_the_file_not_the_librarys_own_exception(tmp_path):
    where = str(tmp_path / "no-such-folder" / "aliases.db")
    with pytest.raises(OSError) as err:
        aliases.BdbWriter(aliases._bsddb(), where, 10)
    assert err.value.filename == where
