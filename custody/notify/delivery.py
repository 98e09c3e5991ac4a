"""Delivery: each recipient's pending notifications sent over its channel, within a time budget.

Two channels: PGP/MIME mail over SMTP (:mod:`custody.notify.mail` builds the message) and
HMAC-signed webhooks (:mod:`custody.notify.webhook` posts them). Delivery happens after the
event's transaction, never in it: a halt is committed (and the halt file written) whatever
the mail server or webhook receivers do. A send that fails stays pending with a backoff
(:mod:`custody.notify.outbox`); a recipient this machine cannot serve (no SMTP server,
system key or webhook secret here) is skipped and keeps its notifications.
"""

from __future__ import annotations

import hashlib
import json
import smtplib
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custody.clock import iso
from custody.config import Settings
from custody.errors import CustodyError, InputError
from custody.files import SECRET_FILE_MAX, read_limited, read_limited_text
from custody.notify import mail, outbox, webhook
from custody.notify.catalog import Notification
from custody.notify.recipients import WEBHOOK, active, recipient_dict, secret_path, webhook_secrets_dir
from custody.store.db import Database
from custody.store.models import NotifyCursor, NotifyRecipient

DEFAULT_HOOK_TIMEOUT = 5.0
SEND_TIMEOUT = 20.0


# ---------------------------------------------------------------- configuration


def _secret(name: str, path: Path | None, value: str | None) -> str | None:
    """The first line of ``NAME_FILE`` when given, else ``NAME``; never a command-line argument.

    Raises InputError for a file that cannot be read or is empty.
    """
    if path is not None:
        try:
            lines = read_limited_text(path.expanduser(), SECRET_FILE_MAX, f"{name}_FILE").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read {name}_FILE {path}: {exc}") from None
        if not lines or not lines[0]:
            raise InputError(f"{name}_FILE {path} is empty")
        return lines[0]
    return value


@dataclass(frozen=True)
class NotifyConfig:
    """What delivery needs, from the settings: secret files read and values checked."""

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
    def load(cls, settings: Settings) -> NotifyConfig:
        """Raises InputError for an unreadable secret file, a bad SMTP URL or timeout."""
        try:
            timeout = float(settings.notify_timeout or DEFAULT_HOOK_TIMEOUT)
        except ValueError:
            raise InputError("CUSTODY_NOTIFY_TIMEOUT must be a number of seconds") from None
        if settings.smtp_url:
            parse_smtp_url(settings.smtp_url)
        return cls(
            gnupg_home=settings.gnupg_home,
            secrets_dir=webhook_secrets_dir(settings),
            smtp_url=settings.smtp_url,
            smtp_starttls=settings.smtp_starttls,
            smtp_user=settings.smtp_user,
            smtp_password=_secret("CUSTODY_SMTP_PASSWORD", settings.smtp_password_file, settings.smtp_password),
            mail_from=settings.notify_from,
            key_passphrase=_secret(
                "CUSTODY_NOTIFY_PASSPHRASE", settings.notify_passphrase_file, settings.notify_passphrase
            ),
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
    def __init__(self, config: NotifyConfig, r: NotifyRecipient, key: mail.SystemKey) -> None:
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
        message = mail.Mail(
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
            data = mail.build_mail(self.config.gnupg_home, self.key, self.config.key_passphrase, message)
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


def _mail_body(n: Notification, key: mail.SystemKey) -> str:
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
        path = secret_path(config.secrets_dir, r.id or 0)
        try:
            secret = read_limited(path, SECRET_FILE_MAX, "webhook secret file")
        except (OSError, InputError):
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


def _channel(config: NotifyConfig, r: NotifyRecipient, key_cache: dict[str, Any]) -> _Channel:
    if r.kind == WEBHOOK:
        return _WebhookChannel(config, r)
    if "key" not in key_cache:
        try:
            key_cache["key"] = mail.system_key(config.gnupg_home)
        except CustodyError as exc:
            key_cache["key"] = exc
    key = key_cache["key"]
    if isinstance(key, CustodyError):
        raise _NotHere(f"no system PGP key here: {key}")
    return _MailChannel(config, r, key)


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


def deliver_pending(
    db: Database,
    settings: Settings,
    *,
    timeout: float = DEFAULT_HOOK_TIMEOUT,
    force: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryReport:
    """Send every pending notification to every active recipient, in order, within ``timeout`` s.

    Failed sends stay pending with their attempt counted and a backoff (``force`` ignores
    the backoff). Recipients this machine cannot serve (no SMTP URL, system key or webhook
    secret here) are skipped and keep their notifications. Raises InputError (settings),
    StorageError; a delivery problem is never raised, only reported.
    """
    report = DeliveryReport()
    config = NotifyConfig.load(settings)
    deadline = clock() + timeout
    with db.transaction() as s:
        rows = active(s)
    owner = uuid.uuid4().hex
    key_cache: dict[str, Any] = {}
    for r in rows:
        rid = r.id or 0
        who = {"recipient_id": rid, "kind": r.kind, "target": r.target}
        if clock() >= deadline:
            report.timed_out = True
            report.skipped.append(who | {"reason": "out of time"})
            continue
        with db.transaction() as s:
            c = s.get(NotifyCursor, rid)
            if not outbox.has_pending(s, c.delivered_seq if c else 0):
                continue
        try:
            channel = _channel(config, r, key_cache)
        except (_NotHere, CustodyError) as exc:
            report.skipped.append(who | {"reason": f"not deliverable from here: {exc}"})
            continue
        claimed = outbox.claim(db, rid, owner, force, lease=max(deadline - clock(), 0) + 60)
        if isinstance(claimed, str):
            report.skipped.append(who | {"reason": claimed})
            channel.close()
            continue
        try:
            _deliver_to(db, rid, channel, claimed, deadline, clock, report, who)
        finally:
            channel.close()
            outbox.release(db, rid, owner)
    return report


def _deliver_to(
    db: Database,
    rid: int,
    channel: _Channel,
    after: int,
    deadline: float,
    clock: Callable[[], float],
    report: DeliveryReport,
    who: dict[str, Any],
) -> None:
    while True:
        batch = outbox.next_batch(db, rid, after)
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
                attempts, retry_at = outbox.fail(db, rid, n.seq, str(exc))
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
            outbox.advance(db, rid, n.seq, delivered=True)
            report.delivered.append(who | {"seq": n.seq, "event": n.event, "notification": n.kind})
            after = n.seq


def pending(db: Database, settings: Settings, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Each active recipient with its undelivered notifications (oldest first, at most ``limit``).

    Also says whether this machine can deliver to it. Raises StorageError.
    """
    db.check_schema()
    config = NotifyConfig.load(settings)
    key_cache: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    with db.transaction() as s:
        upto = outbox.head_seq(s)
        for r in active(s):
            c = s.get(NotifyCursor, r.id)
            items = outbox.pending_in(s, c.delivered_seq if c else 0, upto, limit)
            entry = recipient_dict(r, c) | {"pending": items}
            try:
                _channel(config, r, key_cache).close()
                entry["deliverable_here"], entry["not_here_because"] = True, None
            except (_NotHere, CustodyError) as exc:
                entry["deliverable_here"], entry["not_here_because"] = False, str(exc)
            out.append(entry)
    return out
