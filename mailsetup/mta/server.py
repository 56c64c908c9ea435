"""The embedded MTA's servers: one aiosmtpd server per listener of the model, thin handlers over the
Policy, durable delivery (Maildir or the encrypted queue) before 250, a connection cap, and a log line
per transaction.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import functools
import itertools
import logging
import os
import pwd
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from mailsetup import aliases as aliases_mod
from mailsetup import credentials as creds_mod
from mailsetup import queuekey
from mailsetup.errors import MailsetupError
from mailsetup.files import read_secret
from mailsetup.model import MailSetup
from mailsetup.mta import maildir
from mailsetup.mta.data import READ_SIZE, DataState, Spool, lf_chunks, normalise_line_ends, receive_data
from mailsetup.mta.policy import LOOPBACK, MAX_RECIPIENTS, Policy, policy_for, sender_refusal
from mailsetup.mta.queue import MailQueue, RelayWorker

log = logging.getLogger("mailsetup.mta")
# aiosmtpd logs every command at INFO and a deprecation of its own at WARNING; our handler logs
# one line per transaction instead.
logging.getLogger("mail.log").setLevel(logging.ERROR)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_sanitized_log = aiosmtpd.smtp.sanitized_log


def _sanitized_log_if_enabled(func, msg, *args, **kwargs):
    """aiosmtpd masks AUTH arguments for two log calls on every command line before the logger
    decides it will drop them (~5 % of a message's CPU): skip the work for a level that is off."""
    logger, level = getattr(func, "__self__", None), _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled


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


def options_from_flags(listen: str, smtp_port: int, submission_port: int, relay_host: str | None,
                       loopback_is_remote: bool, max_connections: int, timeout: float) -> MtaOptions:
    """`mailsetup serve`'s flags, each checked by the model's validator for that kind of value (a bad
    one is a one-line error naming its flag); a port of 0 means any free one."""
    from mailsetup.model import validate_hostport, validate_listen, validate_port

    return MtaOptions(
        listen=validate_listen(listen, "--listen", "linux"),
        smtp_port=validate_port(smtp_port, "--smtp-port") if smtp_port else 0,
        submission_port=validate_port(submission_port, "--submission-port") if submission_port else 0,
        relay_host=validate_hostport(relay_host, "--relay-host") if relay_host else None,
        local_peers=frozenset() if loopback_is_remote else LOOPBACK,
        max_connections=max_connections,
        timeout=timeout,
    )


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
    signer: Any = None  # dkim.Signer when DKIM is on: mail taken on submission leaves signed
    dkim_stamp: tuple | None = None  # of dkim.toml when the signer was loaded: a change means reload

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
        self.policy = policy_for(self.setup, self.aliases, creds, self.options.local_peers)
        log.info("loaded %s: %d login(s)", path, len(creds))
        return True


    def reload_signer(self, force: bool = False) -> bool:
        """Sign with the keys dkim.toml names now: after `mailsetup dkim` switched to the next pair, a
        running server follows within seconds (or at once on SIGHUP), so its signatures never lean on
        a record that is about to be removed. A state that no longer loads keeps the loaded keys."""
        if not self.setup.dkim:
            return False
        path = Path(self.setup.layout.dkim_state)
        stamp = _stamp(path)
        if stamp == self.dkim_stamp and not force:
            return False
        from mailsetup.dkim import Signer

        try:
            signer = Signer.load(self.setup.domain, self.setup.layout.dkim_dir, path)
        except MailsetupError as exc:
            self.dkim_stamp = stamp  # say it once
            log.error("kept the loaded DKIM keys: %s", exc.message)
            return False
        self.signer, self.dkim_stamp = signer, stamp
        log.info("DKIM: signing with %s", ", ".join(signer.selectors))
        return True

    def reload(self, force: bool = False) -> None:
        """What may change under a running server: the logins and the DKIM keys."""
        self.reload_credentials(force)
        self.reload_signer(force)


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
    policy = policy_for(setup, aliases, creds, options.local_peers)
    signer, dkim_stamp = None, None
    if setup.dkim:
        from mailsetup.dkim import Signer

        dkim_stamp = _stamp(Path(setup.layout.dkim_state))
        signer = Signer.load(setup.domain, setup.layout.dkim_dir, Path(setup.layout.dkim_state))

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

    return Runtime(setup, tls, aliases, creds, queue, policy, home, owner, options, creds_stamp=creds_stamp,
                   signer=signer, dkim_stamp=dkim_stamp)


class Handler:
    """aiosmtpd hooks: RCPT asks the Policy; DATA stores durably, then answers."""

    def __init__(self, rt: Runtime, listener: str, worker: RelayWorker | None):
        self.rt = rt
        self.listener = listener
        self.worker = worker

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        refusal = sender_refusal(address)
        if refusal is not None:
            return refusal.reply()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:  # smtpd's answer to the 1001st, measured on 7.4
            return "451 4.5.3 too many recipients"
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
        except MailsetupError as exc:
            # A user's Maildir root must not write in (a link, someone else's folder): the reason
            # is the admin's to read, the sender is told to try later (the user can fix it).
            log.error("%s %s from=<%s> to=%s not delivered: %s", self.listener, peer, mail_from,
                      ",".join(envelope.rcpt_tos), exc.message)
            return "451 4.2.0 a local mailbox cannot be written safely; try again later"
        if relay and self.worker:
            self.worker.wake()
        log.info(
            "%s %s tls=%s auth=%s from=<%s> to=%s size=%d local=%s relay=%s id=%s %.1fms",
            self.listener, peer, "yes" if session.ssl else "no", session.auth_data or "-",
            mail_from, ",".join(envelope.rcpt_tos), spool.size, ",".join(users) or "-",
            ",".join(relay) or "-", qid or "-", (time.monotonic() - started) * 1000,
        )
        return f"250 2.0.0 Ok: {'queued as ' + qid if qid else 'delivered'}"

    def _signatures(self, spool: Spool) -> bytes:
        """DKIM-Signature lines for mail taken on submission (smtpd's filter signs there too); the
        message is signed as received, CRLF lines, before our Received line goes on top."""
        if self.rt.signer is None or self.listener != "submission":
            return b""
        message = b"".join(spool.chunks()) if spool.in_file else spool.getvalue()
        try:
            return self.rt.signer.headers(message)
        except Exception as exc:  # dkimpy's errors: the message still goes, unsigned, and the log says so
            log.error("%s DKIM signing failed, sent unsigned: %s", self.listener, exc)
            return b""

    def _store(self, mail_from: str, users: tuple[str, ...], relay: tuple[str, ...], received: bytes,
               spool: Spool) -> str | None:
        received = self._signatures(spool) + received
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


# Command arguments that would carry a line break or a NUL into what we store or relay (a HELO name
# lands in the Received header): smtpd 7.4 answers 501 for HELO/EHLO and 5xx for MAIL/RCPT.
_ARG_REFUSALS = {
    "HELO": "501 5.5.4 invalid domain name",
    "EHLO": "501 5.5.4 invalid domain name",
    "MAIL": "553 5.1.0 sender address syntax error",
    "RCPT": "501 5.1.3 recipient address syntax error",
}

# Then 421 and hang up (smtpd 7.4 answers 535 for ever; we stop sooner). Not fewer: a client with a
# wrong password often tries it with each mechanism offered (smtplib: PLAIN, then LOGIN).
AUTH_FAILURES_PER_SESSION = 5
AUTH_FREE_FAILURES = 3  # per address within AuthGuard.WINDOW; each one beyond waits longer
AUTH_DELAY = (0.17, 1.0)  # smtpd pauses a failed AUTH 0.15-1 s at random (measured on 7.4)


# A MAIL FROM / RCPT TO path as smtpd 7.4 takes it: "<" path ">", then nothing or parameters after
# spaces. aiosmtpd's parser (the email package's) also takes `a@b`, `<a@b` (no ">"), comments and
# quoted local parts, and a tab before the parameters; smtpd answers each 553 / 501 (measured), and
# so do we. Blanks before the "<" are allowed, as smtpd allows them.
_PATH_SHAPE = re.compile(r' *<([^<>()"\\\s]*)>(?: +(?:\S.*)?)?\Z', re.S)
# ...and a domain that is one: labels, or an address literal in brackets. (The email parser's
# answer to `<a@[>` differs between Python versions: 3.11 raised, 3.13 took it; smtpd says 553.)
_PATH_DOMAIN = re.compile(r"(?:\[[^\[\]\\]*\]|[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\Z")
# Within that, the shape nearly every path has: <dot-atom@domain>, then nothing, or spaces and
# parameters. aiosmtpd parses each with the email package's header parser and defines a class per
# call: ~100 µs, a tenth of a message's CPU in `serve`. The rest (source routes, address literals)
# still goes to aiosmtpd's parser; for what this matches the answer is the same
# (tests/test_protocol_hygiene.py compares the two).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?: +(?=[A-Za-z0-9])|\Z)")


class _Counter:
    def __init__(self) -> None:
        self.active = 0
        self.live: set[SMTP] = set()  # to hang up on at stop
        self.per_peer: dict[str, int] = {}


class CappedSMTP(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent connections, in all and per client address (421
    beyond either), command arguments kept free of line breaks and NULs, and AUTH that is checked off
    the event loop and slowed down after a failure."""

    def __init__(self, handler, counter: _Counter, cap: int, spool_dir: Path | None = None, *,
                 guard: AuthGuard | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._spool_dir = spool_dir  # where a big message waits while it arrives (private)
        self._counter = counter
        self._cap = cap
        # One address holds at most half the slots (Postfix's smtpd_client_connection_count_limit
        # is half its process limit too), so a single client cannot lock everyone else out.
        self._per_peer_cap = max(1, cap // 2)
        self._peer_ip: str | None = None
        self._counted = False
        self._refused = False
        self._guard = guard
        self._auth_failures = 0
        for command, refusal in _ARG_REFUSALS.items():
            self._smtp_methods[command] = self._clean_args(self._smtp_methods[command], refusal)

    # aiosmtpd cancels and re-arms the idle timer on every command (a TimerHandle each, ~5 % of a
    # message's CPU). Here the deadline moves on and the one timer, when it fires early, re-arms
    # itself for what is left; the timeout itself is aiosmtpd's (_timeout_cb, same length).
    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline or handle.when() < self.loop.time():
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)
            return
        self._timeout_cb()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        shape = _PATH_SHAPE.match(arg)
        if not shape:
            return None, None
        path = shape.group(1)
        if "@" in path and not _PATH_DOMAIN.match(path.rpartition("@")[2]):
            return None, None
        plain = _PLAIN_PATH.match(arg)
        if plain is None:
            try:
                return super()._getaddr(arg)
            except Exception:  # noqa: BLE001 - the email parser trips on e.g. "<" or "<a@[>" (aiosmtpd
                return None, None  # answered "500 Error: (IndexError) ..."): a syntax error it is
        addr = plain.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, arg[plain.end():]

    def _clean_args(self, method, refusal: str):
        @functools.wraps(method)  # keeps aiosmtpd's HELP text (__smtp_syntax__)
        async def checked(arg):
            if arg and ("\r" in arg or "\n" in arg or "\x00" in arg):
                await self.push(refusal)
                return
            await method(arg)
        return checked

    def connection_made(self, transport):
        if not self._counted and not self._refused:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else None
            if self._counter.active >= self._cap or (
                    ip is not None and self._counter.per_peer.get(ip, 0) >= self._per_peer_cap):
                self._refused = True
                transport.write(b"421 4.7.0 too many connections, try again later\r\n")
                transport.close()
                return
            self._counter.active += 1
            if ip is not None:
                self._counter.per_peer[ip] = self._counter.per_peer.get(ip, 0) + 1
                self._peer_ip = ip
            self._counted = True
            self._counter.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc):
        if self._refused:
            return
        if self._counted:
            self._counter.active -= 1
            if self._peer_ip is not None:
                left = self._counter.per_peer.get(self._peer_ip, 1) - 1
                if left > 0:
                    self._counter.per_peer[self._peer_ip] = left
                else:
                    self._counter.per_peer.pop(self._peer_ip, None)
            self._counted = False
            self._counter.live.discard(self)
        super().connection_lost(exc)

    # --- AUTH: aiosmtpd decodes PLAIN / LOGIN and calls the authenticator synchronously, on the event
    # loop. Here the authenticator only hands the login over; bcrypt runs in the guard's threads.

    async def auth_PLAIN(self, _, args):
        return await self._checked_auth("PLAIN", await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args):
        return await self._checked_auth("LOGIN", await super().auth_LOGIN(_, args))

    async def _checked_auth(self, mechanism: str, result: AuthResult) -> AuthResult:
        if self._guard is None or not isinstance(result.auth_data, _PendingLogin):
            return result
        login = result.auth_data.login
        ok = await self._guard.check(login.login, login.password)
        user = login.login.decode("utf-8", "replace")
        log.info("auth %s for %r from %s: %s", mechanism, user, self._peer_ip, "ok" if ok else "failed")
        if ok:
            return AuthResult(success=True, handled=False, auth_data=user)
        self._auth_failures += 1
        await asyncio.sleep(self._guard.failure_delay(self._peer_ip))
        if self._auth_failures >= AUTH_FAILURES_PER_SESSION:
            return AuthResult(success=False, handled=False,
                              message="421 4.7.0 too many failed authentications; closing")
        return AuthResult(success=False, handled=False, message="535 5.7.8 authentication failed")

    async def smtp_AUTH(self, arg):
        await super().smtp_AUTH(arg)
        if self._auth_failures >= AUTH_FAILURES_PER_SESSION and self.transport is not None:
            self.transport.close()


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
        # aiosmtpd's reader has the command line limit (1001) as its buffer limit, so during DATA the
        # transport stopped reading (an epoll_ctl each way) whenever more than 2 KB waited: every
        # message of a few KB, ~5 % of its CPU. While DATA is read, the buffer may hold one read;
        # the command limit is back before the next command line is read.
        command_limit = self._reader._limit  # noqa: SLF001 - StreamReader has no public setter
        self._reader._limit = max(command_limit, READ_SIZE // 2)  # noqa: SLF001
        try:
            try:
                state = await receive_data(self._reader, lambda block: spool.write(normalise_line_ends(block)),
                                           self.data_size_limit, self.line_length_limit)
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
            self._reader._limit = command_limit  # noqa: SLF001
            spool.close()


@dataclass(frozen=True)
class _PendingLogin:
    login: LoginPassword


class AuthGuard:
    """Checks logins in a small thread pool (bcrypt costs ~50 ms of CPU: on the event loop, 16
    guessers made every other client wait seconds for its greeting) and decides how long a failure
    waits: smtpd's random pause, longer for an address that keeps failing."""

    WINDOW = 600.0  # seconds a failure counts against its address
    MAX_EXTRA = 5.0

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self.pool.submit(creds_mod.dummy_hash)  # made now, so the first unknown login costs no more
        self.failures: dict[str, list[float]] = {}

    async def check(self, login: bytes, password: bytes) -> bool:
        self.rt.reload_credentials()  # one stat: a login added a moment ago works at once
        user = login.decode("utf-8", "replace")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, creds_mod.check_password, self.rt.creds, user, password)

    def failure_delay(self, ip: str | None) -> float:
        delay = random.uniform(*AUTH_DELAY)  # noqa: S311 - jitter, not a secret
        if ip is None:
            return delay
        now = time.monotonic()
        recent = [t for t in self.failures.get(ip, []) if now - t < self.WINDOW][-50:] + [now]
        if len(self.failures) > 10_000 and ip not in self.failures:  # bounded memory under a flood
            self.failures.clear()
        self.failures[ip] = recent
        # From the 4th failure within the window on, each one adds half a second, up to 5 s.
        return delay + min(self.MAX_EXTRA, 0.5 * max(0, len(recent) - AUTH_FREE_FAILURES))


def make_authenticator(rt: Runtime):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        # Checked by CappedSMTP off the event loop; a failure's reply is its to delay.
        return AuthResult(success=False, handled=False, auth_data=_PendingLogin(auth_data))
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
        self.guard = AuthGuard(rt)

    def _factory(self, listener: str):
        rt = self.rt
        handler = Handler(rt, listener, self.worker)
        submission = listener == "submission"
        authenticator = make_authenticator(rt)

        def build():
            return CappedSMTP(
                handler, self._counter, rt.options.max_connections, rt.queue.dir, guard=self.guard,
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
        self.guard.pool.shutdown(wait=False, cancel_futures=True)


class _BatchedLog(logging.Handler):
    """Records are only queued by the thread that logs them; a writer thread formats and writes what
    gathered every BATCH_SECONDS, in one write. A warning or worse is written at once; stop() writes
    the rest. While stderr is not being read (a paused terminal, a stuck pipe) the writer blocks:
    at most MAX_PENDING lines wait, the rest are counted and the count is written when it can be,
    so a client's flood of refusals cannot grow the server without bound."""

    BATCH_SECONDS = 0.05
    MAX_PENDING = 10_000  # ~5 MB of the longest lines a client can cause
    dropped = 0

    def __init__(self, stream, formatter: logging.Formatter):
        super().__init__()
        self.stream = stream
        self.setFormatter(formatter)
        self.pending: collections.deque[logging.LogRecord] = collections.deque()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.pending) >= self.MAX_PENDING:
            self.dropped += 1  # not atomic across threads: a count off by one, never a line kept
            return
        self.pending.append(record)  # atomic; no lock, no wake-up
        if record.levelno >= logging.WARNING:
            self.wake.set()

    def _write_pending(self) -> None:
        lines = []
        dropped, self.dropped = self.dropped, 0
        while self.pending:
            record = self.pending.popleft()
            try:
                lines.append(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 - a bad record must not stop the log
                self.handleError(record)
        if dropped:
            lines.append(f"{dropped} log line(s) dropped: stderr was not being read\n")
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing to log to
                pass

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.BATCH_SECONDS)
            self.wake.clear()
            self._write_pending()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self._write_pending()


def serve_forever(rt: Runtime, say) -> None:
    """Run the MTA in the foreground until SIGINT or SIGTERM; one log line per transaction on stderr."""
    import signal
    import sys

    # Log lines are formatted and written by a thread, not on the event loop (measured: ~6% of a
    # delivery's time when done inline), a batch at a time (a wake-up and a write per line cost
    # another ~5 %).
    listener = _BatchedLog(sys.stderr, logging.Formatter("%(asctime)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[listener])
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False  # unused by the format
    logging._srcfile = None  # nor the caller's file and line (the logging HOWTO's "Optimization")
    listener.start()
    opts = rt.options

    async def run() -> None:
        mta = EmbeddedMta(rt)
        await mta.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, functools.partial(rt.reload, True))

        async def watch_credentials() -> None:  # new logins are also local users (RCPT) in a sandbox
            while True:
                await asyncio.sleep(2)
                rt.reload()

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


def serve_from_flags(root, os_name: str | None, listen: str, smtp_port: int, submission_port: int,
                     relay_host: str | None, loopback_is_remote: bool, max_connections: int, timeout: float) -> None:
    """`mailsetup serve`: the embedded MTA on the set-up's files until a signal stops it."""
    from mailsetup.answers import load_setup
    from mailsetup.report import echo

    options = options_from_flags(listen, smtp_port, submission_port, relay_host, loopback_is_remote,
                                 max_connections, timeout)
    setup = load_setup(root, os_name)
    if setup.backup_for:  # it would refuse the backup domains' mail that the published MX records send here
        raise MailsetupError(f"this set-up is a backup MX for {', '.join(setup.backup_for)} (--backup-for), which the "
                             "embedded MTA does not do; run the real smtpd (mailsetup smoke --engine opensmtpd)")
    serve_forever(load_runtime(setup, options), say=lambda text: echo(text, err=True))
