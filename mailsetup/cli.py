"""The mailsetup command line: each command names its options (declared in options.py) and calls
its steps; errors become one line and an exit code. Heavy modules load inside the commands.

No `from __future__ import annotations` here: Typer reads every command's annotations on each start
(for `--help` and for any one command alike), and as strings it compiles and evals each of them
twice (~370 evals): ~10 ms of the ~28 ms it took to build the commands, measured here."""

import sys

import typer

from mailsetup import options as o

app = typer.Typer(name="mailsetup", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Bring up a working, secure OpenSMTPD: certificate, queue key, aliases.db, smtpd.conf.")
user_app = typer.Typer(help="Mail users: the logins for authenticated submission.", no_args_is_help=True)
app.add_typer(user_app, name="user")


def _version(value: bool) -> None:
    if value:
        from mailsetup import __version__

        typer.echo(f"mailsetup {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Bring up a working, secure OpenSMTPD: certificate, queue key, aliases.db, smtpd.conf."""


def _exit(ok: bool) -> None:
    if not ok:
        raise typer.Exit(1)


@app.command()
def init(domain: o.Domain = None, hostname: o.Hostname = None, os_name: o.OsName = None, root: o.Root = None,
         aliases: o.AliasesFile = None, admin: o.Admin = None, tls: o.TlsMode = None, key_type: o.InitKeyType = None,
         days: o.InitDays = None, cert: o.ExistingCert = None, key: o.ExistingKey = None, listen: o.Listen = None,
         smtp_port: o.InitSmtpPort = None, submission_port: o.InitSubmissionPort = None,
         smtpd_version: o.SmtpdVersion = None, queue_compression: o.InitCompression = None,
         queue_encryption: o.InitEncryption = None, max_message_size: o.MaxMessageSize = None,
         keep_backups: o.KeepBackups = None, user: o.FirstUser = None, password_stdin: o.PasswordStdin = False,
         answers: o.AnswersPath = None, rotate: o.Rotate = False, rotate_cert: o.RotateCert = False,
         rotate_queue_key: o.RotateQueueKey = False, drain: o.Drain = False, drain_timeout: o.DrainTimeout = 300.0,
         force_rotate: o.ForceRotate = False, rotate_dkim: o.RotateDkim = False,
         force_dkim_switch: o.ForceDkimSwitch = False, yes: o.Yes = False, dry_run: o.DryRun = False,
         diff: o.Diff = False, dkim: o.Dkim = None, mta_sts_mode: o.MtaStsMode = None, smoke_flag: o.Smoke = None,
         quiet: o.Quiet = False, as_json: o.InitJson = False, no_preflight: o.NoPreflight = False,
         ip: o.PreflightIp = None, nameserver: o.Nameserver = None, probe: o.Probe = None, dnsbl: o.Dnsbl = None,
         acme_server: o.AcmeServer = None, acme_email: o.AcmeEmail = None, webroot: o.Webroot = None,
         http_01_port: o.Http01Port = None, reload_command: o.ReloadCommand = None, relay_tls: o.RelayTls = None,
         backup_mx: o.BackupMx = None, backup_for: o.BackupFor = None, imap: o.Imap = None,
         dovecot_version: o.DovecotVersion = None, import_conf: o.ImportConf = None, debug: o.Debug = False) -> None:
    """Provision everything (certificate, queue key, aliases, smtpd.conf), check it, smoke-test it.

    On a terminal it asks what no flag gave; a re-run shows the state and offers rotation."""
    from mailsetup.initflow import run_from_options

    code = run_from_options(dict(locals()))  # every option by its name: initflow sorts answers from the rest
    if code:
        raise typer.Exit(code)


@app.command("import")
def import_cmd(conf: o.ImportFile = None, root: o.Root = None, os_name: o.OsName = None, domain: o.Domain = None,
               hostname: o.Hostname = None, admin: o.Admin = None, user: o.FirstUser = None,
               password_stdin: o.PasswordStdin = False, yes: o.Yes = False, dry_run: o.DryRun = False,
               diff: o.Diff = False, smoke_flag: o.Smoke = None, quiet: o.Quiet = False, as_json: o.InitJson = False,
               no_preflight: o.NoPreflight = False, dkim: o.Dkim = None, imap: o.Imap = None,
               debug: o.Debug = False) -> None:
    """Adopt an existing smtpd.conf (6.3's grammar, the tutorial's, or 6.4's and later): what it means
    becomes the answers of `init`, which plans, diffs, checks with smtpd -n, writes with backups, smoke-tests.
    DKIM and IMAP stay off unless the old file had them or a flag turns them on."""
    import inspect

    from mailsetup.importconf import default_conf
    from mailsetup.initflow import run_from_options

    given = dict(locals())
    options = {name: p.default for name, p in inspect.signature(init).parameters.items()}
    options.update({k: v for k, v in given.items() if k in options})
    options["import_conf"] = conf or default_conf(root, os_name)
    code = run_from_options(options)
    if code:
        raise typer.Exit(code)


@app.command()
def render(domain: o.Domain = None, hostname: o.Hostname = None, os_name: o.OsName = None, root: o.Root = None,
           listen: o.Listen = None, smtp_port: o.SmtpPort = 25, submission_port: o.SubmissionPort = 587,
           smtpd_version: o.SmtpdVersion = None, queue_compression: o.Compression = True,
           queue_encryption: o.Encryption = True, cert: o.ExistingCert = None, key: o.ExistingKey = None,
           queue_key_file: o.QueueKeyFile = None, aliases_format: o.AliasesFormat = "db", out: o.RenderOut = None,
           force: o.Force = False, debug: o.Debug = False) -> None:
    """Print (or write) smtpd.conf for the given settings."""
    from mailsetup.artifacts import render_conf

    raw = dict(domain=domain, hostname=hostname, os=os_name, root=root, listen=listen, smtp_port=smtp_port,
               submission_port=submission_port, smtpd_version=smtpd_version, queue_compression=queue_compression,
               queue_encryption=queue_encryption, cert=cert, key=key)
    render_conf(raw, queue_key_file, aliases_format, out, force)


@app.command()
def cert(hostname: o.CertHostname = None, days: o.Days = 3650, key_type: o.KeyType = "rsa-2048",
         out_cert: o.OutCert = None, out_key: o.OutKey = None, csr: o.Csr = None, os_name: o.OsName = None,
         root: o.Root = None, force: o.ForceBackup = False, debug: o.Debug = False) -> None:
    """Make a private key and a self-signed certificate (or a CSR) for the mail host."""
    from mailsetup.artifacts import make_cert

    make_cert(hostname, days, key_type, out_cert, out_key, csr, os_name, root, force)


@app.command()
def keygen(out: o.KeyOut = None, force: o.KeyForce = False, debug: o.Debug = False) -> None:
    """Make a queue encryption key (32 characters, as `openssl rand -hex 16`)."""
    from mailsetup.artifacts import make_queue_key

    make_queue_key(out, force)


@app.command("aliases")
def aliases_cmd(source: o.AliasesSource, out: o.AliasesOut = None, check: o.CheckOnly = False,
                smtpd_version: o.SmtpdVersion = None, debug: o.Debug = False) -> None:
    """Validate an aliases file and build aliases.db the way `makemap -t aliases` does."""
    from mailsetup.artifacts import build_aliases

    build_aliases(source, out, check, smtpd_version)


@app.command()
def serve(root: o.Root = None, os_name: o.OsName = None, listen: o.ServeListen = "127.0.0.1",
          smtp_port: o.ServeSmtpPort = 25, submission_port: o.ServeSubmissionPort = 587, relay_host: o.RelayHost = None,
          loopback_is_remote: o.LoopbackIsRemote = False, max_connections: o.MaxConnections = 500,
          timeout: o.Timeout = 300.0, debug: o.Debug = False) -> None:
    """Run the embedded MTA in the foreground on the set-up's files (Ctrl-C or SIGTERM stops it)."""
    from mailsetup.mta.server import serve_from_flags

    serve_from_flags(root, os_name, listen, smtp_port, submission_port, relay_host, loopback_is_remote,
                     max_connections, timeout)


@app.command()
def smoke(root: o.Root = None, os_name: o.OsName = None, as_json: o.SmokeJson = False, smtp_port: o.SmokeSmtpPort = 0,
          submission_port: o.SmokeSubmissionPort = 0, engine: o.Engine = "embedded", smtpd: o.SmtpdBinary = None,
          debug: o.Debug = False) -> None:
    """Start an MTA on the set-up's files and prove mail flows; exit 0 only if all pass."""
    from mailsetup.smoke import smoke_command

    _exit(smoke_command(root, os_name, as_json, smtp_port, submission_port, engine, smtpd))


@app.command()
def doctor(root: o.Root = None, os_name: o.OsName = None, as_json: o.DoctorJson = False,
           debug: o.Debug = False) -> None:
    """Check the set-up's health: each check ✓ / ! / ✗ with why and what to do. Exit 1 on any ✗."""
    from mailsetup.doctor import doctor_command

    _exit(doctor_command(root, os_name, as_json))


@app.command()
def dns(root: o.Root = None, os_name: o.OsName = None, ip: o.Ip = None, check: o.DnsCheck = False,
        nameserver: o.Nameserver = None, as_json: o.DnsJson = False, debug: o.Debug = False) -> None:
    """The DNS records to publish (MX, A/AAAA, SPF, DMARC, DKIM, MTA-STS, TLS-RPT, SRV) and PTR advice; --check
    compares with live DNS."""
    from mailsetup.answers import load_setup
    from mailsetup.dns import show_records

    _exit(show_records(load_setup(root, os_name), ip or [], check, nameserver, as_json))


@app.command("dkim")
def dkim_cmd(root: o.Root = None, os_name: o.OsName = None, rotate: o.DkimRotate = False,
             force_switch: o.ForceDkimSwitch = False, nameserver: o.Nameserver = None, yes: o.Yes = False,
             dry_run: o.DryRun = False, as_json: o.InitJson = False, debug: o.Debug = False) -> None:
    """DKIM-sign an existing set-up's mail, rotate its keys in stages, or switch to the pending ones."""
    from mailsetup.initflow import run_dkim

    code = run_dkim(root, os_name, rotate, force_switch, nameserver, yes, dry_run, as_json)
    if code:
        raise typer.Exit(code)


@app.command()
def preflight(root: o.Root = None, os_name: o.OsName = None, ip: o.PreflightIp = None, nameserver: o.Nameserver = None,
              probe: o.Probe = None, dnsbl: o.Dnsbl = None, timeout: o.PreflightTimeout = 5.0,
              as_json: o.PreflightJson = False, debug: o.Debug = False) -> None:
    """Will the internet take this host's mail? Its name, reverse DNS, MX, outbound port 25 and the
    blocklists, each ✓ / ! / ✗ with what to do. Exit 1 on any ✗."""
    from mailsetup.preflight import preflight_command, preflight_options

    _exit(preflight_command(root, os_name, preflight_options(ip, nameserver, probe, dnsbl, timeout), as_json))


@user_app.command("add")
def user_add(name: o.UserName, password_stdin: o.UserPasswordStdin = False, root: o.Root = None,
             os_name: o.OsName = None, debug: o.Debug = False) -> None:
    """Add a user (or change their password). The password is asked twice, hidden, or read from stdin."""
    from mailsetup.users import add_user

    add_user(name, password_stdin, root, os_name)


@user_app.command("list")
def user_list(root: o.Root = None, os_name: o.OsName = None, debug: o.Debug = False) -> None:
    """List the users who can log in."""
    from mailsetup.users import list_users

    for name in list_users(root, os_name):
        typer.echo(name)


@user_app.command("remove")
def user_remove(name: o.RemovedUser, root: o.Root = None, os_name: o.OsName = None, debug: o.Debug = False) -> None:
    """Remove a user's login (their Maildir is left alone)."""
    from mailsetup.users import remove_user

    remove_user(name, root, os_name)


def _app_for(argv: list[str]) -> typer.Typer:
    """`app` as this start needs it. Typer builds every command's options (168 of them) on each start
    although one command at most runs: ~15 ms, which `--help` and `keygen` would pay above `import typer`.
    A command (or group) named first: an app holding only it. Anything else (no arguments, `--help`,
    `--version`, an unknown option or name) ends in the command list, the version or an error, and runs
    no command: the commands are stand-ins there, with their own names and help but no options. What each
    prints (the command list, "No such command" with its suggestion, usage lines) is unchanged."""
    from copy import copy

    from typer.main import get_command_name

    name = argv[1] if len(argv) > 1 else ""
    if name == "--":  # `mailsetup -- keygen` runs keygen: only the whole app can
        return app
    lean = copy(app)  # the same callback and settings; keeps the group (and its usage lines) a group
    commands = [c for c in app.registered_commands if (c.name or get_command_name(c.callback.__name__)) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if commands or groups:
        lean.registered_commands, lean.registered_groups = commands, groups
    else:
        lean.registered_commands = [_listed_only(c) for c in app.registered_commands]
    return lean


def _listed_only(command):  # a CommandInfo with a stand-in callback: its name and help, no options
    from copy import copy

    real = command.callback

    def stand_in() -> None:
        raise AssertionError(f"the stand-in for {real.__name__} ran")  # _app_for's rules exclude it

    stand_in.__name__, stand_in.__doc__ = real.__name__, real.__doc__
    listed = copy(command)
    listed.callback = stand_in
    return listed


def main() -> None:
    from mailsetup.entry import run

    run(lambda: _app_for(sys.argv)(standalone_mode=True), "--debug" in sys.argv)


if __name__ == "__main__":
    main()
