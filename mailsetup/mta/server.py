"""The embedded MTA's servers: one aiosmtpd server per listener of the model, thin handlers over the
Policy, durable delivery (Maildir or the encrypted queue) before 250, a connection cap, and a log line
per transaction.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import itertools
import logging
import os
import pwd
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from mailsetup import aliases as aliases_mod
from mailsetup import credentials as creds_mod
from mailsetup import queuekey
from mailsetup.errors import MailsetupError
from mailsetup.files import read_secret
from mailsetup.model import MailSetup
from mailsetup.mta import maildir
from mailsetup.mta.data import DataState, Spool, lf_chunks, receive_data
from mailsetup.mta.policy import LOOPBACK, Policy, local_user_check
from mailsetup.mta.queue import MailQueue, RelayWorker

log = logging.getLogger("mailsetup.mta")
# aiosmtpd logs every command at INFO and a deprecation of its own at WARNING; our handler logs
# one line per transaction instead.
logging.getLogger("mail.log").setLevel(logging.ERROR)


@dataclass
class MtaOptions:
    listen: str = "127.0.0.1"
    smtp_port: int = 25
    submission_port: int = 587
    relay_host: tuple[str, int] | None = None
    local_peers: frozenset[str] = LOOPBACK
    max_connections: int = 500
    timeout: float = 300.0  # idle/command/data timeout per connection
    queue_dir: Path | None = None  # default: the layout's
    retry_first: float = 1.0


@dataclass
class Runtime:
    """Everything the MTA reads from the set-up's files on disk, loaded once at start."""

    setup: MailSetup
    tls: ssl.SSLContext
    aliases: dict[str, str]
    creds: dict[str, str]
    queue: MailQueue
    policy: Policy
    home: Callable[[str], Path]
    owner: Callable[[str], tuple[int, int] | None]
    options: MtaOptions
    stats: dict = field(default_factory=lambda: {"delivered": 0, "queued": 0, "refused": 0})
    creds_stamp: tuple | None = None  # of the credentials file loaded: a change means reload

    def reload_credentials(self, force: bool = False) -> bool:
        """Re-read the credentials table when it changed on disk (or when forced, on SIGHUP), so
        `mailsetup user add/remove` takes effect without a restart. A table that no longer parses
        leaves the loaded one in place. True when a new table was loaded."""
        path = Path(self.setup.layout.credentials)
        stamp = _stamp(path)
        if stamp == self.creds_stamp and not force:
            return False
        try:
            creds = {c.user: c.hash for c in creds_mod.read_credentials(path)}
        except MailsetupError as exc:
            self.creds_stamp = stamp  # say it once, not on every login
            log.error("kept the loaded logins: %s", exc.message)
            return False
        self.creds, self.creds_stamp = creds, stamp
        domains = frozenset({self.setup.domain, self.setup.hostname, "localhost"})
        self.policy = Policy(domains, self.aliases, local_user_check(self.setup, self.aliases, creds),
                             self.options.local_peers)
        log.info("loaded %s: %d login(s)", path, len(creds))
        return True


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load_tls(setup: MailSetup) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # OpenSSL opens the files by name: as root, first make sure no other user can steer them.
        read_secret(Path(setup.tls.cert))
        read_secret(Path(setup.tls.key))
        ctx.load_cert_chain(str(setup.tls.cert), str(setup.tls.key))
    except FileNotFoundError as exc:
        raise MailsetupError(f"{exc.filename}: missing; run `mailsetup init` first", exit_code=1) from None
    except ssl.SSLError as exc:
        raise MailsetupError(
            f"{setup.tls.key}: does not load with {setup.tls.cert} ({exc.reason or exc}); "
            "are they a pair?", exit_code=1,
        ) from None
    return ctx


def load_runtime(setup: MailSetup, options: MtaOptions) -> Runtime:
    tls = load_tls(setup)
    aliases = aliases_mod.read_aliases_db(Path(setup.layout.aliases_db))
    creds_stamp = _stamp(Path(setup.layout.credentials))
    creds = {c.user: c.hash for c in creds_mod.read_credentials(Path(setup.layout.credentials))}
    key = queuekey.read_queue_key(Path(setup.queue.key_file)) if setup.queue.encryption else None
    queue = MailQueue(options.queue_dir or Path(setup.layout.queue_dir), key, setup.queue.compression)
    domains = frozenset({setup.domain, setup.hostname, "localhost"})
    policy = Policy(domains, aliases, local_user_check(setup, aliases, creds), options.local_peers)

    @functools.lru_cache(maxsize=4096)
    def home(user: str) -> Path:
        if setup.root is None:
            return Path(pwd.getpwnam(user).pw_dir) / "Maildir"
        return Path(setup.maildir_for(user))

    @functools.lru_cache(maxsize=4096)
    def owner(user: str) -> tuple[int, int] | None:
        """A real user's mail belongs to them; in a sandbox, to whoever runs mailsetup."""
        if setup.root is None:
            pw = pwd.getpwnam(user)
            return pw.pw_uid, pw.pw_gid
        return None

    return Runtime(setup, tls, aliases, creds, queue, policy, home, owner, options, creds_stamp=creds_stamp)


class Handler:
    """aiosmtpd hooks: RCPT asks the Policy; DATA stores durably, then answers."""

    def __init__(self, rt: Runtime, listener: str, worker: RelayWorker | None):
        self.rt = rt
        self.listener = listener
        self.worker = worker

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        decision = self.rt.policy.check_rcpt(address, bool(session.authenticated), peer)
        if not decision.accepted:
            self.rt.stats["refused"] += 1
            log.info("%s %s refused rcpt <%s>: %s", self.listener, peer, address, decision.reply())
            return decision.reply()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if not hasattr(envelope, "decisions"):
            envelope.decisions = []
        envelope.decisions.append(decision)
        return decision.reply()

    _stamp: tuple[int, str] = (0, "")

    def _date(self) -> str:
        now = int(time.time())
        if self._stamp[0] != now:
            self._stamp = (now, email.utils.formatdate(now, localtime=True))
        return self._stamp[1]

    def _received(self, server, session, envelope) -> bytes:
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        proto = "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")
        stamp = self._date()
        return (
            f"Received: from {session.host_name or 'unknown'} ([{peer}])\r\n"
            f"\tby {self.rt.setup.hostname} (mailsetup) with {proto}; {stamp}\r\n"
        ).encode()

    async def handle_DATA(self, server, session, envelope):
        started = time.monotonic()
        decisions = getattr(envelope, "decisions", [])
        users = tuple(dict.fromkeys(u for d in decisions for u in d.local_users))
        relay = tuple(dict.fromkeys(a for d in decisions for a in d.relay_to))
        spool: Spool = envelope.spool  # the message as received (CappedSMTP.smtp_DATA)
        received = self._received(server, session, envelope)
        mail_from = envelope.mail_from or ""
        peer = session.peer[0] if isinstance(session.peer, tuple) else "?"
        try:
            qid = await asyncio.to_thread(self._store, mail_from, users, relay, received, spool)
        except OSError as exc:
            # Disk full, permissions: say "later", never lose what we cannot store.
            log.error("%s %s from=<%s> store failed: %s", self.listener, peer, mail_from, exc)
            return f"451 4.3.0 temporary local problem ({exc.strerror or exc}); try again later"
        if relay and self.worker:
            self.worker.wake()
        log.info(
            "%s %s tls=%s auth=%s from=<%s> to=%s size=%d local=%s relay=%s id=%s %.1fms",
            self.listener, peer, "yes" if session.ssl else "no", session.auth_data or "-",
            mail_from, ",".join(envelope.rcpt_tos), spool.size, ",".join(users) or "-",
            ",".join(relay) or "-", qid or "-", (time.monotonic() - started) * 1000,
        )
        return f"250 2.0.0 Ok: {'queued as ' + qid if qid else 'delivered'}"

    def _store(self, mail_from: str, users: tuple[str, ...], relay: tuple[str, ...], received: bytes,
               spool: Spool) -> str | None:
        # Maildir readers (mutt, Dovecot) expect Unix line ends, as smtpd's own maildir delivery writes.
        if spool.in_file:  # a big message: streamed from its spool file, a chunk at a time, per copy
            def message() -> Iterator[bytes]:
                return itertools.chain((received,), spool.chunks())
            for user in users:
                header = f"Return-Path: <{mail_from}>\nDelivered-To: {user}\n".encode()
                maildir.deliver_chunks(self.rt.home(user), itertools.chain((header,), lf_chunks(message())),
                                       owner=self.rt.owner(user))
                self.rt.stats["delivered"] += 1
            if relay:
                qid = self.rt.queue.put_chunks(mail_from, relay, message())
                self.rt.stats["queued"] += 1
                return qid
            return None
        body = received + spool.getvalue()
        local_copy = body.replace(b"\r\n", b"\n") if users else b""
        for user in users:
            header = f"Return-Path: <{mail_from}>\nDelivered-To: {user}\n".encode()
            # One write, not two: every syscall in a delivery thread is a GIL hand-off.
            maildir.deliver(self.rt.home(user), header + local_copy, owner=self.rt.owner(user))
            self.rt.stats["delivered"] += 1
        if relay:
            qid = self.rt.queue.put(mail_from, relay, body)
            self.rt.stats["queued"] += 1
            return qid
        return None


class _Counter:
    def __init__(self) -> None:
        self.active = 0
        self.live: set[SMTP] = set()  # to hang up on at stop


class CappedSMTP(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent connections (421 beyond it)."""

    def __init__(self, handler, counter: _Counter, cap: int, spool_dir: Path | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._spool_dir = spool_dir  # where a big message waits while it arrives (private)
        self._counter = counter
        self._cap = cap
        self._counted = False
        self._refused = False

    def connection_made(self, transport):
        if not self._counted and not self._refused:
            if self._counter.active >= self._cap:
                self._refused = True
                transport.write(b"421 4.7.0 too many connections, try again later\r\n")
                transport.close()
                return
            self._counter.active += 1
            self._counted = True
            self._counter.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc):
        if self._refused:
            return
        if self._counted:
            self._counter.active -= 1
            self._counted = False
            self._counter.live.discard(self)
        super().connection_lost(exc)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA, but the message goes to a Spool as it arrives instead of being
        collected in memory (several copies of it: 8 parallel 34 MB messages took 800 MB). The
        handler finds it as envelope.spool; envelope.content and original_content stay None."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = Spool(self._spool_dir)
        try:
            try:
                state = await receive_data(self._reader, spool.write, self.data_size_limit,
                                           self.line_length_limit)
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            if state is None:  # the client hung up before the end
                return
            if state is DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            elif state is DataState.TOO_MUCH:
                await self.push("552 Error: Too much mail data")
            if state is not DataState.NOMINAL:
                self._set_post_data_state()
                return
            await spool.finish()
            self.envelope.spool = spool
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            spool.close()


def make_authenticator(rt: Runtime):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        rt.reload_credentials()  # one stat: a login added a moment ago works at once
        ok = creds_mod.check_password(rt.creds, user, auth_data.password)
        log.info("auth %s for %r: %s", mechanism, user, "ok" if ok else "failed")
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)
    return authenticator


class EmbeddedMta:
    """Both listeners and the relay worker on one event loop."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.servers: list[asyncio.base_events.Server] = []
        self.worker = RelayWorker(rt.queue, rt.options.relay_host, rt.setup.hostname,
                                  first_retry=rt.options.retry_first)
        self._worker_task: asyncio.Task | None = None
        self.ports: dict[str, int] = {}
        self._counter = _Counter()

    def _factory(self, listener: str):
        rt = self.rt
        handler = Handler(rt, listener, self.worker)
        submission = listener == "submission"
        authenticator = make_authenticator(rt)

        def build():
            return CappedSMTP(
                handler, self._counter, rt.options.max_connections, rt.queue.dir,
                hostname=rt.setup.hostname,
                tls_context=rt.tls,
                require_starttls=submission,  # submission: TLS before anything else
                auth_required=submission,  # submission: AUTH before MAIL
                auth_require_tls=True,  # AUTH is never offered in clear text
                authenticator=authenticator,
                data_size_limit=rt.setup.max_message_size,
                timeout=rt.options.timeout,
                ident="mailsetup ESMTP",
            )
        return build

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.rt.options
        try:
            for name, port in (("smtp", opts.smtp_port), ("submission", opts.submission_port)):
                server = await loop.create_server(self._factory(name), host=opts.listen, port=port,
                                                  reuse_address=True)
                self.servers.append(server)
                self.ports[name] = server.sockets[0].getsockname()[1]
        except OSError as exc:
            await self.stop()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise MailsetupError(f"cannot listen on {opts.listen} port {port}: {why}", exit_code=1) from None
        self._worker_task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        if self._worker_task:
            self._worker_task.cancel()
            try:
                await self._worker_task
            except (asyncio.CancelledError, Exception):  # noqa: S110 - stopping; the worker logs its own errors
                pass
        for server in self.servers:
            server.close()
        for proto in list(self._counter.live):  # hang up on clients still connected
            if proto.transport is not None:
                proto.transport.close()
        if self._counter.live:
            await asyncio.sleep(0.05)  # let their handler tasks see the hang-up and end
        for server in self.servers:
            await server.wait_closed()
        self.servers = []


def serve_forever(rt: Runtime, say) -> None:
    """Run the MTA in the foreground until SIGINT or SIGTERM; one log line per transaction on stderr."""
    import logging.handlers
    import queue as queue_mod
    import signal
    import sys

    # Log lines are formatted and written by a thread, not on the event loop (measured: ~6% of a
    # delivery's time when done inline).
    log_queue: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    listener = logging.handlers.QueueListener(log_queue, stream)

    class _Enqueue(logging.handlers.QueueHandler):
        def prepare(self, record):  # format in the listener's thread, not here
            return record

    logging.basicConfig(level=logging.INFO, handlers=[_Enqueue(log_queue)])
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False  # unused by the format
    listener.start()
    opts = rt.options

    async def run() -> None:
        mta = EmbeddedMta(rt)
        await mta.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, functools.partial(rt.reload_credentials, True))

        async def watch_credentials() -> None:  # new logins are also local users (RCPT) in a sandbox
            while True:
                await asyncio.sleep(2)
                rt.reload_credentials()

        watcher = asyncio.create_task(watch_credentials())
        relay = f"{opts.relay_host[0]}:{opts.relay_host[1]}" if opts.relay_host else None
        say(f"serving {rt.setup.domain}: smtp {opts.listen}:{mta.ports['smtp']}, "
            f"submission {opts.listen}:{mta.ports['submission']}"
            + (f", relay to {relay}" if relay else ", no relay host (outbound mail stays queued)"))
        await stop.wait()
        watcher.cancel()
        await mta.stop()

    try:
        asyncio.run(run())
    finally:
        listener.stop()
    say("stopped")
