"""``/metrics`` of ``custody serve``: the Prometheus text format, read from the store at each scrape.

Reserves minus liabilities come from the last ``audit.reserves`` entry of the audit log (what
``custody audit reserves`` recorded), never from a live scan of the chain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select

from custody.clock import aware, now, parse_iso
from custody.config import Settings
from custody.control import halt as halt_lib
from custody.control import halt_file
from custody.control.halt_state import with_waiting
from custody.errors import CustodyError
from custody.notify import delivery
from custody.store.db import Database
from custody.store.models import AuditEntry, DepositRow, WithdrawalRow

PENDING = ("requested", "approved")
"""Withdrawals waiting for people: requested (approvals to come) and approved (signatures to come)."""


def snapshot(db: Database, settings: Settings, halt: Callable[[], halt_lib.HaltState] | None = None) -> dict[str, Any]:
    """The figures /metrics publishes (NaN where unknown). Never raises: a store that cannot
    be read shows as halted with ``store_up`` 0. ``halt``: the halt read of the service (its
    HaltReader, whose checks GET /v1/halt answers by); else read from the store."""
    stamp = now()
    out: dict[str, Any] = {"store_up": 1.0}
    state = with_waiting((halt or (lambda: halt_lib.read_state(db)))(), settings.halt_file)  # as GET /v1/halt
    out["halted"] = 1.0 if state.halted else 0.0
    current = halt_file.read(settings.halt_file)
    doc = current.doc if current is not None else None
    updated = parse_iso(doc.get("updated_at")) if isinstance(doc, dict) else None
    until = parse_iso(doc.get("valid_until")) if isinstance(doc, dict) else None
    out["lease_age"] = (stamp - updated).total_seconds() if updated else math.nan
    out["lease_remaining"] = (until - stamp).total_seconds() if until else math.nan
    out["withdrawals"] = {}
    out["oldest_pending_age"] = 0.0
    out["synced_height"] = math.nan
    out["reserves_minus_liabilities"] = math.nan
    out["audit_reserves_height"] = math.nan
    out["notification_backlog"] = math.nan
    try:
        db.check_schema()
        with db.transaction() as s:
            for status, n in s.exec(
                select(WithdrawalRow.status, func.count()).group_by(col(WithdrawalRow.status))
            ).all():
                out["withdrawals"][status] = float(n)
            oldest = s.exec(
                select(func.min(WithdrawalRow.created_at)).where(col(WithdrawalRow.status).in_(PENDING))
            ).first()
            if oldest is not None:
                out["oldest_pending_age"] = (stamp - aware(oldest)).total_seconds()
            heights = [
                s.exec(select(func.max(DepositRow.height))).first(),
                s.exec(select(func.max(WithdrawalRow.block_height))).first(),
            ]
            seen = [h for h in heights if h is not None]
            if seen:
                out["synced_height"] = float(max(seen))
            last = s.exec(
                select(AuditEntry).where(AuditEntry.event == "audit.reserves").order_by(col(AuditEntry.seq).desc())
            ).first()
            if last is not None:
                payload = json.loads(last.payload)
                out["reserves_minus_liabilities"] = float(payload["reserves_sat"] - payload["liabilities_sat"])
                out["audit_reserves_height"] = float(payload["height"])
        out["notification_backlog"] = float(sum(len(r["pending"]) for r in delivery.pending(db, settings)))
    except (CustodyError, KeyError, TypeError, ValueError):
        out["store_up"] = 0.0
    return out


class CustodyCollector(Collector):
    """A prometheus_client collector that reads :func:`snapshot` at each scrape."""

    def __init__(self, db: Database, settings: Settings, halt: Callable[[], halt_lib.HaltState] | None = None) -> None:
        self.db = db
        self.settings = settings
        self.halt = halt

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.db, self.settings, self.halt)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("custody_store_up", "1 when the store could be read at this scrape.", snap["store_up"])
        yield gauge("custody_halted", "1 while trading is halted (or the state cannot be read).", snap["halted"])
        yield gauge(
            "custody_halt_lease_age_seconds",
            "Seconds since this machine's halt file was last written (NaN: no file).",
            snap["lease_age"],
        )
        yield gauge(
            "custody_halt_lease_remaining_seconds",
            "Seconds until this machine's halt file expires (negative: expired, a halt for the engine).",
            snap["lease_remaining"],
        )
        by_status = GaugeMetricFamily("custody_withdrawals", "Withdrawals by status.", labels=["status"])
        for status in sorted(set(snap["withdrawals"]) | set(PENDING)):
            by_status.add_metric([status], snap["withdrawals"].get(status, 0.0))
        yield by_status
        yield gauge(
            "custody_withdrawal_oldest_pending_age_seconds",
            "Age of the oldest withdrawal requested or approved and not yet signed (0: none).",
            snap["oldest_pending_age"],
        )
        yield gauge(
            "custody_last_synced_height",
            "The highest block at which a sync recorded a deposit or a withdrawal's confirmation.",
            snap["synced_height"],
        )
        yield gauge(
            "custody_notification_backlog",
            "Notifications not delivered yet, summed over recipients.",
            snap["notification_backlog"],
        )
        yield gauge(
            "custody_reserves_minus_liabilities_sat",
            "Reserves minus liabilities in satoshis, from the last audit.reserves entry of the audit log.",
            snap["reserves_minus_liabilities"],
        )
        yield gauge(
            "custody_audit_reserves_height",
            "The block height of that last reserves audit.",
            snap["audit_reserves_height"],
        )
