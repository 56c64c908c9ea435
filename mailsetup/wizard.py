"""The guided flow: questionary prompts that fill in only the answers no flag, answers file or earlier
run gave. It collects answers and never writes a file; each question names its flag.
"""

from __future__ import annotations

from typing import Any

from mailsetup.questions import QUESTIONS, Answers, Question, check_typed


def _ask(question) -> Any:
    # unsafe_ask raises KeyboardInterrupt on Ctrl-C (ask() would print and return None).
    return question.unsafe_ask()


def _wanted(q: Question, answers: Answers, change_all: bool) -> bool:
    """Not given by a flag, it applies, and it has no answer yet (or the user changes everything)."""
    if q.kind == "setting" or q.key in answers.given or not q.when(answers):
        return False
    # A value only detected (DKIM on when the filter is installed) is the default offered, not an answer.
    return (change_all and q.reask) or answers.get(q.key) in (None, "") or answers.source(q.key) == "detected"


def _prompt(q: Question, answers: Answers):
    import questionary

    if q.kind == "confirm":
        return questionary.confirm(q.prompt, default=q.default(answers))
    if q.kind == "path":
        return questionary.path(q.prompt)
    if q.kind == "select":
        choices = [questionary.Choice(label, value=value) for value, label in q.choices()]
        default = next((c for c in choices if c.value == q.default(answers)), None)
        return questionary.select(q.prompt, choices=choices, default=default)
    return questionary.text(q.prompt, default=str(q.default(answers)), validate=check_typed(q, answers))


def ask_missing(answers: Answers, change_all: bool = False) -> str | None:
    """Ask, in the table's order, each question no flag answered and no other layer did (with
    change_all, every question no flag answered, offering the current answer as the default).
    The answers go into the wizard's layer; the first user's password, if any, is returned."""
    import questionary

    password = None
    for q in QUESTIONS:
        if not _wanted(q, answers, change_all):
            continue
        if q.ask_first and not _ask(questionary.confirm(q.ask_first, default=False)):
            continue
        if q.explain:
            questionary.print(q.explain)
        value = _ask(_prompt(q, answers))
        if value in (None, ""):
            continue
        answers.answer(q.key, value)
        if q.then_password:
            password = ask_password(value)
    return password


def _rules_check(text: str) -> bool | str:
    from mailsetup.credentials import check_password_rules
    from mailsetup.errors import MailsetupError

    try:
        check_password_rules(text)
    except MailsetupError as exc:
        return exc.message
    return True


def ask_password(user: str) -> str:
    import questionary

    while True:
        first = _ask(questionary.password(
            f"Password for {user} (hidden):", validate=_rules_check))
        again = _ask(questionary.password("Again:"))
        if first == again:
            return first
        questionary.print("The two passwords differ; once more.", style="fg:ansired")


RERUN_CHOICES = {
    "keep": "keep everything (no key or certificate changes)",
    "rotate-cert": "rotate the certificate (new key and certificate)",
    "rotate-queue-key": "rotate the queue encryption key",
    "rotate-all": "rotate both",
    "change": "change settings",
}


def ask_rerun_action() -> str:
    import questionary

    choices = [questionary.Choice(text, value=value) for value, text in RERUN_CHOICES.items()]
    return _ask(questionary.select("This host is already set up. What now?", choices=choices, default=choices[0]))


def confirm(message: str, default: bool = False) -> bool:
    import questionary

    return bool(_ask(questionary.confirm(message, default=default)))
