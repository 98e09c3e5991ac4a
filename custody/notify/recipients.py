"""Who is told: email addresses (optionally with a PGP key) and webhooks; add, remove, list.

Every change is recorded in the audit log in the same transaction, so the other recipients
hear of it (``notify.recipient_added`` / ``.recipient_removed``). A webhook's HMAC secret
never enters the store: it is written to ``HOME/notify/webhooks/ID.secret`` (0600) on the
machine that added it, and the store keeps only its SHA-256 to recognise it there.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.errors import Conflict, InputError, NotFound
from custody.notify import mail, outbox, webhook
from custody.store.db import Database
from custody.store.models import NotifyCursor, NotifyRecipient

EMAIL = "email"
WEBHOOK = "webhook"
_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def webhook_secrets_dir(settings: Settings) -> Path:
    """Where this machine keeps the webhooks' HMAC secrets: ``HOME/notify/webhooks``."""
    return settings.home / "notify" / "webhooks"


def secret_path(secrets_dir: Path, recipient_id: int) -> Path:
    """The file holding webhook ``recipient_id``'s secret."""
    return secrets_dir / f"{recipient_id}.secret"


def check_email(address: str) -> str:
    """Raises InputError unless ``address`` is a plain ``local@domain`` address."""
    address = address.strip()
    if not _EMAIL_RE.match(address) or ".." in address.split("@")[1] or len(address) > 254:
        raise InputError(f"not an email address: {address!r} (expected local@domain)")
    return address


def recipient_dict(r: NotifyRecipient, c: NotifyCursor | None) -> dict[str, Any]:
    """A recipient with its delivery state, as ``custody notify recipient list`` shows it."""
    return {
        "id": r.id,
        "kind": r.kind,
        "target": r.target,
        "pgp_fingerprint": r.pgp_fingerprint,
        "encrypted": r.pgp_fingerprint is not None,
        "active": r.active,
        "created_at": iso(r.created_at),
        "removed_at": iso(r.removed_at),
        "delivered_seq": c.delivered_seq if c else None,
        "delivered": c.delivered_count if c else 0,
        "last_delivered_at": iso(c.last_delivered_at) if c else None,
        "attempts": c.attempts if c else 0,
        "next_attempt_at": iso(c.next_attempt_at) if c else None,
        "last_error": c.last_error if c else None,
    }


def _logged(row: NotifyRecipient) -> dict[str, Any]:
    """How the audit log (and so every other recipient) names a recipient: a webhook URL
    redacted to its origin, with the full URL's SHA-256 to tell two apart."""
    if row.kind == WEBHOOK:
        return {
            "recipient_id": row.id,
            "kind": row.kind,
            "target": webhook.redact(row.target),
            "target_sha256": hashlib.sha256(row.target.encode()).hexdigest(),
        }
    return {"recipient_id": row.id, "kind": row.kind, "target": row.target}


def _add(s: Session, kind: str, target: str, actor: str, **fields: Any) -> NotifyRecipient:
    existing = s.exec(
        select(NotifyRecipient).where(NotifyRecipient.kind == kind, NotifyRecipient.target == target)
    ).first()
    if existing is not None and existing.active:
        raise Conflict(f"{kind} recipient {target} exists already (remove it first to change it)")
    at = now()
    if existing is None:
        row = NotifyRecipient(kind=kind, target=target, created_at=at, **fields)
    else:  # re-added after removal: the same row, a fresh start
        row = existing
        row.active, row.created_at, row.removed_at = True, at, None
        for name, value in fields.items():
            setattr(row, name, value)
    s.add(row)
    s.flush()
    entry = audit_log.append(
        s,
        "notify.recipient_added",
        actor,
        _logged(row) | {"pgp_fingerprint": fields.get("pgp_fingerprint")},
    )
    # A new recipient hears of what happens from now on (its own addition excluded).
    outbox.start_cursor(s, row.id or 0, entry.seq)
    return row


def add_email(db: Database, address: str, public_key: str | None = None, *, actor: str = "operator") -> dict[str, Any]:
    """Register an email recipient; with ``public_key`` (armored), mail to it is encrypted too.

    Raises InputError (address, key), Conflict (registered already), GnuPGMissing.
    """
    address = check_email(address)
    fingerprint = armored = None
    if public_key is not None:
        key = mail.inspect_public_key(public_key)
        fingerprint, armored = key.fingerprint, key.armored
    db.check_schema()
    with db.transaction() as s:
        row = _add(s, EMAIL, address, actor, pgp_fingerprint=fingerprint, pgp_key=armored, secret_sha256=None)
        return recipient_dict(row, s.get(NotifyCursor, row.id))


def _write_secret(secrets_dir: Path, path: Path, secret: bytes) -> None:
    """Write the secret atomically, readable by this user only. Raises InputError."""
    try:
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot store the webhook secret under {secrets_dir}: {exc.strerror}") from None


def add_webhook(
    db: Database, settings: Settings, url: str, secret: bytes, *, actor: str = "operator"
) -> dict[str, Any]:
    """Register a webhook; its secret goes to ``HOME/notify/webhooks/ID.secret`` (0600), not the store.

    Raises InputError (URL, secret), Conflict (registered already).
    """
    url = webhook.check_url(url.strip())
    secret = webhook.check_secret(secret)
    db.check_schema()
    secrets_dir = webhook_secrets_dir(settings)
    with db.transaction() as s:
        digest = hashlib.sha256(secret).hexdigest()
        row = _add(s, WEBHOOK, url, actor, pgp_fingerprint=None, pgp_key=None, secret_sha256=digest)
        # Written before the commit: a failure here rolls the registration back.
        _write_secret(secrets_dir, secret_path(secrets_dir, row.id or 0), secret)
        return recipient_dict(row, s.get(NotifyCursor, row.id))


def remove(db: Database, kind: str, target: str, *, actor: str = "operator") -> dict[str, Any]:
    """Stop notifying a recipient, named by its address, URL or id. Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        query = select(NotifyRecipient).where(NotifyRecipient.kind == kind, col(NotifyRecipient.active))
        rows = [r for r in s.exec(query).all() if r.target == target or str(r.id) == target]
        if not rows:
            raise NotFound(f"no {kind} recipient {target!r}")
        row = rows[0]
        row.active, row.removed_at = False, now()
        s.add(row)
        audit_log.append(s, "notify.recipient_removed", actor, _logged(row))
        return recipient_dict(row, s.get(NotifyCursor, row.id))


def recipients(db: Database, *, include_removed: bool = False) -> list[dict[str, Any]]:
    """Registered recipients with their delivery state."""
    db.check_schema()
    with db.transaction() as s:
        query = select(NotifyRecipient).order_by(col(NotifyRecipient.id))
        if not include_removed:
            query = query.where(col(NotifyRecipient.active))
        return [recipient_dict(r, s.get(NotifyCursor, r.id)) for r in s.exec(query).all()]


def active(s: Session) -> list[NotifyRecipient]:
    """The recipients to tell, in the order they were added."""
    return list(
        s.exec(select(NotifyRecipient).where(col(NotifyRecipient.active)).order_by(col(NotifyRecipient.id))).all()
    )


def has_recipients(db: Database) -> bool:
    """Whether any recipient is registered."""
    with db.transaction(read_only=True) as s:
        return s.exec(select(NotifyRecipient.id).where(col(NotifyRecipient.active)).limit(1)).first() is not None
