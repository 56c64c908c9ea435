"""The `mailsetup` command's entry point: errors become one line and an exit code here, for every
command.

`mailsetup aliases SOURCE [--out DB] [--check] [--smtpd-version V] [--debug]` runs without Typer:
sites rebuild aliases.db on every change, often from scripts, and importing Typer alone takes longer
than makemap's whole run on 10,000 entries (benchmarks/aliases.py). Any other command line, and an
aliases command line this reader does not take whole (--help, a repeated, unknown or empty option,
a value that looks like an option, `--`), goes to the Typer application, which answers as it always
has (its usage errors included)."""

import os
import sys

_ALIASES_VALUES = {"--out": "out", "--smtpd-version": "smtpd_version"}
_ALIASES_SWITCHES = {"--check": "check", "--debug": "debug"}


def aliases_arguments(args: list[str]) -> dict | None:
    """The aliases command's arguments (after `aliases`), or None when Typer must read them."""
    found: dict = {}
    rest = iter(args)
    for arg in rest:
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _ALIASES_VALUES:
            value = value if eq else next(rest, "")
            key = _ALIASES_VALUES[name]
        elif name in _ALIASES_SWITCHES and not eq:
            key, value = _ALIASES_SWITCHES[name], True
        elif not arg.startswith("-") and arg:
            key, value = "source", arg
        else:
            return None
        if key in found or value == "" or (value is not True and value.startswith("-")):
            return None
        if key in ("source", "out") and os.path.exists(value) and not os.access(value, os.R_OK):
            return None  # Typer's Path refuses an unreadable one with a usage error: it says so
        found[key] = value
    return found if "source" in found else None


def _aliases(found: dict) -> None:
    installed = None
    if not found.get("smtpd_version"):  # smtpd -h runs while the rest loads
        from mailsetup.smtpdversion import VersionProbe

        installed = VersionProbe()
    from pathlib import Path

    from mailsetup.artifacts import build_aliases

    out = found.get("out")
    try:
        build_aliases(Path(found["source"]), Path(out) if out else None, bool(found.get("check")),
                      found.get("smtpd_version"), installed)
    finally:
        if installed is not None:
            installed.close()  # unread only when we leave early (an error, Ctrl-C): never left running


def run(command, debug: bool) -> None:
    """Run `command()`, a MailsetupError printed as one line (its hint on a second) and its exit
    code; with --debug, the traceback instead."""
    from mailsetup.errors import Interrupted, MailsetupError

    try:
        if os.geteuid() == 0 and any(v in os.environ for v in ("TMPDIR", "TEMP", "TMP")):
            from mailsetup.files import use_trusted_tempdir

            use_trusted_tempdir()  # root inherits a user's TMPDIR through `su` or pam_tmpdir
        command()
    except MailsetupError as exc:
        if debug:
            raise
        from mailsetup.report import echo, one_line

        error = "" if isinstance(exc, Interrupted) else "error: "
        echo(f"mailsetup: {error}{one_line(exc.message)}", err=True, fg=None if error == "" else "red")
        if exc.hint:
            echo(f"hint: {one_line(exc.hint)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        from mailsetup.report import echo

        echo("mailsetup: interrupted; nothing was left half-written.", err=True)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): as click does, quietly, exit 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush then succeeds
        sys.exit(1)


def main() -> None:
    found = aliases_arguments(sys.argv[2:]) if sys.argv[1:2] == ["aliases"] else None
    if found is not None:
        run(lambda: _aliases(found), bool(found.get("debug")))
        return
    from mailsetup.cli import main as typer_main

    typer_main()
