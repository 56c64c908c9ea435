"""`mailsetup import`: an smtpd.conf mailsetup did not write — in OpenSMTPD 6.3's grammar or older
(the tutorial's `pki … certificate`, `queue encryption key`, `accept … deliver to`) or in 6.4's and
later (`action` / `match`) — read into the answers init works from. What the model cannot express is
named, one line each with file:line; an open relay is reported and never carried over.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailsetup.errors import MailsetupError

MAX_WORD = 8000  # smtpd's own lexer refuses a word longer than its 8,096-byte buffer
MAX_FILE = 4 << 20  # a hand-written smtpd.conf is a few KiB
MAX_EXPANDED = 100_000  # words that $macros may add to a file, all told
LOOPBACK = {"localhost", "lo", "lo0", "127.0.0.1", "::1"}
PORT_NAMES = {"smtp": 25, "submission": 587, "smtps": 465}
_SEPARATORS = " \t\r\n#{}=,!\"'"  # smtpd's lexer makes `!` a word of its own: `!from` is `! from`
# Statements smtpd knows that mailsetup does not set (dropped with a note, not refused).
KNOWN = {"admd", "bounce", "bounce-warn", "ca", "expire", "filter", "limit", "mda", "mta", "proc", "srs", "hostname"}


@dataclass
class Word:
    text: str
    line: int
    quoted: bool = False


@dataclass
class Found:
    where: str  # FILE:LINE
    text: str

    def __str__(self) -> str:
        from mailsetup.report import one_line

        # Words of the file are in the text: an escape sequence in them must not reach root's terminal.
        return one_line(f"{self.where}: {self.text}")


class ImportedAnswers(dict):
    """The answers read from a config, and the line each came from: an error names `FILE:LINE: --flag`."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.lines: dict[str, int] = {}

    def set(self, key: str, value, line: int) -> None:
        self[key] = value
        self.lines[key] = line

    def where(self, key: str) -> str:
        from mailsetup.model import flag_of

        line = self.lines.get(key)
        return f"{self.path}:{line}: {flag_of(key)}" if line else f"{self.path}: {flag_of(key)}"


@dataclass
class Imported:
    path: Path
    grammar: str  # "6.4+" or "6.3 and older"
    answers: ImportedAnswers
    understood: list[Found] = field(default_factory=list)
    dropped: list[Found] = field(default_factory=list)  # not carried over, each with why
    open_relays: list[Found] = field(default_factory=list)
    queue_key: str | None = None  # a secret: never printed, never in the answers
    logins: list = field(default_factory=list)  # credentials.Credential of the auth table (hashes: secret)

    def as_dict(self) -> dict:
        return {"file": str(self.path), "grammar": self.grammar, "answers": dict(self.answers),
                "understood": [str(f) for f in self.understood], "not_carried_over": [str(f) for f in self.dropped],
                "open_relays": [str(f) for f in self.open_relays], "queue_key_kept": self.queue_key is not None,
                "logins": [c.user for c in self.logins]}


# --- words and statements, as smtpd's lexer makes them ------------------------------------------------

def lex(text: str, name: str) -> list[list[Word]]:
    """Statements (one per line; `\\` joins lines, `{ … }` may span them) of words; comments gone,
    quotes taken off. A quote left open, a stray brace or an over-long word is one error naming the line."""
    statements: list[list[Word]] = []
    words: list[Word] = []
    depth, i, n, line, opened = 0, 0, len(text), 1, 1
    while i < n:
        c = text[i]
        if c == "\\" and text.startswith("\n", i + 1):
            i, line = i + 2, line + 1
        elif c == "\n":
            i, line = i + 1, line + 1
            if depth == 0 and words:
                statements.append(words)
                words = []
        elif c in " \t\r":
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"'":
            word, i = _quoted(text, i, line, name)
            words.append(word)
        elif c in "{}=,!":
            depth += {"{": 1, "}": -1}.get(c, 0)
            opened = line if c == "{" and depth == 1 else opened
            if depth < 0:
                raise MailsetupError(f"{name}:{line}: a '}}' closes nothing")
            words.append(Word(c, line))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SEPARATORS and not (text[j] == "\\" and text.startswith("\n", j + 1)):
                j += 1
            _check_length(j - i, name, line)
            words.append(Word(text[i:j], line))
            i = j
    if depth:
        raise MailsetupError(f"{name}:{opened}: a '{{' is never closed")
    if words:
        statements.append(words)
    return statements


def _quoted(text: str, i: int, line: int, name: str) -> tuple[Word, int]:
    quote, j, out = text[i], i + 1, []
    while True:
        end = j
        while end < len(text) and text[end] not in (quote, "\\", "\n"):
            end += 1
        out.append(text[j:end])
        _check_length(sum(map(len, out)), name, line)
        if end >= len(text) or text[end] == "\n":
            raise MailsetupError(f"{name}:{line}: a quoted string is not closed on its line")
        if text[end] == "\\":
            nxt = text[end + 1:end + 2]
            out.append(nxt if nxt in (quote, "\\") else "\\" + nxt)
            j = end + 2
            continue
        return Word("".join(out), line, True), end + 1


def _check_length(length: int, name: str, line: int) -> None:
    if length > MAX_WORD:
        raise MailsetupError(f"{name}:{line}: a word of more than {MAX_WORD:,} characters (smtpd refuses it too)")


def expand_macros(statements: list[list[Word]], name: str) -> list[list[Word]]:
    """`name = value` lines define macros; `$name` outside quotes is replaced by its value."""
    macros: dict[str, list[Word]] = {}
    out = []
    budget = MAX_EXPANDED  # macros of macros grow tenfold a line: a 400-byte file could ask for 10^9 words
    for words in statements:
        expanded: list[Word] = []
        for w in words:
            if w.text.startswith("$") and not w.quoted and len(w.text) > 1:
                if w.text[1:] not in macros:
                    raise MailsetupError(f"{name}:{w.line}: a $macro that is not defined above (smtpd refuses it too)")
                budget -= len(macros[w.text[1:]])
                if budget < 0:
                    raise MailsetupError(f"{name}:{w.line}: the $macros expand to more than {MAX_EXPANDED:,} words "
                                         "(macros of macros, multiplying): not a config to adopt")
                expanded.extend(Word(x.text, w.line, x.quoted) for x in macros[w.text[1:]])
            else:
                expanded.append(w)
        if len(expanded) >= 3 and expanded[1].text == "=" and not expanded[1].quoted:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", expanded[0].text):
                raise MailsetupError(f"{name}:{expanded[0].line}: a macro name must be letters, digits and _")
            macros[expanded[0].text] = expanded[2:]
            continue
        out.append(expanded)
    return out


# --- the statements, read into the model's answers ------------------------------------------------------

def _size(text: str) -> int | None:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", text)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _port(text: str) -> int | None:
    if text in PORT_NAMES:
        return PORT_NAMES[text]
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def _is_file(path: str, world_readable: bool = False) -> bool:
    """Whether a path the config names is a regular file there (a name too long to be one is not);
    with world_readable, one every user may read already (republishing it gives away nothing)."""
    import stat

    try:
        st = Path(path).stat()
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and (not world_readable or bool(st.st_mode & stat.S_IROTH))


def _table_name(text: str) -> str | None:
    m = re.fullmatch(r"<([^<>]+)>", text)
    return m.group(1) if m else None


@dataclass
class _Rule:
    line: int
    text: str  # the rule as written (words joined), for the report
    reject: bool = False
    from_: str = "local"  # any, local, socket, source, auth
    for_: str = "local"  # any, local, domain
    domains: list[str] = field(default_factory=list)
    auth: bool = False
    sources: list[str] = field(default_factory=list)  # `from src` networks, as far as they can be read
    restricted: bool = False  # `from KIND <table>`: only what the table names
    method: str = ""  # maildir, mbox, lmtp, mda, relay, expand-only, forward-only
    opts: list[str] = field(default_factory=list)


def _anyone(rule: _Rule) -> bool:
    """Whether a rule's `from` lets any host on the Internet in: any, any negation (`!from local` is
    everyone else), rDNS or MAIL FROM (the client says what they are), a source network of /0."""
    kind = rule.from_.lstrip("!")
    if rule.from_.startswith("!"):
        return kind != "any"
    if kind in ("src", "source"):
        return any(s.split("/")[-1] == "0" for s in rule.sources)
    return kind == "any" or kind == "mail-from" or (kind == "rdns" and not rule.restricted)


def _anywhere(rule: _Rule) -> bool:
    """Whether a rule's `for` reaches any domain: any, any negation, a domain `*` (or `*.tld`)."""
    if rule.for_.startswith("!"):
        return rule.for_ != "!any"
    if rule.for_ == "domain":
        return any(d.startswith("*") and "." not in d.lstrip("*.") for d in rule.domains)
    return rule.for_ == "any"


class _Reader:
    def __init__(self, path: Path, os_name: str, default_listen: str, trusted: bool = True, shared: bool = False):
        self.name = str(path)
        self.trusted = trusted  # only root controls the config's path: the secret files it names may be read
        self.shared = shared  # others could read the config (and so its queue key)
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.os_name, self.default_listen = os_name, default_listen
        self.result = Imported(path, "", ImportedAnswers(path))
        self.pki: dict[str, dict[str, tuple[str, int]]] = {}
        self.tables: dict[str, tuple[list[str], int]] = {}
        self.inline: set[str] = set()
        self.listeners: list[list[Word]] = []
        self.actions: dict[str, list[Word]] = {}
        self.rules: list[_Rule] = []
        self.legacy = self.modern = False
        self._backup_seen: set[str] = set()

    def at(self, line: int) -> str:
        return f"{self.name}:{line}"

    def ok(self, line: int, text: str) -> None:
        self.result.understood.append(Found(self.at(line), text))

    def drop(self, line: int, text: str) -> None:
        self.result.dropped.append(Found(self.at(line), text))

    def read(self, statements: list[list[Word]]) -> Imported:
        handlers: dict[str, Callable[[list[Word]], None]] = {
            "pki": self.pki_stmt, "queue": self.queue_stmt, "table": self.table_stmt, "listen": self.listen_stmt,
            "max-message-size": self.size_stmt, "smtp": self.smtp_stmt, "accept": self.legacy_rule,
            "reject": self.legacy_rule, "action": self.action_stmt, "match": self.match_stmt,
            "include": self.include_stmt,
        }
        for words in statements:
            first = words[0]
            handler = handlers.get(first.text) if not first.quoted else None
            if handler is not None:
                handler(words)
            elif first.text in KNOWN and not first.quoted:
                self.drop(first.line, f"`{first.text}`: not something mailsetup sets; not carried over")
            else:
                # Never the word itself: a file named by mistake (a key, /etc/shadow) is not echoed.
                raise MailsetupError(f"{self.at(first.line)}: not an smtpd.conf statement (smtpd refuses it too): "
                                     "is this an smtpd.conf?")
        self.result.grammar = "6.4+" if self.modern or not self.legacy else "6.3 and older"
        if self.legacy and self.modern:
            self.drop(1, "mixes the grammar of 6.3 and older with 6.4's: smtpd refuses such a file")
        self.settle()
        for found in (self.result.understood, self.result.dropped):
            found.sort(key=lambda f: int(f.where.rsplit(":", 1)[1]))
        return self.result

    # statements --------------------------------------------------------------------------------

    def include_stmt(self, words: list[Word]) -> None:
        raise MailsetupError(f"{self.at(words[0].line)}: include: import reads one file; "
                             "paste the included file in its place first")

    def pki_stmt(self, words: list[Word]) -> None:
        t = [w.text for w in words]
        if len(t) >= 4 and t[2] in ("cert", "certificate", "key"):
            kind = "key" if t[2] == "key" else "cert"
            self.legacy |= t[2] == "certificate"
            self.pki.setdefault(t[1], {})[kind] = (t[3], words[0].line)
        else:
            self.drop(words[0].line, f"pki {' '.join(t[2:3])}: not carried over "
                                     "(mailsetup sets the certificate and key)")

    def queue_stmt(self, words: list[Word]) -> None:
        t = [w.text for w in words]
        line, ans = words[0].line, self.result.answers
        if t[1:] == ["compression"]:
            ans.set("queue_compression", True, line)
            self.ok(line, "queue compression")
        elif len(t) >= 2 and t[1] == "encryption":
            ans.set("queue_encryption", True, line)
            self.legacy |= len(t) > 2 and t[2] == "key"
            key = t[3] if len(t) > 3 and t[2] == "key" else (t[2] if len(t) > 2 else None)
            from mailsetup.queuekey import validate_queue_key

            try:
                self.result.queue_key = validate_queue_key(key, "") if key else None
            except MailsetupError:
                self.result.queue_key = None
            if self.result.queue_key:
                self.ok(line, "queue encryption with its key (kept: mail queued under it stays readable)")
                if self.shared:
                    self.drop(line, "queue encryption key: others could read this file, so the key is not secret; "
                                    "once the queue is drained, rotate it (mailsetup init --rotate-queue-key --drain)")
            else:
                self.drop(line, "queue encryption key: not a usable key (32 characters); a new one is made, so "
                                "drain the old queue first (smtpctl pause smtp; wait for `smtpctl show queue` "
                                "to be empty)")
        else:
            self.drop(line, f"queue {' '.join(t[1:2])}: not carried over")

    def table_stmt(self, words: list[Word]) -> None:
        if len(words) < 3:
            self.drop(words[0].line, "table without a source: not carried over")
            return
        # Of a mapping `{ key = value, … }` only the keys: a lookup (a domain, a source) matches keys, and
        # the values may be secrets (a credentials table's password hashes) never to be printed.
        rest = words[2:]
        values = [w.text for i, w in enumerate(rest) if w.text not in ("{", "}", ",", "=")
                  and not (i and rest[i - 1].text == "=" and not rest[i - 1].quoted)]
        self.tables[words[1].text] = (values, words[0].line)
        if words[2].text == "{":
            self.inline.add(words[1].text)
            # the pairs themselves, for an auth table's logins only: never shown
            self.pairs[words[1].text] = [(rest[i - 2].text, w.text) for i, w in enumerate(rest)
                                         if i >= 2 and rest[i - 1].text == "=" and not rest[i - 1].quoted]

    def listen_stmt(self, words: list[Word]) -> None:
        self.listeners.append(words)

    def size_stmt(self, words: list[Word]) -> None:
        self.legacy = True
        self._size(words, words[1:])

    def smtp_stmt(self, words: list[Word]) -> None:
        if len(words) >= 3 and words[1].text == "max-message-size":
            self._size(words, words[2:])
        else:
            self.drop(words[0].line, f"smtp {words[1].text if len(words) > 1 else ''}: not carried over")

    def _size(self, words: list[Word], rest: list[Word]) -> None:
        size = _size(rest[0].text) if rest else None
        if size is None:
            self.drop(words[0].line, "max-message-size: not a size; mailsetup's default is kept")
            return
        self.result.answers.set("max_message_size", size, words[0].line)
        self.ok(words[0].line, f"max-message-size {size} bytes")

    # rules ---------------------------------------------------------------------------------------

    def legacy_rule(self, words: list[Word]) -> None:
        """6.3 and older: accept|reject [tagged T] [from …] [for …] [options] deliver to …|relay …"""
        self.legacy = True
        t = [w.text for w in words]
        rule = _Rule(words[0].line, " ".join(t), reject=t[0] == "reject")
        i = 1
        while i < len(t):
            word = t[i]
            if word == "from" and i + 1 < len(t):
                i = self._from(rule, t, i + 1)
            elif word == "for" and i + 1 < len(t):
                i = self._for(rule, t, i + 1)
            elif word == "deliver" and i + 2 < len(t):
                rule.method, rule.opts = t[i + 2], rule.opts + t[i + 3:]
                break
            elif word == "relay":
                rule.method, rule.opts = "relay", rule.opts + t[i + 1:]
                break
            else:
                rule.opts.append(word)
                i += 1
        self.rules.append(rule)

    def _from(self, rule: _Rule, t: list[str], i: int) -> int:
        negate = t[i] == "!"
        i += negate
        kind = t[i] if i < len(t) else "local"
        rule.from_ = ("!" if negate or rule.from_.startswith("!") else "") + kind
        if kind in ("source", "src", "rdns", "mail-from", "auth") and i + 1 < len(t) and t[i + 1].startswith("<"):
            i += 1
            rule.sources = list(self.tables.get(_table_name(t[i]) or "", ([], 0))[0])
            rule.restricted = True
        elif kind in ("source", "src") and i + 1 < len(t):
            i += 1  # a literal network (or an inline table: its words are read as the rule's options)
            rule.sources, rule.restricted = [t[i]], True
        return i + 1

    def _for(self, rule: _Rule, t: list[str], i: int) -> int:
        negate = t[i] == "!"
        i += negate
        kind = t[i] if i < len(t) else "local"
        rule.for_ = ("!" if negate or rule.for_.startswith("!") else "") + kind
        if kind == "domain" and i + 1 < len(t):
            i += 1
            if t[i] == "{":
                end = t.index("}", i) if "}" in t[i:] else len(t)
                rule.domains = [x for x in t[i + 1:end] if x != ","]
                return end + 1
            table = _table_name(t[i])
            rule.domains = self._table_values(table) if table else [t[i]]
        elif kind in ("rcpt-to", "recipient") and i + 1 < len(t):
            i += 1
        return i + 1

    def _table_values(self, name: str) -> list[str]:
        values, _ = self.tables.get(name, ([], 0))
        return [v for v in values if ":" not in v and "/" not in v]

    def action_stmt(self, words: list[Word]) -> None:
        self.modern = True
        if len(words) < 3:
            self.drop(words[0].line, "action without a method: not carried over")
            return
        self.actions[words[1].text] = words

    def match_stmt(self, words: list[Word]) -> None:
        """6.4+: match [!]from … [!]for … [auth] [tag …] action NAME | reject"""
        self.modern = True
        t = [w.text for w in words]
        rule = _Rule(words[0].line, " ".join(t))
        i = 1
        while i < len(t):
            if t[i] == "!" and i + 1 < len(t) and t[i + 1] in ("from", "for"):  # 6.4's `!from`, `!for`
                setattr(rule, "from_" if t[i + 1] == "from" else "for_", "!")
                i += 1
            elif t[i] == "from":
                i = self._from(rule, t, i + 1)
            elif t[i] == "for":
                i = self._for(rule, t, i + 1)
            elif t[i] == "!" and i + 1 < len(t) and t[i + 1] == "auth":  # `!auth`: unauthenticated only
                i += 3 if i + 2 < len(t) and t[i + 2].startswith("<") else 2
            elif t[i] == "auth":
                rule.auth = True
                i += 2 if i + 1 < len(t) and t[i + 1].startswith("<") else 1
            elif t[i] == "reject":
                rule.reject = True
                break
            elif t[i] == "action" and i + 1 < len(t):
                action = self.actions.get(t[i + 1])
                if action is None:
                    raise MailsetupError(f"{self.at(words[0].line)}: match names an action that no action line "
                                         "above defines (smtpd refuses it too)")
                at = [w.text for w in action]
                rule.method, rule.opts = at[2], at[3:]
                break
            else:
                rule.opts.append(t[i])
                i += 1
        if rule.from_ == "auth":
            rule.auth = True
        self.rules.append(rule)

    # what it all means ---------------------------------------------------------------------------

    def settle(self) -> None:
        for key in ("queue_compression", "queue_encryption", "dkim"):  # absent: off, as smtpd had it
            self.result.answers.setdefault(key, False)
        self.settle_rules()
        self.result.answers.setdefault("imap", "none")  # delivery stays as it was unless it went to Dovecot
        self.settle_listeners()
        self.settle_tls()
        self.settle_logins()

    def settle_logins(self) -> None:
        """The listeners' auth table: its logins (user and crypt hash) carried over as they are."""
        names = []
        for words in self.listeners:
            t = [w.text for w in words]
            for i, word in enumerate(t[:-1]):
                if word in ("auth", "auth-optional") and _table_name(t[i + 1]):
                    names.append(_table_name(t[i + 1]))
        for name in dict.fromkeys(names):
            values, line = self.tables.get(name, ([], 0))
            if not line:
                self.drop(self.listeners[0][0].line, f"auth <{name}>: no such table above; no logins carried over")
                continue
            try:
                logins = self._logins(name, values)
            except MailsetupError as exc:
                self.drop(line, f"table {name}: logins not carried over ({exc.message})")
                continue
            have = {x.user for x in self.result.logins}
            self.result.logins.extend(c for c in logins if c.user not in have)
            self.ok(line, f"table {name}: {len(logins)} login(s) carried over with their password hashes")

    def settle_rules(self) -> None:
        ans, domains = self.result.answers, {}  # domain: its line; a dict, as a 4 MiB file lists 300,000
        for rule in self.rules:
            if rule.reject:
                self.drop(rule.line, "a reject rule: not carried over (mailsetup accepts mail only for its domain "
                                     "and relays only for authenticated and local senders)")
            elif rule.method == "relay":
                self.settle_relay(rule)
            elif rule.method:
                self.settle_delivery(rule, domains)
            else:
                self.drop(rule.line, "a rule without a delivery or relay: not carried over")
        if domains:
            (first, at), *rest = domains.items()
            ans.set("domain", first, at)
            for extra, line in rest:
                self.drop(line, f"domain {extra[:80]}: a set-up serves one domain; {first} is imported")

    def settle_delivery(self, rule: _Rule, domains: dict[str, int]) -> None:
        ans = self.result.answers
        if rule.for_ == "domain":
            for d in rule.domains:
                domains.setdefault(d, rule.line)
            if rule.domains:
                self.ok(rule.line, f"mail for {', '.join(rule.domains)[:120]} is delivered ({rule.method})")
            if rule.from_ not in ("any", "local"):
                self.drop(rule.line, f"delivery only from {rule.from_}: mailsetup takes the domain's mail from anyone")
        elif rule.for_ == "local":
            self.ok(rule.line, "local accounts' mail is delivered (match for local)")
        else:
            self.drop(rule.line, f"delivery for {rule.for_}: not carried over")
            return
        if rule.method == "maildir":
            rest = [x for x in rule.opts if x not in ("alias", "virtual", "userbase") and not x.startswith("<")]
            if rest and rest[0] not in ("junk",):
                self.drop(rule.line, f"maildir {rest[0][:80]}: mailsetup delivers to ~/Maildir")
        elif rule.method == "lmtp" and rule.opts and "dovecot" in rule.opts[0]:
            ans.set("imap", "dovecot", rule.line)
            self.ok(rule.line, "delivery through Dovecot's LMTP: --imap dovecot")
        else:
            self.drop(rule.line, f"delivery by {rule.method}: mailsetup delivers to each account's Maildir "
                                 "(or Dovecot's LMTP); not carried over")
        self.settle_alias(rule)

    def settle_alias(self, rule: _Rule) -> None:
        for word, arg in zip(rule.opts, rule.opts[1:], strict=False):
            table = _table_name(arg)
            if word == "alias" and table:
                self.settle_aliases_table(table, rule.line)
            elif word in ("virtual", "userbase") and table:
                self.drop(rule.line, f"{word} <{table}>: not carried over (mailsetup has no virtual users yet)")

    def settle_aliases_table(self, table: str, line: int) -> None:
        values, where = self.tables.get(table, ([], line))
        spec = values[0] if len(values) == 1 else ""
        kind, _, path = spec.partition(":") if ":" in spec else ("file", "", spec)
        source = path[:-3] if kind == "db" and path.endswith(".db") else path
        if kind not in ("file", "db") or not source.startswith("/"):
            self.drop(where, f"table {table}: not a file mailsetup can read its aliases from; its own are made")
        elif not _is_file(source):
            self.drop(where, f"table {table}: {source} is not there to import; mailsetup makes its own aliases")
        elif not _is_file(source, world_readable=True):
            # The config's author chose this path, and /etc/aliases is readable by everyone: a file only
            # root may read (a key, a credentials table) must not come out as the aliases.
            self.drop(where, f"table {table}: {source} is not readable by everyone, and the aliases are; not "
                             "imported (give it with --aliases if it really is your aliases file)")
        else:
            self.result.answers.set("aliases", source, where)
            self.ok(where, f"aliases from {source}")

    def settle_relay(self, rule: _Rule) -> None:
        ans, opts = self.result.answers, rule.opts
        if "backup" in opts:
            if rule.for_ == "domain" and rule.domains:
                backup = ans.get("backup_for", [])
                backup.extend(d for d in dict.fromkeys(rule.domains) if d not in self._backup_seen)
                self._backup_seen.update(rule.domains)
                ans.set("backup_for", backup, rule.line)
                self.ok(rule.line, f"backup MX for {', '.join(rule.domains)}")
            else:
                self.drop(rule.line, "a backup relay without its domains: not carried over")
            return
        open_relay = not rule.auth and _anyone(rule) and _anywhere(rule)
        if open_relay:
            self.result.open_relays.append(Found(self.at(rule.line), f"`{rule.text[:120]}` relays anyone's mail to "
                                                 "anywhere (an open relay): not carried over"))
            return
        if rule.from_ in ("local", "auth") or rule.auth:
            self.ok(rule.line, "relays for authenticated and local senders")
        else:
            self.drop(rule.line, f"relay from {rule.from_}: not carried over (mailsetup relays for authenticated "
                                 "and local senders only)")
        if any(x in opts for x in ("via", "host")):
            self.drop(rule.line, "relay through a smarthost: not carried over (mailsetup delivers to each domain's MX)")
        if "tls" in opts:
            verify = "verify" in opts if self.legacy else "no-verify" not in opts
            if verify:
                ans.set("relay_tls", "verify", rule.line)
                self.ok(rule.line, "relay over verified TLS: --relay-tls verify")
            else:
                self.drop(rule.line, "relay tls without verifying: becomes opportunistic TLS "
                                     "(--relay-tls opportunistic)")

    def _logins(self, name: str, values: list[str]) -> list:
        from mailsetup import credentials

        if name in self.inline:  # { "user" = "hash", … }
            text = "".join(f"{u} {h}\n" for u, h in self.pairs.get(name, []))
            return credentials.parse_credentials(text, f"table {name}")
        if not self.trusted:
            raise MailsetupError("the config is not root's alone, so the files it names are not read for logins")
        kind, sep, rest = values[0].partition(":") if len(values) == 1 else ("", "", "")
        path = rest if kind == "file" else (values[0] if values and not sep else "")
        if not path.startswith("/"):
            raise MailsetupError("not a file mailsetup can read logins from")
        if not Path(path).exists():
            raise MailsetupError(f"{path} is not there")
        return credentials.read_credentials(Path(path))

    def settle_listeners(self) -> None:
        ans = self.result.answers
        addresses: dict[str, None] = {}  # in order, each once (a dict: a file may have 100,000 listeners)
        for words in self.listeners:
            t = [w.text for w in words]
            line = words[0].line
            where = t[2] if len(t) > 2 and t[1] == "on" else ""
            if where in LOOPBACK:
                self.ok(line, "listen on localhost (mailsetup always does)")
                continue
            if where in ("egress", "all", "0.0.0.0", "::") and self.os_name != "openbsd":
                where = self.default_listen if where in ("egress", "all") else where
            port = _port(t[t.index("port") + 1]) if "port" in t and t.index("port") + 1 < len(t) else 25
            if where == "socket":
                continue
            if port is None:
                self.drop(line, "listen on a port mailsetup cannot read: not carried over")
                continue
            if "smtps" in t or port == 465:
                self.drop(line, "implicit TLS (smtps, 465): not offered; clients submit on 587 with STARTTLS")
                continue
            submission = "tls-require" in t and "auth" in t
            key = "submission_port" if submission else "smtp_port"
            if port != (587 if submission else 25):
                ans.set(key, port, line)
            addresses.setdefault(where)
            self.ok(line, f"listen on {where} port {port}" + (" (submission: TLS and AUTH required)" if submission
                                                               else " (STARTTLS offered, AUTH after it)"))
            for word in ("tag", "mask-source", "mask-src", "senders", "filter", "hostnames", "proxy-v2"):
                if word in t:
                    self.drop(line, f"listen … {word}: not carried over")
            if "hostname" in t and t.index("hostname") + 1 < len(t):
                ans.set("hostname", t[t.index("hostname") + 1], line)
        if addresses and list(addresses) != [self.default_listen]:
            ans.set("listen", list(addresses), self.listeners[0][0].line)

    def settle_tls(self) -> None:
        """The certificate the listeners named: kept where both files are there, else a new one."""
        ans = self.result.answers
        names = []
        for words in self.listeners:
            t = [w.text for w in words]
            if "pki" in t and t.index("pki") + 1 < len(t):
                names.append(t[t.index("pki") + 1])
        names = list(dict.fromkeys(names)) or list(self.pki)
        if not names:
            return
        name = names[0]
        pair = self.pki.get(name, {})
        if "hostname" not in ans and "." in name:
            ans.set("hostname", name, pair.get("cert", ("", self.listeners[0][0].line if self.listeners else 1))[1])
        cert, key = pair.get("cert"), pair.get("key")
        if cert and key and _is_file(cert[0]) and _is_file(key[0]):
            for path, line in (cert, key):
                _refuse_swappable(path, f"{self.at(line)}: pki {name}")
            ans.set("tls", "existing", cert[1])
            ans.set("cert", cert[0], cert[1])
            ans.set("key", key[0], key[1])
            self.ok(cert[1], f"certificate {cert[0]} and key {key[0]} (kept as they are)")
        else:
            missing = next((p for p, _ in (cert or ("", 0), key or ("", 0)) if not p or not _is_file(p)), "")
            line = (cert or key or ("", 1))[1]
            ans.set("tls", "self-signed", line)
            self.drop(line, f"pki {name}: {missing or 'a file'} is not there; a new self-signed certificate is made")
        for extra in names[1:]:
            line = self.pki.get(extra, {}).get("cert", ("", 1))[1]
            self.drop(line, f"pki {extra}: a second certificate: not carried over")


def read_config(path: Path, os_name: str, default_listen: str) -> Imported:
    """An smtpd.conf read into answers, as whoever controls its path (files.read_input)."""
    from mailsetup.files import read_input

    name = str(path)
    try:
        data = read_input(path, limit=MAX_FILE)
    except FileNotFoundError:
        raise MailsetupError(f"{name}: no such file to import") from None
    except OSError as exc:
        raise MailsetupError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise MailsetupError(f"{name}:{line}: not UTF-8 text") from None
    if "\0" in text:
        raise MailsetupError(f"{name}:{text[:text.index(chr(0))].count(chr(10)) + 1}: a NUL byte: not a config file")
    statements = expand_macros(lex(text, name), name)
    trusted, shared = _standing(path)
    return _Reader(path, os_name, default_listen, trusted, shared).read(statements)


def _refuse_swappable(path: str, where: str) -> None:
    """As root: one line naming the config's line when a certificate or key it names sits where a user
    other than root could swap it (mailsetup would refuse to read it later, without the line)."""
    from mailsetup.files import _controllers, strict

    if strict() and (users := _controllers(Path(path))):
        raise MailsetupError(f"{where}: {path} is where a user other than root (uid {min(users)}) could swap it; "
                             "move the pair into a folder only root controls, and import again")


def _standing(path: Path) -> tuple[bool, bool]:
    """(only root controls the file's path, others may read the file)."""
    import os
    import stat

    from mailsetup.files import _controllers, strict

    try:
        mode = os.stat(path).st_mode
        trusted = not strict() or not _controllers(Path(path))
    except (OSError, MailsetupError):
        return False, False
    return trusted, bool(stat.S_IMODE(mode) & 0o044)


def foreign_conf(path: Path, sandbox: bool) -> tuple[Path, bool] | None:
    """(`path`, certain) when it is an smtpd.conf that says something and that neither mailsetup wrote
    nor the OS package installed unchanged; else None. `certain`: in a sandbox (no package puts files
    there), or where dpkg records the package's conffile to compare with; elsewhere (Alpine, the
    BSDs) a packaged default cannot be told from a hand-written file."""
    import hashlib

    from mailsetup.files import read_input

    try:
        data = read_input(path, limit=MAX_FILE)
    except (OSError, MailsetupError):
        return None
    if b"written by mailsetup" in data[:400]:
        return None
    try:
        if not lex(data.decode("utf-8"), str(path)):
            return None  # empty, or only comments
    except (UnicodeDecodeError, MailsetupError):
        pass  # not even readable as a config: certainly not ours
    if sandbox:
        return path, True
    sums = _packaged_sums(path)
    if sums and hashlib.md5(data).hexdigest() in sums:  # noqa: S324 - dpkg's own sums
        return None
    return path, sums is not None


def _packaged_sums(path: Path) -> set[str] | None:
    """The md5 sums dpkg records for `path` as a conffile of the opensmtpd package (empty when the
    package is not installed or does not own it); None where there is no dpkg to ask."""
    import shutil
    import subprocess

    if not shutil.which("dpkg-query"):
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}\\n", "opensmtpd"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {parts[1] for parts in (line.split() for line in out.splitlines())
            if len(parts) >= 2 and parts[0] == str(path)}


def default_conf(root: Path | None, os_name: str | None) -> Path:
    """The smtpd.conf of the OS layout (under --root in a sandbox): what `mailsetup import` adopts by default."""
    from mailsetup.platforms import detect_os, get_layout, sandboxed

    return Path(sandboxed(get_layout(os_name or detect_os() or "debian"), root and root.absolute()).smtpd_conf)
