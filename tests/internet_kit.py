"""A small internet inside this machine: mail hosts, each in its own network, mount, UTS and PID
namespaces (own /etc, /home, /var, /run), joined by veth pairs to a bridge in a hub namespace that
holds the one DNS server (dnsmasq) and the one ACME CA (Pebble). Addresses are from 192.0.2.0/24
(documentation); no namespace has a default route, so nothing leaves the machine.

Used by tests/test_internet.py, and by hand (docs/internet.md): `.venv/bin/python tests/internet_kit.py up`.
Everything started here lives in PID namespaces whose first process is killed by `stop()`: the
kernel then ends every process inside, whatever state a test left it in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

NET = "192.0.2"
HUB = f"{NET}.1"  # dnsmasq on :53, Pebble on :14000 (ACME) and :15000 (its management API)
PASSWORD = "correct horse battery"
TOOLS = {name: shutil.which(name) or f"/usr/sbin/{name}" for name in ("dnsmasq", "pebble", "smtpd", "smtpctl")}


def _die_with_parent() -> None:
    """In the holder, before exec: the kernel kills it when the process that started it dies (a test
    run killed by a timeout leaves no namespaces behind: --kill-child then ends everything inside)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


class Node:
    """One set of namespaces, kept alive by a holder process (`unshare ... sleep`). `run` and `popen`
    enter all of them with nsenter; `stop` kills the holder, and with it everything inside."""

    def __init__(self, name: str, work: Path, setup: str = "", uts: bool = False):
        self.name, self.work = name, work
        flags = ["--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--mount", "--propagation", "private"]
        if uts:
            flags.append("--uts")
        script = f"set -e\n{setup}\nip link set lo up\necho ready\nexec sleep 1000000\n"
        self.holder = subprocess.Popen(["unshare", *flags, "sh", "-c", script], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                       preexec_fn=_die_with_parent)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            raise RuntimeError(f"namespaces for {name} did not come up: {self.holder.stderr.read()}")
        self.pid = self._first_process()
        self.procs: list[subprocess.Popen] = []

    def _first_process(self) -> int:
        """The holder's child: PID 1 of the new PID namespace, the process nsenter targets."""
        for _ in range(100):
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.01)
        raise RuntimeError(f"no first process in {self.name}'s namespaces")

    def enter(self, *argv: object) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "--net", "--mount", "--uts", "--pid", "--", *map(str, argv)]

    def run(self, *argv: object, input: str | None = None, timeout: float = 120,
            env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
        proc = _run(self.enter(*argv), timeout=timeout, input=input, env=dict(os.environ, **(env or {})),
                    stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def popen(self, log: Path, *argv: object, env: dict | None = None) -> subprocess.Popen:
        """A daemon inside, its output in `log` (a file: a pipe nobody reads would fill and stall it)."""
        pidfile = log.with_suffix(".pid")  # its PID as this namespace numbers it, for `kill`
        pidfile.unlink(missing_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(self.enter("sh", "-c", 'echo $$ >"$0"; exec "$@"', pidfile, *argv), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(os.environ, **(env or {})))
        proc.pidfile = pidfile
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: str = "TERM") -> int:
        """Signal a daemon `popen` started (nsenter, its parent outside, passes no signal on)."""
        for _ in range(100):
            if proc.pidfile.exists() and proc.pidfile.read_text().strip():
                break
            time.sleep(0.01)
        if proc.poll() is None:
            self.run("kill", f"-{sig}", proc.pidfile.read_text().strip(), timeout=10)
        return proc.wait(20)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.holder.kill()
        self.holder.wait(10)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@dataclass(eq=False)  # hashable: one host is one machine
class Host:
    """A mail host: its domain, its mail host name, its address, its namespaces, and its own copies of
    /etc (the test's /etc copied), /home (empty), /var (an overlay over this machine's) and /run."""

    domain: str
    address: str
    work: Path
    node: Node | None = None
    smtpd: subprocess.Popen | None = None
    users: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # more answers-file keys for this host

    @property
    def hostname(self) -> str:
        return f"mail.{self.domain}"

    @property
    def etc(self) -> Path:
        return self.work / "etc"

    @property
    def home(self) -> Path:
        return self.work / "home"

    @property
    def var(self) -> Path:
        """What this host wrote under /var (the overlay's upper folder)."""
        return self.work / "var"

    @property
    def log(self) -> Path:
        return self.work / "smtpd.log"

    def boot(self, hub: Node, pebble_root: Path | None) -> None:
        self.work.mkdir(parents=True)
        _run(["cp", "-a", "/etc", str(self.etc)], timeout=120).check_returncode()
        for name in ("resolv.conf", "hosts", "hostname", "mailname"):
            with contextlib.suppress(FileNotFoundError):
                (self.etc / name).unlink()
        (self.etc / "resolv.conf").write_text(f"nameserver {HUB}\n")
        (self.etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{self.address}\t{self.hostname} mail\n")
        (self.etc / "hostname").write_text(self.hostname + "\n")
        (self.etc / "mailname").write_text(self.hostname + "\n")
        if pebble_root:  # this host's smtpd (and every TLS client on it) trusts the small internet's CA
            bundle = self.etc / "ssl/certs/ca-certificates.crt"
            text = bundle.read_text() if bundle.exists() and not bundle.is_symlink() else ""
            bundle.unlink(missing_ok=True)
            bundle.write_text(text + pebble_root.read_text())
        self.home.mkdir(mode=0o755)
        (self.work / "var-work").mkdir()
        self.var.mkdir()
        setup = "\n".join([
            f"mount --bind {self.etc} /etc", f"mount --bind {self.home} /home",
            f"mount -t overlay overlay -o lowerdir=/var,upperdir={self.var},workdir={self.work}/var-work /var",
            "mount -t tmpfs -o mode=0755 tmpfs /run", f"hostname {self.hostname}"])
        self.node = Node(self.domain, self.work, setup, uts=True)
        veth = f"v-{self.domain.split('.')[0]}"[:15]
        _run(["ip", "link", "add", veth, "netns", str(hub.pid), "type", "veth", "peer", "name", "eth0",
              "netns", str(self.node.pid)]).check_returncode()
        hub.run("ip", "link", "set", veth, "master", "br0", "up", check=True)
        self.node.run("ip", "addr", "add", f"{self.address}/24", "dev", "eth0", check=True)
        self.node.run("ip", "link", "set", "eth0", "up", check=True)
        for user in self.users:  # (this machine may have the name already: the copy of /etc is the host's own)
            self.node.run("sh", "-c", 'id -u "$1" >/dev/null 2>&1 && usermod -d "/home/$1" "$1" || '
                          'useradd -M -d "/home/$1" -s /usr/sbin/nologin "$1"; '
                          'install -d -m 0700 -o "$1" -g "$(id -gn "$1")" "/home/$1"', "sh", user, check=True)

    def run(self, *argv: object, **kw) -> subprocess.CompletedProcess:
        return self.node.run(*argv, **kw)

    def provision(self, net: Internet, mailsetup: str) -> dict[str, int]:
        """The Ansible role (contrib/ansible) run on this host with the real ansible-playbook, as an
        admin provisions a machine: `mailsetup init` unattended from the inventory's answers, then the
        user's login (its password only on mailsetup's stdin). Returns the play's recap."""
        from ansible_kit import playbook_argv, playbook_env, recap

        inventory = {"mailsetup_answers": self.answers(net), "mailsetup_command": mailsetup,
                     "mailsetup_users": [{"name": self.users[0], "password": PASSWORD}],
                     "mailsetup_init_args": ["--no-smoke", "--no-preflight"],
                     "mailsetup_environment": {"REQUESTS_CA_BUNDLE": str(net.ca_bundle)}}
        path = self.work / "inventory-vars.json"
        path.write_text(json.dumps(inventory))
        path.chmod(0o600)
        r = self.run(*playbook_argv(self.hostname, path), env=playbook_env(), timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"ansible-playbook on {self.hostname}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}")
        return recap(r.stdout)

    def answers(self, net: Internet) -> dict:
        """What this host's inventory says: its names and address, a certificate from the small
        internet's ACME CA, DKIM, verified TLS when it relays (every host here has a CA-signed one),
        and its own `extra` (backup MX settings)."""
        return {"domain": self.domain, "hostname": self.hostname, "os": "debian", "admin": self.users[0],
                "listen": [self.address], "tls": "acme", "acme_server": net.acme_directory, "dkim": True,
                "relay_tls": "verify", "imap": "none", **self.extra}  # smtpd delivers itself: no Dovecot runs here

    def start_smtpd(self) -> None:
        self.smtpd = self.node.popen(self.log, TOOLS["smtpd"], "-d", "-f", "/etc/smtpd.conf")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.run(TOOLS["smtpctl"], "show", "status", timeout=10).returncode == 0:
                return
            if self.smtpd.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"smtpd on {self.hostname} did not start:\n{self.log.read_text(errors='replace')}")

    def stop_smtpd(self) -> None:
        """SIGTERM, smtpd's own clean stop (`smtpctl stop` on a paused smtpd took 20 s here)."""
        if self.smtpd:
            self.node.kill(self.smtpd)
        self.smtpd = None

    def maildir(self, user: str) -> list[Path]:
        new = self.home / user / "Maildir/new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def queue(self) -> list[str]:
        r = self.run(TOOLS["smtpctl"], "show", "queue", timeout=20)
        return [line for line in r.stdout.splitlines() if line.strip()]


def dnsmasq_options(records: list[dict], ptr: list[str]) -> list[str]:
    """`mailsetup dns --json` records as lines of a dnsmasq configuration file (where, unlike on its
    command line, quotes delimit a TXT record's strings), one for one: a record of a kind not known
    here fails the harness instead of being left out."""
    opts = []
    for rec in records:
        name, kind, value = rec["name"].rstrip("."), rec["type"], rec["value"]
        if kind == "MX":
            pref, host = value.split()
            opts.append(f"mx-host={name},{host.rstrip('.')},{pref}")
        elif kind == "A":
            opts.append(f"address=/{name}/{value}")
        elif kind == "TXT":
            chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
            opts.append(f"txt-record={name}," + ",".join(f'"{c}"' for c in chunks))
        elif kind == "CNAME":
            opts.append(f"cname={name},{value.rstrip('.')}")
        elif kind == "SRV":
            prio, weight, port, target = value.split()
            opts.append(f"srv-host={name}" if target == "." else
                        f"srv-host={name},{target.rstrip('.')},{port},{prio},{weight}")
        else:
            raise AssertionError(f"a record the harness cannot publish: {rec}")
    for line in ptr:  # "PTR 10.2.0.192.in-addr.arpa. -> mail.a.test.: ..."
        m = re.match(r"PTR (\S+)\. -> (\S+)\.", line)
        if m:
            opts.append(f"ptr-record={m[1]},{m[2]}")
    return opts


def standard_hosts(work: Path) -> list[Host]:
    """A (a.test, alice), B (b.test, bob; its MX records name C as backup) and C (c.test, carol;
    backup MX for b.test)."""
    return [Host("a.test", f"{NET}.10", work / "a", users=["alice"]),
            Host("b.test", f"{NET}.20", work / "b", users=["bob"], extra={"backup_mx": ["mail.c.test"]}),
            Host("c.test", f"{NET}.30", work / "c", users=["carol"], extra={"backup_for": ["b.test"]})]


class Internet:
    """The hub (bridge, dnsmasq, Pebble) and the hosts. `up()` boots them all; `publish()` serves a
    host's printed records; `down()` stops everything."""

    def __init__(self, work: Path, hosts: list[Host]):
        self.work = work
        self.hosts = {h.domain: h for h in hosts}
        self.hub: Node | None = None
        self.dnsmasq: subprocess.Popen | None = None
        self.pebble: subprocess.Popen | None = None
        self.published: dict[str, list[str]] = {}
        self.ca_bundle: Path | None = None  # what certbot trusts Pebble's own https listener with
        self.pebble_root: Path | None = None  # the root Pebble issues under: every host trusts it

    @property
    def acme_directory(self) -> str:
        return f"https://{HUB}:14000/dir"

    def up(self) -> Internet:
        from mta_kit import listener_ca

        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o755)  # smtpd's unprivileged processes and the users' deliveries walk through it
        self.hub = Node("hub", self.work, "ip link add br0 type bridge\n"
                        f"ip addr add {HUB}/24 dev br0\nip link set br0 up")
        self.serve_dns()
        self.ca_bundle = listener_ca(self.work, f"IP:{HUB}")
        self.start_pebble()
        for host in self.hosts.values():
            host.boot(self.hub, self.pebble_root)
        return self

    def serve_dns(self) -> None:
        """(Re)start dnsmasq with what is published now; before any host printed its records, each
        mail host's A record, as its owner points the name at the machine before asking for a
        certificate."""
        if self.dnsmasq:
            self.hub.kill(self.dnsmasq)
        lines = [o for options in self.published.values() for o in options]
        lines += [f"address=/{h.hostname}/{h.address}" for d, h in self.hosts.items() if d not in self.published]
        conf = self.work / "dnsmasq.conf"
        conf.write_text("".join(line + "\n" for line in lines))
        log = self.work / "dnsmasq.log"
        self.dnsmasq = self.hub.popen(log, TOOLS["dnsmasq"], "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                      "--no-poll", f"--conf-file={conf}", f"--listen-address={HUB}",
                                      "--bind-interfaces", "--user=root", "--local=/test/",
                                      "--local=/2.0.192.in-addr.arpa/", "--log-queries", "--log-facility=-")
        for _ in range(100):
            if self.hub.run("bash", "-c", f"exec 3<>/dev/tcp/{HUB}/53", timeout=5).returncode == 0:
                return
            if self.dnsmasq.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"dnsmasq did not start:\n{log.read_text(errors='replace')}")

    def start_pebble(self) -> None:
        config = self.work / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{HUB}:14000", "managementListenAddress": f"{HUB}:15000",
            "certificate": str(self.work / "cert.pem"), "privateKey": str(self.work / "key.pem"),
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.pebble = self.hub.popen(self.work / "pebble.log", TOOLS["pebble"], "-config", config,
                                     "-dnsserver", f"{HUB}:53", env=env)
        fetch = ("import ssl,sys,urllib.request;ctx=ssl.create_default_context(cafile=sys.argv[1]);"
                 "sys.stdout.write(urllib.request.urlopen(sys.argv[2],context=ctx,timeout=5).read().decode())")
        for _ in range(200):
            r = self.hub.run(sys.executable, "-c", fetch, self.ca_bundle, f"https://{HUB}:15000/roots/0", timeout=20)
            if r.returncode == 0 and "BEGIN CERTIFICATE" in r.stdout:
                self.pebble_root = self.work / "pebble-root.pem"
                self.pebble_root.write_text(r.stdout)
                return
            if self.pebble.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"pebble did not start:\n{(self.work / 'pebble.log').read_text(errors='replace')}")

    def publish(self, host: Host, mailsetup: str, only: tuple[str, ...] | None = None,
                ptr: str | None = None) -> list[dict]:
        """Serve exactly what `mailsetup dns --json` prints on `host` and return it. For a host whose
        owner published less: `only` the record types given, and `ptr` a PTR naming another host
        ("" for none) instead of the one printed."""
        r = host.run(mailsetup, "dns", "--json", check=True)
        printed = json.loads(r.stdout)
        records = [rec for rec in printed["records"] if only is None or rec["type"] in only]
        lines = printed.get("ptr", [])
        if ptr is not None:
            lines = [f"PTR {'.'.join(reversed(host.address.split('.')))}.in-addr.arpa. -> {ptr}."] if ptr else []
        self.published[host.domain] = dnsmasq_options(records, lines)
        self.serve_dns()
        return printed["records"]

    def provision(self, mailsetup: str) -> dict[str, dict[str, int]]:
        """Up, each host provisioned through the Ansible role (all at once, as three admins would),
        its records published as printed, its smtpd started. Returns each play's recap."""
        self.up()
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            recaps = dict(zip(self.hosts, pool.map(lambda h: h.provision(self, mailsetup), self.hosts.values()),
                              strict=True))
        for host in self.hosts.values():
            self.publish(host, mailsetup)
            host.start_smtpd()
        return recaps

    def down(self) -> None:
        for host in self.hosts.values():
            if host.node:
                host.node.stop()
        if self.hub:
            self.hub.stop()


USAGE = """usage (as root, with the test venv's python; docs/internet.md):
  python tests/internet_kit.py up [DIR]                 bring the small internet up in DIR (default
                                                        /tmp/mailsetup-internet); Ctrl-C tears it down
  python tests/internet_kit.py enter NAME [COMMAND...]  a shell (or COMMAND) on a.test, b.test, c.test or
                                                        hub, in the small internet that `up` runs"""
DEFAULT_DIR = Path("/tmp/mailsetup-internet")


def _up(work: Path) -> int:
    from conftest import MAILSETUP

    if work.exists():
        print(f"{work} exists: is the small internet up already? (remove it if not)", file=sys.stderr)
        return 2
    net = Internet(work, standard_hosts(work))
    try:
        net.provision(MAILSETUP)
        where = {"hub": net.hub.pid, **{d: h.node.pid for d, h in net.hosts.items()}}
        (work / "pids.json").write_text(json.dumps(where))
        print(f"The small internet is up ({work}); dnsmasq and Pebble on {HUB}.")
        for h in net.hosts.values():
            print(f"  {h.hostname:<12} {h.address:<11} user {h.users[0]} (password: {PASSWORD})")
        print(f"Look around: python {sys.argv[0]} enter a.test   (then e.g. mailsetup dns --check, smtpctl show "
              "queue, swaks ...)\nCtrl-C here tears it all down.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` tears it down like Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        net.down()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _enter(name: str, command: list[str], work: Path = DEFAULT_DIR) -> int:
    try:
        pid = json.loads((work / "pids.json").read_text())[name]
    except (OSError, KeyError, ValueError):
        print(f"no {name} in a small internet at {work}: start one with `up`", file=sys.stderr)
        return 2
    argv = ["nsenter", "-t", str(pid), "--net", "--mount", "--uts", "--pid", "--", *(command or ["bash", "-i"])]
    venv = str(Path(sys.executable).parent)  # mailsetup, ansible-playbook: the test venv's, first on PATH
    os.environ["PATH"] = f"{venv}:{os.environ.get('PATH', '')}"
    os.execvp(argv[0], argv)


if __name__ == "__main__":  # pragma: no cover - by hand, see docs/internet.md
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = sys.argv[1:]
    if args[:1] == ["up"] and len(args) <= 2:
        sys.exit(_up(Path(args[1]) if len(args) == 2 else DEFAULT_DIR))
    if args[:1] == ["enter"] and len(args) >= 2:
        sys.exit(_enter(args[1], args[2:]))
    print(USAGE, file=sys.stderr)
    sys.exit(2)
