"""`--tls acme` end to end against Pebble (Let's Encrypt's test CA) on loopback, with real http-01
validation: Pebble asks dnsmasq where mail.example.test is (127.0.0.1) and fetches the challenge from
certbot's standalone server. init obtains the certificate, smtpd.conf points at certbot's live files,
a forced renewal runs mailsetup's deploy hook, and smtpd serves the new certificate, whose chain
verifies against Pebble's root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import IS_ROOT, MAILSETUP, OPENSSL, SMTPD, run_cli, smtpd_check, tree
from mta_kit import free_port, listener_ca
from test_answers_truth import Host
from test_real_smtpd import ensure_system_user

PEBBLE = shutil.which("pebble")
CERTBOT = shutil.which("certbot")
DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
HOST = "mail.example.test"

needs_pebble = pytest.mark.skipif(
    not (PEBBLE and CERTBOT and DNSMASQ and OPENSSL and IS_ROOT),
    reason="needs root, pebble, certbot, dnsmasq and openssl (scripts/bootstrap --test installs them)")


def _wait_tcp(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _openssl(*args: object, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, input=input, timeout=60)


class Pebble:
    """dnsmasq (mail.example.test → 127.0.0.1) and Pebble validating http-01 on `http_port` for real."""

    def __init__(self, work: Path):
        self.work = work
        # what certbot trusts Pebble's https with (REQUESTS_CA_BUNDLE)
        self.ca_bundle = listener_ca(work, "DNS:localhost,IP:127.0.0.1")
        self.port, self.mgmt, self.http_port, self.dns = free_port(), free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen] = []

    def start(self) -> Pebble:
        self._spawn("dnsmasq", [
            DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--conf-file=/dev/null",
            f"--port={self.dns}", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
            "--local=/example.test/", f"--host-record={HOST},127.0.0.1"])
        config = self.work / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.mgmt}",
            "certificate": str(self.work / "cert.pem"), "privateKey": str(self.work / "key.pem"),
            "httpPort": self.http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        pebble = self._spawn("pebble", [PEBBLE, "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns}"],
                             env=env, cwd=self.work)
        _wait_tcp(self.port, pebble, "pebble")
        _wait_tcp(self.mgmt, pebble, "pebble's management port")
        return self

    def _spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """Output to a file, not a pipe: Pebble logs every request, and a pipe nobody reads would fill
        and stall it."""
        with (self.work / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        return proc

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def env(self) -> dict[str, str]:
        return {"REQUESTS_CA_BUNDLE": str(self.ca_bundle)}

    def root_pem(self) -> Path:
        """The root of the chain Pebble issues under (a new one each start)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt}/roots/0", context=ctx, timeout=10) as r:
            path = self.work / "pebble-root.pem"
            path.write_bytes(r.read())
        return path

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture
def pebble():
    work = Path(tempfile.mkdtemp(prefix="mailsetup-pebble-"))
    server = Pebble(work)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def sandbox():
    base = Path(tempfile.mkdtemp(prefix="mailsetup-acme-", dir="/tmp"))
    base.chmod(0o755)  # smtpd's unprivileged processes must reach aliases.db
    yield base / "root"
    shutil.rmtree(base, ignore_errors=True)


def acme_init(sandbox: Path, pebble: Pebble, *extra: object, hostname: str = HOST):
    return run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", sandbox,
                   "--admin", "alice", "--hostname", hostname, "--tls", "acme", "--acme-server", pebble.directory,
                   "--http-01-port", pebble.http_port, "--acme-email", "postmaster@example.test", *extra,
                   env=pebble.env, timeout=300)


def fingerprint(pem_text: str) -> str:
    """The SHA-256 fingerprint of the first certificate in the text."""
    r = _openssl("x509", "-noout", "-fingerprint", "-sha256", input=pem_text)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def certbot_dirs(sandbox: Path) -> list[str]:
    return ["--config-dir", str(sandbox / "etc/letsencrypt"), "--work-dir", str(sandbox / "var/lib/letsencrypt"),
            "--logs-dir", str(sandbox / "var/log/letsencrypt")]


def served_by_smtpd(sandbox: Path, root_pem: Path) -> tuple[str, str]:
    """Start the real smtpd on the set-up's files (as its restart would), ask it with openssl s_client
    -starttls smtp, stop it. Returns (the served certificate's fingerprint, s_client's verdict)."""
    from mailsetup.answers import load_setup
    from mailsetup.realsmtpd import RealSmtpd, loopback_config

    setup = load_setup(sandbox, "debian")
    smtp, submission = free_port(), free_port()
    with RealSmtpd(SMTPD, loopback_config(setup, smtp, submission, free_port()), (smtp, submission)):
        r = _openssl("s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{smtp}", "-servername", HOST,
                     "-CAfile", root_pem, "-verify_hostname", HOST, "-verify_return_error", input="QUIT\n")
    verdict = next((line.strip() for line in r.stdout.splitlines() if "Verify return code" in line), r.stderr)
    return fingerprint(r.stdout), verdict


@needs_pebble
@pytest.mark.skipif(not (SMTPD and Path("/usr/libexec/opensmtpd/filter-dkimsign").exists()),
                    reason="needs OpenSMTPD and opensmtpd-filter-dkimsign")
def test_acme_issues_renews_through_the_hook_and_smtpd_serves_the_new_certificate(sandbox: Path, pebble: Pebble):
    ensure_system_user("alice")  # smtpd delivers to system users only
    marker = sandbox.parent / "reloaded"
    r = acme_init(sandbox, pebble, "--dkim", "--reload-command", f"echo renewed >> {marker}")
    assert r.code == 0, r.err + r.out
    live = sandbox / "etc/letsencrypt/live" / HOST
    assert f"certbot: a certificate for {HOST} from {pebble.directory} in {live}" in r.out
    # smtpd.conf names certbot's stable paths; smtpd -n accepts them (and init's smoke test passed).
    conf = (sandbox / "etc/smtpd.conf").read_text()
    assert f'pki {HOST} cert "{live}/fullchain.pem"' in conf and f'pki {HOST} key "{live}/privkey.pem"' in conf
    assert smtpd_check(sandbox / "etc/smtpd.conf").returncode == 0
    # the embedded MTA's smoke test shows the CA-issued certificate (Pebble's intermediate issued it)
    assert ("STARTTLS (TLSv1.3) serves fullchain.pem, valid for mail.example.test, issued by CN=Pebble "
            "Intermediate CA") in r.out
    # The deploy hook: root's, 0755, where certbot runs it after each renewal.
    hook = sandbox / "etc/letsencrypt/renewal-hooks/deploy/mailsetup-smtpd"
    st = hook.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    root_pem = pebble.root_pem()
    chain = live / "fullchain.pem"
    assert _openssl("verify", "-CAfile", root_pem, "-untrusted", chain, chain).returncode == 0
    first = fingerprint(chain.read_text())
    assert not marker.exists()

    # (certbot renew sleeps up to 8 minutes first when not on a terminal, unless told not to)
    renew = subprocess.run([CERTBOT, "renew", "--force-renewal", "--non-interactive", "--no-random-sleep-on-renew",
                            *certbot_dirs(sandbox)],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, **pebble.env))
    assert renew.returncode == 0, renew.stderr
    assert marker.read_text() == "renewed\n"  # the hook checked the pair and ran the reload command
    assert "the renewed certificate of mail.example.test checks out" in renew.stderr + renew.stdout
    second = fingerprint(chain.read_text())
    assert second != first

    # smtpd, started on the renewed files, serves the new certificate, and its chain verifies.
    served, verdict = served_by_smtpd(sandbox, root_pem)
    assert served == second
    assert verdict == "Verify return code: 0 (ok)"
    # And the smoke test on the real smtpd agrees that what it serves is the live certificate. (init's
    # embedded smoke test left a root-owned Maildir in the sandbox, which the real smtpd's delivery
    # refuses: a sandbox quirk outside --tls acme, so it goes first.)
    shutil.rmtree(sandbox / "home/alice", ignore_errors=True)
    smoke = run_cli("smoke", "--root", sandbox, "--engine", "opensmtpd", "--json")
    checks = {c["name"]: c for c in json.loads(smoke.out)}
    assert smoke.code == 0, ([c for c in checks.values() if not c["ok"]], smoke.err)
    assert checks["STARTTLS with the generated certificate"]["ok"]
    assert "issued by CN=Pebble Intermediate CA" in checks["STARTTLS with the generated certificate"]["detail"]
    # with DKIM on, both engines sign what leaves: the CA-issued certificate and the signatures together
    assert "DKIM signatures verify" in r.out
    assert "2 signatures" in checks["DKIM signatures verify against the records `mailsetup dns` prints"]["detail"]


@needs_pebble
def test_a_certificate_certbot_cannot_get_stops_init_with_one_line_and_nothing_written(sandbox: Path,
                                                                                      pebble: Pebble):
    """dnsmasq knows no other.example.test: Pebble's validation fails, init says why in one line and
    writes none of its files (certbot keeps its own account and log under etc/ and var/)."""
    r = acme_init(sandbox, pebble, hostname="other.example.test")
    assert r.code == 1, r.out
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("mailsetup: error: --tls acme: certbot could not obtain a certificate for "
                           f"other.example.test from {pebble.directory}: "), line
    assert "nothing written" in line and "letsencrypt.log" in line
    assert "Traceback" not in r.err
    ours = [p for p in sandbox.rglob("*") if p.is_file() and "letsencrypt" not in p.parts]
    assert ours == []
    assert not (sandbox / "etc/letsencrypt/live/other.example.test").exists()


@needs_pebble
def test_doctor_checks_the_acme_certificate_expiry_chain_and_name(sandbox: Path, pebble: Pebble):
    r = acme_init(sandbox, pebble, "--no-smoke")
    assert r.code == 0, r.err
    root_pem = pebble.root_pem()

    def doctor(bundle: str) -> dict[str, dict]:
        d = run_cli("doctor", "--root", sandbox, "--json", env={"REQUESTS_CA_BUNDLE": bundle})
        return {f["name"]: f for f in json.loads(d.out)}

    found = doctor(str(root_pem))  # as a client that trusts Pebble's root
    assert found["certificate chain"]["status"] == "ok", found["certificate chain"]
    assert found["certificate chain"]["detail"] == f"2 certificates in fullchain.pem, verified against {root_pem}"
    assert found["certificate names the mail host"]["status"] == "ok"
    assert found["certbot deploy hook"]["status"] == "ok"
    assert found["certificate expiry"]["status"] == "ok"
    assert "certbot renews it from 30 days before" in found["certificate expiry"]["detail"]
    # The system's store does not know Pebble's root: the chain holds together but clients refuse it.
    found = doctor("")
    assert found["certificate chain"]["status"] == "warn"
    assert "holds together (2 certificates) but does not verify against" in found["certificate chain"]["detail"]

    # Expiry, judged on the real certificate at other moments: 10 days left warns (certbot should
    # have renewed from 30), after the end fails.
    import datetime as dt

    from mailsetup.answers import load_setup
    from mailsetup.doctor import Doctor
    from mailsetup.pki import inspect_cert, load_cert

    setup = load_setup(sandbox, "debian")
    end = inspect_cert(load_cert(Path(setup.tls.cert))).not_after
    status, detail = Doctor(setup, now=end - dt.timedelta(days=10, hours=1)).cert_expiry()
    assert status == "warn" and "in 10 days" in detail and "certbot renew" in detail
    status, detail = Doctor(setup, now=end + dt.timedelta(days=1)).cert_expiry()
    assert status == "fail" and detail.startswith(f"the certificate expired on {end:%Y-%m-%d}")
    # A hook certbot would not run (not executable) is named.
    hook = sandbox / "etc/letsencrypt/renewal-hooks/deploy/mailsetup-smtpd"
    hook.chmod(0o644)
    assert doctor(str(root_pem))["certbot deploy hook"]["status"] == "fail"


@needs_pebble
def test_the_deploy_hook_refuses_a_renewed_pair_that_does_not_match(sandbox: Path, pebble: Pebble):
    """certbot runs the hook with RENEWED_LINEAGE; a key that is not the certificate's (or a certificate
    for another name) stops it before the restart: smtpd keeps serving the old pair."""
    marker = sandbox.parent / "reloaded"
    r = acme_init(sandbox, pebble, "--no-smoke", "--reload-command", f"echo restarted >> {marker}")
    assert r.code == 0, r.err
    live = sandbox / "etc/letsencrypt/live" / HOST
    hook = sandbox / "etc/letsencrypt/renewal-hooks/deploy/mailsetup-smtpd"

    def run_hook(lineage: Path = live) -> subprocess.CompletedProcess:
        return subprocess.run([hook], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, RENEWED_LINEAGE=str(lineage)))

    done = run_hook()
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "restarted\n"
    # another lineage of this host's certbot: not smtpd's certificate, nothing to do
    done = run_hook(sandbox / "etc/letsencrypt/live/www.example.test")
    assert done.returncode == 0 and marker.read_text() == "restarted\n"
    # a key that is not the certificate's (written where live/privkey.pem leads, in archive/)
    assert _openssl("genpkey", "-algorithm", "RSA", "-out", (live / "privkey.pem").resolve()).returncode == 0
    done = run_hook()
    assert done.returncode == 1
    assert done.stderr.strip() == (f"mailsetup deploy hook: {live}/privkey.pem is not the key of {live}/fullchain.pem; "
                                   "smtpd not restarted, it keeps serving the old certificate")
    assert marker.read_text() == "restarted\n"
    # a matching pair for another name
    other_key, other_cert = (live / "privkey.pem").resolve(), (live / "fullchain.pem").resolve()
    assert _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", other_key, "-out", other_cert,
                    "-days", "2", "-subj", "/CN=www.example.test", "-addext",
                    "subjectAltName=DNS:www.example.test").returncode == 0
    done = run_hook()
    assert done.returncode == 1
    assert done.stderr.strip() == (f"mailsetup deploy hook: {live}/fullchain.pem does not name {HOST}; "
                                   "smtpd not restarted, it keeps serving the old certificate")
    assert marker.read_text() == "restarted\n"
    # init sees it too, and says how to mend it; --rotate-cert asks certbot for a new pair
    again = acme_init(sandbox, pebble, "--no-smoke")
    assert again.code == 1
    assert again.err_lines == [
        f"mailsetup: error: --tls acme: certbot's certificate does not check out ({live}/fullchain.pem names "
        f"www.example.test, not {HOST}); ask certbot for a new one: mailsetup init --rotate-cert"]
    assert acme_init(sandbox, pebble, "--no-smoke", "--rotate-cert").code == 0
    assert marker.read_text() == "restarted\n" * 2  # certbot ran the hook on that renewal itself
    assert run_hook().returncode == 0 and marker.read_text() == "restarted\n" * 3


@pytest.mark.parametrize("flag, value, error", [
    ("--acme-server", "http://127.0.0.1:14000/dir",
     "--acme-server: 'http://127.0.0.1:14000/dir' is not an https:// URL of an ACME directory"),
    ("--acme-email", "not an address", "--acme-email: 'not an address' contains a space, which is not allowed here"),
    ("--acme-email", "you@", "--acme-email: a DNS name is required"),
    ("--reload-command", "systemctl restart opensmtpd\nrm -rf /",
     "--reload-command: 'systemctl restart opensmtpd\\nrm -rf /' contains a newline, which is not allowed here"),
    ("--http-01-port", "0", "--http-01-port: 0 is not a port number (1-65535)"),
    ("--webroot", "relative/dir", "--webroot: 'relative/dir' must be an absolute path"),
])
def test_bad_acme_settings_are_one_line_and_nothing_written(tmp_path: Path, flag: str, value: str, error: str | None):
    sandbox = tmp_path / "root"
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", sandbox, "--admin", "alice",
                "--tls", "acme", flag, value)
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("mailsetup: error: "), r.err
    if error:
        assert r.err_lines[0] == f"mailsetup: error: {error}"
    assert tree(sandbox) == {}


def test_without_certbot_init_says_how_to_install_it_and_writes_nothing(tmp_path: Path):
    sandbox = tmp_path / "root"
    r = run_cli("init", "--yes", "--domain", "example.test", "--os", "debian", "--root", sandbox, "--admin", "alice",
                "--tls", "acme", env={"PATH": str(tmp_path / "empty")})
    assert r.code == 1, r.err
    assert r.err_lines == ["mailsetup: error: --tls acme: certbot is not installed; install certbot first: "
                           "apt-get install certbot (Debian's package)"]
    assert tree(sandbox) == {}


def test_a_dry_run_says_what_certbot_would_do_and_runs_nothing(tmp_path: Path):
    sandbox = tmp_path / "root"
    r = run_cli("init", "--dry-run", "--domain", "example.test", "--os", "debian", "--root", sandbox,
                "--admin", "alice", "--tls", "acme", "--webroot", "/var/www/html", "--acme-server", "https://127.0.0.1:9/dir")
    assert r.code == 0, r.err
    assert ("certbot will obtain a certificate for mail.example.test from https://127.0.0.1:9/dir (through the web "
            "server serving /var/www/html) before anything is written") in r.out
    assert f'cert "{sandbox}/etc/letsencrypt/live/mail.example.test/fullchain.pem"' in r.out
    assert tree(sandbox) == {}


@needs_pebble
def test_a_rerun_keeps_certbots_certificate_and_rotate_cert_asks_for_a_new_one(sandbox: Path, pebble: Pebble):
    assert acme_init(sandbox, pebble, "--no-smoke").code == 0
    chain = sandbox / "etc/letsencrypt/live" / HOST / "fullchain.pem"
    first = fingerprint(chain.read_text())
    answers = (sandbox / "etc/mailsetup/answers.toml").read_text()
    assert f'acme_server = "{pebble.directory}"' in answers and f"http_01_port = {pebble.http_port}" in answers
    assert 'tls = "acme"' in answers and 'acme_email = "postmaster@example.test"' in answers
    # A re-run from answers.toml alone (no --tls, no --acme-* flags) keeps the certificate...
    rerun = ("init", "--yes", "--no-smoke", "--os", "debian", "--root", sandbox)
    again = run_cli(*rerun, env=pebble.env, timeout=300)
    assert again.code == 0, again.err
    assert (f"certbot renews the certificate; after each renewal {sandbox}/etc/letsencrypt/renewal-hooks/deploy/"
            f"mailsetup-smtpd checks it and restarts smtpd. Try a renewal: certbot renew --dry-run --config-dir "
            f"{sandbox}/etc/letsencrypt --work-dir {sandbox}/var/lib/letsencrypt --logs-dir "
            f"{sandbox}/var/log/letsencrypt") in again.out
    assert f"kept certbot's certificate {chain}" in again.out and "certbot: a certificate" not in again.out
    assert fingerprint(chain.read_text()) == first
    # ...and --rotate-cert asks the recorded ACME server again, on the recorded port.
    rotated = run_cli(*rerun, "--rotate-cert", env=pebble.env, timeout=300)
    assert rotated.code == 0, rotated.err
    assert f"certbot: a certificate for {HOST} from {pebble.directory}" in rotated.out
    assert fingerprint(chain.read_text()) != first


class HostWithVar(Host):
    """This host through a private mount namespace (a copy of /etc, an empty /home and /run); /var is
    an overlay whose writes (certbot's work and logs directories) land in `var`."""

    def __init__(self, base: Path):
        super().__init__(base)
        self.var = Path(f"{self.etc}.var")  # the overlay's upper folder (conftest.own_var)


@needs_pebble
@pytest.mark.skipif(not (SMTPD and shutil.which("unshare")), reason="needs OpenSMTPD and unshare")
def test_on_a_real_host_certbot_uses_etc_letsencrypt_and_the_hook_restarts_the_service(tmp_path: Path,
                                                                                       pebble: Pebble):
    """No --root: certbot's own directories, smtpd.conf in /etc naming /etc/letsencrypt/live, and a hook
    that restarts smtpd the way this host does (here without systemd: the init script through service)."""
    host = HostWithVar(tmp_path)
    r = host.run("env", f"REQUESTS_CA_BUNDLE={pebble.ca_bundle}", MAILSETUP, "init", "--yes", "--no-smoke",
                 "--domain", "example.test", "--os", "debian", "--admin", "postmaster@example.org",
                 "--hostname", HOST, "--tls", "acme", "--acme-server", pebble.directory,
                 "--http-01-port", pebble.http_port, "--no-preflight")
    assert r.code == 0, r.err + r.out
    live = host.etc / "letsencrypt/live" / HOST
    assert (live / "fullchain.pem").exists() and (live / "privkey.pem").exists()
    conf = (host.etc / "smtpd.conf").read_text()
    assert f'pki {HOST} cert "/etc/letsencrypt/live/{HOST}/fullchain.pem"' in conf
    assert "✓ smtpd -n: configuration OK" in r.out
    assert (host.var / "log/letsencrypt/letsencrypt.log").exists()
    hook = (host.etc / "letsencrypt/renewal-hooks/deploy/mailsetup-smtpd").read_text()
    assert f"live=/etc/letsencrypt/live/{HOST}\n" in hook
    restart = "service opensmtpd restart" if (host.etc / "init.d/opensmtpd").exists() else None
    if restart:
        assert f"\n{restart}\n" in hook
    if 'imap = "dovecot"' in (host.etc / "mailsetup/answers.toml").read_text():  # Dovecot here: IMAP by default
        assert hook.endswith('\ndoveadm reload || say "no running Dovecot to reload; it reads the new certificate '
                             'when it starts"\n')


def test_the_wizard_explains_the_tls_choice_and_asks_for_the_acme_address(tmp_path: Path):
    from test_wizard import DOWN, answer, finish, spawn

    root = tmp_path / "root"
    child = spawn("init", "--root", root, "--os", "debian", "--domain", "example.test", "--admin", "alice",
                  "--user", "", "--acme-server", "https://127.0.0.1:9/dir", "--dry-run")
    answer(child, r"Mail host name, its FQDN \(--hostname\)", "\r")
    child.expect(r"only for a public name whose port 80 reaches this host")
    answer(child, r"TLS certificate \(--tls\)", DOWN * 3 + "\r")  # the fourth: acme
    answer(child, r"Address Let's Encrypt writes to about the certificate, blank for none \(--acme-email\)",
           "you@example.test\r")
    answer(child, r"Key type \(--key-type\)", "\r")
    answer(child, r"Compress the queue", "y")
    answer(child, r"Encrypt the queue", "y")
    answer(child, r"Sign outgoing mail with DKIM", "y")
    answer(child, r"\(--imap\)", "\r")  # a sandbox: none
    answer(child, r"Run the smoke test", "n")
    code, text = finish(child)
    assert code == 0, text
    assert "self-signed works anywhere, but mail clients warn about it" in text
    assert "a CA-trusted certificate from Let's Encrypt, renewed by certbot" in text
    assert ("certbot will obtain a certificate for mail.example.test from https://127.0.0.1:9/dir (with certbot's "
            "own server on port 80) before anything is written") in text
    assert tree(root) == {}


@needs_pebble
def test_webroot_answers_the_challenge_through_the_web_server_already_on_port_80(sandbox: Path, pebble: Pebble):
    """--webroot DIR: certbot writes the challenge into DIR, a web server that already holds the port
    (here python's http.server on Pebble's http-01 port) serves it; certbot opens no port itself."""
    webroot = sandbox.parent / "www"
    webroot.mkdir()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", webroot,
                            str(pebble.http_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_tcp(pebble.http_port, web, "the web server")
        r = acme_init(sandbox, pebble, "--no-smoke", "--webroot", webroot)
    finally:
        _stop(web)
    assert r.code == 0, r.err + r.out
    assert f"(through the web server serving {webroot})" in r.out
    assert (sandbox / "etc/letsencrypt/live" / HOST / "fullchain.pem").exists()
    assert f"webroot = \"{webroot}\"" in (sandbox / "etc/mailsetup/answers.toml").read_text()
