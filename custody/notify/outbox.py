"""The outbox is the audit log: each recipient's cursor, lease, pending entries and backoff.

The audit log is written in the same database transaction as every custody event, so it is
the notifications' outbox: nothing is queued when an event happens, and nothing can be lost
between the event and its notification. Each recipient has a cursor (the last audit entry
delivered to it); its pending notifications are the notifiable entries after the cursor,
sent one at a time, in order. A failed send keeps the entry pending and backs off
(30 s, 1 min, 2 min ... at most 1 h; ``force`` ignores that). A deliverer leases the
recipient for its time budget, so two processes never send the same entry at once; only a
crash between a successful send and the cursor's commit can repeat one, with the same
Message-ID / ``X-Custody-Delivery`` for the receiver to drop.

Every function here is one short database transaction on one recipient's cursor; what is
sent, and how, is :mod:`custody.notify.delivery`'s business.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.notify.catalog import EVENTS, PREFIXES, Notification, notification_for
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead, NotifyCursor

BACKOFF_BASE = 30.0
BACKOFF_CAP = 3600.0
PAGE = 200
"""Audit entries read per query while looking for notifiable ones."""


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failures: 30, 60, 120 ... at most 3600."""
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempts - 1, 0)))


def aware(value: datetime | None) -> datetime | None:
    """A stored time as UTC-aware (SQLite hands them back naive)."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def head_seq(s: Session) -> int:
    """The audit log's last entry."""
    head = s.get(AuditHead, 1)
    return head.seq if head else 0


def candidates(s: Session, after: int, upto: int, limit: int) -> list[AuditEntry]:
    """Audit entries in (after, upto] whose event may be told, oldest first, at most ``limit``."""
    query = (
        select(AuditEntry)
        .where(col(AuditEntry.seq) > after, col(AuditEntry.seq) <= upto)
        .where(or_(col(AuditEntry.event).in_(EVENTS), *[col(AuditEntry.event).startswith(p) for p in PREFIXES]))
        .order_by(col(AuditEntry.seq))
        .limit(limit)
    )
    return list(s.exec(query).all())


def has_pending(s: Session, start: int) -> bool:
    """Whether any entry after ``start`` may be told (a cheap look: no write, no lease)."""
    return bool(candidates(s, start, head_seq(s), 1))


def pending_in(s: Session, start: int, upto: int, limit: int) -> list[dict[str, Any]]:
    """The notifications after ``start`` up to ``upto``, oldest first, at most ``limit``."""
    items: list[dict[str, Any]] = []
    after = start
    while len(items) < limit:
        batch = candidates(s, after, upto, PAGE)
        for e in batch:
            n = notification_for(e)
            if n is not None and len(items) < limit:
                items.append({"seq": n.seq, "at": n.at, "event": n.event, "title": n.title})
        if len(batch) < PAGE:
            break
        after = batch[-1].seq
    return items


def start_cursor(s: Session, rid: int, seq: int) -> None:
    """Place a (re-)added recipient's cursor at ``seq`` with no retry state and no lease:
    it hears of what happens from then on."""
    cursor = s.get(NotifyCursor, rid)
    if cursor is None:
        cursor = NotifyCursor(recipient_id=rid, delivered_seq=seq)
    cursor.delivered_seq, cursor.failing_seq, cursor.attempts = seq, None, 0
    cursor.next_attempt_at, cursor.last_error, cursor.lease_owner, cursor.lease_until = None, None, None, None
    s.add(cursor)


def _locked(s: Session, rid: int) -> NotifyCursor | None:
    return s.exec(select(NotifyCursor).where(NotifyCursor.recipient_id == rid).with_for_update()).first()


def claim(db: Database, rid: int, owner: str, force: bool, lease: float) -> int | str:
    """Lease the recipient; its delivered seq, or why not (busy, backing off)."""
    with db.transaction() as s:
        c = _locked(s, rid)
        if c is None:
            c = NotifyCursor(recipient_id=rid, delivered_seq=0)
        at = now()
        until = aware(c.lease_until)
        if until is not None and until > at and c.lease_owner != owner:
            return "another process is delivering to it"
        retry_at = aware(c.next_attempt_at)
        if not force and retry_at is not None and retry_at > at:
            return f"backing off until {iso(retry_at)} after {c.attempts} failed attempt(s)"
        c.lease_owner, c.lease_until = owner, at + timedelta(seconds=lease)
        s.add(c)
        return c.delivered_seq


def release(db: Database, rid: int, owner: str) -> None:
    """Give up the lease ``owner`` holds on the recipient (none held: nothing happens)."""
    with db.transaction() as s:
        c = _locked(s, rid)
        if c is not None and c.lease_owner == owner:
            c.lease_owner, c.lease_until = None, None
            s.add(c)


def advance(db: Database, rid: int, seq: int, delivered: bool) -> None:
    """Move the cursor to ``seq`` (never back); reset the retry state it leaves behind."""
    with db.transaction() as s:
        c = _locked(s, rid)
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


def fail(db: Database, rid: int, seq: int, error: str) -> tuple[int, datetime]:
    """Count a failed send of entry ``seq``; its attempts so far and when to try again."""
    with db.transaction() as s:
        c = _locked(s, rid)
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


def next_batch(db: Database, rid: int, after: int) -> list[Notification]:
    """The next notifiable entries after ``after``; moves the cursor over entries not notified."""
    while True:
        with db.transaction() as s:
            upto = head_seq(s)
            rows = candidates(s, after, upto, PAGE)
        found = [n for n in (notification_for(e) for e in rows) if n is not None]
        if found:
            return found
        # Nothing to tell up to here: move the cursor on so the next look starts there.
        skip_to = rows[-1].seq if len(rows) == PAGE else upto
        if skip_to > after:
            advance(db, rid, skip_to, delivered=False)
        if len(rows) < PAGE:
            return []
        after = skip_to
