"""The guided `mailsetup init` as docs/walkthrough.md shows it: two sessions typed in a real
pseudo-terminal (a first run, then a re-run that rotates the queue key), and the transcript a person
saw once the terminal had drawn it (questionary redraws each prompt as it is answered).

`scripts/walkthrough` records both into the document; tests/test_walkthrough.py records them again
and fails when what the wizard asks no longer matches the document.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from test_wizard import DOWN, answer, finish, first_run, spawn

BEGIN, END = "<!-- recorded by scripts/walkthrough -->", "<!-- end of the recording -->"
SANDBOX = Path("/tmp/demo-wz")  # a fixed place: the document's paths stay the same from one recording to the next
_SPINNER = re.compile(r"^[\u2800-\u28ff] ")  # a braille spinner frame ("⠋ generating keys…")


def rotation_run(root: Path) -> tuple[int, str]:
    child = spawn("init", "--root", root)
    child.expect(r"What now\?")
    child.expect(r"rotate the queue encryption key")
    # the menu's lines drawn before that one (the prompt's own line ends first): the down presses
    child.send(DOWN * (child.before.count("\n") - 1) + "\r")
    answer(child, r"Write these \d+ file\(s\)\?", "y")
    return finish(child)


def clean(raw: str) -> str:
    """What the terminal showed at the end: each answered prompt as its one final line, no menus, no
    spinner frames, no carriage-return overwrites."""
    out: list[str] = []
    menu_of: str | None = None  # the prompt whose menu is being drawn
    for line in raw.replace("\r\n", "\n").split("\n"):
        line = next((part for part in reversed(line.split("\r")) if part.strip()), "").rstrip()
        if _SPINNER.match(line):
            continue
        if menu_of is not None:
            if menu_of not in line:
                continue  # an option of the menu: gone once answered
            line, menu_of = line[line.rfind(menu_of):], None
        elif line.startswith("? "):
            prefix = line[:8]  # "? Again:" is the shortest prompt
            if line.endswith("(Use arrow keys)"):
                menu_of = prefix
                continue
            line = line[line.rfind(prefix):]  # the prompt as drawn while typing, then as answered
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def questions(transcript: str) -> list[str]:
    """The prompts of a transcript, without their answers."""
    asked = []
    for line in transcript.splitlines():
        if line.startswith("? "):
            m = re.match(r"\? (.*?(?:\(--[\w-]+\)[?:]?|\?|:))", line)
            asked.append(m[1] if m else line)
    return asked


def documented(doc: Path) -> tuple[str, str]:
    """The two sessions as docs/walkthrough.md has them."""
    block = doc.read_text().partition(BEGIN)[2].partition(END)[0]
    first, _, again = block.partition("# run again, e.g. a year later")
    return first, again


def record(sandbox: Path | None = None) -> tuple[str, str]:
    """Both sessions in a fresh `sandbox` (SANDBOX, the document's, by default), cleaned; removed
    afterwards. Another sandbox (a test's own, so two runs never share one) is named SANDBOX in the
    transcript."""
    sandbox = sandbox or SANDBOX
    shutil.rmtree(sandbox, ignore_errors=True)
    try:
        code, first = first_run(sandbox, domain="example.org", key_type="")
        assert code == 0, first
        code, again = rotation_run(sandbox)
        assert code == 0, again
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    return tuple(clean(text).replace(str(sandbox), str(SANDBOX)) for text in (first, again))
