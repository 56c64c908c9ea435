"""aliases(5): parse exactly as the target OpenSMTPD's `makemap -t aliases` does (7.4's rules, or
7.5's and later, which differ), then write the aliases.db (Berkeley DB hash via dbm.ndbm, or the real
makemap), read one back, or render a `file:` table instead.
"""

# Behaviour mirrored from OpenSMTPD 7.4.0p1 (Debian 12's bookworm-backports), read in its makemap.c,
# openbsd-compat/fparseln.c, to.c (text_to_expandnode), expand.c (expand_line), table_db.c and
# table_static.c, and checked byte for byte against the real makemap in tests/test_aliases.py.
# OpenSMTPD >= 7.5 replaced fparseln with parse_table_line (smtpd's util.c; makemap.c parse_map): no
# continuation lines, no inline comments, no backslash escapes, blanks trimmed at both ends of a line,
# and only ONE separator (' ', tab or ':') skipped after the name, then blanks and tabs; a name that
# starts with '[' runs to the first ']'. The same file may mean something else there, or be refused:
# parse_aliases takes the target version. Checked against 7.6.0p1's makemap (Debian 13) in
# tests/test_aliases.py, which runs on both Debian 12 and Debian 13 roots.
#
# Lookup semantics (aliases.c aliases_get, table.c table_lookup): the recipient's local part is
# lower-cased (ASCII only), looked up as-is, then, if it holds the subaddress delimiter '+', cut at the
# first '+' and looked up again. Keys are stored and looked up with a trailing NUL. See lookup().

from __future__ import annotations

import functools
import gc
import operator
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from itertools import compress, repeat
from pathlib import Path
from typing import NamedTuple

from mailsetup.errors import MailsetupError

ALIASES_MODE = 0o644
RFC2142_NAMES = ("postmaster", "abuse")

# C isspace() in the "C" locale: smtpd never calls setlocale, so Unicode spaces are ordinary bytes.
_C_SPACE = b" \t\n\v\f\r"
_ASCII_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_USERNAME_EXTRA = frozenset(b"_.-+")
_ADDRESS_USER_EXTRA = frozenset(b"!#$%*/?|^{}`~&'+-=_.")
_ADDRESS_DOMAIN_EXTRA = frozenset(b"-.")
_USERNAME_BYTES = bytes(sorted(_ASCII_ALNUM | _USERNAME_EXTRA))
_ADDRESS_USER_BYTES = bytes(sorted(_ASCII_ALNUM | _ADDRESS_USER_EXTRA))
_ADDRESS_DOMAIN_BYTES = bytes(sorted(_ASCII_ALNUM | _ADDRESS_DOMAIN_EXTRA))
# smtpd's fixed buffers: struct expandnode's u.user (SMTPD_MAXLOCALPARTSIZE) and u.buffer
# (EXPAND_BUFFER); expand_line copies the whole value into a LINE_MAX buffer (2048 on Linux).
_USER_BUF = 256
_EXPAND_BUF = 1024
_LINE_MAX = 2048
# BDB hash metadata page: magic 0x061561 at byte offset 12, in the writer's byte order.
_HASH_MAGIC = (b"\x61\x15\x06\x00", b"\x00\x06\x15\x61")


class DbmUnavailable(MailsetupError):
    """No way to write a Berkeley DB file here (no Berkeley-DB `dbm.ndbm`, or no `makemap`)."""


class AliasEntry(NamedTuple):  # not a dataclass: `mailsetup aliases` starts without loading dataclasses
    """One alias as makemap stores it: `name` is the key (ASCII lower-cased), `value` the text after
    the colon exactly as stored (trailing blanks kept), both without the NUL the db adds; `line` is
    the source line the entry starts on."""

    name: str
    value: str
    line: int

    @property
    def targets(self) -> tuple[str, ...]:
        """The value cut into destinations the way smtpd's expand_line does at delivery time.

        Unlike makemap's check (a plain split on ','), smtpd honours backslash escapes and quotes,
        drops empty pieces, and keeps the quote characters. Empty when smtpd cannot expand the value
        at all; `expansion_problem` then says why.
        """
        pieces, _problem = _expand_like_smtpd(self.value.encode())
        return tuple(p.decode() for p in pieces)

    @property
    def expansion_problem(self) -> str | None:
        """Why smtpd would fail to expand this value at delivery (a temporary failure), or None."""
        return _expand_like_smtpd(self.value.encode())[1]


# --------------------------------------------------------------------------------------- parsing


def _ascii_lower(data: bytes) -> bytes:
    # tolower() in the C locale: only A-Z change, so "É" stays "É" as in the real db.
    return data.translate(_LOWER_TABLE)


_LOWER_TABLE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
# makemap cuts the name at the first blank or ':'
_NAME_END = re.compile(rb"[ \t:]")


def _is_escaped(segment: bytes, index: int) -> bool:
    """fparseln's rule: a character is escaped when an odd number of backslashes precede it."""
    count = 0
    while index - count - 1 >= 0 and segment[index - count - 1] == 0x5C:
        count += 1
    return count % 2 == 1


def _unescape_comments(buf: bytes) -> bytes:
    """FPARSELN_UNESCCOMM: drop the backslash of an escaped '#', keep every other escape pair."""
    if b"\\" not in buf:
        return buf
    out = bytearray()
    i = 0
    while i < len(buf):
        if buf[i] != 0x5C:
            out.append(buf[i])
            i += 1
            continue
        if i + 1 >= len(buf):
            break  # fparseln drops a lone trailing backslash (only reachable before a NUL)
        if buf[i + 1] != 0x23:
            out.append(buf[i])
        out.append(buf[i + 1])
        i += 2
    return bytes(out)


def _logical_lines(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """Yield (first line, makemap's line number, logical line) as fparseln(3) assembles them.

    makemap reports the number of physical lines read so far, i.e. the entry's LAST line, and one
    past the end of the file when a continuation runs into EOF.
    """
    physical = data.split(b"\n")
    if physical[-1] == b"":
        physical.pop()
    count = len(physical)
    index = 0
    while index < count:
        first: int | None = None
        buf: bytes | None = None
        lineno = index
        more = True
        while more:
            more = False
            lineno += 1
            if index >= count:
                break
            segment = physical[index]
            index += 1
            pos = segment.find(b"#")
            while pos >= 0 and _is_escaped(segment, pos):
                pos = segment.find(b"#", pos + 1)
            if pos >= 0:
                segment = segment[:pos]
                # a comment-only line with nothing pending is skipped like a blank one
                more = segment == b"" and buf is None
            if segment.endswith(b"\\") and not _is_escaped(segment, len(segment) - 1):
                segment = segment[:-1]
                more = True
            if segment == b"" and buf is not None:
                continue
            if first is None and segment.strip(_C_SPACE):
                first = index  # where the name is, for people; makemap itself names the last line
            buf = (buf or b"") + segment
        # the rest is handled as a C string: everything after a NUL byte is invisible
        yield first or min(lineno, count), lineno, _unescape_comments((buf or b"").split(b"\0", 1)[0])


def _is_filename(s: bytes) -> bool:
    return s[:1] == b"/" and len(s) < _EXPAND_BUF


def _is_error(s: bytes) -> bool:
    low = _ascii_lower(s[:7])
    if low == b":error:":
        rest = s[7:]
    elif low[:6] == b"error:":
        rest = s[6:]
    else:
        return False
    if len(rest) >= _EXPAND_BUF or len(rest) < 5:
        return False
    # [45][0-9]{2} [a-zA-Z0-9].*
    return (
        rest[0] in b"45"
        and rest[1] in b"0123456789"
        and rest[2] in b"0123456789"
        and rest[3] == 0x20
        and rest[4] in _ASCII_ALNUM
    )


def _is_include(s: bytes) -> bool:
    low = _ascii_lower(s[:9])
    if low == b":include:":
        return _is_filename(s[9:])
    if low[:8] == b"include:":
        return _is_filename(s[8:])
    return False


def _is_filter(s: bytes) -> bool:
    quoted = s[:1] == b'"'
    start = 1 if quoted else 0
    if s[start : start + 1] != b"|":
        return False
    command = s[start + 1 :]
    if len(command) >= _EXPAND_BUF:
        return False
    return not quoted or command.endswith(b'"')


def _address_split(s: bytes) -> int | None:
    """Index of the '@' that alias_is_address would cut at, or None when it never gets that far."""
    at = s.find(b"@")
    if len(s) < 3 or at <= 0 or at == len(s) - 1:
        return None
    return at


def _is_address(s: bytes) -> bool:
    at = _address_split(s)
    if at is None:
        return False
    # translate(None, allowed) deletes every allowed byte: nothing left means all were allowed
    return not s[:at].translate(None, _ADDRESS_USER_BYTES) and not s[at + 1 :].translate(None, _ADDRESS_DOMAIN_BYTES)


def _is_username(s: bytes) -> bool:
    return len(s) < _USER_BUF and not s.translate(None, _USERNAME_BYTES)


def target_kind(target: str | bytes) -> str | None:
    """What smtpd makes of one stripped destination: "error", "include", "filter", "filename",
    "address", "username" — or None when it is invalid. Same order of tests as text_to_expandnode.

    Quirk kept on purpose: alias_is_address cuts its input at the '@' before checking the domain, so
    when the domain is invalid (`bob@[192.0.2.1]`, `bob@bad_host`) the username test sees only `bob`
    and the destination silently becomes the local user `bob`.
    """
    s = target.encode() if isinstance(target, str) else target
    if _is_error(s):
        return "error"
    if _is_include(s):
        return "include"
    if _is_filter(s):
        return "filter"
    if _is_filename(s):
        return "filename"
    if _is_address(s):
        return "address"
    at = _address_split(s)
    if _is_username(s if at is None else s[:at]):
        return "username"
    return None


def split_value(value: str) -> tuple[tuple[str, ...], str | None]:
    """An alias value cut into destinations as smtpd does at delivery, and why it cannot be, if so."""
    pieces, problem = _expand_like_smtpd(value.encode())
    return tuple(p.decode() for p in pieces), problem


def _makemap_accepts_value(value: bytes) -> bool:
    """makemap's make_aliases: a plain split on ',' where every stripped piece is a valid node."""
    for piece in value.split(b","):
        piece = piece.strip(_C_SPACE)
        if not piece or target_kind(piece) is None:
            return False
    return True


def _expand_like_smtpd(value: bytes) -> tuple[list[bytes], str | None]:
    """expand.c expand_line/expand_line_split: what smtpd does with a stored value at delivery."""
    if len(value) >= _LINE_MAX:
        return [], f"the value is {len(value)} bytes; smtpd cannot expand {_LINE_MAX} bytes or more"
    pieces: list[bytes] = []
    current = bytearray()
    escaped = dquote = squote = False
    for byte in value:
        if escaped:
            current.append(byte)
            escaped = False
            continue
        if byte == 0x5C:
            escaped = True
            continue
        if byte == 0x2C and not dquote and not squote:
            pieces.append(bytes(current))
            current.clear()
            continue
        current.append(byte)
        if byte == 0x22 and not squote:
            dquote = not dquote
        if byte == 0x27 and not dquote:
            squote = not squote
    if escaped or dquote or squote:
        return [], "an unbalanced quote or trailing backslash makes smtpd refuse the whole value"
    if current:
        pieces.append(bytes(current))
    targets = [p.strip(_C_SPACE) for p in pieces]
    targets = [t for t in targets if t]
    for target in targets:
        if target_kind(target) is None:
            return [], f"smtpd cannot use destination {targets.index(target) + 1} of {len(targets)}"
    return targets, None


# The first OpenSMTPD whose makemap reads tables with parse_table_line instead of fparseln.
TABLE_LINE_SYNTAX = (7, 5)
# What parse_aliases follows when no version is given: Debian 12's bookworm-backports OpenSMTPD.
DEFAULT_SYNTAX = (7, 4)


def _pick(smtpd_version: tuple[int, ...]):
    """(fast-path pattern, exact parser) for the makemap of that version."""
    if tuple(smtpd_version[:2]) >= TABLE_LINE_SYNTAX:
        return _simple_line(True), _parse_bytes_75
    return _simple_line(False), _parse_bytes


def parse_aliases(
    text: str, source: str = "aliases", smtpd_version: tuple[int, ...] = DEFAULT_SYNTAX
) -> list[AliasEntry]:
    """Parse aliases(5) text as that smtpd version's `makemap -t aliases` does; refuse what it refuses,
    naming source:LINE."""
    data = _encode_checked(text, source)
    pattern, exact = _pick(smtpd_version)
    with _gc_paused():
        entries = _parse_simple(text, pattern)
        return entries if entries is not None else exact(data, source)


def _encode_checked(text: str, source: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        raise MailsetupError(f"{source}:{line}: holds a character that cannot be written as UTF-8") from None


def _parse_bytes(data: bytes, source: str) -> list[AliasEntry]:
    entries: list[AliasEntry] = []
    seen: dict[bytes, int] = {}
    total_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    for first, lineno, logical in _logical_lines(data):
        # makemap counts one line past EOF when a backslash continues into nothing; point at a real one
        shown_line = min(lineno, max(total_lines, 1))
        where = f"{source}:{shown_line}"
        started = f" (entry starts on line {first})" if first != shown_line else ""
        rest = logical.lstrip(_C_SPACE)
        if not rest:
            continue
        found = _NAME_END.search(rest)
        if found is None:
            raise MailsetupError(f"{where}: invalid entry{started}: expected 'name: destination, ...'")
        cut = found.start()
        key = _ascii_lower(rest[:cut])
        value = rest[cut + 1 :].lstrip(b":" + _C_SPACE)
        if not value:
            raise MailsetupError(f"{where}: invalid entry{started}: nothing after the name")
        if key in seen:
            raise MailsetupError(
                f"{where}: duplicate entry{started}: the same name as line {seen[key]} "
                "(names are compared case-insensitively)"
            )
        if not _makemap_accepts_value(value):
            complaint = _value_complaint(value)
            if rest[cut] != 0x3A and b":" in value:
                # "first last: x" is read as name "first" with destination "last: x"
                complaint += " (a name ends at the first blank; it cannot contain blanks)"
            raise MailsetupError(f"{where}: invalid entry{started}: {complaint}")
        seen[key] = first
        entries.append(AliasEntry(name=key.decode(), value=value.decode(), line=first))
    return entries


def _parse_bytes_75(data: bytes, source: str) -> list[AliasEntry]:
    """OpenSMTPD >= 7.5: parse_table_line then add_mapentry, one physical line at a time."""
    entries: list[AliasEntry] = []
    seen: dict[bytes, int] = {}
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # getline: a final '\n' ends the last line, it does not start one
    for lineno, line in enumerate(lines, 1):
        rest = line.lstrip(_C_SPACE)
        if not rest or rest[0] == 0 or rest[0] == 0x23:
            continue  # blank (a NUL ends the C string), or a comment: '#' first, nowhere else
        # trailing blanks are trimmed from the end of the whole line, before the C string ends at a NUL
        rest = rest.rstrip(_C_SPACE).split(b"\0", 1)[0]
        where = f"{source}:{lineno}"
        if rest[0] == 0x5B:
            cut = rest.find(b"]")
            if cut < 0:
                raise MailsetupError(f"{where}: invalid entry: a name that starts with '[' needs its ']'")
            cut += 1
        else:
            found = _NAME_END.search(rest)
            cut = found.start() if found else len(rest)
        # one separator byte (whatever follows a ']'), then blanks and tabs only
        value = rest[cut + 1 :].lstrip(b" \t")
        if not value:
            raise MailsetupError(f"{where}: invalid entry: nothing after the name")
        key = _ascii_lower(rest[:cut])
        if key in seen:
            raise MailsetupError(
                f"{where}: duplicate entry: the same name as line {seen[key]} "
                "(names are compared case-insensitively)"
            )
        if not _makemap_accepts_value(value):
            raise MailsetupError(f"{where}: invalid entry: {_value_complaint(value)}{_hint_75(rest, cut, value)}")
        seen[key] = lineno
        entries.append(AliasEntry(name=key.decode(), value=value.decode(), line=lineno))
    return entries


def _hint_75(rest: bytes, cut: int, value: bytes) -> str:
    """Why a line older OpenSMTPD accepted may be refused by 7.5 and later (never quoting the file)."""
    if b"#" in value:
        return " (OpenSMTPD 7.5 and later have no comments after an entry: '#' is only a comment first on a line)"
    if value.endswith((b",", b"\\")):
        return " (OpenSMTPD 7.5 and later do not continue an entry on the next line)"
    if value[:1] == b":" or (cut < len(rest) and rest[cut] != 0x3A and b":" in value):
        return " (a name ends at the first blank or ':', and only one separator is skipped after it)"
    return ""


# ------------------------------------------------------------------------------ fast path
#
# Most aliases files hold only lines of one plain shape: `name: target, target` with each target a
# user, an address, a /file, an [:]include:/file or a "|command" without quotes or commas inside. For
# them fparseln does nothing but cut a '#' comment, and makemap's checks reduce to one regular
# expression per line, run over the whole text in C. The expression accepts a strict subset of what
# the exact parser accepts, and yields the same name and value; a file with any line it does not
# cover (and any duplicate name) goes through the exact parser in full, so what is refused, and the
# message, never depend on this path. tests/test_aliases.py checks both paths agree.


def _class_of(allowed: bytes, exclude: str = "") -> str:
    """A regex character class of the ASCII bytes in `allowed`, minus those in `exclude`."""
    return "[" + "".join(re.escape(chr(c)) for c in sorted(allowed) if chr(c) not in exclude) + "]"


def _ascii_class(exclude: str) -> str:
    """A regex class of the printable ASCII characters (space excluded) minus `exclude`."""
    return _class_of(bytes(range(0x21, 0x7F)), exclude)


_PATH_CHAR = _ascii_class('",#\\')  # no blank, quote, comma, comment or escape
_COMMAND_CHAR = _PATH_CHAR[:-1] + " ]"  # the same and a space, inside "|..."
_USER_CLASS = _class_of(_USERNAME_BYTES)
_ADDRESS_USER_CLASS = _class_of(_ADDRESS_USER_BYTES, exclude="#")
# an address may not start with '/' or '|' here, which /file and |command take: a target that two
# alternatives match whole would make a failing line backtrack exponentially in its targets
_ADDRESS_FIRST_CLASS = _class_of(_ADDRESS_USER_BYTES, exclude="#/|")
_ADDRESS_DOMAIN_CLASS = _class_of(_ADDRESS_DOMAIN_BYTES)
# Each alternative is a piece target_kind accepts, whole: all ASCII, so that a length in characters
# is a length in bytes, and none holds a blank at either end, a ',', '#', '\' or newline. No piece
# is matched whole by two alternatives, or in two ways by one.
_SIMPLE_TARGET = "|".join(
    (
        f"{_ADDRESS_FIRST_CLASS}{_ADDRESS_USER_CLASS}*@{_ADDRESS_DOMAIN_CLASS}+",  # address (one '@')
        f"{_USER_CLASS}{{1,{_USER_BUF - 1}}}",  # username
        f"/{_PATH_CHAR}{{0,{_EXPAND_BUF - 2}}}",  # /file
        f":?(?i:include):/{_PATH_CHAR}{{0,{_EXPAND_BUF - 2}}}",  # [:]include:/file
        f'"\\|{_COMMAND_CHAR}{{0,{_EXPAND_BUF - 2}}}"',  # "|command"
        f"\\|{_PATH_CHAR}{{0,{_EXPAND_BUF - 1}}}",  # |command
    )
)
# One physical line, found after the '\n' that ends the previous one (the text is given a leading and
# a trailing '\n'): either blank/comment (both groups empty) or `name SEP value [# comment]`. The name
# ends at the first blank or ':' (makemap's cut); the separator runs until a character makemap's
# lstrip(": \t...") keeps, where the value starts; the value keeps its trailing blanks, as stored.
# No possessive quantifiers: Python 3.11.2's re mis-matches `(?:,[ ]*+x)*+` on "," (CPython bug).
_SIMPLE_LINE_TEXT = (
    r"\n(?:[ \t]*([^\s:#]+)[ \t:]+(?![ \t:])"
    rf"((?:{_SIMPLE_TARGET})(?:[ \t]*,[ \t]*(?:{_SIMPLE_TARGET}))*[ \t\r\f\v]*)(?:#[^\n]*)?"
    r"|[ \t\r\f\v]*(?:#[^\n]*)?)(?=\n)"
)


# The same for OpenSMTPD >= 7.5: one separator byte then blanks and tabs, no comment after an entry,
# trailing blanks trimmed (outside the value group); a name starting with '[' goes the exact way.
_SIMPLE_LINE_75_TEXT = (
    r"\n(?:[ \t]*([^\s:#\[]+)[ \t:][ \t]*"
    rf"((?:{_SIMPLE_TARGET})(?:[ \t]*,[ \t]*(?:{_SIMPLE_TARGET}))*)[ \t\r\f\v]*"
    r"|[ \t\r\f\v]*(?:#[^\n]*)?)(?=\n)"
)


@functools.cache
def _simple_line(v75: bool, as_bytes: bool = False) -> re.Pattern:
    """The plain-line pattern of that grammar, compiled on first use (each costs ~2 ms; a command
    needs one of the four)."""
    text = _SIMPLE_LINE_75_TEXT if v75 else _SIMPLE_LINE_TEXT
    return re.compile(text.encode() if as_bytes else text, re.ASCII)


def _parse_simple(text: str, pattern: re.Pattern[str] | None = None) -> list[AliasEntry] | None:
    """The entries, when every line of `text` is blank, a comment or a plain entry and no name repeats;
    else None (then only the exact parser may answer)."""
    if "\\" in text or "\0" in text:
        return None  # escapes, continuation lines and NUL cuts are the exact parser's
    padded = "\n" + text + ("\n" if text and not text.endswith("\n") else "")
    rows = (pattern or _simple_line(False)).findall(padded)
    if len(rows) != padded.count("\n") - 1:
        return None  # some line is not of the plain shape
    del padded
    if not rows:
        return []
    names, values = zip(*rows, strict=True)
    keep = list(map(bool, names))  # blank and comment lines have an empty name
    lines = list(compress(range(1, len(rows) + 1), keep))
    names, values = list(compress(names, keep)), list(compress(values, keep))
    del rows, keep
    if not names:
        return []
    joined = "\n".join(names)  # a name never holds a newline
    keys = (joined.lower() if joined.isascii() else joined.encode().translate(_LOWER_TABLE).decode()).split("\n")
    del joined, names
    if len(set(keys)) != len(keys):
        return None  # a duplicate: the exact parser names both lines
    return list(map(AliasEntry, keys, values, lines))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a million acyclic objects are made: collections would only rescan them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _value_complaint(value: bytes) -> str:
    # Which destination and why, never its text: the file may not be an aliases file at all (a
    # credentials table, a shadow file), and an error message must not carry its secrets.
    pieces = value.split(b",")
    for number, piece in enumerate(pieces, 1):
        piece = piece.strip(_C_SPACE)
        if not piece:
            return "empty destination (two commas, or a comma at the start or end)"
        if target_kind(piece) is None:
            which = f"destination {number} of {len(pieces)}" if len(pieces) > 1 else "the destination"
            return f"{which} is not a user, address, /file, |command, :include:/file or error:NNN text"
    return "invalid destination"  # not reached: only called for values makemap refuses


def _read(path: Path, what: str) -> bytes:
    """The file's bytes, or one line saying why not (as root: read as whoever controls the path)."""
    from mailsetup.files import read_input

    with _reading(path, what):
        return read_input(path)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """An input's OSError as one line naming it (missing, a directory, unreadable)."""
    try:
        yield
    except FileNotFoundError:
        raise MailsetupError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise MailsetupError(f"{path}: is a directory, not an {what}") from None
    except OSError as exc:
        raise MailsetupError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_aliases_file(path: Path, smtpd_version: tuple[int, ...] = DEFAULT_SYNTAX) -> list[AliasEntry]:
    """Read and parse an aliases file as that smtpd version's makemap does; any problem (missing,
    unreadable, not UTF-8) is one line."""
    path = Path(path)
    data = _read(path, "aliases file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MailsetupError(f"{path}:{line}: not valid UTF-8 (column {column}); save the file as UTF-8") from None
    del data  # the text is all the fast path needs; the exact path re-encodes it
    pattern, exact = _pick(smtpd_version)
    with _gc_paused():
        entries = _parse_simple(text, pattern)
        return entries if entries is not None else exact(text.encode(), str(path))


# ------------------------------------------------------------------------------------- checks


def lookup(mapping: Mapping[str, str], localpart: str) -> str | None:
    """The stored value smtpd's aliases_get would find for a recipient's local part, or None."""
    key = _ascii_lower(localpart.encode()).decode()
    if key in mapping:
        return mapping[key]
    if "+" in key:
        return mapping.get(key.split("+", 1)[0])
    return None


def missing_rfc2142(entries: Iterable[AliasEntry], local_users: Iterable[str] = frozenset()) -> list[str]:
    """RFC 2142 mailbox names (postmaster, abuse) that are neither an alias nor a local user."""
    names = {e.name for e in entries}
    users = {_ascii_lower(u.encode()).decode() for u in local_users}
    return [n for n in RFC2142_NAMES if n not in names and n not in users]


# ------------------------------------------------------------------------------------ database


# Measured on 1,000,000 records (benchmarks/aliases.py, docs/benchmarks.md): 16 MiB took 12.2 s, 32 MiB
# 6.6-7.8 s, 48 MiB 6.8-7.1 s. 32 MiB it is: the source is streamed, so the peak stays well under 100 MiB.
BDB_CACHE = 32 << 20
DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")


@functools.cache
def _bsddb():
    """A maintained Berkeley DB binding's `db` module (PyPI's berkeleydb, or bsddb3: Debian's
    python3-bsddb3, found in Debian's own dist-packages when this venv cannot import it), over the
    libdb smtpd reads with; None when there is none."""
    import importlib

    for name in ("berkeleydb", "bsddb3"):
        try:
            return importlib.import_module(f"{name}.db")
        except ImportError:
            continue
    return _debian_bsddb3()


def _debian_bsddb3():
    """Debian's bsddb3 package for this very interpreter (a venv made from /usr/bin/python3 has the
    same ABI), loaded from dist-packages by itself: nothing else of that folder joins sys.path.
    Only from a folder root owns that no one else may write to."""
    import importlib.machinery
    import importlib.util
    import sys

    if "bsddb3" in sys.modules and sys.modules["bsddb3"] is None:
        return None  # blocked on purpose (the import system's convention)
    if not _root_only(DEBIAN_DIST_PACKAGES / "bsddb3"):
        return None
    spec = importlib.machinery.PathFinder.find_spec("bsddb3", [str(DEBIAN_DIST_PACKAGES)])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bsddb3"] = module
    try:
        spec.loader.exec_module(module)
        return importlib.import_module("bsddb3.db")
    except Exception:  # another Python's build, a broken install: as if absent
        for key in [k for k in sys.modules if k == "bsddb3" or k.startswith("bsddb3.")]:
            del sys.modules[key]
        return None


def _root_only(package: Path) -> bool:
    """Whether only root could have put the code under `package` there: no other user controls its
    path, and every file and folder in it is root's and writable by root alone."""
    from mailsetup.files import _controllers

    try:
        if _controllers(package):
            return False
        for place in [package, *package.rglob("*")]:
            st = place.lstat()
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


class BdbWriter:
    """A Berkeley DB hash as makemap writes one (records `name\\0` -> `value\\0`, the library's own
    fill factor), pre-sized for `expected` records, with a BDB_CACHE cache; a name already stored is
    a DuplicateName (DB_NOOVERWRITE), never a silent overwrite. The library's own errors (a full
    disk, a refused open) come out as OSError naming `path`, as every other write's do."""

    def __init__(self, bdb, path: str, expected: int, mode: int = ALIASES_MODE):
        self.bdb, self.path, self.count = bdb, path, 0
        self.db = bdb.DB()
        try:
            self.db.set_h_nelem(min(max(expected, 1), 1 << 30))
            self.db.set_cachesize(0, BDB_CACHE, 1)
            self.db.open(path, dbtype=bdb.DB_HASH, flags=bdb.DB_CREATE | bdb.DB_EXCL, mode=mode)
        except bdb.DBError as exc:
            self.db.close()
            raise self._os_error(exc) from None

    def _os_error(self, exc: Exception) -> OSError:
        code, text = (exc.args + (0, ""))[:2] if exc.args else (0, "")
        return OSError(code if isinstance(code, int) and code > 0 else 0, str(text) or "Berkeley DB refused",
                       self.path)

    def put_all(self, keys: Iterable[bytes], values: Iterable[bytes]) -> None:
        bdb = self.bdb
        put, flag, exists = self.db.put, bdb.DB_NOOVERWRITE, bdb.DBKeyExistError
        try:
            for key, value in zip(keys, values, strict=True):
                try:
                    put(key, value, None, flag)
                except exists:
                    raise DuplicateName(key) from None
                self.count += 1
        except bdb.DBError as exc:
            raise self._os_error(exc) from None

    def has(self, key: bytes) -> bool:
        return self.db.get(key) is not None

    def close(self) -> None:
        try:
            self.db.close()
        except self.bdb.DBError as exc:
            raise self._os_error(exc) from None


class DuplicateName(Exception):
    """A name stored twice (the exact parser then says which lines)."""


def _ndbm():
    """dbm.ndbm when it writes the Berkeley DB hash files smtpd reads, else None."""
    try:
        import dbm.ndbm as ndbm
    except ImportError:
        return None
    # gdbm-compat or a classic ndbm would write a .dir/.pag pair that smtpd cannot open
    if getattr(ndbm, "library", "") != "Berkeley DB":
        return None
    return ndbm


def _makemap_path() -> str | None:
    from mailsetup.smtpdversion import find_binary

    return find_binary("makemap")  # PATH's absolute folders, then the sbin ones a non-root PATH lacks


def db_backend() -> str:
    """Which writer is available: "bdb" (a Berkeley DB binding, as makemap writes), "dbm" (Python's
    dbm.ndbm writes the db), "makemap" (the real tool does), or "file" (none; use a `file:` table
    rendered by render_file_table).

    Caveat: "Berkeley DB" names a format family; on an OS where smtpd and Python link different DB
    libraries (e.g. db 1.85 vs 5.x) check the written file with `makemap -U` or `smtpd -n`.
    """
    if _bsddb() is not None:
        return "bdb"
    if _ndbm() is not None:
        return "dbm"
    if _makemap_path() is not None:
        return "makemap"
    return "file"


_NAME_OF = operator.attrgetter("name")
_VALUE_OF = operator.attrgetter("value")


def _write_entries(writer: BdbWriter, entries: list[AliasEntry]) -> None:
    try:
        writer.put_all((e.name.encode() + b"\0" for e in entries), (e.value.encode() + b"\0" for e in entries))
    except DuplicateName:
        seen: set[str] = set()
        line = next(e.line for e in entries if e.name in seen or seen.add(e.name))
        raise MailsetupError(f"aliases:{line}: duplicate entry") from None
    finally:
        writer.close()


def build_aliases_db(entries: Iterable[AliasEntry]) -> bytes:
    """The aliases.db bytes: keys `name\\0`, values `value\\0`, as makemap writes them (through a
    Berkeley DB binding, else dbm.ndbm)."""
    import tempfile

    bdb = _bsddb()
    if bdb is not None:
        entries = entries if isinstance(entries, list) else list(entries)
        with tempfile.TemporaryDirectory(prefix="mailsetup-aliases-") as tmp:
            path = os.path.join(tmp, "aliases.db")
            try:
                _write_entries(BdbWriter(bdb, path, len(entries)), entries)
                return Path(path).read_bytes()
            except OSError as exc:
                raise MailsetupError(f"cannot build aliases.db in {tmp}: {exc.strerror}", exit_code=1) from None
    ndbm = _ndbm()
    if ndbm is None:
        raise DbmUnavailable(
            "this Python's dbm.ndbm is missing or not Berkeley DB, so it cannot write aliases.db",
            hint="run mailsetup with Debian's /usr/bin/python3, or install OpenSMTPD's makemap",
        )
    entries = entries if isinstance(entries, list) else list(entries)
    names = list(map(_NAME_OF, entries))
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for entry in entries:
            if entry.name in seen:
                # a db holds one value per key; silently keeping the last would hide a mistake
                raise MailsetupError(f"aliases:{entry.line}: duplicate entry")
            seen.add(entry.name)
    with tempfile.TemporaryDirectory(prefix="mailsetup-aliases-") as tmp, _gc_paused():
        base = os.path.join(tmp, "aliases")
        db = ndbm.open(base, "n", ALIASES_MODE)
        try:
            # db[name + "\0"] = value + "\0" for each entry, looped in C; ndbm stores a str as its
            # UTF-8 bytes, the same as name.encode() + b"\0"
            keys = map(operator.add, names, repeat("\0"))
            values = map(operator.add, map(_VALUE_OF, entries), repeat("\0"))
            deque(map(db.__setitem__, keys, values), maxlen=0)
        finally:
            db.close()
        del names
        # Berkeley DB's ndbm emulation appends ".db" to the name it is given
        return Path(base + ".db").read_bytes()


_CHUNK = 1 << 20  # lines are matched a MiB at a time: the file is never copied whole


class NotPlain(Exception):
    """A line the plain-shape patterns do not cover (or a repeated name): the exact parser's."""


def _plain_rows(blocks: Iterable[bytes], smtpd_version: tuple[int, ...]) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """(keys, values) as stored (NUL-terminated, names ASCII lower-cased), a block of whole lines at
    a time, from the same patterns as the fast path of parse_aliases, compiled for bytes; NotPlain as
    soon as a line is not of the plain shape, not UTF-8, or holds a backslash or a NUL."""
    pattern = _simple_line(tuple(smtpd_version[:2]) >= TABLE_LINE_SYNTAX, as_bytes=True)
    carry = b""
    for block in blocks:
        buf = carry + block if carry else block
        cut = buf.rfind(b"\n") + 1
        carry = buf[cut:]
        if cut:
            yield _plain_block(buf[:cut] if carry else buf, pattern)
    if carry:
        yield _plain_block(carry + b"\n", pattern)


def _plain_block(lines: bytes, pattern: re.Pattern[bytes]) -> tuple[list[bytes], list[bytes]]:
    if b"\\" in lines or b"\0" in lines:
        raise NotPlain  # escapes, continuation lines and NUL cuts are the exact parser's
    if not lines.isascii():
        try:
            lines.decode("utf-8")
        except UnicodeDecodeError:
            raise NotPlain from None
    padded = b"\n" + lines
    rows = pattern.findall(padded)
    if len(rows) != padded.count(b"\n") - 1:
        raise NotPlain
    named = [row for row in rows if row[0]]
    return [name.lower() + b"\0" for name, _ in named], [value + b"\0" for _, value in named]


def _source_blocks(source: Path) -> Iterator[bytes]:
    """The aliases file a MiB at a time, read as _read reads it (the same errors, one line each)."""
    from mailsetup.files import read_input_blocks

    with _reading(source, "aliases file"):
        yield from read_input_blocks(source)


def write_aliases_db_file(source: Path, out: Path, smtpd_version: tuple[int, ...],
                          keep_backups: int | None) -> tuple[int, list[str]]:
    """`mailsetup aliases SOURCE --out DB` through a Berkeley DB binding, streamed: the source's lines
    go straight into a pre-sized hash built beside `out` (never the whole database in memory), which
    then replaces it atomically, the old one kept as a dated backup. Returns (entries, RFC 2142 names
    missing). NotPlain when the file needs the exact parser (the caller takes the other way, which
    also names any bad line); DbmUnavailable without a binding."""
    from mailsetup.files import INPUT_LIMIT, replace_built

    bdb = _bsddb()
    if bdb is None:
        raise DbmUnavailable("no Berkeley DB binding here")
    source = Path(source)
    try:
        expected = min(source.stat().st_size, INPUT_LIMIT) // 24  # an estimate: a line is rarely shorter
    except OSError:
        expected = 0
    blocks = _source_blocks(source)

    def build(path: str) -> tuple[int, list[str]]:
        writer = BdbWriter(bdb, path, expected, mode=0o600)
        try:
            with closing(blocks):  # the source's descriptor, closed now even when we stop early
                for keys, values in _plain_rows(blocks, smtpd_version):
                    writer.put_all(keys, values)
            missing = [n for n in RFC2142_NAMES if not writer.has(n.encode() + b"\0")]
            return writer.count, missing
        except DuplicateName:
            raise NotPlain from None
        finally:
            writer.close()

    return replace_built(Path(out), build, ALIASES_MODE, keep_backups)


def build_aliases_db_with_makemap(text: str, entries: Iterable[AliasEntry] | None = None) -> bytes:
    """The aliases.db bytes made by the real `makemap -t aliases` from the aliases source text.

    `entries`: what our parser made of the text for the target smtpd; the db must hold exactly that,
    else the installed makemap reads the file by other rules (another version) and it is refused.
    """
    import subprocess
    import tempfile

    makemap = _makemap_path()
    if makemap is None:
        raise DbmUnavailable(
            "makemap is not installed, so aliases.db cannot be built",
            hint="install OpenSMTPD (it provides makemap) or use a file: aliases table",
        )
    data = _encode_checked(text, "aliases")
    with tempfile.TemporaryDirectory(prefix="mailsetup-makemap-") as tmp:
        source = os.path.join(tmp, "aliases")
        Path(source).write_bytes(data)
        os.chmod(source, ALIASES_MODE)  # makemap copies the source's mode onto the db
        result = subprocess.run(
            [makemap, "-t", "aliases", "-o", source + ".db", source],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.strip().replace(tmp + "/", "").replace("makemap: ", "", 1)
            raise MailsetupError(detail or f"makemap failed with exit code {result.returncode}")
        if entries is not None:
            made = _read_with_makemap(Path("aliases.db"), source + ".db")
            if made != {e.name.encode(): e.value.encode() for e in entries}:
                raise MailsetupError(
                    "the installed makemap reads the aliases differently from the target smtpd version "
                    "(OpenSMTPD 7.5 changed the aliases syntax)",
                    hint="pass --smtpd-version with the installed version",
                )
        return Path(source + ".db").read_bytes()


def read_aliases_db(path: Path) -> dict[str, str]:
    """Read an aliases db back: {name: value}, both without their NUL terminators."""
    import tempfile

    path = Path(path)
    data = _read(path, "aliases database")
    if len(data) < 16 or data[12:16] not in _HASH_MAGIC:
        raise MailsetupError(f"{path}: not a Berkeley DB hash file (build it with makemap -t aliases)")
    ndbm = _ndbm()
    with tempfile.TemporaryDirectory(prefix="mailsetup-readdb-") as tmp:
        # a private copy: ndbm insists on a ".db" name, and we never risk touching the live file
        base = os.path.join(tmp, "aliases")
        Path(base + ".db").write_bytes(data)
        if ndbm is not None:
            try:
                db = ndbm.open(base, "r")
            except ndbm.error as exc:
                raise MailsetupError(f"{path}: cannot open as Berkeley DB: {exc}") from None
            try:
                raw = {k: db[k] for k in db.keys()}
            finally:
                db.close()
        else:
            raw = _read_with_makemap(path, base + ".db")
    result: dict[str, str] = {}
    for key, value in raw.items():
        try:
            result[key.removesuffix(b"\0").decode()] = value.removesuffix(b"\0").decode()
        except UnicodeDecodeError:
            raise MailsetupError(f"{path}: an entry is not valid UTF-8 (rebuild it with mailsetup aliases)") from None
    return result


def _read_with_makemap(shown: Path, path: str) -> dict[bytes, bytes]:
    import subprocess

    makemap = _makemap_path()
    if makemap is None:
        raise DbmUnavailable(f"{shown}: neither a Berkeley-DB dbm.ndbm nor makemap is available to read it")
    result = subprocess.run([makemap, "-U", path], capture_output=True, check=False)
    if result.returncode != 0:
        raise MailsetupError(f"{shown}: makemap -U cannot read it")
    # `makemap -U` prints "key<TAB>value"; a key never holds a tab (makemap cuts names there)
    pairs = (line.split(b"\t", 1) for line in result.stdout.split(b"\n") if line)
    return {p[0]: p[1] if len(p) > 1 else b"" for p in pairs}


# ---------------------------------------------------------------------------------- file table


def render_file_table(entries: Iterable[AliasEntry]) -> bytes:
    """The same aliases as a `table aliases file:PATH` that smtpd's table_static reads identically.

    table_static only knows whole-line comments, trims blanks at both ends of a line, and cuts the
    name at the first blank or ':' -- our stored names and values survive that unchanged, except
    trailing blanks of a value, which smtpd strips again when it expands the value anyway.
    """
    lines = [b"# aliases for OpenSMTPD (file: table), generated by mailsetup from the aliases source"]
    for entry in entries:
        name, value = entry.name.encode(), entry.value.encode()
        if name.startswith(b"#"):
            raise MailsetupError(
                f"aliases:{entry.line}: the name starts with '#', which a file: table "
                "reads as a comment",
                hint="rename the alias, or use a db: table",
            )
        lines.append(name + b": " + value)
    return b"\n".join(lines) + b"\n"
