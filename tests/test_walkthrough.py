"""docs/walkthrough.md is what a person sees: the guided init is typed again in a real
pseudo-terminal (walkthrough_kit) and the document must still ask the same questions, in the same
order, and show the same smoke-test checks. When the wizard changes, run scripts/walkthrough."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import walkthrough_kit as kit

DOC = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
CHECK = re.compile(r"^  [✓✗!] ([^:]+):", re.M)

pytestmark = pytest.mark.once  # the wizard's questions are the same on every release


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[str, str]:
    return kit.record(tmp_path_factory.mktemp("walkthrough") / "demo-wz")


def test_the_walkthrough_asks_what_the_wizard_asks(recorded: tuple[str, str]):
    first, again = kit.documented(DOC)
    assert kit.questions(recorded[0]) == kit.questions(first), "docs/walkthrough.md is stale: run scripts/walkthrough"
    assert kit.questions(recorded[1]) == kit.questions(again), "docs/walkthrough.md is stale: run scripts/walkthrough"
    assert len(kit.questions(first)) >= 10 and "What now?" in kit.questions(again)[0]


def test_the_walkthrough_shows_the_checks_the_smoke_test_runs(recorded: tuple[str, str]):
    first, again = kit.documented(DOC)
    assert CHECK.findall(recorded[0]) == CHECK.findall(first), "docs/walkthrough.md is stale: run scripts/walkthrough"
    assert CHECK.findall(recorded[1]) == CHECK.findall(again), "docs/walkthrough.md is stale: run scripts/walkthrough"
    assert len(CHECK.findall(first)) >= 10


def test_the_transcript_is_what_the_terminal_showed(recorded: tuple[str, str]):
    """Each answered prompt once, as its final line: no menus, no prompts drawn twice, no spinner."""
    for text in recorded:
        lines = text.splitlines()
        asked = [line for line in lines if line.startswith("? ")]
        assert all(line.count(line[:8]) == 1 for line in asked), asked
        assert not any("(Use arrow keys)" in line or line.startswith(" » ") for line in lines)
        assert not any("\r" in line or "\x1b" in line or re.match(r"[\u2800-\u28ff] ", line) for line in lines)
    assert re.search(r"^\? Write these \d+ file\(s\)\? Yes$", recorded[0], re.M) and "? Again: ****" in recorded[0]
