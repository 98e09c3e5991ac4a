"""The public status page: components, incident timelines and reserves against liabilities.

Built on :func:`custody.control.incidents.status_view` (the halt state and incidents, the same view
as ``custody status``) and the audit log's ``audit.reserves`` entries (what ``custody audit
reserves`` recorded at each height, never a live scan). Three renderings of one document:
HTML (with a small inline SVG chart), JSON (``custody-status`` version 1, :data:`SCHEMA`) and
an Atom feed (RFC 4287) with one entry per incident update. ``custody serve`` answers them at
``/status``, ``/status.json`` and ``/status.atom``; ``custody status publish DIR`` writes them
as ``index.html``, ``status.json`` and ``status.atom`` for a public web host.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from sqlmodel import col, select

from custody.clock import iso, now
from custody.control import incidents as incidents_lib
from custody.files import write_atomic
from custody.store.db import Database
from custody.store.models import AuditEntry

FORMAT = "custody-status"
VERSION = 1
COMPONENTS = (
    ("address-issuance", "Address issuance"),
    ("address-verification", "Address verification"),
    ("deposits", "Deposits"),
    ("withdrawals", "Withdrawals"),
    ("trading", "Trading"),
)
HISTORY = 60
"""Reserve audits the chart shows (the newest)."""
ATOM = "http://www.w3.org/2005/Atom"
FEED_ID = "urn:custody:status"

_STATES = ["operational", "halted", "unknown"]
_INCIDENT_STATES = ["investigating", "identified", "monitoring", "resolved"]
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "custody-status version 1",
    "type": "object",
    "required": ["format", "version", "generated_at", "halted", "components", "incidents", "reserves"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": VERSION},
        "generated_at": {"type": "string"},
        "halted": {"type": "boolean"},
        "error": {"type": ["string", "null"]},
        "components": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "name", "status"],
                "additionalProperties": False,
                "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "status": {"enum": _STATES}},
            },
        },
        "incidents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "title", "status", "components", "opened_at", "resolved_at", "updates"],
                "properties": {
                    "id": {"type": "integer"},
                    "title": {"type": "string"},
                    "status": {"enum": _INCIDENT_STATES},
                    "components": {"type": "array", "items": {"type": "string"}},
                    "opened_at": {"type": ["string", "null"]},
                    "resolved_at": {"type": ["string", "null"]},
                    "updates": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["at", "status", "message"],
                            "properties": {
                                "at": {"type": ["string", "null"]},
                                "status": {"enum": _INCIDENT_STATES},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "reserves": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["height", "at", "reserves_sat", "liabilities_sat"],
                "additionalProperties": False,
                "properties": {
                    "height": {"type": "integer"},
                    "at": {"type": ["string", "null"]},
                    "reserves_sat": {"type": "integer"},
                    "liabilities_sat": {"type": "integer"},
                },
            },
        },
    },
}


def _reserves(db: Database) -> list[dict[str, Any]]:
    """The newest :data:`HISTORY` reserve audits of the audit log, oldest first."""
    with db.transaction() as s:
        rows = s.exec(
            select(AuditEntry.at, AuditEntry.payload)
            .where(AuditEntry.event == "audit.reserves")
            .order_by(col(AuditEntry.seq).desc())
            .limit(HISTORY)
        ).all()
    out = []
    for at, payload in reversed(rows):
        try:
            p = json.loads(payload)
            point = {"height": p["height"], "reserves_sat": p["reserves_sat"], "liabilities_sat": p["liabilities_sat"]}
        except (ValueError, KeyError, TypeError):
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in point.values()):
            out.append({**point, "at": iso(at)})
    return out


def status_document(db: Database) -> dict[str, Any]:
    """The status page's document (``custody-status`` version 1; :data:`SCHEMA`)."""
    view = incidents_lib.status_view(db)
    states = dict(view["components"])
    # Deposits are credited by `custody sync`, which the halt stops like every state change.
    states.setdefault("deposits", "halted" if view["halted"] else "operational")
    if view["error"]:
        states = {c: "unknown" for c, _ in COMPONENTS}
    incidents = [
        {k: i[k] for k in ("id", "title", "status", "components", "opened_at", "resolved_at")}
        | {"updates": [{"at": u["at"], "status": u["status"], "message": u["message"]} for u in i["updates"]]}
        for i in view["incidents"]
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "generated_at": iso(now()),
        "halted": view["halted"],
        "error": view["error"],
        "components": [{"id": c, "name": name, "status": states.get(c, "unknown")} for c, name in COMPONENTS],
        "incidents": incidents,
        "reserves": [] if view["error"] else _reserves(db),
    }


# ---------------------------------------------------------------- renderings


def chart_svg(points: list[dict[str, Any]], width: int = 640, height: int = 200) -> str:
    """Reserves (green) against liabilities (red) by block height, as inline SVG."""
    if not points:
        return "<p>No reserve audit has been recorded yet.</p>"
    top = max(max(p["reserves_sat"], p["liabilities_sat"]) for p in points) or 1
    lo, hi = points[0]["height"], points[-1]["height"]
    pad = 40

    def xy(p: dict[str, Any], key: str) -> str:
        x = pad + (width - 2 * pad) * ((p["height"] - lo) / (hi - lo) if hi > lo else 0.5)
        y = height - pad - (height - 2 * pad) * p[key] / top
        return f"{x:.1f},{y:.1f}"

    lines = "".join(
        f"<polyline fill='none' stroke='{colour}' stroke-width='2' class='{key}' "
        f"points='{' '.join(xy(p, key) for p in points)}'/>"
        for key, colour in (("reserves_sat", "#116329"), ("liabilities_sat", "#a40e26"))
    )
    labels = (
        f"<text x='{pad}' y='{height - 10}'>height {lo}</text>"
        f"<text x='{width - pad}' y='{height - 10}' text-anchor='end'>height {hi}</text>"
        f"<text x='{pad}' y='{pad - 10}'>{top / 1e8:.8f} BTC</text>"
        f"<text x='{width // 2}' y='{pad - 10}' fill='#116329'>reserves</text>"
        f"<text x='{width // 2 + 70}' y='{pad - 10}' fill='#a40e26'>liabilities</text>"
    )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' id=reserves-chart width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='reserves against liabilities' "
        f"font-size='12' font-family='sans-serif'>"
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>"
        f"{lines}{labels}</svg>"
    )


def render_html(doc: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td class='{e(c['status'])}'>{e(c['status'])}</td></tr>" for c in doc["components"]
    )
    incidents = ""
    for i in doc["incidents"]:
        timeline = "".join(
            f"<li><time>{e(str(u['at']))}</time> <b>{e(u['status'])}</b>: {e(u['message'])}</li>" for u in i["updates"]
        )
        incidents += (
            f"<section class=incident id=incident-{int(i['id'])}><h3>{e(i['title'])} "
            f"<span class='{e(i['status'])}'>[{e(i['status'])}]</span></h3>"
            f"<p>Affects: {e(', '.join(i['components']))}</p><ol class=timeline>{timeline}</ol></section>"
        )
    overall = "Trading is halted" if doc["halted"] else "All systems operational"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>custody status</title>"
        "<link rel=alternate type='application/atom+xml' href=status.atom title='custody incidents'>"
        "<style>body{font:15px/1.4 system-ui,sans-serif;margin:1em 2em;max-width:60em}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:.2em .6em}"
        ".operational,.resolved{color:#116329}.halted,.unknown,.investigating,.identified{color:#a40e26}"
        ".monitoring{color:#8a5a00}</style></head><body>"
        f"<h1 id=overall>{e(overall)}</h1><p>Updated {e(doc['generated_at'] or '')}</p>"
        f"<h2>Components</h2><table id=components>{rows}</table>"
        f"<h2>Incidents</h2>{incidents or '<p>No incidents.</p>'}"
        f"<h2>Reserves against liabilities</h2>{chart_svg(doc['reserves'])}"
        "<p><a href=status.json>JSON</a> · <a href=status.atom>Atom feed</a></p></body></html>"
    )


def render_atom(doc: dict[str, Any]) -> str:
    """An Atom 1.0 feed (RFC 4287): one entry per incident update, newest first."""
    ET.register_namespace("", ATOM)

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        el = ET.SubElement(parent, f"{{{ATOM}}}{tag}", attrs)
        el.text = text
        return el

    feed = ET.Element(f"{{{ATOM}}}feed")
    sub(feed, "id", FEED_ID)
    sub(feed, "title", "custody status: incidents")
    sub(sub(feed, "author"), "name", "custody")
    sub(feed, "link", rel="alternate", href="index.html")
    entries = [(u, i, n) for i in doc["incidents"] for n, u in enumerate(i["updates"], 1)]
    entries.sort(key=lambda t: (str(t[0]["at"]), t[1]["id"], t[2]), reverse=True)
    sub(feed, "updated", str(entries[0][0]["at"]) if entries else doc["generated_at"])
    for u, i, n in entries:
        entry = sub(feed, "entry")
        sub(entry, "id", f"{FEED_ID}:incident:{int(i['id'])}:update:{n}")
        sub(entry, "title", f"[{u['status']}] {i['title']}")
        sub(entry, "updated", str(u["at"]))
        sub(entry, "link", rel="alternate", href=f"index.html#incident-{int(i['id'])}")
        sub(entry, "summary", f"{u['message']} (affects: {', '.join(i['components'])})")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(feed, encoding="unicode") + "\n"


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def publish(db: Database, directory: Path) -> list[Path]:
    """Write ``index.html``, ``status.json`` and ``status.atom`` into ``directory`` (each replaced
    atomically). Raises StorageError."""
    doc = status_document(db)
    files = {"index.html": render_html(doc), "status.json": render_json(doc), "status.atom": render_atom(doc)}
    written = []
    for name, text in files.items():
        write_atomic(directory / name, text)
        written.append(directory / name)
    return written


def status_router(db: Database) -> APIRouter:
    """``/status``, ``/status.json`` and ``/status.atom``: public, unsigned reads."""
    router = APIRouter()

    @router.get("/status", summary="The public status page (HTML)", response_class=HTMLResponse)
    def status_html() -> HTMLResponse:
        return HTMLResponse(render_html(status_document(db)))

    @router.get("/status.json", summary="The public status page (custody-status version 1)")
    def status_json() -> dict[str, Any]:
        return status_document(db)

    @router.get("/status.atom", summary="The incidents as an Atom feed (RFC 4287)")
    def status_atom() -> Response:
        return Response(render_atom(status_document(db)), media_type="application/atom+xml")

    return router
