"""Signed notifications derived from the audit log: PGP-signed mail and signed webhooks.

The audit log is written in the same database transaction as every custody event, so it is
this module's outbox: nothing is queued when an event happens, and nothing can be lost
between the event and its notification. Each recipient has a cursor (the last audit entry
delivered to it); its pending notifications are the notifiable entries after the cursor,
sent one at a time, in order. A failed send keeps the entry pending and backs off
(30 s, 1 min, 2 min ... at most 1 h; ``force`` ignores that). A deliverer leases the
recipient for its time budget, so two processes never send the same entry at once; only a
crash between a successful send and the cursor's commit can repeat one, with the same
Message-ID / ``X-Custody-Delivery`` for the receiver to drop.

Delivery happens after the event's transaction, never in it: a halt is committed (and the
halt file written) whatever the mail server or webhook receivers do.

What is notified (:func:`notification_for`):

* ``halt.raised`` (a ledger or reserves audit failure raises one with that source),
  ``halt.lifted``;
* ``verification.run`` with failures;
* ``withdrawal.requested``, ``.approved`` (each employee's approval), ``.batched``,
  ``.finalized`` (told as "signed": the final transaction exists, built from m founders'
  signatures; a signatures import that does not complete it is not told), ``.broadcast``,
  ``.confirmed``, ``.failed``;
* every ``audit.*`` event (ledger and reserve audits);
* ``notify.recipient_added`` and ``.recipient_removed``, so that the others learn of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import smtplib
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, SQLModel, col, select

from custody.bitcoin.amounts import format_btc
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.errors import Conflict, CustodyError, InputError, NotFound
from custody.notify import mail as pgp_mime
from custody.notify import webhook
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead, NotifyCursor, NotifyRecipient

EMAIL = "email"
WEBHOOK = "webhook"
BACKOFF_BASE = 30.0
BACKOFF_CAP = 3600.0
DEFAULT_HOOK_TIMEOUT = 5.0
SEND_TIMEOUT = 20.0
_PAGE = 200
_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

_EXACT = (
    "halt.raised",
    "halt.lifted",
    "verification.run",
    "withdrawal.requested",
    "withdrawal.approved",
    "withdrawal.batched",
    "withdrawal.finalized",
    "withdrawal.broadcast",
    "withdrawal.confirmed",
    "withdrawal.failed",
    "notify.recipient_added",
    "notify.recipient_removed",
)
_PREFIXES = ("audit.",)


# ---------------------------------------------------------------- configuration


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _secret_from(env: Mapping[str, str], name: str) -> str | None:
    """``NAME_FILE`` (first line of that file), else ``NAME``; never a command-line argument."""
    path = env.get(f"{name}_FILE")
    if path:
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {name}_FILE {path}: {exc}") from None
        if not lines or not lines[0]:
            raise InputError(f"{name}_FILE {path} is empty")
        return lines[0]
    return env.get(name) or None


@dataclass(frozen=True)
class NotifyConfig:
    """Notification settings from ``CUSTODY_*`` variables, resolved against the custody home."""

    gnupg_home: Path
    secrets_dir: Path
    smtp_url: str | None = None
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    mail_from: str | None = None
    key_passphrase: str | None = field(default=None, repr=False)
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT

    @classmethod
    def load(cls, settings: Settings, env: Mapping[str, str] | None = None) -> NotifyConfig:
        """Raises InputError for an unreadable secret file, a bad SMTP URL or timeout."""
        env = os.environ if env is None else env
        home = env.get("CUSTODY_GNUPGHOME") or str(settings.home / "gnupg")
        try:
            timeout = float(env.get("CUSTODY_NOTIFY_TIMEOUT") or DEFAULT_HOOK_TIMEOUT)
        except ValueError:
            raise InputError("CUSTODY_NOTIFY_TIMEOUT must be a number of seconds") from None
        smtp_url = env.get("CUSTODY_SMTP_URL") or None
        if smtp_url:
            parse_smtp_url(smtp_url)
        return cls(
            gnupg_home=Path(home).expanduser(),
            secrets_dir=settings.home / "notify" / "webhooks",
            smtp_url=smtp_url,
            smtp_starttls=_flag(env.get("CUSTODY_SMTP_STARTTLS")),
            smtp_user=env.get("CUSTODY_SMTP_USER") or None,
            smtp_password=_secret_from(env, "CUSTODY_SMTP_PASSWORD"),
            mail_from=env.get("CUSTODY_NOTIFY_FROM") or None,
            key_passphrase=_secret_from(env, "CUSTODY_NOTIFY_PASSPHRASE"),
            hook_timeout=timeout,
        )


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool


def parse_smtp_url(url: str) -> SmtpTarget:
    """``smtp://host[:port]`` (port 25) or ``smtps://host[:port]`` (TLS from the start, 465).

    Raises InputError for another scheme or a password in the URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise InputError(f"CUSTODY_SMTP_URL must be smtp://host:port or smtps://host:port, not {url!r}")
    if parts.password:
        raise InputError("no password in CUSTODY_SMTP_URL: use CUSTODY_SMTP_PASSWORD_FILE")
    if not parts.hostname:
        raise InputError("CUSTODY_SMTP_URL has no host")
    try:
        port = parts.port or (465 if parts.scheme == "smtps" else 25)
    except ValueError:
        raise InputError("CUSTODY_SMTP_URL has a bad port") from None
    return SmtpTarget(parts.hostname, port, parts.scheme == "smtps")


# ---------------------------------------------------------------- what is notified


@dataclass(frozen=True)
class Notification:
    """One audit entry told to recipients."""

    seq: int
    at: str
    event: str
    actor: str
    payload: dict[str, Any]
    hash: str
    kind: str
    severity: str  # critical, info
    title: str

    def document(self) -> dict[str, Any]:
        """The JSON a webhook receives (and a mail carries)."""
        return {
            "format": "custody-notification",
            "version": 1,
            "notification": self.kind,
            "severity": self.severity,
            "title": self.title,
            "audit": {
                "seq": self.seq,
                "at": self.at,
                "event": self.event,
                "actor": self.actor,
                "payload": self.payload,
                "hash": self.hash,
            },
        }


def _wid(p: dict[str, Any]) -> str:
    return f"#{p.get('withdrawal_id', '?')}"


def _amount(p: dict[str, Any]) -> str:
    value = p.get("amount")
    return f"{format_btc(value)} BTC" if isinstance(value, int) else "?"


def _describe(event: str, actor: str, p: dict[str, Any]) -> tuple[str, str, str] | None:
    """(kind, severity, title) for a notifiable event, None for the rest."""
    if event == "halt.raised":
        source = str(p.get("source", "?"))
        if source in ("ledger", "reserves"):
            return (
                f"audit.{source}_failed",
                "critical",
                f"HALT: {source} audit failed, trading halted (halt #{p.get('halt_id')}): {p.get('reason')}",
            )
        return (
            event,
            "critical",
            f"HALT: trading halted by {actor} (halt #{p.get('halt_id')}, {source}): {p.get('reason')}",
        )
    if event == "halt.lifted":
        signers = p.get("signers") or [actor]
        return event, "critical", f"Halt #{p.get('halt_id')} lifted by {' and '.join(map(str, signers))}"
    if event == "verification.run":
        failures = p.get("failures")
        if not isinstance(failures, int) or failures <= 0:
            return None
        return (
            "verification.failed",
            "critical",
            f"Address verification FAILED: {failures} problem(s) in {p.get('checked')} checked ({p.get('source')})",
        )
    if event == "withdrawal.requested":
        return event, "info", f"Withdrawal {_wid(p)} requested by {actor}: {_amount(p)} to {p.get('destination')}"
    if event == "withdrawal.approved":
        return event, "info", f"Withdrawal {_wid(p)} approved by {actor}"
    if event == "withdrawal.batched":
        members = ", ".join(f"#{m}" for m in p.get("members") or [])
        return event, "info", f"Withdrawal batch #{p.get('batch_id')} created by {actor} of {members}"
    if event == "withdrawal.finalized":
        return "withdrawal.signed", "info", f"Withdrawal {_wid(p)} signed by the founders: txid {p.get('txid')}"
    if event == "withdrawal.broadcast":
        return event, "info", f"Withdrawal {_wid(p)} broadcast: txid {p.get('txid')}"
    if event == "withdrawal.confirmed":
        return event, "info", f"Withdrawal {_wid(p)} confirmed at height {p.get('height')}: txid {p.get('txid')}"
    if event == "withdrawal.failed":
        return event, "critical", f"Withdrawal {_wid(p)} failed: {p.get('reason')}"
    if event in ("notify.recipient_added", "notify.recipient_removed"):
        verb = "added" if event.endswith("added") else "removed"
        return event, "critical", f"Notification recipient {verb} by {actor}: {p.get('kind')} {p.get('target')}"
    if event.startswith(_PREFIXES):
        failed = p.get("ok") is False or (isinstance(p.get("failures"), int) and p["failures"] > 0)
        return event, "critical", f"{'AUDIT FAILED' if failed else 'Audit'}: {event} by {actor}"
    return None


def notification_for(entry: AuditEntry) -> Notification | None:
    """The notification an audit entry makes, or None when it is not notified."""
    try:
        payload = json.loads(entry.payload)
    except ValueError:
        payload = {"raw": entry.payload}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    described = _describe(entry.event, entry.actor, payload)
    if described is None:
        return None
    kind, severity, title = described
    title = " ".join(title.split())[:300]  # one line: it becomes a mail subject
    return Notification(
        entry.seq,
        iso(entry.at, "microseconds") or "",
        entry.event,
        entry.actor,
        payload,
        entry.hash,
        kind,
        severity,
        title,
    )


def _candidates(s: Session, after: int, upto: int, limit: int) -> list[AuditEntry]:
    query = (
        select(AuditEntry)
        .where(col(AuditEntry.seq) > after, col(AuditEntry.seq) <= upto)
        .where(or_(col(AuditEntry.event).in_(_EXACT), *[col(AuditEntry.event).startswith(p) for p in _PREFIXES]))
        .order_by(col(AuditEntry.seq))
        .limit(limit)
    )
    return list(s.exec(query).all())


# ---------------------------------------------------------------- recipients


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def ensure_tables(db: Database) -> None:
    """Create the notification tables in a store made before they existed (idempotent)."""
    tables = [SQLModel.metadata.tables[NotifyRecipient.__tablename__], SQLModel.metadata.tables["notify_cursor"]]
    try:
        SQLModel.metadata.create_all(db.engine, tables=tables, checkfirst=True)
    except Exception as exc:  # noqa: BLE001 - any driver error is a storage problem here
        raise CustodyError(f"cannot create the notification tables: {exc}") from None


def _has_tables(db: Database) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(db.engine).has_table("notify_cursor"))


def _head_seq(s: Session) -> int:
    head = s.get(AuditHead, 1)
    return head.seq if head else 0


def _recipient_dict(r: NotifyRecipient, c: NotifyCursor | None) -> dict[str, Any]:
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


def check_email(address: str) -> str:
    """Raises InputError unless ``address`` is a plain ``local@domain`` address."""
    address = address.strip()
    if not _EMAIL_RE.match(address) or ".." in address.split("@")[1] or len(address) > 254:
        raise InputError(f"not an email address: {address!r} (expected local@domain)")
    return address


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
    cursor = s.get(NotifyCursor, row.id)
    if cursor is None:
        cursor = NotifyCursor(recipient_id=row.id or 0, delivered_seq=entry.seq)
    cursor.delivered_seq, cursor.failing_seq, cursor.attempts = entry.seq, None, 0
    cursor.next_attempt_at, cursor.last_error, cursor.lease_owner, cursor.lease_until = None, None, None, None
    s.add(cursor)
    return row


def add_email(db: Database, address: str, public_key: str | None = None, *, actor: str = "operator") -> dict[str, Any]:
    """Register an email recipient; with ``public_key`` (armored), mail to it is encrypted too.

    Raises InputError (address, key), Conflict (registered already), GnuPGMissing.
    """
    address = check_email(address)
    fingerprint = armored = None
    if public_key is not None:
        key = pgp_mime.inspect_public_key(public_key)
        fingerprint, armored = key.fingerprint, key.armored
    db.check_schema()
    ensure_tables(db)
    with db.transaction() as s:
        row = _add(s, EMAIL, address, actor, pgp_fingerprint=fingerprint, pgp_key=armored, secret_sha256=None)
        return _recipient_dict(row, s.get(NotifyCursor, row.id))


def _secret_path(config: NotifyConfig, recipient_id: int) -> Path:
    return config.secrets_dir / f"{recipient_id}.secret"


def add_webhook(
    db: Database, config: NotifyConfig, url: str, secret: bytes, *, actor: str = "operator"
) -> dict[str, Any]:
    """Register a webhook; its secret goes to ``HOME/notify/webhooks/ID.secret`` (0600), not the store.

    Raises InputError (URL, secret), Conflict (registered already).
    """
    url = webhook.check_url(url.strip())
    secret = webhook.check_secret(secret)
    db.check_schema()
    ensure_tables(db)
    with db.transaction() as s:
        digest = hashlib.sha256(secret).hexdigest()
        row = _add(s, WEBHOOK, url, actor, pgp_fingerprint=None, pgp_key=None, secret_sha256=digest)
        path = _secret_path(config, row.id or 0)
        try:
            config.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secret)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise InputError(f"cannot store the webhook secret under {config.secrets_dir}: {exc.strerror}") from None
        return _recipient_dict(row, s.get(NotifyCursor, row.id))


def remove(db: Database, kind: str, target: str, *, actor: str = "operator") -> dict[str, Any]:
    """Stop notifying a recipient, named by its address, URL or id. Raises NotFound."""
    db.check_schema()
    ensure_tables(db)
    with db.transaction() as s:
        query = select(NotifyRecipient).where(NotifyRecipient.kind == kind, col(NotifyRecipient.active))
        rows = [r for r in s.exec(query).all() if r.target == target or str(r.id) == target]
        if not rows:
            raise NotFound(f"no {kind} recipient {target!r}")
        row = rows[0]
        row.active, row.removed_at = False, now()
        s.add(row)
        audit_log.append(s, "notify.recipient_removed", actor, _logged(row))
        return _recipient_dict(row, s.get(NotifyCursor, row.id))


def recipients(db: Database, *, include_removed: bool = False) -> list[dict[str, Any]]:
    """Registered recipients with their delivery state."""
    db.check_schema()
    if not _has_tables(db):
        return []
    with db.transaction() as s:
        query = select(NotifyRecipient).order_by(col(NotifyRecipient.id))
        if not include_removed:
            query = query.where(col(NotifyRecipient.active))
        return [_recipient_dict(r, s.get(NotifyCursor, r.id)) for r in s.exec(query).all()]


# ---------------------------------------------------------------- channels


class _SendFailed(Exception):
    """One send failed; the entry stays pending."""


class _NotHere(Exception):
    """This machine cannot deliver to the recipient (no SMTP server, key or secret here)."""


class _Channel:
    def send(self, n: Notification, timeout: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _MailChannel(_Channel):
    def __init__(self, config: NotifyConfig, r: NotifyRecipient, key: pgp_mime.SystemKey) -> None:
        if not config.smtp_url:
            raise _NotHere("CUSTODY_SMTP_URL is not set")
        self.config, self.recipient, self.key = config, r, key
        self.target = parse_smtp_url(config.smtp_url)
        self.sender = config.mail_from or key.email or ""
        if not self.sender:
            raise _NotHere("no sender address: set CUSTODY_NOTIFY_FROM")
        self.smtp: smtplib.SMTP | None = None

    def _connect(self, timeout: float) -> smtplib.SMTP:
        if self.smtp is not None:
            return self.smtp
        t = self.target
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if t.implicit_tls:
            smtp = smtplib.SMTP_SSL(t.host, t.port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(t.host, t.port, timeout=timeout)
            if self.config.smtp_starttls:
                smtp.starttls(context=context)
        if self.config.smtp_user:
            smtp.login(self.config.smtp_user, self.config.smtp_password or "")
        self.smtp = smtp
        return smtp

    def send(self, n: Notification, timeout: float) -> None:
        r = self.recipient
        body = _mail_body(n, self.key)
        domain = self.sender.rsplit("@", 1)[-1]
        mail = pgp_mime.Mail(
            sender=self.sender,
            to=r.target,
            subject=f"[custody] {n.title}",
            body=body,
            message_id=f"<custody.{n.hash[:32]}.{r.id}@{domain}>",
            encrypt_to=r.pgp_fingerprint,
            encrypt_key=r.pgp_key,
            hidden_subject=f"[custody] notification #{n.seq} ({n.severity})",
        )
        try:
            data = pgp_mime.build_mail(self.config.gnupg_home, self.key, self.config.key_passphrase, mail)
        except CustodyError as exc:
            raise _SendFailed(str(exc)) from None
        try:
            self._connect(timeout).sendmail(self.sender, [r.target], data)
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise _SendFailed(f"SMTP {self.target.host}:{self.target.port}: {exc}") from None

    def close(self) -> None:
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self.smtp = None


def _mail_body(n: Notification, key: pgp_mime.SystemKey) -> str:
    return "\n".join(
        [
            f"custody: {n.title}",
            "",
            f"severity:  {n.severity}",
            f"event:     {n.event} (audit log entry {n.seq})",
            f"at:        {n.at}",
            f"actor:     {n.actor}",
            f"hash:      {n.hash}",
            "",
            json.dumps(n.document(), indent=2, sort_keys=True, ensure_ascii=False),
            "",
            f"Signed with the custody system key {key.fingerprint}",
            "(published with `custody notify key export`). Check the signature before you act on this message.",
            "",
        ]
    )


class _WebhookChannel(_Channel):
    def __init__(self, config: NotifyConfig, r: NotifyRecipient) -> None:
        path = _secret_path(config, r.id or 0)
        try:
            secret = path.read_bytes()
        except OSError:
            raise _NotHere(f"its secret is not on this machine ({path})") from None
        if hashlib.sha256(secret).hexdigest() != r.secret_sha256:
            raise _NotHere(f"the secret in {path} is not the one registered")
        self.secret, self.recipient = secret, r

    def send(self, n: Notification, timeout: float) -> None:
        body = json.dumps(n.document(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {
            "X-Custody-Event": n.kind,
            "X-Custody-Seq": str(n.seq),
            "X-Custody-Delivery": f"{n.hash[:32]}.{self.recipient.id}",
        }
        try:
            webhook.post(self.recipient.target, self.secret, body, headers, timeout=timeout)
        except webhook.WebhookFailed as exc:
            raise _SendFailed(str(exc)) from None


# ---------------------------------------------------------------- delivery


@dataclass
class DeliveryReport:
    """What one delivery run did."""

    delivered: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # not deliverable here, busy, backing off
    timed_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "skipped": self.skipped,
            "timed_out": self.timed_out,
        }


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failures: 30, 60, 120 ... at most 3600."""
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempts - 1, 0)))


def _claim(db: Database, rid: int, owner: str, force: bool, lease: float) -> int | str:
    """Lease the recipient; its delivered seq, or why not (busy, backing off)."""
    with db.transaction() as s:
        c = s.exec(select(NotifyCursor).where(NotifyCursor.recipient_id == rid).with_for_update()).first()
        if c is None:
            c = NotifyCursor(recipient_id=rid, delivered_seq=0)
        at = now()
        until = _aware(c.lease_until)
        if until is not None and until > at and c.lease_owner != owner:
            return "another process is delivering to it"
        retry_at = _aware(c.next_attempt_at)
        if not force and retry_at is not None and retry_at > at:
            return f"backing off until {iso(retry_at)} after {c.attempts} failed attempt(s)"
        c.lease_owner, c.lease_until = owner, at + timedelta(seconds=lease)
        s.add(c)
        return c.delivered_seq


def _release(db: Database, rid: int, owner: str) -> None:
    with db.transaction() as s:
        c = s.exec(select(NotifyCursor).where(NotifyCursor.recipient_id == rid).with_for_update()).first()
        if c is not None and c.lease_owner == owner:
            c.lease_owner, c.lease_until = None, None
            s.add(c)


def _advance(db: Database, rid: int, seq: int, delivered: bool) -> None:
    """Move the cursor to ``seq`` (never back); reset the retry state it leaves behind."""
    with db.transaction() as s:
        c = s.exec(select(NotifyCursor).where(NotifyCursor.recipient_id == rid).with_for_update()).first()
        if c is None:
            return
        if seq > c.delivered_seq:
            c.delivered_seq = seq
            if delivered:
                c.delivered_count += 1
                c.last_delivered_at = now()
        if c.failing_seq is not None and c.failing_seq <= c.delivered_seq:
            c.failing_seq, c.attempts, c.next_attempt_at, c.last_error = None, 0, None, None
        s.add(c)


def _fail(db: Database, rid: int, seq: int, error: str) -> tuple[int, datetime]:
    with db.transaction() as s:
        c = s.exec(select(NotifyCursor).where(NotifyCursor.recipient_id == rid).with_for_update()).first()
        if c is None:
            c = NotifyCursor(recipient_id=rid, delivered_seq=0)
        c.attempts = c.attempts + 1 if c.failing_seq == seq else 1
        c.failing_seq = seq
        at = now()
        c.last_attempt_at = at
        c.next_attempt_at = at + timedelta(seconds=backoff(c.attempts))
        c.last_error = error[:1000]
        s.add(c)
        return c.attempts, c.next_attempt_at


def _next(db: Database, rid: int, after: int) -> list[Notification]:
    """The next notifiable entries after ``after``; moves the cursor over entries not notified."""
    while True:
        with db.transaction() as s:
            upto = _head_seq(s)
            rows = _candidates(s, after, upto, _PAGE)
        found = [n for n in (notification_for(e) for e in rows) if n is not None]
        if found:
            return found
        # Nothing to tell up to here: move the cursor on so the next look starts there.
        skip_to = rows[-1].seq if len(rows) == _PAGE else upto
        if skip_to > after:
            _advance(db, rid, skip_to, delivered=False)
        if len(rows) < _PAGE:
            return []
        after = skip_to


def _channel(config: NotifyConfig, r: NotifyRecipient, key_cache: dict[str, Any]) -> _Channel:
    if r.kind == WEBHOOK:
        return _WebhookChannel(config, r)
    if "key" not in key_cache:
        try:
            key_cache["key"] = pgp_mime.system_key(config.gnupg_home)
        except CustodyError as exc:
            key_cache["key"] = exc
    key = key_cache["key"]
    if isinstance(key, CustodyError):
        raise _NotHere(f"no system PGP key here: {key}")
    return _MailChannel(config, r, key)


def deliver_pending(
    db: Database,
    settings: Settings,
    *,
    timeout: float = DEFAULT_HOOK_TIMEOUT,
    force: bool = False,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryReport:
    """Send every pending notification to every active recipient, in order, within ``timeout`` s.

    Failed sends stay pending with their attempt counted and a backoff (``force`` ignores
    the backoff). Recipients this machine cannot serve (no SMTP URL, system key or webhook
    secret here) are skipped and keep their notifications. Raises InputError (settings),
    StorageError; a delivery problem is never raised, only reported.
    """
    report = DeliveryReport()
    if not _has_tables(db):
        return report
    config = NotifyConfig.load(settings, env)
    deadline = clock() + timeout
    with db.transaction() as s:
        rows = list(
            s.exec(select(NotifyRecipient).where(col(NotifyRecipient.active)).order_by(col(NotifyRecipient.id))).all()
        )
    owner = uuid.uuid4().hex
    key_cache: dict[str, Any] = {}
    for r in rows:
        rid = r.id or 0
        who = {"recipient_id": rid, "kind": r.kind, "target": r.target}
        if clock() >= deadline:
            report.timed_out = True
            report.skipped.append(who | {"reason": "out of time"})
            continue
        # Cheap look first: no lease (no write) when nothing is pending.
        with db.transaction() as s:
            c = s.get(NotifyCursor, rid)
            start = c.delivered_seq if c else 0
            if not _candidates(s, start, _head_seq(s), 1):
                continue
        try:
            channel = _channel(config, r, key_cache)
        except (_NotHere, CustodyError) as exc:
            report.skipped.append(who | {"reason": f"not deliverable from here: {exc}"})
            continue
        claimed = _claim(db, rid, owner, force, lease=max(deadline - clock(), 0) + 60)
        if isinstance(claimed, str):
            report.skipped.append(who | {"reason": claimed})
            channel.close()
            continue
        try:
            _deliver_to(db, r, channel, claimed, deadline, clock, report, who)
        finally:
            channel.close()
            _release(db, rid, owner)
    return report


def _deliver_to(
    db: Database,
    r: NotifyRecipient,
    channel: _Channel,
    after: int,
    deadline: float,
    clock: Callable[[], float],
    report: DeliveryReport,
    who: dict[str, Any],
) -> None:
    rid = r.id or 0
    while True:
        batch = _next(db, rid, after)
        if not batch:
            return
        for n in batch:
            remaining = deadline - clock()
            if remaining <= 0:
                report.timed_out = True
                report.skipped.append(who | {"reason": "out of time", "seq": n.seq})
                return
            try:
                channel.send(n, timeout=min(remaining, SEND_TIMEOUT))
            except _SendFailed as exc:
                attempts, retry_at = _fail(db, rid, n.seq, str(exc))
                report.failed.append(
                    who
                    | {
                        "seq": n.seq,
                        "event": n.event,
                        "error": str(exc),
                        "attempts": attempts,
                        "next_attempt_at": iso(retry_at),
                    }
                )
                return
            _advance(db, rid, n.seq, delivered=True)
            report.delivered.append(who | {"seq": n.seq, "event": n.event, "notification": n.kind})
            after = n.seq


def pending(
    db: Database, settings: Settings, *, limit: int = 1000, env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Each active recipient with its undelivered notifications (oldest first, at most ``limit``).

    Also says whether this machine can deliver to it. Raises StorageError.
    """
    db.check_schema()
    if not _has_tables(db):
        return []
    config = NotifyConfig.load(settings, env)
    key_cache: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    with db.transaction() as s:
        rows = list(
            s.exec(select(NotifyRecipient).where(col(NotifyRecipient.active)).order_by(col(NotifyRecipient.id))).all()
        )
        upto = _head_seq(s)
        for r in rows:
            c = s.get(NotifyCursor, r.id)
            start = c.delivered_seq if c else 0
            items: list[dict[str, Any]] = []
            after = start
            while len(items) < limit:
                batch = _candidates(s, after, upto, _PAGE)
                for e in batch:
                    n = notification_for(e)
                    if n is not None and len(items) < limit:
                        items.append({"seq": n.seq, "at": n.at, "event": n.event, "title": n.title})
                if len(batch) < _PAGE:
                    break
                after = batch[-1].seq
            entry = _recipient_dict(r, c) | {"pending": items}
            try:
                _channel(config, r, key_cache).close()
                entry["deliverable_here"], entry["not_here_because"] = True, None
            except (_NotHere, CustodyError) as exc:
                entry["deliverable_here"], entry["not_here_because"] = False, str(exc)
            out.append(entry)
    return out


def has_recipients(db: Database) -> bool:
    """Whether any recipient is registered (False for a store without the tables)."""
    if not _has_tables(db):
        return False
    with db.transaction() as s:
        return s.exec(select(NotifyRecipient.id).where(col(NotifyRecipient.active)).limit(1)).first() is not None
