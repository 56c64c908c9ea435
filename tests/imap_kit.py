"""Run inside a private mount + network namespace (tests/test_dovecot.py makes it): a real-host
`mailsetup init --imap dovecot`, then the real smtpd and the real Dovecot on the written files, a
message to an alias through LMTP, read back over IMAPS. Prints one JSON object of what it saw.

usage: python3 imap_kit.py MAILSETUP PASSWORD
"""

from __future__ import annotations

import imaplib
import json
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

MAILSETUP, PASSWORD = sys.argv[1], sys.argv[2]
seen: dict[str, object] = {}


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, input=input, timeout=120,
                          env=dict(os.environ, NO_COLOR="1"))


def wait_port(port: int, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def imaps_login(user: str, password: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed: the pair is checked apart
    try:
        with imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=context, timeout=10) as imap:
            imap.login(user, password)
            imap.select("INBOX")
            _, found = imap.search(None, "ALL")
            bodies = [imap.fetch(n, "(RFC822)")[1][0][1].decode() for n in found[0].split()]
            imap.logout()
            return "ok:" + "\n".join(bodies)
    except imaplib.IMAP4.error as exc:
        return f"refused:{exc}"


def plain_imap() -> str:
    try:
        socket.create_connection(("127.0.0.1", 143), 3).close()
        return "open"
    except OSError as exc:
        return f"closed:{exc.strerror}"


def main() -> None:
    import pwd

    for name in ("alice", "bob"):
        run("useradd", "-m", "-s", "/usr/sbin/nologin", name)
        account = pwd.getpwnam(name)  # it may be in the copied /etc already; /home is empty here
        Path(account.pw_dir).mkdir(mode=0o750, exist_ok=True)
        os.chown(account.pw_dir, account.pw_uid, account.pw_gid)
    r = run(MAILSETUP, "init", "--yes", "--domain", "example.test", "--os", "debian", "--no-smoke",
            "--no-preflight", "--admin", "alice", "--user", "alice", "--password-stdin", "--listen", "127.0.0.1",
            "--imap", "dovecot", input=PASSWORD + "\n")
    seen["init"] = [r.returncode, r.stdout[-3000:], r.stderr[-2000:]]
    if r.returncode:
        return
    dovecot = subprocess.Popen(["dovecot", "-F", "-c", "/etc/dovecot/dovecot.conf"],
                               stdout=subprocess.DEVNULL, stderr=open("/tmp/dovecot.log", "w"))
    smtpd = subprocess.Popen(["smtpd", "-d", "-f", "/etc/smtpd.conf"],
                             stdout=subprocess.DEVNULL, stderr=open("/tmp/smtpd.log", "w"))
    try:
        seen["ports"] = [wait_port(993), wait_port(25)]
        prove()
    finally:
        for proc in (smtpd, dovecot):
            proc.terminate()
            proc.wait(10)
        seen["dovecot_log"] = Path("/tmp/dovecot.log").read_text()[-1500:]
        seen["smtpd_log"] = Path("/tmp/smtpd.log").read_text()[-1500:]


def prove() -> None:
    with smtplib.SMTP("127.0.0.1", 25, timeout=15) as s:
        s.sendmail("someone@elsewhere.test", ["postmaster@example.test"],
                   "From: someone@elsewhere.test\r\nTo: postmaster@example.test\r\nSubject: through LMTP\r\n\r\nhi\r\n")
    new = Path("/home/alice/Maildir/new")
    end = time.monotonic() + 20
    while time.monotonic() < end and not (new.is_dir() and any(new.iterdir())):
        time.sleep(0.2)
    seen["delivered"] = [p.read_text() for p in new.iterdir()] if new.is_dir() else []
    seen["alice"] = imaps_login("alice", PASSWORD)
    seen["alice_wrong"] = imaps_login("alice", PASSWORD + "x")
    seen["plain_imap"] = plain_imap()
    doctor = run(MAILSETUP, "doctor", "--json")
    seen["doctor"] = {f["name"]: [f["status"], f["detail"]] for f in json.loads(doctor.stdout or "[]")}
    home = Path("/home/alice/Maildir")
    mode = home.stat().st_mode
    home.chmod(0o755)  # a Maildir others can read: doctor names it
    doctor = run(MAILSETUP, "doctor", "--json")
    seen["doctor_open_maildir"] = {f["name"]: [f["status"], f["detail"]] for f in json.loads(doctor.stdout or "[]")}
    home.chmod(mode)
    r = run(MAILSETUP, "user", "add", "bob", "--password-stdin", input=PASSWORD + "b\n")
    seen["add_bob"] = [r.returncode, r.stdout, r.stderr]
    seen["bob"] = imaps_login("bob", PASSWORD + "b")
    r = run(MAILSETUP, "user", "remove", "bob")
    seen["remove_bob"] = [r.returncode, r.stdout, r.stderr]
    seen["bob_removed"] = imaps_login("bob", PASSWORD + "b")


if __name__ == "__main__":
    try:
        main()
    finally:
        print(json.dumps(seen))
