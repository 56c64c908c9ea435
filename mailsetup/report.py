"""What init tells the user: the plan (files, modes, states, diffs), what was written, the checks,
and the next steps for this OS.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `mailsetup keygen` prints through echo() without loading the model
    from mailsetup.model import MailSetup
    from mailsetup.plan import Applied

_STATE_COLOR = {"new": "green", "replaced": "yellow", "unchanged": None}


_FG = {"black": 30, "red": 31, "green": 32, "yellow": 33, "blue": 34, "magenta": 35, "cyan": 36, "white": 37}
_ANSI = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")


def _style(text: str, fg: str | None, bold: bool = False) -> str:
    if os.environ.get("NO_COLOR") or not fg and not bold:
        return text
    color = f"\033[{_FG[fg]}m" if fg else ""
    return color + ("\033[1m" if bold else "") + text + "\033[0m"


def _write(text: str = "", err: bool = False) -> None:
    """A line out as click.echo writes it (flushed; colour codes only on a terminal), without loading
    Typer and click: `mailsetup aliases` prints through here on its Typer-free way (entry.py)."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    if "\033" in text and not _isatty(stream):
        text = _ANSI.sub("", text)
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:  # an ASCII-only stream (PYTHONIOENCODING=ascii): '?' for what it cannot show
        encoding = stream.encoding or "ascii"
        stream.write((text + "\n").encode(encoding, "replace").decode(encoding))
    stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def echo(text: str = "", err: bool = False, fg: str | None = None) -> None:
    """One line for a person, coloured unless NO_COLOR is set."""
    _write(_style(text, fg), err=err)


def print_plan(prov, show_diff: bool) -> None:
    setup: MailSetup = prov.setup
    _write(
        f"mailsetup: {setup.domain} on {setup.hostname} ({setup.layout.title}, smtpd "
        f"{setup.smtpd_version[0]}.{setup.smtpd_version[1]}"
        + (f", under {setup.root}" if setup.root else "")
        + ")"
    )
    for note in prov.notes:
        _write(f"  - {note}")
    _write("Plan:")
    for change in prov.plan.changes:
        state = change.state()
        _write(
            f"  {_style(f'{state:<9}', _STATE_COLOR[state])} {change.mode:04o}  {change.path}  ({change.reason})"
        )
    if show_diff:
        for change in prov.plan.changes:
            if change.state() == "unchanged":
                continue
            for line in change.diff().splitlines():
                color = "green" if line.startswith("+") else "red" if line.startswith("-") else None
                _write(_style(line, color))


def print_applied(results: list[Applied]) -> None:
    written = [r for r in results if r.state != "unchanged"]
    _write(f"Wrote {len(written)} file(s).")
    for r in written:
        if r.backup:
            _write(f"  backup of the old {r.path.name}: {r.backup}")


def print_verdict(verdict, defect: str | None) -> None:
    mark = _style("✓", "green") if verdict.ok else _style("✗", "red")
    if verdict.ran:
        _write(f"{mark} smtpd -n: {verdict.text}")
    else:
        _write(f"- {verdict.text}")
    if defect:
        _write(_style(f"✗ installed OpenSMTPD: {defect}", "red"))


def print_next_steps(setup: MailSetup) -> None:
    _write("Next steps:")
    for step in next_steps(setup):
        _write(f"  {step}")


def print_warnings(warnings: list[str]) -> None:
    """The warnings of a run, together and last, where a person reads them (and once more just before
    a question that depends on them)."""
    if not warnings:
        return
    _write(_style("Warnings:", "yellow", bold=True), err=True)
    for warning in warnings:
        _write(_style(f"  ! {warning}", "yellow"), err=True)


def print_json(value) -> None:
    """Every command's --json output: one document on stdout, indented the same way."""
    import json

    _write(json.dumps(value, indent=2))


def print_smoke(sr, as_json: bool = False) -> None:
    """The smoke report as text (✓/✗ and a total) or as a JSON list of its checks."""
    if as_json:
        print_json([c.as_dict() for c in sr.checks])
        return
    _write("Smoke test (on loopback, with the set-up's own files):")
    for c in sr.checks:
        mark = _style("✓", "green") if c.ok else _style("✗", "red")
        _write(f"  {mark} {c.name}: {c.detail} ({c.seconds:.2f}s)")
    total = sum(c.seconds for c in sr.checks)
    passed = sum(c.ok for c in sr.checks)
    _write(_style(f"  {passed}/{len(sr.checks)} passed in {total:.1f}s", "green" if sr.ok else "red"))


_MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}
_COLORS = {"ok": None, "warn": "yellow", "fail": "red"}


def print_doctor(findings, as_json: bool = False) -> None:
    """doctor's findings as text (✓ / ! / ✗ and a count) or as a JSON list."""
    if as_json:
        print_json([f.as_dict() for f in findings])
        return
    for f in findings:
        _write(_style(f"{_MARKS[f.status]} {f.name}: {f.detail}", _COLORS[f.status]))
    fails = sum(f.status == "fail" for f in findings)
    warns = sum(f.status == "warn" for f in findings)
    _write(_style(f"{len(findings) - fails - warns} ok, {warns} warning(s), {fails} problem(s)",
                      "red" if fails else "green"))


def print_preflight(pre, as_json: bool = False) -> None:
    """preflight's checks: a heading naming what was checked, then the lines as doctor prints them."""
    if as_json:
        print_json(pre.as_dict())
        return
    where = ", ".join(pre.addresses) or "no public address known"
    _write(f"Preflight: {pre.setup.hostname} ({where}) and {pre.setup.domain}, as the internet sees them:")
    print_doctor(pre.findings)


def print_dns(setup: MailSetup, records, ptr: list[str], have_ips: bool, comparisons,
              left_out: list[str] = (), mta_sts: dict | None = None) -> None:
    from mailsetup.dns import GROUPS, client_ports, group_of

    # Shown by what each record does; the snippet stays pasteable (its headings are zone comments).
    ordered = [r for key in GROUPS for r in records if group_of(r) == key]
    _write(f"; zone-file snippet for {setup.domain}")
    for key, title in GROUPS.items():
        group = [r for r in ordered if group_of(r) == key]
        if not group and key != "routing":
            continue
        _write(f"; -- {title}")
        for r in group:
            _write(r.zone_line())
        if key == "routing":
            for why in left_out:  # a zone-file comment: the snippet can still be pasted as it is
                _write(f"; {why}")
            if not have_ips:
                _write(f"{setup.hostname + '.':<32} 3600 IN A     <this host's public IPv4: pass --ip>")
    _write("")
    _write(f"{'name':<32} {'type':<5} {'value':<60} why")
    for r in ordered:
        _write(f"{r.name:<32} {r.type:<5} {r.value:<60} {r.why}")
    for line in ptr:
        _write(f"PTR: {line}")
    if mta_sts is not None:
        _write("")
        for line in _mta_sts_lines(setup, mta_sts):
            _write(line)
    ports = client_ports(setup)
    offered = [f"{name} on {setup.hostname} port {port}" for name, port in ports.items() if port is not None]
    missing = [name for name, port in ports.items() if port is None]
    _write(f"Mail clients (RFC 6186) find {', '.join(offered)}"
               + (f"; \"0 0 0 .\" says {', '.join(missing)} not offered here" if missing else "") + ".")
    if setup.imap == "dovecot":
        from mailsetup.dns import autoconfig_url

        _write(f"Thunderbird autoconfig: {setup.layout.autoconfig_file}; serve it at {autoconfig_url(setup)} "
                   f"(point autoconfig.{setup.domain} at that web server).")
    if comparisons is None:
        return
    _write("")
    for c in comparisons:
        found = f" (found: {', '.join(c.found)})" if c.found and c.status != "ok" else ""
        _write(_style(f"{_MARKS[c.status]} {c.record.type} {c.record.name}: {c.detail}{found}", _COLORS[c.status]))


def _mta_sts_lines(setup: MailSetup, info: dict) -> list[str]:
    """Where the MTA-STS policy is, where it must be served, and what its mode means."""
    host = f"mta-sts.{setup.domain}"
    lines = [f"MTA-STS policy (mode {info['mode']}, id {info['id']}): {info['path']}",
             f"  Serve it at {info['url']} with a CA-trusted certificate for {host} (senders ignore a policy "
             f"fetched over a self-signed one); the CNAME above sends {host} to {setup.hostname}."]
    if info["on_disk"] == "missing":
        lines.append(_style(f"  ! {info['path']} is not there: run mailsetup init to write it", "yellow"))
    elif info["on_disk"] in ("differs", "unreadable"):
        why = "is not the policy these records announce" if info["on_disk"] == "differs" else "cannot be read"
        lines.append(_style(f"  ! {info['path']} {why}: run mailsetup init", "yellow"))
    if info["mode"] == "testing":
        lines.append("  testing: senders still deliver when TLS fails and report it to postmaster (TLS-RPT); once "
                     "the reports show no failures, re-run init with --mta-sts-mode enforce and publish the new id.")
    elif info["mode"] == "enforce":
        lines.append(f"  enforce: senders refuse to deliver unless TLS to {setup.hostname} works with a CA-trusted "
                     "certificate; --mta-sts-mode testing goes back (publish the new id).")
    else:
        lines.append(f"  none: senders forget the policy; after max_age ({info['max_age']} s) the _mta-sts record, "
                     f"the {host} name and the file may be removed.")
    return lines


def next_steps(setup: MailSetup) -> list[str]:
    """What the person does next, fitted to where the files went: a sandbox gets how to run smtpd on
    it; a real host gets the restart command of its service manager (see platforms.restart_command)."""
    from mailsetup.platforms import restart_command

    layout = setup.layout
    root_arg = f" --root {setup.root}" if setup.root else ""
    steps = [
        f"Publish DNS: {setup.domain}. IN MX 10 {setup.hostname}.   and A/AAAA records for the addresses smtpd "
        f"listens on (mailsetup dns{root_arg} --ip PUBLIC_ADDRESS prints them all)",
    ]
    if setup.root is not None:
        ports = " and ".join(str(p) for p in sorted({lst.port for lst in setup.listeners}))
        steps += [
            f"Try it with the real smtpd on loopback: mailsetup smoke{root_arg} --engine opensmtpd",
            f"Run smtpd on this sandbox (as root, in the foreground; it takes ports {ports} and "
            f"/var/spool/smtpd): smtpd -d -f {layout.smtpd_conf}",
            f"On the {layout.title} host itself: {layout.restart}",
        ]
    else:
        steps.append(f"Restart OpenSMTPD: {restart_command(layout)}")
    if setup.imap == "dovecot":  # Dovecot was written for, not started: smtpd now hands local mail to its LMTP
        steps.append(f"Start Dovecot (IMAPS on 993; smtpd delivers through its LMTP): {_dovecot_start(setup)}")
    if setup.tls.source == "acme":
        from mailsetup.acme import certbot_dirs, hook_path

        dirs = " " + " ".join(certbot_dirs(setup)) if setup.root else ""
        steps.append(f"certbot renews the certificate; after each renewal {hook_path(setup)} checks it and restarts "
                     f"smtpd. Try a renewal: certbot renew --dry-run{dirs}")
    steps.append("After editing aliases: mailsetup aliases "
                 f"{layout.aliases} --out {layout.aliases_db} && smtpctl update table aliases")
    return steps


def _dovecot_start(setup: MailSetup) -> str:

    from mailsetup.platforms import restart_command

    if setup.root is not None:
        return f"dovecot -F -c {setup.layout.dovecot_conf}"
    found = restart_command(setup.layout._replace(restart="systemctl restart dovecot"))
    return "dovecot (it runs in the background by itself)" if found.startswith("no systemd") else found


def one_line(text: str) -> str:
    """A message stays one line whatever a name in it holds: control characters are shown escaped, so
    a file name cannot forge a second line."""
    return "".join(c if " " <= c != "\x7f" and not "\x80" <= c <= "\x9f" else repr(c)[1:-1] for c in text)
