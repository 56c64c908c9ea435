"""`--tls acme`: every call of certbot (obtain the mail host's certificate), and the deploy hook
certbot runs after each renewal, which checks the new pair and restarts smtpd so it serves it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from mailsetup.errors import MailsetupError
from mailsetup.model import Acme, MailSetup
from mailsetup.plan import FileChange

HOOK_MODE = 0o755  # certbot runs only executables in renewal-hooks/deploy
HOOK_NAME = "mailsetup-smtpd"
CERTBOT_TIMEOUT = 600  # a CA that never answers must not hang init for ever

INSTALL_HINT = "install certbot first: apt-get install certbot (Debian's package)"


def _acme(setup: MailSetup) -> Acme:
    assert setup.tls.acme is not None, "an acme set-up carries its Acme settings"
    return setup.tls.acme


def live_dir(setup: MailSetup) -> Path:
    return Path(setup.tls.cert).parent


def hook_path(setup: MailSetup) -> Path:
    return Path(setup.layout.letsencrypt_dir) / "renewal-hooks" / "deploy" / HOOK_NAME


def certbot_dirs(setup: MailSetup) -> list[str]:
    """certbot's config, work and logs directories: the layout's, so under the sandbox with --root."""
    layout = setup.layout
    return ["--config-dir", str(layout.letsencrypt_dir), "--work-dir", str(layout.letsencrypt_work),
            "--logs-dir", str(layout.letsencrypt_logs)]


def _key_options(key_type: str) -> list[str]:
    if key_type == "ecdsa-p256":
        return ["--key-type", "ecdsa", "--elliptic-curve", "secp256r1"]
    return ["--key-type", "rsa", "--rsa-key-size", "4096" if key_type == "rsa-4096" else "2048"]


def certonly_command(setup: MailSetup, certbot: str = "certbot", force: bool = False) -> list[str]:
    """certbot certonly for the mail host, unattended: standalone on --http-01-port, or through a web
    server's document root. `--cert-name` keeps the lineage at live/HOSTNAME, where smtpd.conf points.
    The CA's certificate is trusted as certbot trusts it (the system's store, or REQUESTS_CA_BUNDLE)."""
    acme = _acme(setup)
    if acme.webroot is not None:
        how = ["--webroot", "-w", str(acme.webroot)]
    else:
        how = ["--standalone", "--http-01-port", str(acme.http_port)]
    contact = ["--email", acme.email] if acme.email else ["--register-unsafely-without-email"]
    return [certbot, "certonly", "--non-interactive", "--agree-tos", *how, "--server", acme.server, *contact,
            "--cert-name", setup.hostname, "-d", setup.hostname, *_key_options(setup.tls.key_type),
            *(["--force-renewal"] if force else ["--keep-until-expiring"]), *certbot_dirs(setup)]


def find_certbot() -> str:
    found = shutil.which("certbot")
    if not found:
        raise MailsetupError(f"--tls acme: certbot is not installed; {INSTALL_HINT}", exit_code=1)
    return found


def have_certificate(setup: MailSetup) -> bool:
    return Path(setup.tls.cert).exists() and Path(setup.tls.key).exists()


def obtain(setup: MailSetup, force: bool = False) -> str:
    """Run certbot for the mail host; one line on failure (certbot's own reason, its log's place).
    Returns what was done, for the report."""
    cmd = certonly_command(setup, find_certbot(), force)
    _make_parents(setup)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CERTBOT_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MailsetupError(f"--tls acme: certbot did not finish within {CERTBOT_TIMEOUT} s; nothing written "
                             f"(its log: {setup.layout.letsencrypt_logs}/letsencrypt.log)", exit_code=1) from None
    if done.returncode != 0 or not have_certificate(setup):
        raise MailsetupError(f"--tls acme: certbot could not obtain a certificate for {setup.hostname} from "
                             f"{_acme(setup).server}: {certbot_reason(done.stderr + done.stdout)}; nothing written "
                             f"(its log: {setup.layout.letsencrypt_logs}/letsencrypt.log)", exit_code=1)
    return f"certbot: a certificate for {setup.hostname} from {_acme(setup).server} in {live_dir(setup)}"


def _make_parents(setup: MailSetup) -> None:
    """certbot makes every missing directory above its own 0700 (certbot.compat.filesystem.makedirs):
    in a fresh sandbox that would be ROOT/etc itself, keeping smtpd's unprivileged processes from the
    aliases table. So the parents (on a real host /etc, /var/lib, /var/log) are made first, 0755."""
    from mailsetup.files import make_dirs

    layout = setup.layout
    for folder in (layout.letsencrypt_dir, layout.letsencrypt_work, layout.letsencrypt_logs):
        make_dirs(Path(folder).parent)


def certbot_reason(output: str) -> str:
    """The line of certbot's output that says why: the CA's Detail, else its first error line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("Detail:", "An unexpected error occurred:", "Error"):
        found = next((line for line in lines if line.startswith(prefix)), None)
        if found:
            return found.removeprefix("Detail:").strip()
    skip = ("Saving debug log", "Ask for help", "See the logfile", "Some challenges have failed")
    useful = [line for line in lines if not line.startswith(skip)]
    return (useful or ["certbot gave no reason"])[-1]


def reload_command(setup: MailSetup) -> str:
    """What the hook runs once the pair checks out: --reload-command, else this OS's restart of smtpd
    (smtpd has no reload of its certificates: only a restart reads them). In a sandbox (--root) there is
    no service to restart: it says so instead."""
    from mailsetup.platforms import restart_command

    given = _acme(setup).reload
    if given:
        return given
    if setup.root is not None:
        return "echo " + shlex.quote(f"sandbox (--root): not restarting smtpd ({setup.layout.restart})")
    found = restart_command(setup.layout)
    if found.startswith("no systemd"):  # a sentence for a person, not a command
        return f"echo {shlex.quote(found)} >&2; exit 1"
    return found


def dovecot_reload(setup: MailSetup) -> str:
    """With --imap dovecot, the hook's last line: Dovecot serves the same pair, and `doveadm reload`
    makes it read the renewed one (no restart, no dropped IMAP sessions)."""
    if setup.imap != "dovecot":
        return ""
    if setup.root is not None:
        return "echo " + shlex.quote("sandbox (--root): not reloading Dovecot (doveadm reload)") + "\n"
    return 'doveadm reload || say "no running Dovecot to reload; it reads the new certificate when it starts"\n'


def render_deploy_hook(setup: MailSetup) -> bytes:
    """The deploy hook: a POSIX sh script that openssl can judge with, no Python needed at renewal."""
    q = shlex.quote
    live = live_dir(setup)
    return f"""#!/bin/sh
# Written by mailsetup (--tls acme). certbot runs it after renewing a certificate: it checks that the
# new key matches the new certificate and that the certificate names {setup.hostname}, then restarts
# smtpd, which reads its certificate only when it starts. Re-run `mailsetup init` to change it.
set -eu
host={q(setup.hostname)}
live={q(str(live))}
case "${{RENEWED_LINEAGE:-$live}}" in
  "$live") ;;
  *) exit 0 ;;  # another certificate of this host: not smtpd's
esac
cert="$live/fullchain.pem"
key="$live/privkey.pem"
say() {{ echo "mailsetup deploy hook: $*" >&2; }}
if [ "$(openssl x509 -in "$cert" -noout -pubkey)" != "$(openssl pkey -in "$key" -pubout)" ]; then
  say "$key is not the key of $cert; smtpd not restarted, it keeps serving the old certificate"
  exit 1
fi
if ! openssl x509 -in "$cert" -noout -checkhost "$host" | grep -q 'does match'; then
  say "$cert does not name $host; smtpd not restarted, it keeps serving the old certificate"
  exit 1
fi
say "the renewed certificate of $host checks out; restarting smtpd"
{reload_command(setup)}
{dovecot_reload(setup)}""".encode()


def hook_change(setup: MailSetup) -> FileChange:
    return FileChange(hook_path(setup), render_deploy_hook(setup), HOOK_MODE,
                      "certbot deploy hook: checks each renewed certificate, then restarts smtpd")


def plan_note(setup: MailSetup) -> str:
    """What init will ask certbot for, said in the plan before anything runs."""
    acme = _acme(setup)
    how = (f"through the web server serving {acme.webroot}" if acme.webroot is not None
           else f"with certbot's own server on port {acme.http_port}")
    return (f"certbot will obtain a certificate for {setup.hostname} from {acme.server} ({how}) before "
            "anything is written")
