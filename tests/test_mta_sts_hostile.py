"""The MTA-STS web root in a shape mailsetup did not expect (issue 13 review): the mail set-up goes
on without the policy file, as it does for a web root another user owns."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import init_args, run_cli


@pytest.mark.parametrize("shape", ["web root is a file", "policy path is a folder"])
def test_a_web_root_in_another_shape_is_a_warning_not_a_failed_init(tmp_path: Path, shape: str):
    root = tmp_path / "root"
    r = run_cli(*init_args(root, "--no-smoke"))
    assert r.code == 0, r.err
    web = root / "var/www/mta-sts"
    policy = web / ".well-known/mta-sts.txt"
    policy.unlink()
    if shape == "web root is a file":
        policy.parent.rmdir()
        web.rmdir()
        web.write_text("a deploy's stray file\n")
        where = f"{web}: Not a directory"
    else:
        policy.mkdir()
        where = f"{policy}: Is a directory"
    r = run_cli("init", "--yes", "--no-smoke", "--root", root, "--max-message-size", "20000000")
    assert r.code == 0, r.out + r.err
    assert f"MTA-STS policy not written: {where}; its text is in `mailsetup dns --json`" in r.out + r.err
    assert "max-message-size 20000000" in (root / "etc/smtpd.conf").read_text()  # the rest was written
