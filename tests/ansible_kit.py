"""Running contrib/ansible with the real ansible-playbook (ansible-core from the test extra): the
command line, an environment that no ansible.cfg, HOME or terminal of this machine changes, and the
PLAY RECAP read back as numbers."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
# The tests run from the checkout; the role is not part of the wheel.
PLAYBOOK = Path(__file__).resolve().parent.parent / "contrib" / "ansible" / "playbook.yml"

_home: Path | None = None


def _private_home() -> Path:
    """One writable HOME (and ansible's temp folders under it) for this test process, removed at exit."""
    global _home
    if _home is None:
        _home = Path(tempfile.mkdtemp(prefix="mailsetup-ansible-"))
        atexit.register(shutil.rmtree, _home, True)
    return _home


def playbook_env(log_path: Path | None = None) -> dict[str, str]:
    """The environment ansible-playbook runs in: a private HOME and temp folders, no ansible.cfg of
    this machine (an empty one of ours), no host key checking, retry files, cows or colour, and
    modules run by Debian's /usr/bin/python3. `log_path`: ANSIBLE_LOG_PATH."""
    home = _private_home()
    cfg = home / "ansible.cfg"
    if not cfg.exists():
        cfg.write_text("[defaults]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        HOME=str(home),
        ANSIBLE_CONFIG=str(cfg),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_NOCOWS="1",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_STDOUT_CALLBACK="default",
        # The host's own Python, as on a Debian host (discovery would follow this machine's PATH,
        # e.g. into a pyenv shim).
        ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3",
        ANSIBLE_DEPRECATION_WARNINGS="False",
        NO_COLOR="1",
        LC_ALL="C.UTF-8",
    )
    if log_path is not None:
        env["ANSIBLE_LOG_PATH"] = str(log_path)
    return env


def playbook_argv(host: str, vars_file: Path, check: bool = False) -> list[str]:
    """ansible-playbook applying the role to `host` through the local connection (run it as root
    in the host's own namespaces), with the variables of `vars_file` (YAML or JSON)."""
    argv = [ANSIBLE_PLAYBOOK, "-c", "local", "-i", f"{host},", "-e", f"@{vars_file}", str(PLAYBOOK)]
    return argv + ["--check"] if check else argv


_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>(?:\w+=\d+\s*)+)$")


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP's numbers (ok, changed, unreachable, failed, skipped, rescued, ignored) of the
    one host in `output`; an AssertionError when there is no recap."""
    _, found, after = output.rpartition("PLAY RECAP")
    assert found, f"no PLAY RECAP in ansible-playbook's output:\n{output[-2000:]}"
    for line in after.splitlines():
        m = _RECAP_LINE.match(line.strip())
        if m:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group("counts"))}
    raise AssertionError(f"no host line in the PLAY RECAP:\n{after}")
