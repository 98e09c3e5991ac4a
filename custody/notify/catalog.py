"""Which audit events are told to recipients, under which name, severity and title.

What is notified (:func:`notification_for`):

* ``halt.raised`` (a ledger or reserves audit failure raises one with that source),
  ``halt.lifted``;
* ``verification.run`` with failures;
* ``withdrawal.requested``, ``.approved`` (each employee's approval), ``.batched``,
  ``.finalized`` (told as "signed": the final transaction exists, built from m founders'
  signatures; a signatures import that does not complete it is not told), ``.broadcast``,
  ``.confirmed``, ``.failed``;
* every ``audit.*`` event (ledger and reserve audits);
* ``notify.recipient_added`` and ``.recipient_removed``, so that the others learn of it;
* ``rulebook.proposed`` and ``.applied`` (critical when the rulebook loosens anything: everyone
  learns of it before it can take effect);
* ``policy.rotated`` (critical: new founders' keys from now on) and ``sweep.requested``.

:data:`EVENTS` and :data:`PREFIXES` narrow the audit log to the candidates in SQL; the
final word is :func:`notification_for` (a ``verification.run`` without failures is not told).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from custody.bitcoin.amounts import format_btc
from custody.clock import iso
from custody.store.models import AuditEntry

EVENTS = (
    "halt.raised",
    "halt.lifted",
    "verification.run",
    "withdrawal.requested",
    "withdrawal.approved",
    "withdrawal.batched",
    "withdrawal.finalized",
    "withdrawal.broadcast",
    "withdrawal.confirmed",
    "withdrawal.refused",
    "withdrawal.failed",
    "notify.recipient_added",
    "notify.recipient_removed",
    "rulebook.proposed",
    "rulebook.applied",
    "policy.rotated",
    "sweep.requested",
)
"""Audit events that may be told, named exactly."""

PREFIXES = ("audit.",)
"""Audit events that may be told, named by prefix."""


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


def _describe_withdrawal(event: str, actor: str, p: dict[str, Any]) -> tuple[str, str, str] | None:
    """(kind, severity, title) of a withdrawal's step, None for the steps not notified."""
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
    if event == "withdrawal.refused":
        refusal = f"refused by the node ({p.get('refusal')}): {p.get('reason')}; it stays signed and held"
        return event, "critical", f"Withdrawal {_wid(p)} {refusal}"
    if event == "withdrawal.failed":
        return event, "critical", f"Withdrawal {_wid(p)} failed: {p.get('reason')}"
    return None


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
    if event.startswith("withdrawal."):
        return _describe_withdrawal(event, actor, p)
    if event in ("rulebook.proposed", "rulebook.applied"):
        return _rulebook(event, actor, p)
    if event == "policy.rotated":
        founders = ", ".join(map(str, p.get("founders") or []))
        approved = ", ".join(map(str, p.get("approved_by") or []))
        policy = f"epoch {p.get('epoch')}, {p.get('threshold')}-of-{p.get('n')} ({founders})"
        return event, "critical", f"Founders' keys ROTATED by {actor}: {policy}, approved by {approved}"
    if event == "sweep.requested":
        return (
            event,
            "info",
            f"Sweep {_wid(p)} requested by {actor}: {p.get('inputs')} old coin(s) to {p.get('destination')}",
        )
    if event in ("notify.recipient_added", "notify.recipient_removed"):
        verb = "added" if event.endswith("added") else "removed"
        return event, "critical", f"Notification recipient {verb} by {actor}: {p.get('kind')} {p.get('target')}"
    if event.startswith(PREFIXES):
        failed = p.get("ok") is False or (isinstance(p.get("failures"), int) and p["failures"] > 0)
        return event, "critical", f"{'AUDIT FAILED' if failed else 'Audit'}: {event} by {actor}"
    return None


def _rulebook(event: str, actor: str, p: dict[str, Any]) -> tuple[str, str, str]:
    loosens = [str(x) for x in p.get("loosens") or []]
    verb = "proposed" if event.endswith("proposed") else "applied"
    what = f"LOOSENS ({'; '.join(loosens)})" if loosens else "only tightens"
    return (
        event,
        "critical" if loosens else "info",
        f"Rulebook #{p.get('serial')} {verb} by {actor}: {what}; in force from height {p.get('effective_height')}",
    )


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
