"""DKIM: the signing keys (RSA-2048 and Ed25519, both signing, as RFC 8463 recommends), their
selectors, the record each needs in DNS, and the state file that says which key signs.

One key file per selector, PEM, in the layout's DKIM folder (owned by the signing filter's user,
0600 from birth). The state file (dkim.toml, no secrets) lists every key with its stage:
pending (made, its record not yet confirmed) → active (signs) → retiring (its record stays published
until a date) → retired (forgotten). smtpd signs through Debian's opensmtpd-filter-dkimsign; the
embedded MTA signs the same way with dkimpy.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from mailsetup.errors import MailsetupError

ALGORITHMS = {"rsa": ("rsa-sha256", "r"), "ed25519": ("ed25519-sha256", "e")}
STAGES = ("pending", "active", "retiring")
STATE_MODE = 0o644
KEY_MODE = 0o600
RETIREMENT_DAYS = 7  # how long a replaced key's record stays published (mail in flight still verifies)
# filter-dkimsign's default (its -h), so both engines sign the same headers.
SIGNED_HEADERS = ("from reply-to subject date to cc resent-date resent-from resent-to resent-cc in-reply-to "
                  "references list-id list-help list-unsubscribe list-subscribe list-post list-owner "
                  "list-archive").split()
# dkimpy joins a folded header's lines one `+=` at a time: time grows with the square of its size
# (a 1.2 MB Subject of 300 000 folds, 16 s of CPU while holding the GIL, measured). A bigger header
# than Postfix keeps (header_size_limit) is not signed: the message goes unsigned, as on any signing error.
HEADER_LIMIT = 100 << 10
# dkimpy also holds every line of the message as its own object: 34 MB of 3-byte lines took 1.1 GB
# and 6 s per message (measured). Real mail has far fewer (base64 fills 78 bytes a line: a message
# at smtpd's 35 MB limit has under half a million); one with more goes unsigned.
LINE_LIMIT = 1_000_000
_SELECTOR = re.compile(r"^[0-9]{6}(?:[0-9]{2})?[re](?:[0-9]{1,2})?$")


@dataclass(frozen=True)
class DkimKey:
    selector: str  # YYYYMM + r|e, with the day and a number when a month already has one
    algorithm: str  # rsa | ed25519
    stage: str  # pending | active | retiring
    created: dt.date
    retire_after: dt.date | None = None  # retiring: the record may be removed from this day on

    @property
    def signature_algorithm(self) -> str:
        return ALGORITHMS[self.algorithm][0]

    def path(self, folder: PurePosixPath) -> PurePosixPath:
        return folder / f"{self.selector}.key"

    def record_name(self, domain: str) -> str:
        return f"{self.selector}._domainkey.{domain}"


# --- keys -------------------------------------------------------------------------------------------

def generate_key(algorithm: str) -> bytes:
    """A new private key as PEM (PKCS#8): what filter-dkimsign and dkimpy both read."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if algorithm == "rsa"
           else ed25519.Ed25519PrivateKey.generate())
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _load(pem: bytes, algorithm: str, where: str):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        key = ser.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise MailsetupError(f"{where}: not a PEM private key") from None
    wanted = rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey
    if not isinstance(key, wanted):
        raise MailsetupError(f"{where}: not an {algorithm} key")
    return key


def public_value(pem: bytes, algorithm: str, where: str = "DKIM key") -> str:
    """The `p=` of the key's record: base64 of the SubjectPublicKeyInfo (RSA) or of the raw 32-byte
    public key (Ed25519, RFC 8463)."""
    from cryptography.hazmat.primitives import serialization as ser

    public = _load(pem, algorithm, where).public_key()
    if algorithm == "rsa":
        der = public.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    else:
        der = public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return base64.b64encode(der).decode()


def record_text(pem: bytes, algorithm: str, where: str = "DKIM key") -> str:
    return f"v=DKIM1; k={algorithm}; p={public_value(pem, algorithm, where)}"


def dkimpy_private_key(pem: bytes, algorithm: str, where: str = "DKIM key") -> bytes:
    """The key as dkimpy's sign() takes it: PEM for RSA, base64 of the raw seed for Ed25519."""
    if algorithm == "rsa":
        _load(pem, algorithm, where)
        return pem
    from cryptography.hazmat.primitives import serialization as ser

    raw = _load(pem, algorithm, where).private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    return base64.b64encode(raw)


# --- selectors and stages ----------------------------------------------------------------------------

def new_selector(algorithm: str, today: dt.date, taken: set[str]) -> str:
    """YYYYMMr / YYYYMMe; when that month's is taken, the day is added, then a number."""
    letter = ALGORITHMS[algorithm][1]
    for base in (f"{today:%Y%m}{letter}", f"{today:%Y%m%d}{letter}"):
        if base not in taken:
            return base
    n = 2
    while f"{today:%Y%m%d}{letter}{n}" in taken:
        n += 1
    return f"{today:%Y%m%d}{letter}{n}"


def new_pair(stage: str, today: dt.date, taken: set[str]) -> list[DkimKey]:
    keys = []
    for algorithm in ALGORITHMS:
        selector = new_selector(algorithm, today, taken | {k.selector for k in keys})
        keys.append(DkimKey(selector, algorithm, stage, today))
    return keys


def signing(keys: list[DkimKey]) -> list[DkimKey]:
    """The keys that sign: the active ones, RSA first (smtpd's chain and the embedded MTA agree)."""
    return sorted((k for k in keys if k.stage == "active"), key=lambda k: k.algorithm != "rsa")


def published(keys: list[DkimKey], today: dt.date) -> list[DkimKey]:
    """The keys whose records DNS should serve: pending (to be checked before they sign), active,
    and retiring ones until their date."""
    return [k for k in keys if k.stage != "retiring" or (k.retire_after and today < k.retire_after)]


def retire(key: DkimKey, today: dt.date, days: int = RETIREMENT_DAYS) -> DkimKey:
    return replace(key, stage="retiring", retire_after=today + dt.timedelta(days=days))


@dataclass
class Step:
    """What one run does to the keys: the state it leaves, the keys to generate, what to tell."""

    keys: list[DkimKey]
    new: list[DkimKey]
    notes: list[str]


def next_state(keys: list[DkimKey], *, rotate: bool, switch: bool, today: dt.date, taken: set[str]) -> Step:
    """The stages moved on by one run (Stalwart's pending → active → retiring → retired):
    - no active key: a first pair, active at once (nothing was signed before);
    - a retiring key whose date has come is retired (forgotten; its file may be deleted);
    - `switch` (DNS serves the pending records, or forced): pending → active, active → retiring;
    - `rotate`: a new pending pair, whose records are to be published before the next run switches."""
    notes: list[str] = []
    kept = [k for k in keys if not (k.stage == "retiring" and k.retire_after and k.retire_after <= today)]
    for k in keys:
        if k not in kept:
            notes.append(f"DKIM key {k.selector} retired: its record may be removed; its key file is no longer used")
    if not signing(kept):
        new = new_pair("active", today, taken | {k.selector for k in kept})
        return Step(kept + new, new, notes + ["new DKIM keys " + ", ".join(k.selector for k in new)
                                             + ": publish their records (mailsetup dns)"])
    pending = [k for k in kept if k.stage == "pending"]
    if pending and switch:
        kept = [retire(k, today) if k.stage == "active" else replace(k, stage="active") if k.stage == "pending"
                else k for k in kept]
        until = today + dt.timedelta(days=RETIREMENT_DAYS)
        notes.append("DKIM signing moved to " + ", ".join(k.selector for k in pending)
                     + f"; keep the old records published until {until}")
        pending = []
    new: list[DkimKey] = []
    if rotate and pending:
        notes.append("a DKIM rotation is already pending (" + ", ".join(k.selector for k in pending)
                     + "): publish its records; the next run switches once DNS serves them")
    elif rotate:
        new = new_pair("pending", today, taken | {k.selector for k in kept})
        kept = kept + new
        notes.append("next DKIM keys " + ", ".join(k.selector for k in new) + ": publish their records "
                     "(mailsetup dns), check with `mailsetup dns --check`; the next run switches to them")
    return Step(kept, new, notes)


# --- the state file ------------------------------------------------------------------------------------

def render_state(keys: list[DkimKey]) -> bytes:
    lines = ["# mailsetup DKIM keys (no secrets): which selector signs (active), which waits for its DNS\n",
             "# record (pending), which is retiring (its record stays published until retire_after).\n"]
    for k in keys:
        lines += ["\n[[key]]\n", f'selector = "{k.selector}"\n', f'algorithm = "{k.algorithm}"\n',
                  f'stage = "{k.stage}"\n', f"created = {k.created.isoformat()}\n"]
        if k.retire_after:
            lines.append(f"retire_after = {k.retire_after.isoformat()}\n")
    return "".join(lines).encode()


def parse_state(data: bytes, where: str) -> list[DkimKey]:
    """dkim.toml as mailsetup wrote it; anything else is refused in one line naming the file."""
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MailsetupError(f"{where}: not a mailsetup DKIM state file ({type(exc).__name__})") from None
    items = parsed.get("key", [])
    if not isinstance(items, list):  # `key = 5`, `[key]`: not the array of tables mailsetup writes
        raise MailsetupError(f"{where}: key is not a list of [[key]] tables")
    keys: list[DkimKey] = []
    for n, item in enumerate(items, 1):
        keys.append(_key_from(item, f"{where}: key {n}"))
    if len({k.selector for k in keys}) != len(keys):
        raise MailsetupError(f"{where}: a selector is listed twice")
    return keys


def _key_from(item: object, where: str) -> DkimKey:
    if not isinstance(item, dict) or set(item) - {"selector", "algorithm", "stage", "created", "retire_after"}:
        raise MailsetupError(f"{where}: unexpected fields")
    selector, algorithm, stage = item.get("selector"), item.get("algorithm"), item.get("stage")
    if not isinstance(selector, str) or not _SELECTOR.fullmatch(selector):  # `$` alone lets a "\n" through
        raise MailsetupError(f"{where}: selector is not one mailsetup makes (YYYYMMr, YYYYMMe)")
    if algorithm not in ALGORITHMS or ALGORITHMS[algorithm][1] not in selector[6:]:
        raise MailsetupError(f"{where}: algorithm is not rsa or ed25519, or does not match the selector")
    if stage not in STAGES:
        raise MailsetupError(f"{where}: stage is not one of {', '.join(STAGES)}")
    created, retire_after = item.get("created"), item.get("retire_after")
    # A date, not a date-time (a datetime is a date too, but compares with none: a traceback later).
    if not _is_date(created) or (retire_after is not None and not _is_date(retire_after)):
        raise MailsetupError(f"{where}: created and retire_after are dates (YYYY-MM-DD)")
    return DkimKey(selector, algorithm, stage, created, retire_after)


def _is_date(value: object) -> bool:
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)


def read_state(path: Path) -> list[DkimKey]:
    """The keys the last run recorded, or none when there is no state file yet."""
    from mailsetup.files import read_secret

    try:
        data = read_secret(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MailsetupError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_state(data, str(path))


def read_key(folder: PurePosixPath, key: DkimKey) -> bytes:
    """A key's PEM, read as every secret is (root's file, no link another user controls)."""
    from mailsetup.files import read_secret

    path = Path(key.path(folder))
    try:
        return read_secret(path)
    except FileNotFoundError:
        # Not "run init": every run checks the keys it keeps and would stop here again.
        raise MailsetupError(f"{path}: the DKIM key for selector {key.selector} is missing; put it back, or take "
                             "its [[key]] out of dkim.toml and run `mailsetup dkim --rotate` for a new pair",
                             exit_code=1) from None
    except OSError as exc:
        raise MailsetupError(f"{path}: cannot read: {exc.strerror}", exit_code=1) from None


def key_access(filter_user: str) -> tuple[int, tuple[int, int] | None]:
    """(mode, owner) of a key file: root's, readable by the signing filter's group (0640), so the
    filter reads it and no other user controls it (a file the filter's user owned, it could change,
    and root reads it to sign in the embedded MTA). Where that user does not exist or we are not
    root: 0600, ours alone."""
    import grp
    import os
    import pwd

    if os.geteuid() != 0:
        return KEY_MODE, None
    try:
        gid = pwd.getpwnam(filter_user).pw_gid
        grp.getgrgid(gid)
    except KeyError:
        return KEY_MODE, None
    return 0o640, (0, gid)


# --- signing in the embedded MTA ------------------------------------------------------------------------

class Signer:
    """Signs a message with every active key, as filter-dkimsign does on smtpd: the same headers,
    simple/simple, RSA then Ed25519. Returns the DKIM-Signature header lines to put on top."""

    def __init__(self, domain: str, keys: list[tuple[DkimKey, bytes]]):
        self.domain = domain.encode()
        self.keys = keys  # (key, private key as dkimpy takes it)

    @classmethod
    def load(cls, domain: str, folder: PurePosixPath, state: Path) -> Signer:
        keys = signing(read_state(state))
        if not keys:
            raise MailsetupError(f"{state}: DKIM is on but no key is active; run `mailsetup init`", exit_code=1)
        return cls(domain, [(k, dkimpy_private_key(read_key(folder, k), k.algorithm, str(k.path(folder))))
                            for k in keys])

    @property
    def selectors(self) -> list[str]:
        return [k.selector for k, _ in self.keys]

    def headers(self, message: bytes) -> bytes:
        import dkim as dkimpy

        if header_size(message) > HEADER_LIMIT:
            raise ValueError(f"its header is larger than {HEADER_LIMIT >> 10} KiB")
        message = _without_trailing_empty_lines(message)
        if message.count(b"\n") > LINE_LIMIT:
            raise ValueError(f"it has more than {LINE_LIMIT} lines")
        out = b""
        for key, private in self.keys:
            out += dkimpy.sign(message, key.selector.encode(), self.domain, private,
                               canonicalize=(b"simple", b"simple"),
                               signature_algorithm=key.signature_algorithm.encode(),
                               include_headers=[h.encode() for h in SIGNED_HEADERS])
        return out


def header_size(message: bytes) -> int:
    """Bytes before the empty line that ends the header (CRLF or LF lines, as dkimpy splits them);
    the whole message when it has none. Only the first HEADER_LIMIT bytes or so are looked at."""
    head = message[:HEADER_LIMIT + 4]
    if head.startswith((b"\r\n", b"\n")):
        return 0
    ends = [i for i in (head.find(b"\n\r\n"), head.find(b"\n\n")) if i >= 0]
    return min(ends) + 1 if ends else len(message)


def _without_trailing_empty_lines(message: bytes) -> bytes:
    """The message with the empty lines at its end taken off, which changes no signature: both
    canonicalizations ignore them (RFC 6376 3.4.3, 3.4.4). dkimpy splits every line into a list and
    strips them with a regex: a body of 17 million CRLFs took 18 s and 1.7 GB (measured); 0.7 s and
    0.1 GB without them. Only whole CRLFs go; a bare CR or LF among them keeps the message as it is."""
    kept = message.rstrip(b"\r\n")
    tail = len(message) - len(kept)
    if tail <= 2 or message[len(kept):] != b"\r\n" * (tail // 2) or tail % 2:
        return message
    return kept + b"\r\n"
