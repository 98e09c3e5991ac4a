"""Incidents (opened by a halt, updated by an operator, resolved by its lift) and the halt's status
view.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import col, select

from custody.clock import iso, now
from custody.control import audit_log
from custody.control.halt import COMPONENTS, read_state
from custody.control.halt_state import with_waiting
from custody.errors import (
    Conflict,
    InputError,
    NotFound,
)
from custody.store.db import Database
from custody.store.models import HaltRow, IncidentRow, IncidentUpdate

STATUSES = ("investigating", "identified", "monitoring", "resolved")


# ---------------------------------------------------------------- incidents and status view


def update_incident(db: Database, incident_id: int, status: str, message: str, actor: str) -> IncidentRow:
    """Add a timestamped update to an incident.

    Raises InputError (unknown status, empty message), NotFound, Conflict (resolving an
    incident whose halt is still active, or updating a resolved one).
    """
    if status not in STATUSES:
        raise InputError(f"unknown status {status!r}: expected one of {', '.join(STATUSES)}")
    if not message.strip():
        raise InputError("an incident update needs a message")
    with db.transaction() as s:
        incident = s.get(IncidentRow, incident_id)
        if incident is None:
            raise NotFound(f"no incident #{incident_id}")
        if incident.status == "resolved":
            raise Conflict(f"incident #{incident_id} is resolved")
        if status == "resolved" and incident.halt_id is not None:
            h = s.get(HaltRow, incident.halt_id)
            if h is not None and h.active:
                raise Conflict(
                    f"incident #{incident_id} cannot be resolved while halt #{h.id} is active: "
                    "lift the halt (two employees)"
                )
        at = now()
        incident.status = status
        if status == "resolved":
            incident.resolved_at = at
        s.add(incident)
        s.add(IncidentUpdate(incident_id=incident_id, at=at, status=status, message=message.strip(), actor=actor))
        audit_log.append(
            s, "incident.updated", actor, {"incident_id": incident_id, "status": status, "message": message}
        )
        return incident


def status_view(db: Database, recent: int = 10) -> dict[str, Any]:
    """Components (operational or halted) and open and recent incidents with their timelines.
    A halt waiting in the Database's halt file for the store halts every component."""
    state = read_state(db)
    if db.halt_file is not None:
        state = with_waiting(state, db.halt_file)
    incidents: list[dict[str, Any]] = []
    halted_components: set[str] = set()
    if state.error is None:
        with db.transaction(read_only=True) as s:
            rows = s.exec(select(IncidentRow).order_by(col(IncidentRow.id).desc()).limit(recent)).all()
            open_rows = s.exec(select(IncidentRow).where(IncidentRow.status != "resolved")).all()
            for row in {r.id: r for r in [*open_rows, *rows]}.values():
                comps = json.loads(row.components)
                if row.status != "resolved":
                    halted_components.update(comps)
                updates = s.exec(
                    select(IncidentUpdate).where(IncidentUpdate.incident_id == row.id).order_by(col(IncidentUpdate.id))
                ).all()
                incidents.append(
                    {
                        "id": row.id,
                        "halt_id": row.halt_id,
                        "title": row.title,
                        "status": row.status,
                        "components": comps,
                        "opened_at": iso(row.opened_at),
                        "resolved_at": iso(row.resolved_at),
                        "updates": [
                            {"at": iso(u.at), "status": u.status, "message": u.message, "actor": u.actor}
                            for u in updates
                        ],
                    }
                )
    if state.halted:
        halted_components.update(COMPONENTS)
    incidents.sort(key=lambda i: i["id"], reverse=True)
    return {
        "halted": None if state.unknown else state.halted,
        "error": state.error,
        "components": {
            c: ("unknown" if state.unknown else "halted" if c in halted_components else "operational")
            for c in COMPONENTS
        },
        "incidents": incidents,
    }
