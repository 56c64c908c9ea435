"""The one exception type for user mistakes: a message for people, caught once in cli.py."""


class MailsetupError(Exception):
    """A user-facing error: one line saying what is wrong and where, and an optional hint.

    `exit_code` is 2 for bad input (usage), 1 for a failed check.
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class Interrupted(MailsetupError):
    """Ctrl-C: the command stops, every file as it was (the CLI framework would otherwise swallow it)."""

    def __init__(self, message: str = "interrupted; nothing was left half-written.") -> None:
        super().__init__(message, exit_code=130)
