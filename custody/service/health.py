"""The operator's status: the halt's status view and what else decides whether custody runs.

:func:`operator_status` returns :func:`custody.control.incidents.status_view`'s dictionary
unchanged in its keys (``halted``, ``error``, ``components``, ``incidents``; what the status
page builds on) with these added:

* ``operational``: not halted, the store readable and the node answering; ``problems`` says
  why not, one sentence each.
* ``node``: ``reachable``, ``height`` (its tip) and ``error``.
* ``sync``: ``height``, the highest block sync has recorded a deposit or a withdrawal at,
  ``at``, when sync last recorded a change (an audit log entry), and ``behind``.
* ``withdrawals``: how many wait for approvals (requested), for signatures (approved) and
  for broadcast (signed).
* ``reserves``: the last ``custody audit reserves`` run (the audit log's, never a live scan):
  height, reserves and liabilities in sat, their difference, ok, when.
* ``halt_file``: this machine's halt file: path, halted, ``valid_until`` and the seconds left
  of its lease (negative: expired, which the trading engine takes as halted).

Resolved incidents older than ``recent_days`` are left out unless ``all_incidents``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from custody.chain.types import ChainBackend
from custody.clock import iso, now, parse_iso
from custody.config import Settings
from custody.control import halt_file, incidents
from custody.errors import CustodyError
from custody.store.db import Database
from custody.store.models import AuditEntry, DepositRow, WithdrawalRow

RECENT_DAYS = 7
WAITING = {"requested": "approvals", "approved": "signatures", "signed": "broadcast"}
SYNC_EVENTS = (
    "deposit.seen",
    "deposit.credited",
    "deposit.reversed",
    "withdrawal.confirmed",
    "withdrawal.settled",
    "withdrawal.unsettled",
    "withdrawal.reorged",
    "withdrawal.refunded",
)


def operator_status(
    db: Database,
    settings: Settings,
    node: Callable[[], ChainBackend] | None,
    *,
    all_incidents: bool = False,
    recent_days: int = RECENT_DAYS,
) -> dict[str, Any]:
    """The status view with the node, sync, pending withdrawals, reserves and the halt file's
    lease (module docstring). ``node`` opens the chain backend (None: no node to ask). Never
    raises for a node or a store that cannot be read: they show in ``problems``."""
    view = incidents.status_view(db, recent=1_000_000_000 if all_incidents else 10)
    if not all_incidents:
        cutoff = now() - timedelta(days=recent_days)
        view["incidents"] = [
            i
            for i in view["incidents"]
            if i["status"] != "resolved" or (parse_iso(i["resolved_at"]) or cutoff) > cutoff
        ]
    view["node"] = _node(node)
    view.update(_store_figures(db))
    view["sync"]["behind"] = (
        view["node"]["height"] - view["sync"]["height"]
        if view["node"]["height"] is not None and view["sync"]["height"] is not None
        else None
    )
    view["halt_file"] = _lease(settings)
    problems = []
    if view["halted"]:
        problems.append("trading is halted" if view["error"] is None else view["error"])
    if not view["node"]["reachable"]:
        problems.append(f"the node cannot be reached: {view['node']['error']}")
    lease = view["halt_file"]
    if lease["halted"] is not False or (lease["remaining_seconds"] is not None and lease["remaining_seconds"] < 0):
        problems.append("the halt file tells the trading engine to stop (halted, missing or its lease expired)")
    view["problems"] = problems
    view["operational"] = not problems
    return view


def _node(open_backend: Callable[[], ChainBackend] | None) -> dict[str, Any]:
    if open_backend is None:
        return {"reachable": False, "height": None, "error": "no node configured"}
    try:
        return {"reachable": True, "height": open_backend().tip_height(), "error": None}
    except CustodyError as exc:
        return {"reachable": False, "height": None, "error": str(exc)}


def _store_figures(db: Database) -> dict[str, Any]:
    """Sync, pending withdrawals and the last reserves audit, from the store (empty when unreadable)."""
    figures: dict[str, Any] = {
        "sync": {"height": None, "at": None},
        "withdrawals": {what: 0 for what in WAITING.values()},
        "reserves": None,
    }
    try:
        db.check_schema()
        with db.transaction(read_only=True) as s:  # never waits behind a writer
            for status, n in s.exec(
                select(WithdrawalRow.status, func.count())
                .where(col(WithdrawalRow.status).in_(list(WAITING)))
                .group_by(col(WithdrawalRow.status))
            ).all():
                figures["withdrawals"][WAITING[status]] = int(n)
            heights = [
                s.exec(select(func.max(DepositRow.height))).first(),
                s.exec(select(func.max(WithdrawalRow.block_height))).first(),
            ]
            seen = [h for h in heights if h is not None]
            figures["sync"]["height"] = max(seen) if seen else None
            last_sync = s.exec(select(func.max(AuditEntry.at)).where(col(AuditEntry.event).in_(SYNC_EVENTS))).first()
            figures["sync"]["at"] = iso(last_sync)
            audit = s.exec(
                select(AuditEntry).where(AuditEntry.event == "audit.reserves").order_by(col(AuditEntry.seq).desc())
            ).first()
            if audit is not None:
                p = json.loads(audit.payload)
                figures["reserves"] = {
                    "height": p.get("height"),
                    "reserves_sat": p.get("reserves_sat"),
                    "liabilities_sat": p.get("liabilities_sat"),
                    "difference_sat": p["reserves_sat"] - p["liabilities_sat"],
                    "ok": p.get("ok"),
                    "at": iso(audit.at),
                }
    except (CustodyError, KeyError, TypeError, ValueError):
        pass  # the store's own error is the status view's "error" already
    return figures


def _lease(settings: Settings) -> dict[str, Any]:
    current = halt_file.read(settings.halt_file)
    doc = current.doc if current is not None else {}
    until = parse_iso(doc.get("valid_until"))
    return {
        "path": str(settings.halt_file),
        "halted": None if current is None else current.halted,
        "valid_until": iso(until),
        "remaining_seconds": None if until is None else round((until - now()).total_seconds()),
    }
