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


def _echo(text: str = "", err: bool = False, fg: str | None = None) -> None:
    from mailsetup.report import echo

    echo(text, err=err, fg=fg)


# init's own options that do not fit on its line.
TlsMode = Annotated[
    str | None, typer.Option("--tls", help="self-signed (default), existing (with --cert/--key) or csr.")
]
MaxMessageSize = Annotated[
    int | None, typer.Option("--max-message-size", help="Largest message accepted, in bytes (35 MB).")
]
DrainTimeout = Annotated[
    float, typer.Option("--drain-timeout", metavar="SECONDS", help="How long --drain waits for an empty queue.")
]
ForceRotate = Annotated[bool, typer.Option("--force-rotate", help="Rotate the queue key even though mail is queued.")]
KeepBackups = Annotated[
    int | None, typer.Option("--keep-backups", parser=_keep_backups, metavar="N",
                             help="Dated backups kept of each file written (5); older ones are removed.")
]


@app.command()
def init(
    domain: Domain = None,
    hostname: Hostname = None,
    os_name: OsName = None,
    root: Root = None,
    aliases: AliasesFile = None,
    admin: Admin = None,
    tls: TlsMode = None,
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
    max_message_size: MaxMessageSize = None,
    keep_backups: KeepBackups = None,
    user: Annotated[str | None, typer.Option("--user", help="Add this mail user (password: asked, or stdin).")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="--user's password on stdin")] = False,
    answers: Annotated[Path | None, typer.Option("--answers", help="A TOML answers file (keys = flag names).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Rotate the certificate and the queue key.")] = False,
    rotate_cert: Annotated[bool, typer.Option("--rotate-cert", help="New key and certificate.")] = False,
    rotate_queue_key: Annotated[bool, typer.Option("--rotate-queue-key", help="New queue encryption key.")] = False,
    drain: Annotated[bool, typer.Option("--drain", help="Before a queue key rotation, pause smtpd and wait.")] = False,
    drain_timeout: DrainTimeout = 300.0,
    force_rotate: ForceRotate = False,
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
    from mailsetup.initflow import run_from_options

    code = run_from_options(dict(locals()))  # every option by its name: initflow sorts answers from the rest
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
    from mailsetup.artifacts import render_conf

    raw = dict(domain=domain, hostname=hostname, os=os_name, root=root, listen=listen, smtp_port=smtp_port,
               submission_port=submission_port, smtpd_version=smtpd_version, queue_compression=queue_compression,
               queue_encryption=queue_encryption, cert=cert, key=key)
    render_conf(raw, queue_key_file, aliases_format, out, force)


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
    from mailsetup.artifacts import make_cert

    make_cert(hostname, days, key_type, out_cert, out_key, csr, os_name, root, force)


@app.command()
def keygen(
    out: Annotated[Path | None, typer.Option("--out", help="Write the key here (0600) instead of printing.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists (a backup is kept).")] = False,
    debug: Debug = False,
) -> None:
    """Make a queue encryption key (32 characters, as `openssl rand -hex 16`)."""
    from mailsetup.artifacts import make_queue_key

    make_queue_key(out, force)


@app.command("aliases")
def aliases_cmd(
    source: Annotated[Path, typer.Argument(help="The aliases(5) file.")],
    out: Annotated[Path | None, typer.Option("--out", help="The database (default: SOURCE.db).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only validate; write nothing.")] = False,
    smtpd_version: SmtpdVersion = None,
    debug: Debug = False,
) -> None:
    """Validate an aliases file and build aliases.db the way `makemap -t aliases` does."""
    from mailsetup.artifacts import build_aliases

    build_aliases(source, out, check, smtpd_version)


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
    from mailsetup.mta.server import load_runtime, options_from_flags, serve_forever

    options = options_from_flags(listen, smtp_port, submission_port, relay_host, loopback_is_remote,
                                 max_connections, timeout)
    serve_forever(load_runtime(load_setup(root, os_name), options), say=lambda text: _echo(text, err=True))


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
    from mailsetup.answers import load_setup
    from mailsetup.doctor import Doctor
    from mailsetup.report import print_doctor

    doc = Doctor(load_setup(root, os_name))
    print_doctor(doc.run(), as_json)
    if not doc.ok:
        raise typer.Exit(1)


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
    from mailsetup.answers import load_setup
    from mailsetup.dns import show_records

    if not show_records(load_setup(root, os_name), ip or [], check, nameserver, as_json):
        raise typer.Exit(1)


user_app = typer.Typer(help="Mail users: the logins for authenticated submission.", no_args_is_help=True)
app.add_typer(user_app, name="user")


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
    from mailsetup.users import add_user

    add_user(name, password_stdin, root, os_name)


@user_app.command("list")
def user_list(root: Root = None, os_name: OsName = None, debug: Debug = False) -> None:
    """List the users who can log in."""
    from mailsetup.users import list_users

    for name in list_users(root, os_name):
        typer.echo(name)


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="The login to remove.")],
    root: Root = None,
    os_name: OsName = None,
    debug: Debug = False,
) -> None:
    """Remove a user's login (their Maildir is left alone)."""
    from mailsetup.users import remove_user

    remove_user(name, root, os_name)


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
