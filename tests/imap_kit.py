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
import tempfile
import time
from pathlib import Path

MAILSETUP, PASSWORD = sys.argv[1], sys.argv[2]
WORK = Path(tempfile.mkdtemp(prefix="imap-kit-"))  # the logs and the client's files; removed at the end
seen: dict[str, object] = {}


def run(*args: str, input: str | None = None, home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", **({"HOME": str(home)} if home else {}))
    return subprocess.run(args, capture_output=True, text=True, input=input, timeout=120, env=env)


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


def mbsync_from_autoconfig() -> list:
    """A real IMAP client set up the way a person's would be: mbsync (isync) configured from the
    Thunderbird autoconfig file init wrote (host, port, TLS, login) and trusting the certificate
    smtpd and Dovecot serve; it copies alice's INBOX into a Maildir of its own."""
    import xml.etree.ElementTree as ET

    incoming = ET.parse("/var/www/autoconfig/mail/config-v1.1.xml").find("emailProvider/incomingServer")
    host, port = incoming.findtext("hostname"), incoming.findtext("port")
    user = incoming.findtext("username").replace("%EMAILLOCALPART%", "alice")
    tls = {"SSL": "IMAPS", "STARTTLS": "STARTTLS"}[incoming.findtext("socketType")]
    with open("/etc/hosts", "a") as hosts:  # this namespace's copy: the mail host is on loopback here
        hosts.write(f"127.0.0.1 {host}\n")
    local = WORK / "mbsync-mail"
    local.mkdir()
    rc = WORK / "mbsyncrc"
    rc.write_text(f"IMAPAccount a\nHost {host}\nPort {port}\nUser {user}\nPassCmd \"cat {WORK}/mbsync-pass\"\n"
                  f"SSLType {tls}\nCertificateFile /etc/ssl/certs/{host}.crt\n\n"
                  "IMAPStore remote\nAccount a\n\n"
                  f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\n\n"
                  "Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\nCreate Near\nSync Pull\n"
                  "SyncState *\n")  # its state in its own Maildir, not in ~/.mbsync
    (WORK / "mbsync-pass").write_text(PASSWORD + "\n")
    r = run("mbsync", "-c", str(rc), "inbox", home=WORK)
    got = [p.read_text() for p in sorted((local / "INBOX").glob("*/*"))]  # cur/: imaplib's fetch marked it seen
    return [r.returncode, r.stdout[-500:] + r.stderr[-1000:], [host, port, user, tls], got]


def main() -> None:
    import pwd

    for name in ("alice", "bob", "carol"):
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
                               stdout=subprocess.DEVNULL, stderr=open(WORK / "dovecot.log", "w"))
    smtpd = subprocess.Popen(["smtpd", "-d", "-f", "/etc/smtpd.conf"],
                             stdout=subprocess.DEVNULL, stderr=open(WORK / "smtpd.log", "w"))
    try:
        seen["ports"] = [wait_port(993), wait_port(25)]
        prove()
    finally:
        for proc in (smtpd, dovecot):
            proc.terminate()
            proc.wait(10)
        seen["dovecot_log"] = (WORK / "dovecot.log").read_text()[-1500:]
        seen["smtpd_log"] = (WORK / "smtpd.log").read_text()[-1500:]


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
    seen["mbsync"] = mbsync_from_autoconfig()
    r = run(MAILSETUP, "smoke", "--json")  # the embedded MTA on free ports, its own loopback Dovecot
    seen["smoke"] = [r.returncode, {c["name"]: [c["ok"], c["detail"]] for c in json.loads(r.stdout or "[]")},
                     r.stderr[-1000:]]
    doctor = run(MAILSETUP, "doctor", "--json")
    seen["doctor"] = {f["name"]: [f["status"], f["detail"]] for f in json.loads(doctor.stdout or "[]")}
    home = Path("/home/alice/Maildir")
    mode = home.stat().st_mode
    home.chmod(0o755)  # a Maildir others can read: doctor names it
    doctor = run(MAILSETUP, "doctor", "--json")
    seen["doctor_open_maildir"] = {f["name"]: [f["status"], f["detail"]] for f in json.loads(doctor.stdout or "[]")}
    home.chmod(mode)
    # carol came over from an older smtpd.conf's auth table (`mailsetup import`) with a SHA-512 crypt
    # hash; the next change of the logins writes her into Dovecot's passwd-file as she is
    sha512 = run("openssl", "passwd", "-6", "-stdin", input=PASSWORD + "c\n").stdout.strip()
    with open("/etc/mailsetup/credentials", "a") as table:
        table.write(f"carol {sha512}\n")
    r = run(MAILSETUP, "user", "add", "bob", "--password-stdin", input=PASSWORD + "b\n")
    seen["add_bob"] = [r.returncode, r.stdout, r.stderr]
    seen["carol"] = imaps_login("carol", PASSWORD + "c")
    seen["carol_wrong"] = imaps_login("carol", PASSWORD)
    seen["bob"] = imaps_login("bob", PASSWORD + "b")
    r = run(MAILSETUP, "user", "remove", "bob")
    seen["remove_bob"] = [r.returncode, r.stdout, r.stderr]
    seen["bob_removed"] = imaps_login("bob", PASSWORD + "b")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - said in the JSON, for the test's message
        seen["error"] = repr(exc)
    finally:
        import shutil

        shutil.rmtree(WORK, ignore_errors=True)
        print(json.dumps(seen))
