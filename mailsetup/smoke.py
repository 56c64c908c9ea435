"""The smoke test: start the embedded MTA on the set-up's files (free loopback ports), play a
stranger, a mail client and a spammer against it with a real SMTP client, and report ✓/✗.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import shutil
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path

from mailsetup import credentials as creds_mod
from mailsetup.errors import MailsetupError
from mailsetup.files import make_dirs, make_users_dirs, read_secret, write_atomic
from mailsetup.model import MailSetup
from mailsetup.mta import maildir as maildir_mod

RELAY_TRICKS = (
    "smoke%example.net@{domain}",
    '"smoke@example.net"@{domain}',
    "@{domain}:smoke@example.net",
    "smoke@example.net@{domain}",
    "example.net!smoke@{domain}",
    "smoke@[192.0.2.1]",
    "smoke@example.net.",
    "SMOKE@EXAMPLE.NET",
    "smoke@{domain}.example.net",
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SmokeReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, fn: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail = fn()
            ok = True
        except AssertionError as exc:
            ok, detail = False, str(exc) or "failed"
        except MailsetupError as exc:
            ok, detail = False, exc.message
        except (OSError, smtplib.SMTPException, ssl.SSLError, TimeoutError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.checks.append(Check(name, ok, detail, round(time.monotonic() - started, 3)))
        return ok


class _LoopThread:
    """An asyncio loop in a background thread: the servers run there, the clients here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="smoke-mta", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _Sink:
    """A throw-away relay target: answers 451 to the first message (so the queue is seen holding
    it), then keeps what it gets."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, str]] = []  # from, to, bytes, the relay's EHLO name
        self.tempfail_left = 1
        self.server = None
        self.port = 0

    async def handle_DATA(self, server, session, envelope):
        if self.tempfail_left > 0:
            self.tempfail_left -= 1
            return "451 4.3.0 sink says: try again later"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                              session.host_name or ""))
        return "250 2.0.0 sink kept it"

    async def start(self) -> None:
        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SMTP(self, hostname="sink.invalid"), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()


def _client_tls(setup: MailSetup) -> ssl.SSLContext:
    """Trust exactly the set-up's certificate, and check it names the host."""
    ctx = ssl.create_default_context(cafile=str(setup.tls.cert))
    ctx.check_hostname = True
    # A CA-issued certificate (--tls acme's fullchain.pem) is not self-signed: trusting it exactly
    # means trusting the leaf itself, not the CA above it.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def _issuer(der: bytes) -> str:
    """"self-signed", or who issued the certificate (a CA's name, e.g. an ACME CA's)."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    if cert.issuer == cert.subject:
        return "self-signed"
    return "issued by " + report_safe(cert.issuer.rfc4514_string())


def report_safe(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _message(token: str, to: str, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"mailsetup smoke test {token}"
    msg.set_content(f"This message was sent by `mailsetup smoke` and is removed again.\nToken: {token}\n")
    return msg


STRANGER = "127.0.0.2"  # loopback, but no interface's address: smtpd's `from local` does not match it


class _Embedded:
    """mailsetup's own MTA, in a thread of this process."""

    name = "embedded MTA"

    def __init__(self, setup: MailSetup, loop: _LoopThread, sink: _Sink, ports: tuple[int, int], queue_dir: Path):
        self.setup, self.loop, self.sink, self.ports_wanted, self.queue_dir = setup, loop, sink, ports, queue_dir
        self.mta = None
        self.ports: dict[str, int] = {}
        self.policy = None

    def start(self) -> str:
        from mailsetup.mta.server import EmbeddedMta, MtaOptions, load_runtime

        options = MtaOptions(
            listen="127.0.0.1", smtp_port=self.ports_wanted[0], submission_port=self.ports_wanted[1],
            relay_host=("127.0.0.1", self.sink.port), queue_dir=self.queue_dir, retry_first=0.3, timeout=30,
        )
        runtime = load_runtime(self.setup, options)  # reads cert, key, aliases.db, creds, queue key
        mta = EmbeddedMta(runtime)
        self.loop.run(mta.start())
        self.mta, self.ports, self.policy = mta, mta.ports, runtime.policy
        return f"embedded MTA on 127.0.0.1:{mta.ports['smtp']} (smtp) and :{mta.ports['submission']} (submission)"

    def maildir(self, user: str) -> Path:
        return self.mta.rt.home(user)

    def owner(self, user: str) -> tuple[int, int] | None:
        return self.mta.rt.owner(user)

    def stop(self) -> None:
        if self.mta is not None:
            with contextlib.suppress(Exception):
                self.loop.run(self.mta.stop())


class _OpenSmtpd:
    """The real smtpd, on the rendered smtpd.conf with only its listeners and relay host changed."""

    name = "OpenSMTPD"

    def __init__(self, setup: MailSetup, sink: _Sink, ports: tuple[int, int], smtpd: str):
        self.setup, self.sink, self.ports_wanted, self.smtpd = setup, sink, ports, smtpd
        self.real = None
        self.ports: dict[str, int] = {}
        self.policy = None

    def start(self) -> str:
        from mailsetup import aliases as aliases_mod
        from mailsetup.mta.policy import policy_for
        from mailsetup.realsmtpd import RealSmtpd, check_written_config, loopback_config

        smtp = self.ports_wanted[0] or _free_port()
        sub = self.ports_wanted[1] or _free_port()
        _check_reachable_by_smtpd(Path(self.setup.layout.aliases_db))
        if self.setup.dkim:  # filter-dkimsign opens its key as its own user
            _check_reachable_by_smtpd(Path(self.setup.layout.dkim_dir), "filter-dkimsign cannot open its key")
        check_written_config(self.setup)
        conf = loopback_config(self.setup, smtp, sub, self.sink.port)
        aliases = aliases_mod.read_aliases_db(Path(self.setup.layout.aliases_db))
        self.policy = policy_for(self.setup, aliases, (), for_smtpd=True)
        self.real = RealSmtpd(self.smtpd, conf, (smtp, sub)).start()
        self.ports = {"smtp": smtp, "submission": sub}
        where = "a private spool" if self.real.isolated else "the system spool"
        return f"smtpd -d on 127.0.0.1:{smtp} (smtp) and :{sub} (submission), {where}, pid {self.real.proc.pid}"

    def maildir(self, user: str) -> Path:
        import pwd

        if self.setup.root is None:
            return Path(pwd.getpwnam(user).pw_dir) / "Maildir"
        return Path(self.setup.maildir_for(user))

    def owner(self, user: str) -> tuple[int, int]:
        """smtpd delivers as the user, in a sandbox too: the Maildir is theirs."""
        import pwd

        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid

    def prepare_maildir(self, user: str) -> None:
        """smtpd delivers as the user: in a sandbox, give them a Maildir they own."""
        import pwd

        if self.setup.root is None:
            return
        pw = pwd.getpwnam(user)
        home = Path(self.setup.layout.home_dir)
        make_dirs(home)
        make_users_dirs(home, [user, "Maildir"], ["tmp", "new", "cur"], (pw.pw_uid, pw.pw_gid))

    def stop(self) -> None:
        if self.real is not None:
            self.real.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_reachable_by_smtpd(path: Path, fails: str = "'lookup: failed to open table aliases'") -> None:
    """smtpd opens db: tables after dropping to its own user (measured on 7.4), and the DKIM filter
    runs as its own: every directory on the way must let others through."""
    for parent in path.parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise MailsetupError(f"{parent} (mode {parent.stat().st_mode & 0o777:04o}) keeps smtpd's unprivileged "
                                 f"processes from {path}: {fails}", exit_code=1)


def run_smoke(setup: MailSetup, smtp_port: int = 0, submission_port: int = 0, engine: str = "embedded",
              smtpd: str | None = None) -> SmokeReport:
    """resolve → start the engine → the checks → one report; whatever was started or added is taken
    away again, whichever step stops the run."""
    smtpd = _resolve_engine(engine, smtpd)  # bad input stops here, before anything is touched
    run = _SmokeRun(setup, (smtp_port, submission_port), smtpd)
    try:
        run.prove()
    finally:
        run.clean_up()
    return run.report


def _resolve_engine(engine: str, smtpd: str | None) -> str | None:
    """The smtpd binary for --engine opensmtpd (None for the embedded MTA), or why it cannot run."""
    if engine != "opensmtpd":
        return None
    from mailsetup.opensmtpd import find_binary

    if smtpd and not os.access(smtpd, os.X_OK):
        raise MailsetupError(f"--smtpd: {smtpd} is not an executable smtpd", exit_code=2)
    smtpd = smtpd or find_binary("smtpd")
    if not smtpd:
        raise MailsetupError("--engine opensmtpd: OpenSMTPD is not installed here (no smtpd)", exit_code=1)
    if os.geteuid() != 0:
        raise MailsetupError("--engine opensmtpd: smtpd must be started as root", exit_code=1)
    return smtpd


class _SmokeRun:
    """One smoke test: its throw-away login, queue and token, the engine under test, the relay sink,
    and the report its checks fill in."""

    def __init__(self, setup: MailSetup, ports: tuple[int, int], smtpd: str | None):
        self.setup = setup
        self.report = SmokeReport()
        self.creds_path = Path(setup.layout.credentials)
        self.stale = _forget_interrupted_runs(setup, self.creds_path)
        exists = self.creds_path.exists()
        self.original_creds = read_secret(self.creds_path) if exists else None
        self.creds_mode = (self.creds_path.stat().st_mode & 0o7777) if exists else creds_mod.CREDS_MODE
        self.user = f"mailsetup-smoke-{secrets.token_hex(3)}"
        self.password = secrets.token_urlsafe(18)
        self.queue_dir = Path(setup.layout.state_dir) / f"smoke-queue-{secrets.token_hex(4)}"
        self.token = secrets.token_hex(8)
        self.delivered: list[tuple[Path, tuple[int, int] | None]] = []
        self.smtpd = smtpd
        self.tls: ssl.SSLContext | None = None  # once the server runs
        self.loop = _LoopThread()
        self.sink = _Sink()
        self.server: _Embedded | _OpenSmtpd
        if smtpd:
            self.sink.tempfail_left = 0  # smtpd's own retry waits minutes; the queue is its business
            self.server = _OpenSmtpd(setup, self.sink, ports, smtpd)
        else:
            self.server = _Embedded(setup, self.loop, self.sink, ports, self.queue_dir)

    @property
    def embedded(self) -> bool:
        return isinstance(self.server, _Embedded)

    def client(self, port: str, helo: str, source: str | None = None) -> _Client:
        return _Client(self.server.ports[port], self.setup.hostname, helo, source=source)

    def prove(self) -> None:
        add = self.report.add
        if self.smtpd and not add("smtpd version and the known TLS defect", self.version):
            self.known_defect = True
        if not add("smoke-only credential", self.add_smoke_user):
            return
        if not add(f"start the {self.server.name} on the set-up's files", self.start):
            return
        add("STARTTLS with the generated certificate", self.certificate)
        add("the server's own name in the greeting and EHLO", self.own_name)
        add("inbound over STARTTLS through the aliases into Maildir", self.inbound)
        if self.setup.imap == "dovecot" and self.reads_imap():
            add("read back over IMAPS through Dovecot", self.imap_read_back)
        add("unauthenticated relay refused", self.no_open_relay)
        add("AUTH without TLS refused", self.auth_needs_tls)
        add("wrong password refused", self.wrong_password)
        if not add("authenticated submission accepted for relay", self.submission_relays):
            return
        if self.embedded:
            add("queued mail encrypted at rest" if self.setup.queue.encryption
                else "queued mail at rest (encryption off)", self.at_rest)
        if add("relay delivers to the relay host", self.reached_sink) and self.setup.dkim:
            add("DKIM signatures verify against the records `mailsetup dns` prints", self.dkim_signed)

    known_defect = False

    # --- the steps before the checks ----------------------------------------------------------------

    def version(self) -> str:
        from mailsetup.opensmtpd import openssl_major, smtpd_version, tls_defect

        found = smtpd_version(self.smtpd)
        assert found, f"{self.smtpd} -h does not say which OpenSMTPD it is"
        defect = tls_defect((found[0], found[1]), openssl_major())
        assert defect is None, defect
        return f"OpenSMTPD {found[2]} ({self.smtpd}) with OpenSSL {openssl_major()}"

    def add_smoke_user(self) -> str:
        creds = creds_mod.read_credentials(self.creds_path)
        hashed = self.hashed = creds_mod.hash_password(self.password)
        # A smoke-only login, taken out again at the end; the original bytes are restored.
        write_atomic(self.creds_path, creds_mod.render_credentials(creds_mod.with_user(creds, self.user, hashed)),
                     self.creds_mode)
        note = f"; removed {self.stale} left by an interrupted run" if self.stale else ""
        return f"smoke-only login {self.user} added to {self.creds_path}{note}"

    def start(self) -> str:
        self.loop.run(self.sink.start())
        started = self.server.start()
        self.tls = _client_tls(self.setup)
        return started + f"; relay sink on :{self.sink.port}"

    # --- the checks, each a story a user would tell -------------------------------------------------

    def certificate(self) -> str:
        setup = self.setup
        pem = read_secret(Path(setup.tls.cert)).decode()
        end = "-----END CERTIFICATE-----"
        cert_der = ssl.PEM_cert_to_DER_cert(pem[:pem.index(end) + len(end)])  # the leaf: the first of a chain
        with self.client("smtp", "smoke.invalid") as c:
            c.ehlo()
            assert c.has_extn("starttls"), "port 25 does not offer STARTTLS"
            assert not c.has_extn("auth"), "AUTH is offered before TLS"
            c.starttls(context=self.tls)
            served = c.sock.getpeercert(binary_form=True)
            version = c.sock.version()
        assert served == cert_der, "the certificate served is not the one in " + str(setup.tls.cert)
        return f"STARTTLS ({version}) serves {Path(setup.tls.cert).name}, valid for {setup.hostname}, {_issuer(served)}"

    def own_name(self) -> str:
        hostname = self.setup.hostname
        with self.client("smtp", "smoke.invalid") as c:
            code, banner = c.banner
            c.ehlo()
            ehlo_name = c.ehlo_resp.decode(errors="replace").split("\n")[0].split(" ")[0]
        greeted = banner.decode(errors="replace").split(" ")[0]
        assert code == 220, f"the greeting is {code}, not 220"
        assert greeted == hostname, f"greets as {greeted!r}, not {hostname} (so do Received headers)"
        assert ehlo_name == hostname, f"answers EHLO as {ehlo_name!r}, not {hostname}"
        return f"greets and answers EHLO as {hostname}"

    def inbound(self) -> str:
        rcpt = f"postmaster@{self.setup.domain}"
        decision = self.server.policy.check_rcpt(rcpt, False, STRANGER)
        assert decision.accepted, f"{rcpt} is refused: {decision.reply()}"
        assert decision.local_users, f"{rcpt} reaches no local Maildir"
        if not self.embedded:
            for u in decision.local_users:
                self.server.prepare_maildir(u)
        with self.client("smtp", "stranger.invalid", source=STRANGER) as c:
            c.starttls(context=self.tls)
            c.send_message(_message(self.token, rcpt, "stranger@example.net"))
        self.inbound_users = list(decision.local_users)
        return f"{rcpt} -> " + ", ".join(self._arrived(u) for u in decision.local_users)

    inbound_users: list = []
    hashed = ""

    def reads_imap(self) -> bool:
        """Dovecot is installed and can serve the Maildir the message went to (imapsmoke.serving_plan:
        as its owner, whether that is a person on a host or whoever runs a sandbox)."""
        from mailsetup.imapsmoke import serving_plan
        from mailsetup.opensmtpd import find_binary

        if find_binary("dovecot") is None or not self.inbound_users:
            return False
        return not isinstance(serving_plan(self.server.maildir(self.inbound_users[0])), str)

    def imap_read_back(self) -> str:
        """The Maildir the test message went to, served by a Dovecot of this test's own on loopback
        (the same template as dovecot.conf), read over IMAPS with a real client library."""
        from mailsetup.imapsmoke import read_back

        assert self.inbound_users, "no message arrived to read back"
        user = self.inbound_users[0]
        return read_back(self.setup, self.tls, user, self.server.maildir(user), self.token, self.password, self.hashed)

    def _arrived(self, user: str) -> str:
        # Read (and later removed) the way it was delivered: as root in a real user's home,
        # through descriptors, never through a link they put there.
        md, owner = self.server.maildir(user), self.server.owner(user)
        hits = _wait_for(lambda: maildir_mod.find_delivered(md, self.token.encode(), owner), 15)
        assert hits, f"nothing arrived in {md / 'new'} for {user} within 15 s"
        self.delivered.extend((p, owner) for p in hits)
        return f"{user} ({md / 'new'})"

    def no_open_relay(self) -> str:
        tricks = ["smoke@example.net"] + [t.format(domain=self.setup.domain) for t in RELAY_TRICKS]
        accepted = []
        with self.client("smtp", "spammer.invalid", source=STRANGER) as c:
            c.ehlo()
            for rcpt in tricks:
                c.rset()
                c.mail("spammer@example.net")
                code, msg = c.rcpt(f"<{rcpt}>")
                if 200 <= code < 300:
                    accepted.append(f"{rcpt} ({code})")
        assert not accepted, "relayed for a stranger: " + ", ".join(accepted)
        return f"{len(tricks)} relay attempts from {STRANGER} refused (plain, percent hack, quoted, source route…)"

    def auth_needs_tls(self) -> str:
        with self.client("submission", "client.invalid") as c:
            c.ehlo()
            assert not c.has_extn("auth"), "submission offers AUTH before STARTTLS"
            blob = base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
            code, _ = c.docmd("AUTH", f"PLAIN {blob}")
            assert code >= 500, f"AUTH before STARTTLS answered {code}"
            code, _ = c.docmd("MAIL", "FROM:<x@example.net>")
            assert code >= 500, f"MAIL before STARTTLS answered {code}"
        return f"submission refuses AUTH and MAIL before STARTTLS ({code})"

    def wrong_password(self) -> str:
        with self.client("submission", "client.invalid") as c:
            c.starttls(context=self.tls)
            try:
                c.login(self.user, self.password + "-wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return f"refused with {exc.smtp_code}"
        raise AssertionError("a wrong password was accepted")

    def submission_relays(self) -> str:
        with self.client("submission", "client.invalid", source=STRANGER) as c:
            c.starttls(context=self.tls)
            c.login(self.user, self.password)
            c.send_message(_message(self.token, "smoke-sink@example.net", f"{self.user}@{self.setup.domain}"))
        return "accepted for relay after AUTH over STARTTLS"

    def at_rest(self) -> str:
        queue = self.setup.queue
        files = [p for p in self.queue_dir.iterdir() if p.is_file()]
        assert files, "the queue is empty: the message was not queued"
        for p in files:
            data = p.read_bytes()
            if queue.encryption or queue.compression:
                assert self.token.encode() not in data, f"{p} holds the message in plaintext"
            mail = self.server.mta.rt.queue.load(p.name)
            assert self.token.encode() in mail.message, f"{p} does not read back as the message sent"
        if queue.encryption:
            return f"{len(files)} queued file(s): no plaintext; AES-256-GCM, decrypts with the queue key"
        return f"{len(files)} queued file(s), NOT encrypted: queue encryption is off in this set-up"

    def reached_sink(self) -> str:
        got = _wait_for(lambda: [m for m in self.sink.messages if self.token.encode() in m[2]], 15)
        assert got, "the relay sink did not receive the message within 15 s"
        helo = got[0][3]
        assert helo == self.setup.hostname, f"the relay introduced itself as {helo!r}, not {self.setup.hostname}"
        retried = " after one temporary failure" if self.embedded else ""
        return f"relayed to the sink on :{self.sink.port}{retried}, introducing itself as {helo}"

    def dkim_signed(self) -> str:
        """Both signatures (RSA and Ed25519) on the relayed message verify with dkimpy against the
        TXT records `mailsetup dns` prints; the same message with one byte of its body changed does not."""
        import dkim as dkimpy

        from mailsetup.dns import dkim_records

        records = {r.name.lower().encode(): r.value.encode() for r in dkim_records(self.setup)}

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
            return records.get(name.lower() if name.endswith(b".") else name.lower() + b".")

        message = next(m[2] for m in self.sink.messages if self.token.encode() in m[2])
        signatures = [v for k, v in dkimpy.DKIM(message).headers if k.lower() == b"dkim-signature"]
        found = sorted(dict(p.split(b"=", 1) for p in (x.strip() for x in re.sub(rb"\s+", b"", v).split(b";")) if p
                            ).get(b"s", b"?").decode() for v in signatures)
        assert signatures, "the relayed message carries no DKIM-Signature"
        from mailsetup.dkim import read_state, signing

        wanted = sorted(k.selector for k in signing(read_state(Path(self.setup.layout.dkim_state))))
        assert found == wanted, f"signed with {', '.join(found)}, not with the active keys {', '.join(wanted)}"
        def verifies(message: bytes, idx: int) -> bool:
            try:
                return dkimpy.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc)
            except dkimpy.DKIMException:  # a body hash mismatch is raised, not returned
                return False

        verified = [verifies(message, i) for i in range(len(signatures))]
        assert all(verified), f"a DKIM signature does not verify (selectors {', '.join(found)}): {verified}"
        head, sep, body = message.partition(b"\r\n\r\n")
        tampered = head + sep + body.replace(self.token.encode(), self.token.encode()[::-1])
        assert not any(verifies(tampered, i) for i in range(len(signatures))), "a changed body still verifies"
        return f"{len(signatures)} signatures ({', '.join(found)}) verify; a changed body fails"

    # --- and after them -----------------------------------------------------------------------------

    def clean_up(self) -> None:
        """Stop what was started, take the mail, queue and login away; the credentials table gets its
        original bytes back."""
        if self.known_defect:
            for c in self.report.checks:
                if not c.ok and "ALERT_INTERNAL_ERROR" in c.detail:
                    c.detail += " (the known TLS defect named above)"
        self.server.stop()
        with contextlib.suppress(Exception):
            self.loop.run(self.sink.stop())
        self.loop.close()
        for p, owner in self.delivered:
            with contextlib.suppress(OSError, MailsetupError):
                maildir_mod.remove_delivered(p, owner)
        shutil.rmtree(self.queue_dir, ignore_errors=True)
        if self.original_creds is not None:
            write_atomic(self.creds_path, self.original_creds, self.creds_mode)
        elif self.creds_path.exists():
            self.creds_path.unlink()


def _forget_interrupted_runs(setup: MailSetup, creds_path: Path) -> str:
    """A smoke test killed midway leaves its login and queue behind: take them away first."""
    gone = []
    creds = creds_mod.read_credentials(creds_path)
    keep = [c for c in creds if not c.user.startswith("mailsetup-smoke-")]
    if len(keep) != len(creds):
        write_atomic(creds_path, creds_mod.render_credentials(keep), creds_path.stat().st_mode & 0o7777)
        gone.append(f"{len(creds) - len(keep)} smoke-only login(s)")
    queues = list(Path(setup.layout.state_dir).glob("smoke-queue-*"))
    for q in queues:
        shutil.rmtree(q, ignore_errors=True)
    if queues:
        gone.append(f"{len(queues)} smoke queue(s)")
    return " and ".join(gone)


def _wait_for(probe: Callable[[], list], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


class _Client(smtplib.SMTP):
    """An SMTP client on loopback that checks the certificate against the mail host's name
    (smtplib would check it against the address it dialled)."""

    def __init__(self, port: int, server_name: str, helo: str, source: str | None = None):
        super().__init__("127.0.0.1", port, local_hostname=helo, timeout=10,
                         source_address=(source, 0) if source else None)
        self._host = server_name

    def connect(self, host: str = "localhost", port: int = 0, source_address=None):
        self.banner = super().connect(host, port, source_address)  # (code, text) of the greeting
        return self.banner


def smoke_command(root, os_name: str | None, as_json: bool, smtp_port: int, submission_port: int, engine: str,
                  smtpd: str | None) -> bool:
    """`mailsetup smoke`: the set-up's files proven on the chosen engine, the checks printed."""
    from mailsetup.answers import load_setup
    from mailsetup.report import print_smoke

    if engine not in ("embedded", "opensmtpd"):
        raise MailsetupError(f"--engine: {engine!r} is not embedded or opensmtpd")
    report = run_smoke(load_setup(root, os_name), smtp_port=smtp_port, submission_port=submission_port,
                       engine=engine, smtpd=smtpd)
    print_smoke(report, as_json)
    return report.ok
