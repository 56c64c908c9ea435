"""The answers file (TOML): what a run chose — never a secret — so later commands and re-runs start
from it. Keys are the flag names without dashes (`smtp_port` for --smtp-port).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from mailsetup.errors import MailsetupError
from mailsetup.platforms import LAYOUTS, detect_os, get_layout, sandboxed

ANSWERS_MODE = 0o644
KEYS = (
    "domain", "hostname", "os", "admin", "tls", "key_type", "days", "cert", "key", "listen", "smtp_port",
    "submission_port", "smtpd_version", "queue_compression", "queue_encryption", "max_message_size",
    "keep_backups",
)
SECRET_WORDS = ("password", "secret", "queue_key")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 32 for c in escaped):
        raise MailsetupError(f"answers: {text!r} has a control character")
    return f'"{escaped}"'


def render_answers(answers: Mapping[str, Any]) -> bytes:
    lines = ["# mailsetup answers: what `mailsetup init` chose (no secrets). A re-run starts from here.\n"]
    for key in KEYS:
        value = answers.get(key)
        if value is None or value == []:
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines).encode()


def load_answers(path: Path, ours: bool = False) -> dict[str, Any]:
    """An answers file: `--answers FILE` (read as whoever controls its path), or with `ours` the one
    the last run wrote, which root acts on and so reads only from a path no other user controls."""
    from mailsetup.files import read_input, read_secret

    try:
        data = read_secret(Path(path)) if ours else read_input(Path(path))
    except FileNotFoundError:
        raise MailsetupError(f"{path}: no answers file; run `mailsetup init` first") from None
    except OSError as exc:
        raise MailsetupError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise MailsetupError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line N, column M)"; put the place first, as everywhere else.
        msg = str(exc)
        line = ""
        if "(at line " in msg:
            msg, _, where = msg.partition(" (at line ")
            line = ":" + where.split(",")[0]
        raise MailsetupError(f"{path}{line}: {msg}") from None
    unknown = sorted(set(parsed) - set(KEYS))
    if unknown:
        raise MailsetupError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    for key in parsed:
        if any(word in key for word in SECRET_WORDS):
            raise MailsetupError(f"{path}: {key!r}: secrets never go in the answers file")
    if "keep_backups" in parsed:  # judged here, where its line is known
        from mailsetup.model import validate_keep_backups

        parsed["keep_backups"] = validate_keep_backups(
            parsed["keep_backups"], f"{path}{_line_of(data, 'keep_backups')}: keep_backups")
    return parsed


def _line_of(data: bytes, key: str) -> str:
    """":N", the line where `key` is set in a TOML file's text ("" when it is not found plainly)."""
    for number, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if line.split("=", 1)[0].strip().strip("\"'") == key:
            return f":{number}"
    return ""


def kept_backups(root: Path | None, os_name: str | None = None) -> int:
    """How many dated backups of each file the set-up under `root` (or this host's) keeps; the
    default where there is none."""
    from mailsetup.model import DEFAULT_KEEP_BACKUPS

    path = existing_answers(root.absolute() if root else None, os_name)
    if path is None:
        return DEFAULT_KEEP_BACKUPS
    return load_answers(path, ours=True).get("keep_backups", DEFAULT_KEEP_BACKUPS)


def find_answers(root: Path | None, os_name: str | None) -> Path:
    """The answers file of the set-up under `root` (or of this host); an error when there is none."""
    found = existing_answers(root, os_name)
    if found is None:
        where = f" under {root}" if root else ""
        raise MailsetupError(f"no mailsetup set-up found{where} (no answers.toml); run `mailsetup init` first")
    return found


def existing_answers(root: Path | None, os_name: str | None) -> Path | None:
    """The answers file of the set-up under `root` (or of this host), or None when there is none."""
    if os_name:
        path = Path(sandboxed(get_layout(os_name), root).answers)
        return path if path.exists() else None
    detected = detect_os()
    names = ([detected] if detected else []) + sorted(LAYOUTS)
    seen: set[PurePosixPath] = set()
    for name in names:
        path = sandboxed(LAYOUTS[name], root).answers
        if path in seen:
            continue
        seen.add(path)
        if Path(path).exists():
            return Path(path)
    return None


def load_setup(root: Path | None, os_name: str | None = None):
    """The MailSetup a previous `init` wrote, re-validated."""
    from mailsetup.model import build_setup

    path = find_answers(root.absolute() if root else None, os_name)
    answers = load_answers(path, ours=True)
    if root is not None:
        answers["root"] = str(root.absolute())
    try:
        return build_setup(answers)
    except MailsetupError as exc:
        raise MailsetupError(f"{path}: {exc.message}") from None
