"""The mailsetup command line: options wired to the pipeline, errors mapped to exit codes.

Heavy modules (cryptography, jinja2, aiosmtpd) are imported inside the commands that use them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mailsetup.errors import Interrupted, MailsetupError

app = typer.Typer(
    name="mailsetup",
    help="Bring up a working, secure OpenSMTPD: certificate, queue key, aliases.db, smtpd.conf.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

def _version(value: bool) -> None:
    if value:
        from mailsetup import __version__

        typer.echo(f"mailsetup {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Bring up a working, secure OpenSMTPD: certificate, queue key, aliases.db, smtpd.conf."""


# Options shared by the commands that build a MailSetup (init, render).
Domain = Annotated[str | None, typer.Option("--domain", help="The mail domain, e.g. example.org.")]
Hostname = Annotated[
    str | None, typer.Option("--hostname", help="The mail host's FQDN (default: this host's, or mail.DOMAIN).")
]
OsName = Annotated[
    str | None, typer.Option("--os", help="Target OS layout: debian, rhel, alpine, arch, freebsd, openbsd.")
]


def _root_path(text: str) -> Path:
    # Path("") is ".": an empty --root (an unset shell variable) must not quietly mean this directory.
    if not text:
        raise MailsetupError("--root: a path is required (a sandbox folder; leave --root out for this host)")
    return Path(text)


Root = Annotated[
    Path | None,
    typer.Option("--root", parser=_root_path, metavar="DIR",
                 help="Prefix every path with DIR (a sandbox; no system files touched)."),
]
AliasesFile = Annotated[Path | None, typer.Option("--aliases", help="An aliases(5) file to install.")]
Admin = Annotated[
    str | None,
    typer.Option("--admin", help="Who reads root's (so postmaster's) mail: a person's account here, or an address."),
]
KeyType = Annotated[str, typer.Option("--key-type", help="rsa-2048, rsa-4096 or ecdsa-p256.")]
Days = Annotated[int, typer.Option("--days", help="Certificate lifetime in days.")]
ExistingCert = Annotated[Path | None, typer.Option("--cert", help="Use this existing certificate (with --key).")]
ExistingKey = Annotated[Path | None, typer.Option("--key", help="The existing certificate's private key.")]
Listen = Annotated[
    list[str] | None,
    typer.Option("--listen", help="Address or interface for ports 25/587 (repeatable; default 0.0.0.0)."),
]
SmtpPort = Annotated[int, typer.Option("--smtp-port", help="Port of the MX listener.")]
SubmissionPort = Annotated[int, typer.Option("--submission-port", help="Port of the submission listener.")]
SmtpdVersion = Annotated[
    str | None,
    typer.Option("--smtpd-version", help="Target smtpd version (default: the installed one, else 7.4)."),
]
Compression = Annotated[bool, typer.Option("--queue-compression/--no-queue-compression")]
Encryption = Annotated[bool, typer.Option("--queue-encryption/--no-queue-encryption")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _keep_backups(text: str) -> int:
    from mailsetup.model import validate_keep_backups

    return validate_keep_backups(text, "--keep-backups")


def _raw_answers(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _detect_smtpd_version(given: str | None) -> str | None:
    if given:
        return given
    from mailsetup.opensmtpd import smtpd_version

    found = smtpd_version()
    return f"{found[0]}.{found[1]}" if found else None


def _echo(text: str = "", err: bool = False, fg: str | None = None) -> None:
    if fg and not os.environ.get("NO_COLOR"):
        text = typer.style(text, fg=fg)
    typer.echo(text, err=err)


@app.command()
def init(
    domain: Domain = None,
    hostname: Hostname = None,
    os_name: OsName = None,
    root: Root = None,
    aliases: AliasesFile = None,
    admin: Admin = None,
    tls: Annotated[
        str | None, typer.Option("--tls", help="self-signed (default), existing (with --cert/--key) or csr.")
    ] = None,
    key_type: Annotated[str | None, typer.Option("--key-type", help="rsa-2048 (default), rsa-4096, ecdsa-p256")] = None,
    days: Annotated[int | None, typer.Option("--days", help="Certificate lifetime in days (3650).")] = None,
    cert: ExistingCert = None,
    key: ExistingKey = None,
    listen: Listen = None,
    smtp_port: Annotated[int | None, typer.Option("--smtp-port", help="Port of the MX listener (25).")] = None,
    submission_port: Annotated[int | None, typer.Option("--submission-port", help="Submission port (587).")] = None,
    smtpd_version: SmtpdVersion = None,
    queue_compression: Annotated[bool | None, typer.Option("--queue-compression/--no-queue-compression")] = None,
    queue_encryption: Annotated[bool | None, typer.Option("--queue-encryption/--no-queue-encryption")] = None,
    max_message_size: Annotated[
        int | None, typer.Option("--max-message-size", help="Largest message accepted, in bytes (35 MB).")
    ] = None,
    keep_backups: Annotated[
        int | None, typer.Option("--keep-backups", parser=_keep_backups, metavar="N",
                                 help="Dated backups kept of each file written (5); older ones are removed.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Add this mail user (password: asked, or stdin).")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="--user's password on stdin")] = False,
    answers: Annotated[Path | None, typer.Option("--answers", help="A TOML answers file (keys = flag names).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Rotate the certificate and the queue key.")] = False,
    rotate_cert: Annotated[bool, typer.Option("--rotate-cert", help="New key and certificate.")] = False,
    rotate_queue_key: Annotated[bool, typer.Option("--rotate-queue-key", help="New queue encryption key.")] = False,
    drain: Annotated[bool, typer.Option("--drain", help="Before a queue key rotation, pause smtpd and wait.")] = False,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", metavar="SECONDS", help="How long --drain waits for an empty queue.")
    ] = 300.0,
    force_rotate: Annotated[
        bool, typer.Option("--force-rotate", help="Rotate the queue key even though mail is queued.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Write without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and diff; write nothing.")] = False,
    diff: Annotated[bool, typer.Option("--diff/--no-diff", help="Show the diff of each file.")] = False,
    smoke_flag: Annotated[bool | None, typer.Option("--smoke/--no-smoke", help="Run the smoke test (yes).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final report as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """Provision everything (certificate, queue key, aliases, smtpd.conf), check it, smoke-test it.

    On a terminal it asks what no flag gave; a re-run shows the state and offers rotation."""
    from mailsetup.initflow import InitOptions, run_init

    if admin is not None:
        from mailsetup.model import refuse_injection

        refuse_injection(admin, "--admin")
    flags = _raw_answers(
        domain=domain, hostname=hostname, os=os_name, root=str(root) if root else None,
        aliases=str(aliases) if aliases else None, admin=admin, tls=tls, key_type=key_type, days=days,
        cert=str(cert) if cert else None, key=str(key) if key else None, listen=listen or None,
        smtp_port=smtp_port, submission_port=submission_port, smtpd_version=smtpd_version,
        queue_compression=queue_compression, queue_encryption=queue_encryption,
        max_message_size=max_message_size, keep_backups=keep_backups, user=user,
    )
    if smoke_flag is not None:
        flags["smoke"] = smoke_flag
    detected = {}
    found = _detect_smtpd_version(None)
    if found:
        detected["smtpd_version"] = found  # wins over a recorded one (initflow); only --smtpd-version beats it
    opts = InitOptions(
        yes=yes, dry_run=dry_run, diff=diff, smoke=smoke_flag, rotate_cert=rotate or rotate_cert,
        rotate_queue_key=rotate or rotate_queue_key, drain=drain, drain_timeout=drain_timeout,
        force_rotate=force_rotate, quiet=quiet,
        as_json=as_json, answers_file=answers, password_stdin=password_stdin,
    )
    code = run_init(flags, opts, detected)
    if code:
        raise typer.Exit(code)


@app.command()
def render(
    domain: Domain = None,
    hostname: Hostname = None,
    os_name: OsName = None,
    root: Root = None,
    listen: Listen = None,
    smtp_port: SmtpPort = 25,
    submission_port: SubmissionPort = 587,
    smtpd_version: SmtpdVersion = None,
    queue_compression: Compression = True,
    queue_encryption: Encryption = True,
    cert: ExistingCert = None,
    key: ExistingKey = None,
    queue_key_file: Annotated[
        Path | None, typer.Option("--queue-key-file", help="The queue key (default: the layout's, if present).")
    ] = None,
    aliases_format: Annotated[str, typer.Option("--aliases-format", help="db or file.")] = "db",
    out: Annotated[Path | None, typer.Option("--out", help="Write here (0600, atomic, with a backup).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    debug: Debug = False,
) -> None:
    """Print (or write) smtpd.conf for the given settings."""
    from mailsetup import queuekey
    from mailsetup.model import build_setup
    from mailsetup.opensmtpd import open_relay_rules
    from mailsetup.render import render_smtpd_conf

    if not domain:
        raise MailsetupError("missing --domain (the mail domain, e.g. --domain example.org)")
    if aliases_format not in ("db", "file"):
        raise MailsetupError(f"--aliases-format: {aliases_format!r} is not db or file")
    setup = build_setup(
        _raw_answers(
            domain=domain, hostname=hostname, os=os_name, root=root, listen=listen, smtp_port=smtp_port,
            submission_port=submission_port, smtpd_version=_detect_smtpd_version(smtpd_version),
            queue_compression=queue_compression, queue_encryption=queue_encryption, cert=cert, key=key,
        )
    )
    qkey = None
    if setup.queue.encryption:
        path = queue_key_file or Path(setup.queue.key_file)
        if not path.exists():
            raise MailsetupError(
                f"--queue-key-file: no queue key at {path}; make one with "
                f"`mailsetup keygen --out {path}` or pass --no-queue-encryption"
            )
        qkey = queuekey.read_queue_key(path)
    text = render_smtpd_conf(setup, qkey, aliases_format)
    if open_relay_rules(text):
        raise MailsetupError("internal error: the rendered configuration would be an open relay", exit_code=1)
    if out is None:
        typer.echo(text, nl=False)
        return
    _write_one(out, text.encode(), 0o600, force, "--out", root, os_name)
    _echo(f"wrote {out} (0600)")


def _write_one(path: Path, content: bytes, mode: int, force: bool, flag: str, root: Path | None = None,
               os_name: str | None = None, secret: bool = False) -> None:
    from mailsetup.files import FileChange

    _write_many([FileChange(path, content, mode, flag, secret=secret)], force, flag, root=root, os_name=os_name)


def _write_many(changes, force: bool, flag: str, make_dirs: bool = False, root: Path | None = None,
                os_name: str | None = None) -> None:
    """Write `changes`, keeping as many backups of each as the set-up under `root` (or this host's) keeps."""
    from mailsetup.answers import kept_backups
    from mailsetup.files import apply_plan

    for change in changes:
        if not make_dirs and not change.path.parent.is_dir():
            raise MailsetupError(f"{flag}: the folder {change.path.parent} does not exist")
        if change.path.exists() and not force:
            raise MailsetupError(f"{flag}: {change.path} exists; pass --force to replace it (a backup is kept)")
        if change.path.is_dir():
            raise MailsetupError(f"{flag}: {change.path} is a directory")
    for result in apply_plan(changes, kept_backups(root, os_name)):
        if result.backup:
            _echo(f"kept the old {result.path} as {result.backup}")


@app.command()
def cert(
    hostname: Annotated[str | None, typer.Option("--hostname", help="The mail host's FQDN.")] = None,
    days: Days = 3650,
    key_type: KeyType = "rsa-2048",
    out_cert: Annotated[Path | None, typer.Option("--out-cert", help="Certificate path.")] = None,
    out_key: Annotated[Path | None, typer.Option("--out-key", help="Private key path (written 0600).")] = None,
    csr: Annotated[
        Path | None, typer.Option("--csr", help="Write a CSR for a CA here instead of a self-signed cert.")
    ] = None,
    os_name: OsName = None,
    root: Root = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files (backups are kept).")] = False,
    debug: Debug = False,
) -> None:
    """Make a private key and a self-signed certificate (or a CSR) for the mail host."""
    from mailsetup import pki
    from mailsetup.files import FileChange
    from mailsetup.model import KEY_TYPES, validate_dns_name, validate_path
    from mailsetup.platforms import detect_os, get_layout, sandboxed

    if not hostname:
        raise MailsetupError("missing --hostname (the mail host's FQDN, e.g. --hostname mail.example.org)")
    host = validate_dns_name(hostname, "--hostname")
    if key_type not in KEY_TYPES:
        raise MailsetupError(f"--key-type: {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    if not 1 <= days <= 36500:
        raise MailsetupError(f"--days: {days} is outside 1..36500")
    defaults = out_cert is None or out_key is None  # the layout's own folders may be made
    if out_cert is None or out_key is None:
        layout = sandboxed(get_layout(os_name or detect_os() or "debian"), root.absolute() if root else None)
        out_cert = out_cert or Path(layout.cert_dir / f"{host}.crt")
        out_key = out_key or Path(layout.key_dir / f"{host}.key")
    validate_path(out_key.absolute(), "--out-key")
    validate_path(out_cert.absolute(), "--out-cert")
    key = pki.generate_key(key_type)
    changes = [FileChange(out_key, pki.key_pem(key), pki.KEY_MODE, "private key", secret=True)]
    if csr is not None:
        changes.append(FileChange(csr, pki.csr(key, host), 0o644, "certificate signing request"))
    else:
        changes.append(FileChange(out_cert, pki.self_signed_cert(key, host, days), pki.CERT_MODE, "certificate"))
    _write_many(changes, force, "--out-key" if out_key.exists() else "--out-cert", make_dirs=defaults, root=root,
                os_name=os_name)
    _echo(f"wrote {out_key} (0600, {key_type})")
    if csr is not None:
        _echo(f"wrote {csr}: send it to your CA, then run init with --cert CERT --key {out_key}")
    else:
        info = pki.inspect_cert(pki.load_cert(out_cert))
        _echo(f"wrote {out_cert} ({host}, expires {info.not_after:%Y-%m-%d})")
        _echo(f"SHA-256 fingerprint: {info.fingerprint_sha256}")


@app.command()
def keygen(
    out: Annotated[Path | None, typer.Option("--out", help="Write the key here (0600) instead of printing.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists (a backup is kept).")] = False,
    debug: Debug = False,
) -> None:
    """Make a queue encryption key (32 characters, as `openssl rand -hex 16`)."""
    from mailsetup import queuekey

    key = queuekey.generate_queue_key()
    if out is None:
        typer.echo(key)
        return
    _write_one(out, queuekey.queue_key_file_bytes(key), queuekey.KEY_MODE, force, "--out", secret=True)
    _echo(f"wrote {out} (0600); smtpd.conf: queue encryption <the key in {out}>", err=True)


@app.command("aliases")
def aliases_cmd(
    source: Annotated[Path, typer.Argument(help="The aliases(5) file.")],
    out: Annotated[Path | None, typer.Option("--out", help="The database (default: SOURCE.db).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only validate; write nothing.")] = False,
    smtpd_version: SmtpdVersion = None,
    debug: Debug = False,
) -> None:
    """Validate an aliases file and build aliases.db the way `makemap -t aliases` does."""
    from mailsetup import aliases as aliases_mod
    from mailsetup.answers import kept_backups
    from mailsetup.files import FileChange, apply_plan
    from mailsetup.model import DEFAULT_SMTPD_VERSION, parse_version

    # 7.5 and later read aliases differently: follow the smtpd that will read this db
    found = _detect_smtpd_version(smtpd_version)
    version = parse_version(found) if found else DEFAULT_SMTPD_VERSION
    entries = aliases_mod.parse_aliases_file(source, version)
    for name in aliases_mod.missing_rfc2142(entries):
        _echo(f"warning: {source}: no {name} alias (RFC 2142 wants {name}@ to reach a person)", err=True,
              fg="yellow")
    if check:
        _echo(f"{source}: {len(entries)} aliases, OK")
        return
    out = out or source.with_name(source.name + ".db")
    backend = aliases_mod.db_backend()
    if backend == "dbm":
        db = aliases_mod.build_aliases_db(entries)
    elif backend == "makemap":
        _echo("note: this Python's dbm cannot write Berkeley DB; using makemap", err=True)
        db = aliases_mod.build_aliases_db_with_makemap(source.read_text(encoding="utf-8"), entries)
    else:
        raise MailsetupError(
            "no Berkeley DB writer here (Python's dbm.ndbm or makemap): use `table aliases "
            f"file:{source}` in smtpd.conf instead of a db: table",
            exit_code=1,
        )
    apply_plan([FileChange(out, db, aliases_mod.ALIASES_MODE, "aliases.db")], kept_backups(None))
    _echo(f"wrote {out}: {len(entries)} aliases")


def _parse_hostport(value: str | None, flag: str) -> tuple[str, int] | None:
    if not value:
        return None
    from mailsetup.model import validate_port

    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise MailsetupError(f"{flag}: {value!r} is not HOST:PORT")
    return host.strip("[]"), validate_port(port, flag)


@app.command()
def serve(
    root: Root = None,
    os_name: OsName = None,
    listen: Annotated[str, typer.Option("--listen", help="Address to listen on.")] = "127.0.0.1",
    smtp_port: Annotated[int, typer.Option("--smtp-port", help="MX listener port (0: any free port).")] = 25,
    submission_port: Annotated[int, typer.Option("--submission-port", help="Submission port (0: any).")] = 587,
    relay_host: Annotated[
        str | None, typer.Option("--relay-host", help="HOST:PORT to relay outbound mail to.")
    ] = None,
    loopback_is_remote: Annotated[
        bool, typer.Option("--loopback-is-remote", help="Treat loopback clients as strangers (testing relay rules).")
    ] = False,
    max_connections: Annotated[int, typer.Option("--max-connections")] = 500,
    timeout: Annotated[float, typer.Option("--timeout", help="Idle/command/data timeout, seconds.")] = 300.0,
    debug: Debug = False,
) -> None:
    """Run the embedded MTA in the foreground on the set-up's files (Ctrl-C or SIGTERM stops it)."""
    from mailsetup.answers import load_setup
    from mailsetup.model import validate_listen, validate_port
    from mailsetup.mta.server import MtaOptions, load_runtime

    setup = load_setup(root, os_name)
    options = MtaOptions(
        listen=validate_listen(listen, "--listen", "linux"),
        smtp_port=validate_port(smtp_port, "--smtp-port") if smtp_port else 0,
        submission_port=validate_port(submission_port, "--submission-port") if submission_port else 0,
        relay_host=_parse_hostport(relay_host, "--relay-host"),
        local_peers=frozenset() if loopback_is_remote else frozenset({"127.0.0.1", "::1"}),
        max_connections=max_connections,
        timeout=timeout,
    )
    from mailsetup.mta.server import serve_forever

    serve_forever(load_runtime(setup, options), say=lambda text: _echo(text, err=True))


def _run_smoke_and_report(setup, as_json: bool, smtp_port: int = 0, submission_port: int = 0,
                          engine: str = "embedded", smtpd: str | None = None) -> bool:
    from mailsetup.report import print_smoke
    from mailsetup.smoke import run_smoke

    report = run_smoke(setup, smtp_port=smtp_port, submission_port=submission_port, engine=engine, smtpd=smtpd)
    print_smoke(report, as_json)
    return report.ok


@app.command()
def smoke(
    root: Root = None,
    os_name: OsName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    smtp_port: Annotated[int, typer.Option("--smtp-port", help="Port for the MX listener (0: a free one).")] = 0,
    submission_port: Annotated[int, typer.Option("--submission-port", help="Submission port (0: free).")] = 0,
    engine: Annotated[
        str, typer.Option("--engine", help="embedded (mailsetup's MTA) or opensmtpd (the real smtpd, as root).")
    ] = "embedded",
    smtpd: Annotated[str | None, typer.Option("--smtpd", help="The smtpd binary for --engine opensmtpd.")] = None,
    debug: Debug = False,
) -> None:
    """Start an MTA on the set-up's files and prove mail flows; exit 0 only if all pass."""
    from mailsetup.answers import load_setup

    if engine not in ("embedded", "opensmtpd"):
        raise MailsetupError(f"--engine: {engine!r} is not embedded or opensmtpd")
    setup = load_setup(root, os_name)
    if not _run_smoke_and_report(setup, as_json, smtp_port, submission_port, engine, smtpd):
        raise typer.Exit(1)


@app.command()
def doctor(
    root: Root = None,
    os_name: OsName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """Check the set-up's health: each check ✓ / ! / ✗ with why and what to do. Exit 1 on any ✗."""
    import json

    from mailsetup.answers import load_setup
    from mailsetup.doctor import Doctor
    from mailsetup.report import print_doctor

    doc = Doctor(load_setup(root, os_name))
    findings = doc.run()
    if as_json:
        typer.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        print_doctor(findings)
    if not doc.ok:
        raise typer.Exit(1)


def _parse_nameserver(value: str) -> tuple[str, int]:
    """ADDR, ADDR:PORT or [V6]:PORT."""
    import ipaddress

    from mailsetup.model import validate_port

    host, port = value, 53
    if value.startswith("[") and "]:" in value:
        host, _, port_text = value[1:].partition("]:")
        port = validate_port(port_text, "--nameserver")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = validate_port(port_text, "--nameserver")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise MailsetupError(f"--nameserver: {value!r} is not ADDR, ADDR:PORT or [ADDR]:PORT") from None


@app.command()
def dns(
    root: Root = None,
    os_name: OsName = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="The mail host's public address (repeatable: v4 and v6).")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Compare with what DNS answers now.")] = False,
    nameserver: Annotated[
        str | None, typer.Option("--nameserver", help="Ask this server (ADDR or ADDR:PORT) instead of the system's.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records (and the check) as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """The DNS records to publish (MX, A/AAAA, SPF, DMARC) and PTR advice; --check compares with live DNS."""
    import json

    from mailsetup import dns as dns_mod
    from mailsetup.answers import load_setup
    from mailsetup.report import print_dns

    setup = load_setup(root, os_name)
    ips, left_out = dns_mod.address_records_for(setup, dns_mod.validate_ips(ip or []))
    records = dns_mod.wanted_records(setup, ips)
    comparisons = None
    if check:
        server, port = None, 53
        if nameserver:
            server, port = _parse_nameserver(nameserver)
        comparisons = dns_mod.check_records(records, server, port)
    if as_json:
        payload = {"records": dns_mod.records_as_dicts(records), "ptr": dns_mod.ptr_advice(setup, ips),
                   "left_out": [{"ip": addr, "why": why} for addr, why in left_out]}
        if comparisons is not None:
            payload["check"] = [c.as_dict() for c in comparisons]
        typer.echo(json.dumps(payload, indent=2))
    else:
        print_dns(setup, records, dns_mod.ptr_advice(setup, ips), bool(ips), comparisons,
                  [why for _, why in left_out])
    if comparisons is not None and any(c.status == "fail" for c in comparisons):
        raise typer.Exit(1)


user_app = typer.Typer(help="Mail users: the logins for authenticated submission.", no_args_is_help=True)
app.add_typer(user_app, name="user")


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line.strip("\r\n"):
            raise MailsetupError("--password-stdin: no password on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise MailsetupError("no terminal to ask for the password on: pass --password-stdin")
    import getpass

    try:
        first = getpass.getpass("Password: ")
        again = getpass.getpass("Again: ")
    except KeyboardInterrupt:
        raise Interrupted() from None
    if first != again:
        raise MailsetupError("the two passwords differ; nothing changed")
    return first


def _credentials_path(root: Path | None, os_name: str | None) -> Path:
    from mailsetup.answers import load_setup

    return Path(load_setup(root, os_name).layout.credentials)


def _write_credentials(root: Path | None, os_name: str | None, creds: list, done: str) -> None:
    """Write the table (owner and mode smtpd needs to re-read it), then have a running smtpd that
    serves this file re-read it, so the change is live without a restart."""
    from mailsetup import credentials as c
    from mailsetup.answers import load_setup
    from mailsetup.files import FileChange, apply_plan
    from mailsetup.opensmtpd import smtpd_tables_reading, update_table
    from mailsetup.platforms import LAYOUTS

    setup = load_setup(root, os_name)
    layout = setup.layout
    path = Path(layout.credentials)
    mode, owner = c.table_access(layout.smtpd_user)
    apply_plan([FileChange(path, c.render_credentials(creds), mode, "credentials", secret=True, owner=owner)],
               setup.keep_backups)
    _echo(f"{done} {path}")
    users = smtpd_tables_reading(path, Path(LAYOUTS[layout.name].smtpd_conf))
    if not users:
        _echo(f"no running smtpd here serves {path}; smtpd reads it when it starts", err=True)
    for user in users:
        ok, said = update_table(user.table)
        if not ok:
            raise MailsetupError(
                f"the running smtpd (pid {user.pid}) could not re-read {path}: "
                f"smtpctl update table {user.table}: {said}",
                hint=f"`mailsetup doctor` says why; or restart smtpd: {layout.restart}", exit_code=1)
        _echo(f"reloaded table {user.table} of the running smtpd (pid {user.pid}): the change is live")


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="The login (and local user) name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (one line).")
    ] = False,
    root: Root = None,
    os_name: OsName = None,
    debug: Debug = False,
) -> None:
    """Add a user (or change their password). The password is asked twice, hidden, or read from stdin."""
    from mailsetup import credentials as c

    c.validate_username(name)
    path = _credentials_path(root, os_name)
    creds = c.read_credentials(path)
    hashed = c.hash_password(_read_password(password_stdin))
    existed = any(x.user == name for x in creds)
    _write_credentials(root, os_name, c.with_user(creds, name, hashed),
                       f"{'changed the password of' if existed else 'added'} {name} in")


@user_app.command("list")
def user_list(root: Root = None, os_name: OsName = None, debug: Debug = False) -> None:
    """List the users who can log in."""
    from mailsetup import credentials as c

    for cred in c.read_credentials(_credentials_path(root, os_name)):
        typer.echo(cred.user)


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="The login to remove.")],
    root: Root = None,
    os_name: OsName = None,
    debug: Debug = False,
) -> None:
    """Remove a user's login (their Maildir is left alone)."""
    from mailsetup import credentials as c

    path = _credentials_path(root, os_name)
    remaining = c.without_user(c.read_credentials(path), name)
    _write_credentials(root, os_name, remaining, f"removed {name} from")


def _one_line(text: str) -> str:
    """A message stays one line whatever a name in it holds: control characters are shown escaped, so
    a file name cannot forge a second line."""
    return "".join(c if " " <= c != "\x7f" else repr(c)[1:-1] for c in text)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        if os.geteuid() == 0 and any(v in os.environ for v in ("TMPDIR", "TEMP", "TMP")):
            from mailsetup.files import use_trusted_tempdir

            use_trusted_tempdir()  # root inherits a user's TMPDIR through `su` or pam_tmpdir
        app(standalone_mode=True)
    except MailsetupError as exc:
        if debug:
            raise
        if isinstance(exc, Interrupted):
            _echo(f"mailsetup: {_one_line(exc.message)}", err=True)
        else:
            _echo(f"mailsetup: error: {_one_line(exc.message)}", err=True, fg="red")
        if exc.hint:
            _echo(f"hint: {_one_line(exc.hint)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _echo("mailsetup: interrupted; nothing was left half-written.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
