"""One message from example.test to postmaster@a.test through the real smtpd, found by MX, in a world
of its own: run as root inside `unshare --net --mount` (test_backup_mx.py does), it gives loopback an
address (without one besides 127.0.0.1, smtpd's resolver looks up no MX host: AI_ADDRCONFIG), points
/etc/resolv.conf at a dnsmasq that serves a.test's MX (mx.a.test, 127.0.0.2), and, with a CA file,
puts it in place of the system's CA bundle, which smtpd verifies against. a.test's MX is
`mailsetup serve` on 127.0.0.2:25 with the certificate of a.test's set-up; example.test's smtpd runs
its set-up's rules (the written smtpd.conf's) with only its listeners moved.

    python relay_world.py WORK SENDER_ROOT RECEIVER_ROOT [CA_FILE]

With BACKUP=1 in the environment the sender is a.test's backup MX (mx2.a.test, preference 20 in DNS):
the message comes to it from a stranger (127.0.0.5, not `from local`), as from any sender on the
internet while the primary was down. Prints one JSON object: the outbound (and backup) action lines,
smtpd's mta log lines, the files delivered into a.test's Maildirs and the envelopes still in smtpd's
queue.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

MAILSETUP = str(Path(sys.executable).with_name("mailsetup"))


def main(work: Path, sender: Path, receiver: Path, ca_file: str | None) -> dict:
    from mailsetup.answers import load_setup
    from mailsetup.realsmtpd import RealSmtpd, _render_inputs, loopback_setup
    from mailsetup.render import render_smtpd_conf

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "192.0.2.99/32", "dev", "lo"], check=True)
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(work / "resolv.conf"), "/etc/resolv.conf"], check=True)
    if ca_file:
        subprocess.run(["mount", "--bind", ca_file, "/etc/ssl/certs/ca-certificates.crt"], check=True)
    procs = [subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--port=53",
         "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--local=/a.test/",
         "--mx-host=a.test,mx.a.test,10", "--host-record=mx.a.test,127.0.0.2",
         "--mx-host=a.test,mx2.a.test,20", "--host-record=mx2.a.test,127.0.0.3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(
        [MAILSETUP, "serve", "--root", str(receiver), "--listen", "127.0.0.2", "--smtp-port", "25",
         "--submission-port", "10587", "--loopback-is-remote"], stdout=subprocess.DEVNULL,
        stderr=(work / "serve.log").open("w")))
    setup = load_setup(sender, "debian")
    conf = render_smtpd_conf(loopback_setup(setup, 10025, 10588), *_render_inputs(setup))
    real = RealSmtpd("/usr/sbin/smtpd", conf, (10025, 10588)).start()
    try:
        _wait_port("127.0.0.2", 25)
        backup = os.environ.get("BACKUP") == "1"
        with smtplib.SMTP("127.0.0.1", 10025, timeout=10, source_address=("127.0.0.5", 0) if backup else None,
                          local_hostname="sender.example.net" if backup else None) as client:
            client.sendmail("alice@example.test", ["postmaster@a.test"], "Subject: hello\r\n\r\nhello\r\n")
        mta: list[str] = []
        for _ in range(100):  # until smtpd says what became of it (delivered, or no route it may use)
            mta = [line for line in real.log.read_text().splitlines() if " mta " in line or "smtp-out" in line]
            if any("result=" in line or "No valid route" in line for line in mta):
                break
            time.sleep(0.1)
        for _ in range(20):  # a delivered message leaves the queue just after its log line
            queued = [p.name for p in (real.work / "spool/queue").rglob("*") if p.is_file()]
            if not queued:
                break
            time.sleep(0.1)
    finally:
        real.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return {"action": next(line for line in conf.splitlines() if line.startswith('action "outbound"')),
            "backup_action": next((line for line in conf.splitlines() if line.startswith('action "backup"')), None),
            "mta": mta, "delivered": [p.name for p in receiver.glob("home/*/Maildir/new/*")], "queued": queued}


def _wait_port(host: str, port: int) -> None:
    import socket

    for _ in range(200):
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(Path(args[0]), Path(args[1]), Path(args[2]), args[3] if len(args) > 3 else None)))
