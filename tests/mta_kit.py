"""Test kit for the embedded MTA: a provisioned sandbox, `mailsetup serve` in a subprocess on free
loopback ports, and a relay sink. Every server started here is stopped by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import MAILSETUP, run_cli

PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)


def start_dnsmasq(port: int, *options: str) -> subprocess.Popen:
    """dnsmasq on 127.0.0.1:`port` answering only from `options` (no resolv.conf, no hosts file),
    returned once it holds the port; the caller stops it (terminate, wait)."""
    proc = subprocess.Popen(
        [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--conf-file=/dev/null",
         f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return proc  # dnsmasq holds it
        time.sleep(0.05)
    proc.terminate()
    proc.wait(5)
    raise AssertionError("dnsmasq did not start")


def listener_ca(work: Path, san: str) -> Path:
    """A CA and a server certificate (work/cert.pem, work/key.pem) for `san` ("DNS:x,IP:y"): Pebble
    ships none for its own https listener. Returns the CA file its clients trust."""
    from conftest import OPENSSL

    def openssl(*args: object) -> None:
        r = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    ca_key, ca, key, csr, cert = (work / n for n in ("ca.key", "ca.pem", "key.pem", "csr.pem", "cert.pem"))
    # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) demands of a CA and a leaf.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=test listener CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "basicConstraints=critical,CA:TRUE")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=pebble")
    ext = work / "ext.cnf"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                   "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", ext)
    return ca


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def provision(root: Path, *extra: object) -> Path:
    r = run_cli("init", "--yes", "--no-smoke", "--domain", "example.test", "--os", "debian", "--root", root,
                "--admin", "alice", *extra)
    assert r.code == 0, r.err
    for user in ("alice", "bob"):
        r = run_cli("user", "add", user, "--password-stdin", "--root", root, input=PASSWORD + "\n")
        assert r.code == 0, r.err
    aliases = root / "etc/aliases"
    aliases.write_text(aliases.read_text() + "team: alice, bob\n")
    assert run_cli("aliases", aliases).code == 0
    return root


class Serve:
    """`mailsetup serve` as a user runs it, in a subprocess."""

    def __init__(self, root: Path, *extra: str, relay_port: int | None = None, remote: bool = True):
        self.root = root
        self.smtp = free_port()
        self.submission = free_port()
        self.extra = list(extra)
        self.relay_port = relay_port
        self.remote = remote
        self.proc: subprocess.Popen | None = None
        self.log = root / "serve.log"

    def start(self) -> Serve:
        args = [MAILSETUP, "serve", "--root", str(self.root), "--smtp-port", str(self.smtp),
                "--submission-port", str(self.submission), *self.extra]
        if self.remote:
            args.append("--loopback-is-remote")
        if self.relay_port:
            args += ["--relay-host", f"127.0.0.1:{self.relay_port}"]
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self.smtp)
        wait_port(self.submission)
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(10)
        elif self.proc:
            code = self.proc.returncode
        if hasattr(self, "_logf"):
            self._logf.close()
        return code

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Sink:
    """A plain aiosmtpd server in a thread that keeps what it is sent."""

    def __init__(self, data_size_limit: int = 33554432) -> None:  # aiosmtpd's default: 32 MiB
        self.data_size_limit = data_size_limit
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 kept"

    def __enter__(self) -> Sink:
        from aiosmtpd.smtp import SMTP

        self.thread.start()

        async def start():
            return await self.loop.create_server(
                lambda: SMTP(self, hostname="sink.invalid", data_size_limit=self.data_size_limit), "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.messages) >= count, f"sink got {len(self.messages)} of {count}"


def maildir_new(root: Path, user: str) -> list[Path]:
    new = root / "home" / user / "Maildir" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []
