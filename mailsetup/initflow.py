"""`mailsetup init` from end to end: answers (flags > answers file > the last run > detected), the
wizard for what is still missing, the plan and its review, the write, smtpd -n, the smoke test, the
report. Rotation is decided here and made safe here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsetup import answers as answers_mod
from mailsetup.errors import Interrupted, MailsetupError


@dataclass
class InitOptions:
    yes: bool = False
    dry_run: bool = False
    diff: bool = False
    smoke: bool | None = None  # None: yes, unless the wizard is told otherwise
    rotate_cert: bool = False
    rotate_queue_key: bool = False
    drain: bool = False
    drain_timeout: float = 300.0
    force_rotate: bool = False
    quiet: bool = False
    as_json: bool = False
    answers_file: Path | None = None
    password_stdin: bool = False
    interactive: bool = field(default_factory=lambda: sys.stdin.isatty() and sys.stdout.isatty())


class Out:
    """Where init talks: plain lines, nothing with --quiet but errors, JSON at the end with --json."""

    def __init__(self, opts: InitOptions):
        self.opts = opts
        self.report: dict[str, Any] = {}
        self.warnings: list[str] = []  # printed together at the end (report.print_warnings)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def say_warnings(self) -> None:
        self.report["warnings"] = list(self.warnings)
        if not (self.opts.quiet or self.opts.as_json):
            from mailsetup import report

            report.print_warnings(self.warnings)

    def say(self, text: str = "", fg: str | None = None, err: bool = False) -> None:
        if self.opts.quiet or (self.opts.as_json and not err):
            return
        import typer

        if fg and not os.environ.get("NO_COLOR"):
            text = typer.style(text, fg=fg)
        typer.echo(text, err=err)

    @contextlib.contextmanager
    def working(self, what: str):
        """A spinner on a terminal for the slow steps; silent elsewhere."""
        if self.opts.quiet or self.opts.as_json or not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(what):
            yield


REQUIRED = ("domain",)


def gather(flags: dict[str, Any], opts: InitOptions, out: Out,
           detected: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict | None]:
    """Merge flags > --answers file > the last run > detected; returns (answers, last run or None)."""
    detected = detected or {}
    root = Path(flags["root"]) if flags.get("root") else None
    previous = None
    # A missing answers file means a first run; one that is there but does not load stops us: a
    # re-run that silently forgot the last run's choices would reconfigure the server.
    path = answers_mod.existing_answers(root and root.absolute(), flags.get("os"))
    if path is not None:
        previous = answers_mod.load_answers(path, ours=True)
    if opts.answers_file and not opts.answers_file.is_file():
        raise MailsetupError(f"--answers: {opts.answers_file}: no such file")
    from_file = answers_mod.load_answers(opts.answers_file) if opts.answers_file else {}
    merged = {**detected, **(previous or {}), **from_file, **flags}
    return merged, previous


def run_init(flags: dict[str, Any], opts: InitOptions, detected: dict[str, Any] | None = None) -> int:
    if not 0 < opts.drain_timeout < float("inf"):
        raise MailsetupError(f"--drain-timeout: {opts.drain_timeout:g} is not a positive number of seconds")
    phase: dict[str, bool] = {}
    try:
        return _run_init(flags, opts, detected or {}, phase)
    except KeyboardInterrupt:
        if phase.get("written"):
            paused = "; smtpd's intake stays paused until you restart it" if phase.get("paused") else ""
            raise Interrupted("interrupted after writing: every file is complete and passed smtpd -n; "
                              f"run `mailsetup smoke` to finish the test{paused}") from None
        # apply_and_verify has already put back anything it had written when the interrupt came.
        raise Interrupted() from None


def _run_init(flags: dict[str, Any], opts: InitOptions, detected: dict[str, Any], phase: dict[str, bool]) -> int:
    from mailsetup import credentials, provision, report, state
    from mailsetup.model import build_setup

    out = Out(opts)
    given = set(flags)
    answers, previous = gather(flags, opts, out, detected)
    chosen_now = given | set(answers_mod.load_answers(opts.answers_file) if opts.answers_file else ())
    version_note = answers_mod.installed_version_wins(answers, chosen_now, detected.get("smtpd_version"))
    interactive = opts.interactive and not opts.yes and not opts.as_json

    rotate_cert, rotate_qk = opts.rotate_cert, opts.rotate_queue_key
    if previous and interactive:
        setup_now = build_setup(answers)
        out.say(f"Found the set-up for {setup_now.domain} ({setup_now.layout.answers}):")
        for line in state.read_state(setup_now).lines():
            out.say(f"  {line}")
        from mailsetup import wizard

        if not (rotate_cert or rotate_qk):
            action = wizard.ask_rerun_action()
            rotate_cert = action in ("rotate-cert", "rotate-all")
            rotate_qk = action in ("rotate-queue-key", "rotate-all")
            if action == "change":
                answers = wizard.ask_missing(answers, given, change_all=True)
    elif interactive:
        from mailsetup import wizard

        answers = wizard.ask_missing(answers, given)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in REQUIRED if not answers.get(k)]
        if missing:
            raise MailsetupError(
                f"missing {', '.join(missing)} (the mail domain, e.g. --domain example.org)"
                + ("" if opts.yes or not sys.stdin.isatty() else "")
            )

    password = answers.pop("_password", None)
    answers.pop("_users_exist", None)
    smoke_wanted = answers.pop("smoke", None)
    user = answers.pop("user", None)
    if user and password is None:
        credentials.validate_username(user, "--user")
        password = _password_from(opts, interactive, user)
    setup = build_setup(answers)
    new_user = None
    if user:
        with out.working("hashing the password…"):
            new_user = (credentials.validate_username(user, "--user"), credentials.hash_password(password))

    drain_first, stranded = False, []
    if rotate_qk and setup.queue.encryption and Path(setup.queue.key_file).exists():
        drain_first, stranded = _queue_key_rotation_plan(setup, opts, out, interactive)

    with out.working("generating keys…"):
        prov = provision.build_plan(setup, admin=answers.get("admin"), raw=answers, rotate_cert=rotate_cert,
                                    rotate_queue_key=rotate_qk, new_user=new_user)
    if version_note:
        prov.notes.insert(0, version_note)
    if not opts.as_json and not opts.quiet:
        report.print_plan(prov, show_diff=opts.diff or opts.dry_run or interactive)
    out.report["files"] = [
        {"path": str(c.path), "mode": f"{c.mode:04o}", "state": c.state(), "reason": c.reason}
        for c in prov.plan.changes
    ]
    out.warnings.extend(prov.warnings)
    out.report["warnings"] = list(out.warnings)
    if version_note:
        out.report["notes"] = [version_note]
    if opts.dry_run:
        out.say("dry run: nothing was written.")
        out.say_warnings()
        _emit_json(out)
        return 0
    pending = prov.plan.pending()
    if not pending:
        out.say("Everything is already in place; nothing to write.")
    elif not opts.yes:
        if not interactive:
            raise MailsetupError("nothing written: pass --yes to write without asking (no terminal to ask on)")
        from mailsetup import wizard

        report.print_warnings(out.warnings)  # read before saying yes; repeated at the end
        if not wizard.confirm(f"Write these {len(pending)} file(s)?", default=True):
            out.say("Nothing written.")
            return 1
    paused = False
    with state.interrupt_on_termination():  # a kill or a hang-up while paused must resume smtpd too
        if drain_first:  # only now, after the user said yes and not in a dry run
            _drain(setup, opts, out)  # resumes smtpd itself when it fails or is interrupted
            paused = True
        try:
            results, verdict = provision.apply_and_verify(prov)
        except BaseException:
            if paused:
                state.resume_opensmtpd(out.say)
            raise
    phase["written"] = True
    if paused:
        from mailsetup.platforms import restart_command

        phase["paused"] = True
        out.warn("smtpd's intake stays paused until you restart it with the new key: "
                 + (restart_command(setup.layout) if setup.root is None else setup.layout.restart))
    if not opts.quiet and not opts.as_json:
        report.print_applied(results)
        report.print_verdict(verdict, provision.installed_smtpd_warning())
    out.report["smtpd_check"] = {"ran": verdict.ran, "ok": verdict.ok, "detail": verdict.text}
    if rotate_qk:
        out.say("queue key rotated; the old one is kept in a dated 0600 backup beside it.")
        if stranded:
            _say_recovery(setup, results, stranded, out)

    smoke_ok = True
    run_smoke = opts.smoke if opts.smoke is not None else (smoke_wanted if smoke_wanted is not None else True)
    if run_smoke:
        from mailsetup.smoke import run_smoke as smoke

        with out.working("smoke test…"):
            sr = smoke(setup)
        out.report["smoke"] = [c.as_dict() for c in sr.checks]
        smoke_ok = sr.ok
        if not opts.as_json and not opts.quiet:
            report.print_smoke(sr)
    else:
        out.say("Smoke test skipped.")
    out.report["next_steps"] = provision.next_steps(setup)
    if not opts.as_json and not opts.quiet:
        report.print_next_steps(setup)
    out.say_warnings()
    _emit_json(out)
    if not smoke_ok:
        raise MailsetupError("the smoke test failed (see the ✗ above); the files stay written", exit_code=1)
    return 0


def _emit_json(out: Out) -> None:
    if out.opts.as_json:
        import typer

        typer.echo(json.dumps(out.report, indent=2))


def _password_from(opts: InitOptions, interactive: bool, user: str = "") -> str:
    if opts.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise MailsetupError("--password-stdin: no password on standard input")
        return line
    if interactive:
        from mailsetup import wizard

        return wizard.ask_password(user)
    raise MailsetupError("--user: give the password on standard input with --password-stdin")


def _queue_key_rotation_plan(setup, opts: InitOptions, out: Out, interactive: bool) -> tuple[bool, list]:
    """OpenSMTPD holds one queue key: mail queued under the old one would be stranded. Refuses, or
    returns (drain first, what --force-rotate strands); the drain is done only once the user confirmed."""
    from mailsetup import state

    waiting = state.queued_mail(setup)
    if not waiting:
        out.say("queue is empty: safe to rotate the queue key.")
        return False, []
    what = "; ".join(map(str, waiting))
    if opts.force_rotate:
        out.warn(f"rotating anyway (--force-rotate); stranded: {what}")
        return False, waiting
    if all(w.drainable for w in waiting):
        if interactive and not opts.drain:
            from mailsetup import wizard

            opts.drain = wizard.confirm(
                f"Mail is queued ({what}). Pause smtpd's intake and wait for it to drain before rotating?",
                default=True)
        if opts.drain:
            return True, []
    elif opts.drain:
        raise MailsetupError(
            f"--drain: not rotating the queue key: {what}, and no running smtpd can deliver it first; start "
            "smtpd (with the current key) and retry, or pass --force-rotate to strand it", exit_code=1)
    raise MailsetupError(
        f"not rotating the queue key: {what}. OpenSMTPD holds one key and cannot read mail queued under "
        "another; let the queue drain (--drain pauses smtpd and waits), or pass --force-rotate to strand it",
        exit_code=1,
    )


def _drain(setup, opts: InitOptions, out: Out) -> None:
    from mailsetup import state

    state.drain_opensmtpd(opts.drain_timeout, out.say)
    try:  # smtpd is paused from here on: whatever stops us must resume it
        left = state.queued_mail(setup)
    except BaseException:
        state.resume_opensmtpd(out.say)
        raise
    if left:
        state.resume_opensmtpd(out.say)
        raise MailsetupError(f"not rotating the queue key: still queued after draining: {'; '.join(map(str, left))}",
                             exit_code=1)


def recovery_steps(setup, old_key: Path | None, old_conf: Path | None) -> list[str]:
    """How to deliver mail queued under a replaced queue key: smtpd with that key, drained, then the new one."""
    start_old = (f"smtpd -f {old_conf}" if old_conf
                 else f"smtpd with `queue encryption` set to the key kept in {old_key or 'the old key backup'}")
    return [
        "run smtpd with the old key, taking no new mail: an smtpd not restarted since still has it; otherwise "
        f"stop smtpd and start {start_old}; then: smtpctl pause smtp",
        "wait until `smtpctl show queue` prints nothing: that mail has been delivered"
        + (f" (the old key stays in {old_key})" if old_key else ""),
        f"restart smtpd with the new key, which also takes mail again: {setup.layout.restart}",
    ]


def _say_recovery(setup, results, stranded: list, out: Out) -> None:
    stranded = [w for w in stranded if w.smtpd]
    if not stranded:
        return
    backups = {Path(r.path): r.backup for r in results if r.backup is not None}
    old_key = backups.get(Path(setup.queue.key_file))
    old_conf = backups.get(Path(setup.layout.smtpd_conf))
    steps = recovery_steps(setup, old_key, old_conf)
    out.report["stranded"] = {"queued": [str(w) for w in stranded], "old_key": str(old_key) if old_key else None,
                              "recover": steps}
    # One warning, printed last with the others, where a person reads it.
    out.warn(f"stranded under the old key: {'; '.join(map(str, stranded))}. To deliver it:"
             + "".join(f"\n      {n}. {step}" for n, step in enumerate(steps, 1)))
