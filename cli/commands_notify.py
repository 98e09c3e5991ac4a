"""``custody notify ...``: the system PGP key, recipients, webhooks, pending and retry.

Also :func:`after_command`, which ``custody``'s group calls after every command to deliver
what the command may have caused (best effort, a short time budget, never the exit code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from custody.errors import CustodyError, InputError
from custody.files import PGP_KEY_MAX, SECRET_FILE_MAX, read_limited, read_limited_text
from custody.notify import delivery, recipients
from custody.notify import mail as pgp_mime
from custody.store.db import Database
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app, read_secret
from custody_cli.helptext import SummaryGroup

DEFAULT_UID = "custody notifications <custody@localhost>"


def _read_key_passphrase(passphrase_file: Path | None) -> str:
    """--passphrase-file, else CUSTODY_NOTIFY_PASSPHRASE, else a prompt (twice)."""
    return read_secret(
        passphrase_file,
        kind="passphrase",
        env_var="CUSTODY_NOTIFY_PASSPHRASE",
        option="--passphrase-file, --no-passphrase",
        prompt="Passphrase for the system PGP key",
        confirm=True,
    )


@click.group(cls=SummaryGroup)
def notify() -> None:
    """Signed notifications: PGP-signed mail and HMAC-signed webhooks of custody events."""


# ---------------------------------------------------------------- the system key


@notify.group("key")
def key_group() -> None:
    """The system's PGP key that signs every notification mail."""


@key_group.command("init")
@click.option("--uid", default=None, help=f"The key's user id (default $CUSTODY_NOTIFY_FROM, else '{DEFAULT_UID}').")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Protect the key with the passphrase in this file (first line). Else $CUSTODY_NOTIFY_PASSPHRASE, "
    "else a prompt.",
)
@click.option("--no-passphrase", is_flag=True, help="Leave the key unprotected (tests; a home on an encrypted disk).")
@json_option
@pass_app
@example("custody notify key init --uid 'Exchange custody <custody@exchange.example>' --passphrase-file pp.txt")
def key_init(
    app: AppContext, uid: str | None, passphrase_file: Path | None, no_passphrase: bool, as_json: bool
) -> None:
    """Generate the system PGP key in the GnuPG home (never replaces one)."""
    if no_passphrase and passphrase_file is not None:
        raise InputError("--no-passphrase and --passphrase-file exclude each other")
    home = app.settings.gnupg_home
    passphrase = None if no_passphrase else _read_key_passphrase(passphrase_file)
    key = pgp_mime.init_key(home, uid or app.settings.notify_from or DEFAULT_UID, passphrase)
    if as_json:
        output.emit_json({"fingerprint": key.fingerprint, "uid": key.uid, "gnupg_home": str(home)})
        return
    output.line(key.fingerprint)
    output.success(f"system PGP key created in {home}: {key.uid}")
    if passphrase is not None:
        output.info("deliveries need its passphrase: CUSTODY_NOTIFY_PASSPHRASE_FILE or CUSTODY_NOTIFY_PASSPHRASE")


@key_group.command("export")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="Write it to this file.")
@pass_app
@example("custody notify key export --out custody-notify.asc")
def key_export(app: AppContext, out_file: Path | None) -> None:
    """Print the system key's public half (ASCII-armored) for publication."""
    armored = pgp_mime.export_public_key(app.settings.gnupg_home)
    if out_file is None:
        click.echo(armored, nl=not armored.endswith("\n"))
        return
    try:
        out_file.write_text(armored, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {out_file}: {exc.strerror}") from None
    output.success(f"public key written to {out_file}")


# ---------------------------------------------------------------- recipients and webhooks


def _show(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        title,
        ["id", "kind", "target", "encrypted", "delivered up to", "attempts", "next attempt", "last error"],
        [
            (
                r["id"],
                r["kind"],
                r["target"],
                "yes" if r["encrypted"] else "",
                r["delivered_seq"],
                r["attempts"] or "",
                r["next_attempt_at"] or "",
                r["last_error"] or "",
            )
            for r in rows
        ],
    )


def _done(row: dict[str, Any], as_json: bool, message: str) -> None:
    """The recipient a command added or removed: as JSON, or ``message``."""
    if as_json:
        output.emit_json(row)
        return
    output.success(message)


@notify.group("recipient")
def recipient_group() -> None:
    """Email recipients of notifications."""


@recipient_group.command("add")
@click.argument("address")
@click.option(
    "--pgp-key",
    "pgp_key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The recipient's OpenPGP public key (armored): mail to them is then encrypted as well.",
)
@json_option
@pass_app
@example("custody notify recipient add auditor@exchange.example --pgp-key auditor.asc")
def recipient_add(app: AppContext, address: str, pgp_key: Path | None, as_json: bool) -> None:
    """Send signed notification mail to ADDRESS from now on."""
    armored = None
    if pgp_key is not None:
        try:
            armored = read_limited_text(pgp_key, PGP_KEY_MAX, "PGP key file")
        except OSError as exc:
            raise InputError(f"cannot read {pgp_key}: {exc}") from None
    row = recipients.add_email(app.db, address, armored)
    extra = f", encrypted to {row['pgp_fingerprint']}" if row["encrypted"] else ""
    _done(row, as_json, f"recipient #{row['id']} {row['target']} added{extra}")


@recipient_group.command("list")
@json_option
@pass_app
@example("custody notify recipient list --json")
def recipient_list(app: AppContext, as_json: bool) -> None:
    """Email and webhook recipients with their delivery state."""
    _show(recipients.recipients(app.db), "Notification recipients", as_json)


@recipient_group.command("remove")
@click.argument("address")
@json_option
@pass_app
@example("custody notify recipient remove auditor@exchange.example")
def recipient_remove(app: AppContext, address: str, as_json: bool) -> None:
    """Stop mailing ADDRESS (an address or a recipient id). The others are told."""
    row = recipients.remove(app.db, recipients.EMAIL, address)
    _done(row, as_json, f"recipient #{row['id']} {row['target']} removed")


@notify.group("webhook")
def webhook_group() -> None:
    """Webhook receivers: JSON POSTs signed with HMAC-SHA256."""


@webhook_group.command("add")
@click.argument("url")
@click.option(
    "--secret-file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The shared HMAC secret (first line, at least 16 bytes); copied to HOME/notify/webhooks, 0600.",
)
@json_option
@pass_app
@example("custody notify webhook add https://ops.exchange.example/custody --secret-file hook.secret")
def webhook_add(app: AppContext, url: str, secret_file: Path, as_json: bool) -> None:
    """POST every notification to URL (http or https), signed with the shared secret."""
    try:
        lines = read_limited(secret_file, SECRET_FILE_MAX, "secret file").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read {secret_file}: {exc.strerror}") from None
    secret = lines[0].strip() if lines else b""
    row = recipients.add_webhook(app.db, app.settings, url, secret)
    _done(row, as_json, f"webhook #{row['id']} {row['target']} added")


@webhook_group.command("list")
@json_option
@pass_app
@example("custody notify webhook list")
def webhook_list(app: AppContext, as_json: bool) -> None:
    """Webhook receivers with their delivery state."""
    _show([r for r in recipients.recipients(app.db) if r["kind"] == recipients.WEBHOOK], "Webhooks", as_json)


@webhook_group.command("remove")
@click.argument("url")
@json_option
@pass_app
@example("custody notify webhook remove https://ops.exchange.example/custody")
def webhook_remove(app: AppContext, url: str, as_json: bool) -> None:
    """Stop posting to URL (a URL or a recipient id). The others are told."""
    row = recipients.remove(app.db, recipients.WEBHOOK, url)
    _done(row, as_json, f"webhook #{row['id']} {row['target']} removed")


# ---------------------------------------------------------------- delivery


@notify.command("pending")
@json_option
@pass_app
@example("custody notify pending --json")
def pending_cmd(app: AppContext, as_json: bool) -> None:
    """Notifications not yet delivered, per recipient, with their last error."""
    rows = delivery.pending(app.db, app.settings)
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        "Pending notifications",
        ["recipient", "seq", "event", "title", "attempts", "next attempt", "last error"],
        [
            (
                f"#{r['id']} {r['target']}",
                p["seq"],
                p["event"],
                p["title"],
                r["attempts"] or "" if i == 0 else "",
                r["next_attempt_at"] or "" if i == 0 else "",
                r["last_error"] or "" if i == 0 else "",
            )
            for r in rows
            for i, p in enumerate(r["pending"])
        ],
    )
    for r in rows:
        if r["pending"] and not r["deliverable_here"]:
            output.warning(f"#{r['id']} {r['target']}: not deliverable from this machine: {r['not_here_because']}")


@notify.command("retry")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=1), help="Time budget, seconds.")
@json_option
@pass_app
@example("custody notify retry --timeout 120")
def retry_cmd(app: AppContext, timeout: float, as_json: bool) -> None:
    """Deliver every pending notification now, ignoring the backoff. Exit 1 when some still fail."""
    click.get_current_context().meta[_DELIVERED] = True  # meta is shared: the group's hook sees it
    app.db.check_schema()
    report = delivery.deliver_pending(app.db, app.settings, timeout=timeout, force=True)
    if as_json:
        output.emit_json(report.to_dict())
    else:
        for d in report.delivered:
            output.info(f"delivered #{d['seq']} {d['event']} to {d['target']}")
        _warn(report)
        output.success(f"{len(report.delivered)} delivered, {len(report.failed)} failed")
    if report.failed or report.timed_out:
        raise CustodyError(
            f"{output.plural(len(report.failed), 'recipient')} failed"
            f"{' and time ran out' if report.timed_out else ''}: "
            "their notifications are kept (custody notify pending)"
        )


_DELIVERED = "custody.notify.delivered"


def _warn(report: delivery.DeliveryReport) -> None:
    for f in report.failed:
        output.warning(
            f"notification #{f['seq']} ({f['event']}) to {f['target']} failed: {f['error']}; "
            f"kept, next attempt after {f['next_attempt_at']} (custody notify retry)"
        )
    for s in report.skipped:
        if "not deliverable" in s["reason"]:
            output.warning(f"notifications to {s['target']} wait: {s['reason']}")


def after_command(ctx: click.Context) -> None:
    """Deliver pending notifications after a command, within CUSTODY_NOTIFY_TIMEOUT (5 s).

    Skipped when the command delivered already, when there is no store, or no recipient.
    Never raises: problems become warnings on stderr.
    """
    try:
        sub = ctx.invoked_subcommand
        if sub is None or ctx.meta.get(_DELIVERED):
            return
        app = ctx.find_object(AppContext)
        if app is None:
            return
        db = app._db  # the command's own store when it opened one
        own = db is None
        if db is None:
            if not _store_may_exist(app.settings.db_url):
                return
            db = Database(app.settings.db_url, halt_file=app.settings.halt_file, manifest=app.settings.manifest)
        try:
            if not db.exists() or not recipients.has_recipients(db):
                return
            config = delivery.NotifyConfig.load(app.settings)
            report = delivery.deliver_pending(db, app.settings, timeout=config.hook_timeout)
        finally:
            if own:
                db.dispose()
        _warn(report)
    except Exception as exc:  # noqa: BLE001 - delivery never changes a command's outcome
        output.warning(f"notifications not delivered now ({type(exc).__name__}: {exc}); custody notify retry")


def _store_may_exist(url: str) -> bool:
    """False for a SQLite file that is not there (opening it would create its directory)."""
    for prefix in ("sqlite:///",):
        if url.startswith(prefix):
            path = url[len(prefix) :].split("?", 1)[0]
            return bool(path) and path != ":memory:" and Path(path).exists()
    return True


COMMANDS = [notify]
