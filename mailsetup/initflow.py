"""`mailsetup init` as its steps: resolve (answers in layers, the wizard or the unattended prompter,
one model) → plan (every file in memory) → confirm → apply (and smtpd -n) → prove (the smoke test)
→ report. Rotation is decided here and made safe here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsetup import answers as answers_mod
from mailsetup.errors import Interrupted, MailsetupError
from mailsetup.model import MailSetup
from mailsetup.questions import Answers, can_sign, check_given, default_imap, require_answers


@dataclass
class InitOptions:
    yes: bool = False
    dry_run: bool = False
    diff: bool = False
    rotate_cert: bool = False
    rotate_queue_key: bool = False
    drain: bool = False
    drain_timeout: float = 300.0
    force_rotate: bool = False
    rotate_dkim: bool = False
    force_dkim_switch: bool = False
    nameserver: str | None = None  # where the DKIM switch asks whether the next keys' records are served
    quiet: bool = False
    as_json: bool = False
    answers_file: Path | None = None
    import_conf: Path | None = None  # `mailsetup import` / --import: an smtpd.conf read as the answers file layer
    password_stdin: bool = False
    preflight: bool = True  # on a real host, before writing: what the internet will make of it
    preflight_with: Any = None  # preflight.PreflightOptions (--ip, --nameserver, --probe, --dnsbl); None: defaults
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
        from mailsetup.report import echo

        echo(text, err=err, fg=fg)

    @contextlib.contextmanager
    def working(self, what: str):
        """A spinner on a terminal for the slow steps; silent elsewhere."""
        if self.opts.quiet or self.opts.as_json or not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(what):
            yield


@dataclass
class Run:
    """One init run as its steps fill it in: resolve sets the model, plan the files, apply the result."""

    setup: MailSetup
    interactive: bool
    rotate_cert: bool = False
    rotate_qk: bool = False
    new_user: tuple[str, str] | None = None  # (name, bcrypt hash): beside the model, never recorded
    version_note: str | None = None
    imported: Any = None  # importconf.Imported, for `mailsetup import`
    drain_first: bool = False
    stranded: list = field(default_factory=list)
    prov: Any = None
    results: list = field(default_factory=list)
    paused: bool = False


def gather(flags: dict[str, Any], opts: InitOptions, detected: dict[str, Any]) -> tuple[Answers, bool]:
    """The answers in their layers: flags > --answers file > the last run > detected (the wizard's
    go under the flags); and whether there was a last run."""
    root = Path(flags["root"]) if flags.get("root") else None
    # A missing answers file means a first run; one that is there but does not load stops us: a
    # re-run that silently forgot the last run's choices would reconfigure the server.
    path = answers_mod.existing_answers(root and root.absolute(), flags.get("os"))
    previous = answers_mod.load_answers(path, ours=True) if path is not None else None
    if opts.answers_file and not opts.answers_file.is_file():
        raise MailsetupError(f"--answers: {opts.answers_file}: no such file")
    from_file = answers_mod.load_answers(opts.answers_file) if opts.answers_file else {}
    if previous is None and opts.import_conf is None:
        _offer_import(root, flags.get("os"), opts)
    if opts.import_conf is not None:
        if opts.answers_file:
            raise MailsetupError("--answers: import reads its answers from the smtpd.conf; give the rest as flags")
        from_file = imported_config(opts.import_conf, root, flags.get("os")).answers
    answers = Answers(flags=flags, file=from_file, last_run=previous, detected=detected)
    if previous is None:  # a new set-up signs with DKIM when it can; an existing one keeps its choice
        answers.layers["detected"]["dkim"] = can_sign(answers)
        answers.layers["detected"]["imap"] = default_imap(answers)  # and serves IMAP when Dovecot is here
    if "dovecot_version" in answers.layers["detected"]:  # the installed Dovecot's grammar beats a recorded one
        answers.layers["last run"].pop("dovecot_version", None)
    return answers, bool(previous)


def imported_config(path: Path, root: Path | None, os_name: str | None) -> Any:
    """The smtpd.conf `mailsetup import` reads (read once per run: its queue key rides beside the answers)."""
    from mailsetup import importconf
    from mailsetup.platforms import detect_os, get_layout

    layout = get_layout(os_name or detect_os() or "debian")
    key = (str(path), str(root), os_name)
    if key not in _IMPORTED:
        _IMPORTED[key] = importconf.read_config(path, layout.name, layout.default_listen)
    return _IMPORTED[key]


_IMPORTED: dict[tuple, Any] = {}


def _offer_import(root: Path | None, os_name: str | None, opts: InitOptions) -> None:
    """A first run where an smtpd.conf mailsetup did not write already is: on a terminal, offer to
    import it (its meaning carried over) rather than replace it; unattended, stop and say how (where
    the OS's packaged default can be told apart: dpkg; elsewhere it is replaced, with a backup)."""
    from mailsetup.importconf import default_conf, foreign_conf

    foreign = foreign_conf(default_conf(root, os_name), sandbox=root is not None)
    if foreign is None:
        return
    found, certain = foreign
    if opts.interactive and not opts.yes and not opts.as_json:
        from mailsetup import wizard

        if wizard.confirm(f"{found} was not written by mailsetup. Import it (its domain, listeners, certificate, "
                          "queue and aliases carried over) instead of replacing it?", default=True):
            opts.import_conf = found
        return
    if not certain:  # maybe the OS's own default: replaced as before (a dated backup is kept)
        return
    raise MailsetupError(f"{found}: an smtpd.conf mailsetup did not write is here; `mailsetup import` adopts it",
                         hint="or move it aside to start afresh (replacing it would not carry its meaning over)")


def run_from_options(options: dict[str, Any]) -> int:
    """`mailsetup init` with its options by name: those that answer a question become the flags
    layer; the rest say how to run."""
    p = dict(options)
    p.pop("debug", None)
    rotate = p.pop("rotate")
    rotate_cert, rotate_qk = p.pop("rotate_cert"), p.pop("rotate_queue_key")
    opts = InitOptions(
        yes=p.pop("yes"), dry_run=p.pop("dry_run"), diff=p.pop("diff"), rotate_cert=rotate or rotate_cert,
        rotate_queue_key=rotate or rotate_qk, drain=p.pop("drain"), drain_timeout=p.pop("drain_timeout"),
        force_rotate=p.pop("force_rotate"), quiet=p.pop("quiet"), as_json=p.pop("as_json"),
        rotate_dkim=p.pop("rotate_dkim"), force_dkim_switch=p.pop("force_dkim_switch"),
        nameserver=p.get("nameserver"),  # also the preflight's, taken next
        answers_file=p.pop("answers"), import_conf=p.pop("import_conf", None),
        password_stdin=p.pop("password_stdin"), preflight=not p.pop("no_preflight"),
        preflight_with=_preflight_options(p),
    )
    p["os"], p["smoke"] = p.pop("os_name"), p.pop("smoke_flag")
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in p.items() if v not in (None, [])}
    return run_init(flags, opts, _detected())


def run_dkim(root: Path | None, os_name: str | None, rotate: bool, force_switch: bool, nameserver: str | None,
             yes: bool, dry_run: bool, as_json: bool) -> int:
    """`mailsetup dkim`: DKIM on an existing set-up, through init's own steps (its last answers,
    with DKIM on): the first keys, a rotation (--rotate), or the switch to the pending keys."""
    answers_mod.find_answers(root and root.absolute(), os_name)  # an existing set-up, or one clear line
    flags = {k: v for k, v in {"root": str(root) if root else None, "os": os_name, "dkim": True}.items() if v}
    opts = InitOptions(yes=yes, dry_run=dry_run, as_json=as_json, rotate_dkim=rotate, force_dkim_switch=force_switch,
                       nameserver=nameserver, preflight=False)  # DKIM only: the host was checked by init
    return run_init(flags, opts, _detected())


def _preflight_options(p: dict[str, Any]) -> Any:
    """The preflight's own options, checked now: a bad one stops the run before anything is asked."""
    from mailsetup.preflight import preflight_options

    return preflight_options(p.pop("ip"), p.pop("nameserver"), p.pop("probe"), p.pop("dnsbl"))


def _detected() -> dict[str, Any]:
    """What this host says by itself: the installed smtpd's version (it wins over a recorded one;
    only a version chosen for this run beats it)."""
    from mailsetup.dovecot import dovecot_version
    from mailsetup.opensmtpd import smtpd_version

    found, dovecot = smtpd_version(), dovecot_version()
    return {**({"smtpd_version": f"{found[0]}.{found[1]}"} if found else {}),
            **({"dovecot_version": f"{dovecot[0]}.{dovecot[1]}"} if dovecot else {})}


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
    """resolve → plan → confirm → apply → prove → report."""
    out = Out(opts)
    run = resolve(flags, opts, detected, out)
    plan(run, opts, out)
    preflight(run, opts, out)
    if opts.dry_run:
        out.say("dry run: nothing was written.")
        return report(run, out, smoke_ok=True)
    if not confirm(run, opts, out):
        return 1
    obtain_certificate(run, out)
    apply(run, opts, out, phase)
    return report(run, out, smoke_ok=prove(run, out))


def resolve(flags: dict[str, Any], opts: InitOptions, detected: dict[str, Any], out: Out) -> Run:
    """Every choice into one model: the answers' layers, the wizard for what is missing (or the
    unattended prompter naming the flag), the re-run's action, the first user's password."""
    from mailsetup.model import build_setup

    answers, rerun = gather(flags, opts, detected)
    imported = None
    if opts.import_conf is not None:
        root = Path(flags["root"]) if flags.get("root") else None
        imported = imported_config(opts.import_conf, root, flags.get("os"))
        _say_imported(imported, out)
    version_note = answers.installed_version_wins()
    check_given(answers)  # before anything is asked: a bad flag or file value is not asked around
    interactive = opts.interactive and not opts.yes and not opts.as_json
    rotate = opts.rotate_cert, opts.rotate_queue_key
    password, setup = None, None
    if rerun and interactive:
        setup = build_setup(answers, answers.where)
        rotate, password, changed = _ask_rerun(setup, answers, rotate, out)
        if changed:
            setup = None  # built again from the changed answers
    elif interactive:
        from mailsetup import wizard

        password = wizard.ask_missing(answers)
    else:
        require_answers(answers)
    run = Run(setup=setup or build_setup(answers, answers.where), interactive=interactive, rotate_cert=rotate[0],
              rotate_qk=rotate[1], version_note=version_note, imported=imported)
    run.new_user = _first_user(run, password, opts, out)
    return run


def _say_imported(imported: Any, out: Out) -> None:
    """What import understood, what it leaves behind (file:line each), and any open relay it refused."""
    out.report["import"] = imported.as_dict()
    out.say(f"Imported {imported.path} (OpenSMTPD {imported.grammar} grammar):")
    for f in imported.understood:
        out.say(f"  ✓ {f}")
    for f in imported.dropped:
        out.say(f"  - {f}")
    for f in imported.open_relays:
        out.warn(f"{f}")


def _ask_rerun(setup: MailSetup, answers: Answers, rotate: tuple[bool, bool],
               out: Out) -> tuple[tuple[bool, bool], str | None, bool]:
    """A re-run on a terminal: the state, then keep / rotate / change. Returns (rotation, the
    password of a first user asked for, whether the answers changed)."""
    from mailsetup import state, wizard

    out.say(f"Found the set-up for {setup.domain} ({setup.layout.answers}):")
    for line in state.read_state(setup).lines():
        out.say(f"  {line}")
    if any(rotate):
        return rotate, None, False
    action = wizard.ask_rerun_action()
    rotate = action in ("rotate-cert", "rotate-all"), action in ("rotate-queue-key", "rotate-all")
    if action != "change":
        return rotate, None, False
    return rotate, wizard.ask_missing(answers, change_all=True), True


def _first_user(run: Run, password: str | None, opts: InitOptions, out: Out) -> tuple[str, str] | None:
    """(name, bcrypt hash) of the login to add, its password read as `user add` reads one."""
    from mailsetup import credentials

    user = run.setup.first_user
    if not user:
        return None
    if password is None:
        from mailsetup import wizard

        ask = (lambda: wizard.ask_password(user)) if run.interactive else None
        password = credentials.read_password(opts.password_stdin, ask,
                                             "--user: give the password on standard input with --password-stdin")
    with out.working("hashing the password…"):
        return user, credentials.hash_password(password)


def plan(run: Run, opts: InitOptions, out: Out) -> None:
    """Every file in memory (the queue key's rotation checked first), shown with its diff."""
    from mailsetup import provision, report

    setup = run.setup
    if run.rotate_qk and setup.queue.encryption and Path(setup.queue.key_file).exists():
        run.drain_first, run.stranded = _queue_key_rotation_plan(setup, opts, out, run.interactive)
    switch = _dkim_switch(setup, opts, out)
    with out.working("generating keys…"):
        prov = provision.build_plan(setup, rotate_cert=run.rotate_cert, rotate_queue_key=run.rotate_qk,
                                    new_user=run.new_user, rotate_dkim=opts.rotate_dkim, dkim_switch=switch,
                                    queue_key=run.imported.queue_key if run.imported else None,
                                    logins=run.imported.logins if run.imported else None)
    if run.version_note:
        prov.notes.insert(0, run.version_note)
    out.report["files"] = prov.files_report()
    if not opts.as_json and not opts.quiet:
        report.print_plan(prov, show_diff=opts.diff or opts.dry_run or run.interactive)
    out.warnings.extend(prov.warnings)
    out.report["warnings"] = list(out.warnings)
    if run.version_note:
        out.report["notes"] = [run.version_note]
    run.prov = prov


def _dkim_switch(setup: MailSetup, opts: InitOptions, out: Out) -> bool:
    """Whether the pending DKIM keys start signing in this run: only once DNS serves their records
    (asked now, of the system's resolver or --nameserver), or when forced."""
    from mailsetup import dns

    unpublished = dns.unpublished_pending_dkim(setup, opts.nameserver) if setup.dkim else None
    if not unpublished:  # no pending keys (None), or all their records served ([])
        return unpublished == []
    if opts.force_dkim_switch:
        out.warn("DKIM: switching to the pending keys without checking DNS (--force-dkim-switch)")
        return True
    for c in unpublished:
        out.warn(f"DKIM: {c.record.name} is {c.detail}, so signing stays with the current keys; publish it "
                 "(mailsetup dns) and run again, or pass --force-dkim-switch")
    return False


def preflight(run: Run, opts: InitOptions, out: Out) -> None:
    """On a real host, before anything is written: DNS, blocklists and port 25 as the internet sees
    them. Advice only: a ✗ never fails the run. A --root sandbox is no host on the internet: not asked."""
    if run.setup.root is not None:
        return
    if not opts.preflight:
        out.say("Preflight skipped.")
        return
    from mailsetup import preflight as preflight_mod
    from mailsetup import report

    with out.working("preflight: DNS, blocklists, port 25…"):
        pre = preflight_mod.run_preflight(run.setup, opts.preflight_with or preflight_mod.PreflightOptions())
    out.report["preflight"] = pre.as_dict()
    if not opts.as_json and not opts.quiet:
        report.print_preflight(pre)
    if not pre.ok:
        out.warn("preflight: the ✗ above keep mail from arriving or being accepted; once fixed, re-check with "
                 "`mailsetup preflight`")


def confirm(run: Run, opts: InitOptions, out: Out) -> bool:
    """Whether to write: nothing pending, --yes, or the person says so."""
    from mailsetup import report

    pending = run.prov.plan.pending()
    if not pending:
        out.say("Everything is already in place; nothing to write.")
        return True
    if opts.yes:
        return True
    if not run.interactive:
        raise MailsetupError("nothing written: pass --yes to write without asking (no terminal to ask on)")
    from mailsetup import wizard

    report.print_warnings(out.warnings)  # read before saying yes; repeated at the end
    if not wizard.confirm(f"Write these {len(pending)} file(s)?", default=True):
        out.say("Nothing written.")
        return False
    return True


def obtain_certificate(run: Run, out: Out) -> None:
    """--tls acme: certbot gets the certificate before anything of ours is written (smtpd -n needs it);
    when it cannot, init stops with certbot's reason and nothing written."""
    from mailsetup import acme

    setup = run.setup
    if setup.tls.source != "acme" or (acme.have_certificate(setup) and not run.rotate_cert):
        return
    with out.working("certbot: obtaining the certificate…"):
        done = acme.obtain(setup, force=run.rotate_cert)
    out.say(done)
    out.report["certificate"] = done


def apply(run: Run, opts: InitOptions, out: Out, phase: dict[str, bool]) -> None:
    """Write (draining smtpd first when the queue key rotates), then smtpd -n judges the result."""
    from mailsetup import apply as apply_step
    from mailsetup import report, state

    setup = run.setup
    with state.interrupt_on_termination():  # a kill or a hang-up while paused must resume smtpd too
        if run.drain_first:  # only now, after the user said yes and not in a dry run
            _drain(setup, opts, out)  # resumes smtpd itself when it fails or is interrupted
            run.paused = True
        try:
            run.results, verdict = apply_step.apply_and_verify(run.prov)
        except BaseException:
            if run.paused:
                state.resume_opensmtpd(out.say)
            raise
    phase["written"] = True
    defect = apply_step.installed_smtpd_warning()
    if run.paused:
        from mailsetup.platforms import restart_command

        phase["paused"] = True
        out.warn("smtpd's intake stays paused until you restart it with the new key: "
                 + (restart_command(setup.layout) if setup.root is None else setup.layout.restart))
    if not opts.quiet and not opts.as_json:
        report.print_applied(run.results)
        report.print_verdict(verdict, defect)
        if run.prov.dovecot_check is not None and run.prov.dovecot_check.text:
            out.say(("✓ " if run.prov.dovecot_check.ran else "- ") + run.prov.dovecot_check.text)
    out.report["smtpd_check"] = {"ran": verdict.ran, "ok": verdict.ok, "detail": verdict.text}
    if run.prov.dovecot_check is not None and run.prov.dovecot_check.text:
        check = run.prov.dovecot_check
        out.report["dovecot_check"] = {"ran": check.ran, "ok": check.ok, "detail": check.text}
    if run.rotate_qk:
        out.say("queue key rotated; the old one is kept in a dated 0600 backup beside it.")
        if run.stranded:
            _say_recovery(setup, run.results, run.stranded, out)


def prove(run: Run, out: Out) -> bool:
    """The smoke test on the written files, unless it was declined."""
    if not run.setup.smoke:
        out.say("Smoke test skipped.")
        return True
    from mailsetup import report
    from mailsetup.smoke import run_smoke as smoke

    with out.working("smoke test…"):
        sr = smoke(run.setup)
    out.report["smoke"], ok = [c.as_dict() for c in sr.checks], sr.ok
    if not out.opts.as_json and not out.opts.quiet:
        report.print_smoke(sr)
    return ok


def report(run: Run, out: Out, smoke_ok: bool) -> int:
    """Next steps (after a write), the warnings last, the JSON report; a failed smoke test fails the run."""
    from mailsetup import report as report_mod

    if not out.opts.dry_run:
        out.report["next_steps"] = report_mod.next_steps(run.setup)
        if not out.opts.as_json and not out.opts.quiet:
            report_mod.print_next_steps(run.setup)
    out.say_warnings()
    _emit_json(out)
    if not smoke_ok:
        raise MailsetupError("the smoke test failed (see the ✗ above); the files stay written", exit_code=1)
    return 0


def _emit_json(out: Out) -> None:
    if out.opts.as_json:
        from mailsetup.report import print_json

        print_json(out.report)


def _queue_key_rotation_plan(setup, opts: InitOptions, out: Out, interactive: bool) -> tuple[bool, list]:
    """OpenSMTPD holds one queue key: mail queued under the old one would be stranded. Refuses, or
    returns (drain first, what --force-rotate strands); the drain is done only once the user confirmed."""
    from mailsetup import state

    waiting = state.queued_mail(setup)
    if not waiting:
        out.say("queue is empty: safe to rotate the queue key.")
        # ...for now: a running smtpd keeps taking mail, under the old key, until it is restarted with
        # the new one, and that mail would be stranded. Its intake is paused before the new key is
        # written (the drain then ends at once) and stays paused until the restart.
        return setup.root is None and state.smtpd_answers(), []
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
