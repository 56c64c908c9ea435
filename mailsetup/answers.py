"""The answers file (TOML): what a run chose — never a secret — so later commands and re-runs start
from it. Keys are the flag names without dashes (`smtp_port` for --smtp-port).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from mailsetup.errors import MailsetupError
from mailsetup.platforms import LAYOUTS, detect_os, get_layout, sandboxed

SECRET_WORDS = ("password", "secret", "queue_key")


class AnswersFile(dict):
    """The keys of an answers file, and where each was set: an error names `FILE:LINE: --flag` (a
    key is its flag's name)."""

    def __init__(self, path: Path, data: bytes, values: dict[str, object]):
        super().__init__(values)
        self.path = path
        self._lines = _lines_of(data)

    def where(self, key: str) -> str:
        from mailsetup.model import flag_of

        line = self._lines.get(key)
        return f"{self.path}:{line}: {flag_of(key)}" if line else f"{self.path}: {flag_of(key)}"


def load_answers(path: Path, ours: bool = False) -> AnswersFile:
    """An answers file: `--answers FILE` (read as whoever controls its path), or with `ours` the one
    the last run wrote, which root acts on and so reads only from a path no other user controls."""
    import tomllib  # here: `mailsetup aliases` on a host without answers never needs it

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
    from mailsetup.questions import SAVED_KEYS

    unknown = sorted(set(parsed) - set(SAVED_KEYS))
    if unknown:
        raise MailsetupError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(SAVED_KEYS)})")
    for key in parsed:
        if any(word in key for word in SECRET_WORDS):
            raise MailsetupError(f"{path}: {key!r}: secrets never go in the answers file")
    loaded = AnswersFile(Path(path), data, parsed)
    if "keep_backups" in loaded:  # read by later commands on its own (kept_backups)
        from mailsetup.model import validate_keep_backups

        loaded["keep_backups"] = validate_keep_backups(loaded["keep_backups"], loaded.where("keep_backups"))
    return loaded


def _lines_of(data: bytes) -> dict[str, int]:
    """The line where each key is set plainly (`key = …`) in a TOML file's text."""
    lines: dict[str, int] = {}
    for number, line in enumerate(data.decode("utf-8").split("\n"), 1):
        key = line.split("=", 1)[0].strip().strip("\"'")
        if "=" in line and key not in lines:
            lines[key] = number
    return lines


def kept_backups(root: Path | None, os_name: str | None = None) -> int:
    """How many dated backups of each file the set-up under `root` (or this host's) keeps; the
    default where there is none."""
    from mailsetup.defaults import DEFAULT_KEEP_BACKUPS

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
        return build_setup(answers, where=answers.where)
    except MailsetupError as exc:
        if exc.message.startswith(str(path)):
            raise
        raise MailsetupError(f"{path}: {exc.message}") from None
