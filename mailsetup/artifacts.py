"""The commands that make one thing on their own: smtpd.conf (`render`), a key and certificate
(`cert`), a queue key (`keygen`), aliases.db (`aliases`). Each checks its input, builds the bytes in
memory and leaves the writing to files.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mailsetup.errors import MailsetupError
from mailsetup.report import echo

if TYPE_CHECKING:  # the plan module loads dataclasses: `mailsetup aliases` mostly goes without it
    from mailsetup.plan import FileChange
    from mailsetup.smtpdversion import VersionProbe


def smtpd_version_or_installed(given: str | None) -> str | None:
    """The version given, else the installed smtpd's (None when there is none)."""
    if given:
        return given
    from mailsetup.opensmtpd import smtpd_version

    found = smtpd_version()
    return f"{found[0]}.{found[1]}" if found else None


def write_new(changes: list[FileChange], force: bool, flag: str, make_dirs: bool = False,
              root: Path | None = None, os_name: str | None = None, prune: bool = True) -> None:
    """Write files the user named: never over one without --force (its backup is kept then, as many
    as the set-up under `root`, or this host's, keeps; every one when not `prune`), never into a
    folder that does not exist unless it is the layout's own (make_dirs)."""
    from mailsetup.answers import kept_backups
    from mailsetup.plan import apply_plan

    for change in changes:
        if not make_dirs and not change.path.parent.is_dir():
            raise MailsetupError(f"{flag}: the folder {change.path.parent} does not exist")
        if change.path.exists() and not force:
            raise MailsetupError(f"{flag}: {change.path} exists; pass --force to replace it (a backup is kept)")
        if change.path.is_dir():
            raise MailsetupError(f"{flag}: {change.path} is a directory")
    for result in apply_plan(changes, kept_backups(root, os_name) if prune else None):
        if result.backup:
            echo(f"kept the old {result.path} as {result.backup}")


def render_conf(raw: dict, queue_key_file: Path | None, aliases_format: str, out: Path | None,
                force: bool) -> None:
    """smtpd.conf for `raw` (answers as init's flags name them), with the queue key on disk:
    printed, or written 0600 to `out`."""
    from mailsetup import queuekey
    from mailsetup.model import build_setup
    from mailsetup.opensmtpd import open_relay_rules
    from mailsetup.plan import FileChange
    from mailsetup.questions import require_answers
    from mailsetup.render import render_smtpd_conf

    require_answers(raw)
    if aliases_format not in ("db", "file"):
        raise MailsetupError(f"--aliases-format: {aliases_format!r} is not db or file")
    raw = {k: v for k, v in raw.items() if v is not None}
    raw["smtpd_version"] = smtpd_version_or_installed(raw.get("smtpd_version"))
    setup = build_setup(raw)
    qkey = None
    if setup.queue.encryption:
        path = queue_key_file or Path(setup.queue.key_file)
        if not path.exists():
            raise MailsetupError(
                f"--queue-key-file: no queue key at {path}; make one with "
                f"`mailsetup keygen --out {path}` or pass --no-queue-encryption"
            )
        qkey = queuekey.read_queue_key(path)
    text = render_smtpd_conf(setup, qkey, aliases_format)
    if open_relay_rules(text):
        raise MailsetupError("internal error: the rendered configuration would be an open relay", exit_code=1)
    if out is None:
        import typer

        typer.echo(text, nl=False)
        return
    # Never pruned here: smtpd.conf carries the queue key, and an older one may be all that still
    # opens mail in the queue (init prunes, after checking the queue; a queue key is a few bytes).
    write_new([FileChange(out, text.encode(), 0o600, "--out")], force, "--out", root=raw.get("root"),
              os_name=raw.get("os"), prune=False)
    echo(f"wrote {out} (0600)")


def make_cert(hostname: str | None, days: int, key_type: str, out_cert: Path | None, out_key: Path | None,
              csr: Path | None, os_name: str | None, root: Path | None, force: bool) -> None:
    """A private key and a self-signed certificate (or a CSR), by default where the layout keeps them."""
    from mailsetup import pki
    from mailsetup.model import validate_days, validate_dns_name, validate_key_type, validate_path
    from mailsetup.plan import FileChange
    from mailsetup.platforms import detect_os, get_layout, sandboxed

    if not hostname:
        raise MailsetupError("missing --hostname (the mail host's FQDN, e.g. --hostname mail.example.org)")
    host = validate_dns_name(hostname, "--hostname")
    key_type = validate_key_type(key_type)
    days = validate_days(days)
    defaults = out_cert is None or out_key is None  # the layout's own folders may be made
    if out_cert is None or out_key is None:
        layout = sandboxed(get_layout(os_name or detect_os() or "debian"), root.absolute() if root else None)
        out_cert = out_cert or Path(layout.cert_dir / f"{host}.crt")
        out_key = out_key or Path(layout.key_dir / f"{host}.key")
    validate_path(out_key.absolute(), "--out-key")
    validate_path(out_cert.absolute(), "--out-cert")
    key = pki.generate_key(key_type)
    changes = [FileChange(out_key, pki.key_pem(key), pki.KEY_MODE, "private key", secret=True)]
    if csr is not None:
        changes.append(FileChange(csr, pki.csr(key, host), 0o644, "certificate signing request"))
    else:
        changes.append(FileChange(out_cert, pki.self_signed_cert(key, host, days), pki.CERT_MODE, "certificate"))
    write_new(changes, force, "--out-key" if out_key.exists() else "--out-cert", make_dirs=defaults, root=root,
              os_name=os_name)
    echo(f"wrote {out_key} (0600, {key_type})")
    if csr is not None:
        echo(f"wrote {csr}: send it to your CA, then run init with --cert CERT --key {out_key}")
    else:
        info = pki.inspect_cert(pki.load_cert(out_cert))
        echo(f"wrote {out_cert} ({host}, expires {info.not_after:%Y-%m-%d})")
        echo(f"SHA-256 fingerprint: {info.fingerprint_sha256}")


def make_queue_key(out: Path | None, force: bool) -> None:
    """A queue encryption key, printed, or written 0600 to `out`."""
    from mailsetup import queuekey

    key = queuekey.generate_queue_key()
    if out is None:
        echo(key)
        return
    from mailsetup.plan import FileChange

    # Every backup kept (see render_conf): an old queue key may be the only way into queued mail.
    write_new([FileChange(out, queuekey.queue_key_file_bytes(key), queuekey.KEY_MODE, "--out", secret=True)], force,
              "--out", prune=False)
    echo(f"wrote {out} (0600); smtpd.conf: queue encryption <the key in {out}>", err=True)


def _warn_rfc2142(source: Path, missing: list[str]) -> None:
    for name in missing:
        echo(f"warning: {source}: no {name} alias (RFC 2142 wants {name}@ to reach a person)", err=True,
             fg="yellow")


def build_aliases(source: Path, out: Path | None, check: bool, smtpd_version: str | None,
                  installed: VersionProbe | None = None) -> None:
    """Check an aliases file and, unless `check`, write its database as `makemap -t aliases` does.
    `installed`: `smtpd -h` already running (entry.py starts it before anything loads)."""
    from mailsetup.defaults import DEFAULT_SMTPD_VERSION, parse_version

    # 7.5 and later read aliases differently: follow the smtpd that will read this db
    if smtpd_version:
        version = parse_version(smtpd_version)
    else:
        from mailsetup.smtpdversion import VersionProbe

        found = (installed or VersionProbe()).result()
        version = found[:2] if found else DEFAULT_SMTPD_VERSION
    from mailsetup import aliases as aliases_mod
    from mailsetup.answers import kept_backups

    out = out or source.with_name(source.name + ".db")
    if not check and aliases_mod.db_backend() == "bdb" and out.parent.is_dir():
        try:  # streamed through Berkeley DB, as makemap writes it; the exact parser's way for the rest
            count, missing = aliases_mod.write_aliases_db_file(source, out, version, kept_backups(None))
        except aliases_mod.NotPlain:
            pass
        except OSError as exc:
            raise MailsetupError(f"cannot write {out}: {exc.strerror or exc}", exit_code=1) from None
        else:
            _warn_rfc2142(source, missing)
            echo(f"wrote {out}: {count} aliases")
            return
    entries = aliases_mod.parse_aliases_file(source, version)
    _warn_rfc2142(source, aliases_mod.missing_rfc2142(entries))
    if check:
        echo(f"{source}: {len(entries)} aliases, OK")
        return
    backend = aliases_mod.db_backend()
    if backend in ("bdb", "dbm"):
        db = aliases_mod.build_aliases_db(entries)
    elif backend == "makemap":
        echo("note: this Python's dbm cannot write Berkeley DB; using makemap", err=True)
        db = aliases_mod.build_aliases_db_with_makemap(source.read_text(encoding="utf-8"), entries)
    else:
        raise MailsetupError(
            "no Berkeley DB writer here (Python's dbm.ndbm or makemap): use `table aliases "
            f"file:{source}` in smtpd.conf instead of a db: table",
            exit_code=1,
        )
    from mailsetup.plan import FileChange, apply_plan

    apply_plan([FileChange(out, db, aliases_mod.ALIASES_MODE, "aliases.db")], kept_backups(None))
    echo(f"wrote {out}: {len(entries)} aliases")
