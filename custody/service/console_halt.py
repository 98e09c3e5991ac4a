"""The approval console's halt page: raise a halt, and consent to lifting one, with a security key.

Any one employee of the founders' roster may halt trading; a lift needs two distinct
employees with the lift role (a security key's consent and a key file's count alike). The
server makes the statement (for a raise, with the moment it names), the browser has the
employee's security key sign its digest, and :mod:`custody.control.halt_webauthn` checks the
assertion against the roster before anything changes.
"""

from __future__ import annotations

import html
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from custody.config import Settings
from custody.control import halt as halt_lib
from custody.control import halt_webauthn as hw
from custody.control.halt_state import with_waiting
from custody.identity.webauthn import Assertion, unb64url
from custody.service.console import B64_PATTERN, NAME_PATTERN, page, same_origin
from custody.store.db import Database

HaltId = Annotated[int, Path(ge=1, le=2**31 - 1)]
REASON_PATTERN = r"^[^\x00-\x1f\x7f]{1,500}$"


class RaiseRequest(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    reason: str = Field(pattern=REASON_PATTERN)


class Signed(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    credential_id: str = Field(pattern=B64_PATTERN)
    authenticator_data: str = Field(pattern=B64_PATTERN)
    client_data_json: str = Field(pattern=B64_PATTERN)
    signature: str = Field(pattern=B64_PATTERN)

    def assertion(self) -> str:
        return Assertion(
            unb64url(self.authenticator_data, "authenticator_data"),
            unb64url(self.client_data_json, "client_data_json"),
            unb64url(self.signature, "signature"),
        ).encode()


class SignedRaise(Signed):
    reason: str = Field(pattern=REASON_PATTERN)
    at: str = Field(pattern=r"^[0-9T:.Z-]{20,40}$")


def _halt_page(db: Database) -> HTMLResponse:
    state = halt_lib.read_state(db)
    if db.halt_file is not None:
        state = with_waiting(state, db.halt_file)
    e = html.escape
    rows = "".join(
        f"<tr id=halt-{int(h['id'])}><td>#{int(h['id'])}</td><td>{e(str(h['raised_by']))}</td>"
        f"<td>{e(str(h['reason']))}</td><td class=lifters>{e(', '.join(h['lift_signatures']) or '-')}</td>"
        f"<td><form class=lift data-halt='{int(h['id'])}'><input class=employee required "
        "pattern='[a-z][a-z0-9._-]{0,31}' placeholder=employee> <button type=submit>Sign the lift</button>"
        "</form></td></tr>"
        for h in state.halts
        if h.get("active", True) and h.get("id") is not None
    ) + "".join(
        f"<tr class=pending><td>waiting</td><td>{e(str(p.get('actor')))}</td><td>{e(str(p.get('reason')))}</td>"
        "<td>-</td><td>in the halt file; the store has not recorded it (no lift before it does)</td></tr>"
        for p in state.pending
    )
    status = "Trading is HALTED" if state.halted else "Trading runs"
    body = (
        f"<p id=halt-state>{e(status)}{': ' + e(state.error) if state.error else ''}</p>"
        "<h2>Active halts</h2><p>Lifting needs two different employees with the lift role.</p>"
        "<table id=halts><thead><tr><th>halt</th><th>raised by</th><th>reason</th><th>lift signed by</th>"
        f"<th></th></tr></thead><tbody>{rows}</tbody></table>"
        "<h2>Halt trading</h2><form id=raise><label>Employee <input id=employee required "
        "pattern='[a-z][a-z0-9._-]{0,31}'></label> <label>Reason <input id=reason required maxlength=500>"
        "</label> <button type=submit>Halt with security key</button></form><p id=result role=status></p>"
    )
    return page("Halt", body)


def halt_router(db: Database, settings: Settings, origin: str) -> APIRouter:
    """The halt page and its calls; ``origin`` is the console's origin as browsers see it."""
    router = APIRouter(prefix="/console", include_in_schema=False, dependencies=[same_origin(origin)])

    @router.get("/halt")
    def halt_page() -> HTMLResponse:
        return _halt_page(db)

    @router.post("/api/halt/challenge")
    def raise_challenge(body: RaiseRequest) -> dict[str, Any]:
        c = hw.raise_challenge(body.employee, body.reason)
        return {"digest": c.digest, "at": c.at}

    @router.post("/api/halt")
    def raise_halt(body: SignedRaise) -> dict[str, Any]:
        raised = hw.raise_with_security_key(
            db, settings, body.employee, body.reason, body.at, body.credential_id, body.assertion()
        )
        return {"halt_id": raised.id, "halted": raised.engine_halted, "problems": list(raised.problems)}

    @router.get("/api/halts/{halt_id}/challenge")
    def lift_challenge(halt_id: HaltId) -> dict[str, Any]:
        return {"digest": hw.lift_challenge(db, halt_id).digest}

    @router.post("/api/halts/{halt_id}/lift")
    def lift(halt_id: HaltId, body: Signed) -> dict[str, Any]:
        r = hw.lift_with_security_key(db, settings, halt_id, body.employee, body.credential_id, body.assertion())
        return {"halt_id": r.halt_id, "signers": r.signers, "lifted": r.lifted, "needed": r.needed}

    return router
