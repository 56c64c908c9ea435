"""Every command-line option, declared once: its flag, type and help. cli.py names them per command.

A flag that answers an init question has the same name as the question's key (questions.py), so
`--smtp-port` is `smtp_port` in an answers file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mailsetup.errors import MailsetupError


def _root_path(text: str) -> Path:
    # Path("") is ".": an empty --root (an unset shell variable) must not quietly mean this directory.
    if not text:
        raise MailsetupError("--root: a path is required (a sandbox folder; leave --root out for this host)")
    return Path(text)


def _keep_backups(text: str) -> int:
    from mailsetup.model import validate_keep_backups

    return validate_keep_backups(text, "--keep-backups")


_opt = typer.Option


# --- where the set-up is ------------------------------------------------------------------------
Root = Annotated[Path | None, _opt("--root", parser=_root_path, metavar="DIR",
                                   help="Prefix every path with DIR (a sandbox; no system files touched).")]
OsName = Annotated[str | None, _opt("--os", help="Target OS layout: debian, rhel, alpine, arch, freebsd, openbsd.")]
Debug = Annotated[bool, _opt("--debug", help="Show tracebacks.")]

# --- what init asks (and render, cert take) ---------------------------------------------------------
Domain = Annotated[str | None, _opt("--domain", help="The mail domain, e.g. example.org.")]
Hostname = Annotated[str | None, _opt("--hostname",
                                      help="The mail host's FQDN (default: this host's, or mail.DOMAIN).")]
AliasesFile = Annotated[Path | None, _opt("--aliases", help="An aliases(5) file to install.")]
Admin = Annotated[str | None, _opt(
    "--admin", help="Who reads root's (so postmaster's) mail: a person's account here, or an address.")]
TlsMode = Annotated[str | None, _opt(
    "--tls", help="self-signed (default), existing (with --cert/--key), csr, or acme (certbot, Let's Encrypt).")]
AcmeServer = Annotated[str | None, _opt("--acme-server", metavar="URL",
                                        help="--tls acme: the ACME directory (Let's Encrypt's production one).")]
AcmeEmail = Annotated[str | None, _opt("--acme-email", help="--tls acme: the account's contact address.")]
Webroot = Annotated[Path | None, _opt("--webroot", metavar="DIR", help=(
    "--tls acme: answer the http-01 challenge through the web server serving DIR (default: certbot's own "
    "server on port 80)."))]
Http01Port = Annotated[int | None, _opt("--http-01-port", help="--tls acme: the port certbot's own server uses (80).")]
ReloadCommand = Annotated[str | None, _opt("--reload-command", metavar="CMD", help=(
    "--tls acme: what certbot's deploy hook runs after a renewal (default: the OS's restart of smtpd)."))]
KeyType = Annotated[str, _opt("--key-type", help="rsa-2048, rsa-4096 or ecdsa-p256.")]
InitKeyType = Annotated[str | None, _opt("--key-type", help="rsa-2048 (default), rsa-4096, ecdsa-p256")]
Days = Annotated[int, _opt("--days", help="Certificate lifetime in days.")]
InitDays = Annotated[int | None, _opt("--days", help="Certificate lifetime in days (3650).")]
ExistingCert = Annotated[Path | None, _opt("--cert", help="Use this existing certificate (with --key).")]
ExistingKey = Annotated[Path | None, _opt("--key", help="The existing certificate's private key.")]
Listen = Annotated[list[str] | None, _opt(
    "--listen", help="Address or interface for ports 25/587 (repeatable; default 0.0.0.0).")]
SmtpPort = Annotated[int, _opt("--smtp-port", help="Port of the MX listener.")]
InitSmtpPort = Annotated[int | None, _opt("--smtp-port", help="Port of the MX listener (25).")]
SubmissionPort = Annotated[int, _opt("--submission-port", help="Port of the submission listener.")]
InitSubmissionPort = Annotated[int | None, _opt("--submission-port", help="Submission port (587).")]
SmtpdVersion = Annotated[str | None, _opt(
    "--smtpd-version", help="Target smtpd version (default: the installed one, else 7.4).")]
Imap = Annotated[str | None, _opt(
    "--imap", metavar="SERVER", help="IMAP server: dovecot (IMAPS on 993, same certificate and logins; the "
    "default where Dovecot is installed) or none.")]
DovecotVersion = Annotated[str | None, _opt(
    "--dovecot-version", help="Target Dovecot version, 2.3 or 2.4 (default: the installed one, else 2.3).")]
Compression = Annotated[bool, _opt("--queue-compression/--no-queue-compression")]
InitCompression = Annotated[bool | None, _opt("--queue-compression/--no-queue-compression")]
Encryption = Annotated[bool, _opt("--queue-encryption/--no-queue-encryption")]
InitEncryption = Annotated[bool | None, _opt("--queue-encryption/--no-queue-encryption")]
MaxMessageSize = Annotated[int | None, _opt("--max-message-size",
                                            help="Largest message accepted, in bytes (35 MB).")]
KeepBackups = Annotated[int | None, _opt("--keep-backups", parser=_keep_backups, metavar="N",
                                         help="Dated backups kept of each file written (5); older ones are removed.")]
FirstUser = Annotated[str | None, _opt("--user", help="Add this mail user (password: asked, or stdin).")]
Dkim = Annotated[bool | None, _opt("--dkim/--no-dkim", help="Sign outgoing mail with DKIM (RSA and Ed25519).")]
MtaStsMode = Annotated[str | None, _opt(
    "--mta-sts-mode", metavar="MODE",
    help="The MTA-STS policy's mode: testing (default; senders report, still deliver), enforce, or none.")]
RelayTls = Annotated[str | None, _opt(
    "--relay-tls", metavar="MODE", help="Outbound TLS: opportunistic (default; STARTTLS when offered, any "
    "certificate) or verify (STARTTLS and a CA-trusted certificate required, else the mail waits in the queue).")]
BackupMx = Annotated[list[str] | None, _opt(
    "--backup-mx", metavar="HOST", help="Another host that is a backup MX for the domain (repeatable; `dns` "
    "prints it as MX 20, 30…).")]
BackupFor = Annotated[list[str] | None, _opt(
    "--backup-for", metavar="DOMAIN", help="A domain this host is a backup MX for: its mail is taken from "
    "anyone, queued and handed to its primary MX (repeatable).")]
Smoke = Annotated[bool | None, _opt("--smoke/--no-smoke", help="Run the smoke test (yes).")]

# --- how init runs ------------------------------------------------------------------------------------
PasswordStdin = Annotated[bool, _opt("--password-stdin", help="--user's password on stdin")]
AnswersPath = Annotated[Path | None, _opt("--answers", help="A TOML answers file (keys = flag names).")]
ImportConf = Annotated[Path | None, _opt("--import", metavar="SMTPD_CONF",
                                         help="Start from an existing smtpd.conf (any grammar): `mailsetup import`.")]
ImportFile = Annotated[Path | None, typer.Argument(help="The smtpd.conf to adopt (default: the OS layout's).",
                                                   show_default=False, metavar="SMTPD_CONF")]
Rotate = Annotated[bool, _opt("--rotate", help="Rotate the certificate and the queue key.")]
RotateCert = Annotated[bool, _opt("--rotate-cert", help="New key and certificate.")]
RotateQueueKey = Annotated[bool, _opt("--rotate-queue-key", help="New queue encryption key.")]
Drain = Annotated[bool, _opt("--drain", help="Before a queue key rotation, pause smtpd and wait.")]
DrainTimeout = Annotated[float, _opt("--drain-timeout", metavar="SECONDS",
                                     help="How long --drain waits for an empty queue.")]
ForceRotate = Annotated[bool, _opt("--force-rotate", help="Rotate the queue key even though mail is queued.")]
RotateDkim = Annotated[bool, _opt("--rotate-dkim", help="Make the next DKIM keys (they sign once DNS serves them).")]
ForceDkimSwitch = Annotated[bool, _opt("--force-dkim-switch",
                                       help="Sign with the pending DKIM keys even though DNS does not serve them.")]
Yes = Annotated[bool, _opt("--yes", "-y", help="Write without asking.")]
DryRun = Annotated[bool, _opt("--dry-run", help="Show the plan and diff; write nothing.")]
Diff = Annotated[bool, _opt("--diff/--no-diff", help="Show the diff of each file.")]
Quiet = Annotated[bool, _opt("--quiet", "-q", help="Print only errors.")]
InitJson = Annotated[bool, _opt("--json", help="Print the final report as JSON.")]

# --- the single-file commands -------------------------------------------------------------------------
QueueKeyFile = Annotated[Path | None, _opt("--queue-key-file",
                                           help="The queue key (default: the layout's, if present).")]
AliasesFormat = Annotated[str, _opt("--aliases-format", help="db or file.")]
RenderOut = Annotated[Path | None, _opt("--out", help="Write here (0600, atomic, with a backup).")]
Force = Annotated[bool, _opt("--force", help="Replace --out if it exists.")]
CertHostname = Annotated[str | None, _opt("--hostname", help="The mail host's FQDN.")]
OutCert = Annotated[Path | None, _opt("--out-cert", help="Certificate path.")]
OutKey = Annotated[Path | None, _opt("--out-key", help="Private key path (written 0600).")]
Csr = Annotated[Path | None, _opt("--csr", help="Write a CSR for a CA here instead of a self-signed cert.")]
ForceBackup = Annotated[bool, _opt("--force", help="Replace existing files (backups are kept).")]
KeyOut = Annotated[Path | None, _opt("--out", help="Write the key here (0600) instead of printing.")]
KeyForce = Annotated[bool, _opt("--force", help="Replace --out if it exists (a backup is kept).")]
AliasesSource = Annotated[Path, typer.Argument(help="The aliases(5) file.", metavar="SOURCE")]
AliasesOut = Annotated[Path | None, _opt("--out", help="The database (default: SOURCE.db).")]
CheckOnly = Annotated[bool, _opt("--check", help="Only validate; write nothing.")]

# --- the MTA and the checks ---------------------------------------------------------------------------
ServeListen = Annotated[str, _opt("--listen", help="Address to listen on.")]
ServeSmtpPort = Annotated[int, _opt("--smtp-port", help="MX listener port (0: any free port).")]
ServeSubmissionPort = Annotated[int, _opt("--submission-port", help="Submission port (0: any).")]
RelayHost = Annotated[str | None, _opt("--relay-host", help="HOST:PORT to relay outbound mail to.")]
LoopbackIsRemote = Annotated[bool, _opt("--loopback-is-remote",
                                        help="Treat loopback clients as strangers (testing relay rules).")]
MaxConnections = Annotated[int, _opt("--max-connections")]
Timeout = Annotated[float, _opt("--timeout", help="Idle/command/data timeout, seconds.")]
SmokeJson = Annotated[bool, _opt("--json", help="Print the checks as JSON.")]
SmokeSmtpPort = Annotated[int, _opt("--smtp-port", help="Port for the MX listener (0: a free one).")]
SmokeSubmissionPort = Annotated[int, _opt("--submission-port", help="Submission port (0: free).")]
Engine = Annotated[str, _opt("--engine",
                             help="embedded (mailsetup's MTA) or opensmtpd (the real smtpd, as root).")]
SmtpdBinary = Annotated[str | None, _opt("--smtpd", help="The smtpd binary for --engine opensmtpd.")]
DoctorJson = Annotated[bool, _opt("--json", help="Print the findings as JSON.")]
Ip = Annotated[list[str] | None, _opt("--ip", help="The mail host's public address (repeatable: v4 and v6).")]
DnsCheck = Annotated[bool, _opt("--check", help="Compare with what DNS answers now.")]
Nameserver = Annotated[str | None, _opt(
    "--nameserver", help="Ask this server (ADDR or ADDR:PORT) instead of the system's.")]
DnsJson = Annotated[bool, _opt("--json", help="Print the records (and the check) as JSON.")]
PreflightIp = Annotated[list[str] | None, _opt(
    "--ip", metavar="ADDR", help="An address of this host to check (repeatable; default: its public listen addresses).",
)]
Probe = Annotated[str | None, _opt("--probe", metavar="HOST[:PORT]",
                                   help="Try outbound port 25 here (default gmail-smtp-in.l.google.com:25).")]
Dnsbl = Annotated[list[str] | None, _opt(
    "--dnsbl", metavar="ZONE", help="A DNS blocklist to look the addresses up on (repeatable; default "
    "zen.spamhaus.org and bl.spamcop.net).")]
PreflightTimeout = Annotated[float, _opt("--timeout", metavar="SECONDS",
                                         help="How long each DNS question and the port 25 probe may take.")]
PreflightJson = Annotated[bool, _opt("--json", help="Print the checks as JSON.")]
NoPreflight = Annotated[bool, _opt("--no-preflight",
                                   help="Skip the preflight (DNS, blocklists, port 25) a real host runs first.")]
UserName = Annotated[str, typer.Argument(help="The login (and local user) name.", metavar="NAME")]
UserPasswordStdin = Annotated[bool, _opt("--password-stdin",
                                         help="Read the password from standard input (one line).")]
RemovedUser = Annotated[str, typer.Argument(help="The login to remove.", metavar="NAME")]
DkimRotate = Annotated[bool, _opt("--rotate", help="Make the next keys; they sign once DNS serves their records.")]
