"""The approval console: web pages of ``custody serve`` where employees approve with a security key.

``/console/`` lists the withdrawals awaiting approval; ``/console/withdrawals/{id}`` shows
exactly what one approval signs (every output with its address and amount, which one is our
change, the fee, the rules of the rulebook that apply, the approvals so far, the statement
digest) and approves it: the browser asks the employee's security key (WebAuthn) to sign the
statement's digest as its challenge, and the assertion is checked against the founders'
roster and stored as the employee's approval (:mod:`custody.withdraw.webauthn_approval`).
``/console/register`` makes a new credential on a security key and shows what the founders
add to the roster (``custody roster propose --webauthn NAME=FILE``).

The pages read without a signature, like /metrics: serve the console on the staff network
only. Nothing is approved without a security key listed in the founders' roster, and each
assertion is bound to the console's origin and to one exact statement.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from custody.config import Settings
from custody.control.roster import check_pinned, load_trust, standing
from custody.errors import ApprovalError, NotFound
from custody.identity.webauthn import Assertion, credential_from_registration, unb64url
from custody.service import console_assets as assets
from custody.store.db import Database
from custody.withdraw import queue as wd
from custody.withdraw import states as wd_states
from custody.withdraw.webauthn_approval import approve_with_security_key

MAX_ID = 2**31 - 1
B64_PATTERN = r"^[A-Za-z0-9_-]{1,16384}$"
NAME_PATTERN = r"^[a-z][a-z0-9._-]{0,31}$"
# Scripts only from the console itself (no inline script: what a page shows cannot run).
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'"

WithdrawalId = Annotated[int, Path(ge=1, le=MAX_ID)]
EmployeeName = Annotated[str, Path(pattern=NAME_PATTERN)]


class ApprovalBody(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    credential_id: str = Field(pattern=B64_PATTERN)
    authenticator_data: str = Field(pattern=B64_PATTERN)
    client_data_json: str = Field(pattern=B64_PATTERN)
    signature: str = Field(pattern=B64_PATTERN)


class RegistrationBody(BaseModel):
    attestation_object: str = Field(pattern=B64_PATTERN)
    client_data_json: str = Field(pattern=B64_PATTERN)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> HTMLResponse:
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · custody</title><link rel=stylesheet href=/console/console.css>"
        "<script src=/console/console.js defer></script></head>"
        f"<body><header><a href=/console/>custody approval console</a></header><main><h1>{_e(title)}</h1>"
        f"{body}</main></body></html>"
    )
    return HTMLResponse(doc, headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})


def _table(headers: Iterable[str], rows: Iterable[Iterable[object]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(w: dict[str, Any]) -> str:
    if w["awaiting_request_signature"]:
        return f"<span class=unsigned>{_e(w['status'])}: not signed by {_e(w['requester'])} yet</span>"
    return _e(w["status"])


def _pending_page(db: Database) -> HTMLResponse:
    rows = [w for status in (wd_states.REQUESTED, wd_states.APPROVED) for w in wd.list_withdrawals(db, status)]
    links = "".join(
        f"<tr><td><a href=/console/withdrawals/{int(w['id'])}>#{int(w['id'])}</a></td><td>{_status(w)}</td>"
        f"<td>{_e(w['account'])}</td><td>{_e(w['destination'])}</td><td class=num>{_e(w['amount'])}</td>"
        f"<td>{_e(', '.join(w['approvals']['valid']) or '-')}</td></tr>"
        for w in rows
    )
    table = (
        "<table id=pending><thead><tr><th>id</th><th>status</th><th>account</th><th>destination</th>"
        f"<th>amount</th><th>approved by</th></tr></thead><tbody>{links}</tbody></table>"
    )
    empty = "<p>Nothing awaits approval.</p>" if not rows else ""
    return page(
        "Withdrawals awaiting approval",
        table + empty + "<p><a href=/console/request>Request a withdrawal</a> · "
        "<a href=/console/register>Register a security key</a></p>",
    )


def _rules(rules: dict[str, Any]) -> str:
    book = f"rulebook #{rules['rulebook']}" if rules["rulebook"] else "the built-in rules (no rulebook yet)"
    tiers = _table(
        ["withdrawal", "tier", "why", "approvals needed", "approved by", "still needed"],
        [
            [f"#{t['withdrawal_id']}", t["tier"], t["why"], t["approvals_needed"], ", ".join(t["approved_by"]) or "-"]
            + [t["still_needed"]]
            for t in rules["withdrawals"]
        ],
        "rules",
    )
    broken = "".join(f"<li>{_e(v['rule'])}: {_e(v['detail'])}</li>" for v in rules["violations"])
    broken = f"<ul class=violations>{broken}</ul>" if broken else "<p>No rule is broken.</p>"
    return f"<h2>Rules that apply</h2><p>{_e(book)} at height {_e(rules['height'])}</p>{tiers}{broken}"


_CANCEL = (
    "<h2>Cancel this unsigned request</h2><p>{1} recorded it but never signed it: it holds the customer's "
    "balance. {1} may cancel it with the same security key.</p><form id=cancel data-withdrawal='{0}'>"
    "<label>Reason <input id=cancel-reason required maxlength=500></label> "
    "<button type=submit>Cancel with security key</button></form>"
)


def _withdrawal_page(db: Database, withdrawal_id: int) -> HTMLResponse:
    w = wd.show_withdrawal(db, withdrawal_id)
    outputs = _table(
        ["output", "address", "amount (sat)", "what"],
        [[o["n"], o["address"], o["amount_sat"], "change (ours)" if o["change"] else "payment"] for o in w["outputs"]],
        "outputs",
    )
    inputs = _table(["input", "amount (sat)"], [[i["outpoint"], i["amount_sat"]] for i in w["inputs"]], "inputs")
    approvals = w["approvals"]
    rejected = "".join(f"<li>{_e(who)}: {_e(why)}</li>" for who, why in approvals["rejected"])
    digest = w["statement_digest"] or ""
    facts = _table(
        ["withdrawal", "status", "account", "requested by", "fee (sat)", "fee rate (sat/vB)", "unsigned txid"],
        [[f"#{w['id']}", w["status"], w["account"], w["requester"], w["fee_sat"], w["fee_rate"], w["unsigned_txid"]]],
        "facts",
    )
    body = (
        f"{facts}<h2>Outputs</h2>{outputs}<h2>Inputs</h2>{inputs}{_rules(wd.rule_check(db, withdrawal_id))}"
        f"<h2>Approvals so far</h2><p id=approved-by>{_e(', '.join(approvals['valid']) or 'none')}</p>"
        f"<ul class=rejected>{rejected}</ul>"
        f"<h2>Statement digest</h2><p><code id=digest>{_e(digest)}</code></p>"
        "<p>Your security key signs exactly this digest: check it against the one your colleague reads.</p>"
        f"<form id=approve data-withdrawal='{int(w['id'])}' data-digest='{_e(digest)}'>"
        "<label>Employee <input id=employee name=employee required pattern='[a-z][a-z0-9._-]{0,31}'></label> "
        "<button type=submit>Approve with security key</button></form><p id=result role=status></p>"
        + (_CANCEL.format(int(w["id"]), _e(w["requester"])) if w["awaiting_request_signature"] else "")
    )
    return page(f"Withdrawal #{w['id']}", body)


_REGISTER = (
    "<p>Make a credential on your security key for this console. The founders add it to the roster "
    "(<code>custody roster propose --webauthn NAME=FILE</code>, then sign and apply): until then it "
    "approves nothing.</p><form id=register><label>Employee <input id=employee name=employee required "
    "pattern='[a-z][a-z0-9._-]{0,31}'></label> <button type=submit>Register security key</button></form>"
    "<pre id=credential></pre><p id=result role=status></p>"
)


def console_keys(db: Database, settings: Settings, origin: str, name: str) -> dict[str, Any]:
    """Employee ``name``'s security keys for the console at ``origin``, as the roster lists them.
    Raises NotFound (no such employee, or no key of theirs for this console)."""
    with db.transaction() as s:
        roster = standing(s, check_pinned(s, load_trust(settings))).roster
    e = roster.employee(name) if roster else None
    if e is None:
        raise NotFound(f"no employee named {name!r} in the founders' roster")
    creds = [c for c in e.webauthn if c.origin == origin]
    if not creds:
        raise NotFound(f"{name} has no security key for {origin} in the founders' roster")
    return {"name": name, "rp_id": creds[0].rp_id, "credentials": [c.id for c in creds]}


def same_origin(origin: str) -> Any:
    """The dependency of every console route: a state change (any method but GET and HEAD) sent by
    a browser from another origin is refused before it reaches the store. The console has no
    session to steal, but a page elsewhere could make a staff browser, which reaches the console,
    record withdrawal requests or ask for challenges in an employee's name. A client that sends no
    Origin (not a browser) is let through: it could send any Origin it likes. Raises ApprovalError."""

    def check(request: Request) -> None:
        if request.method in ("GET", "HEAD"):
            return
        sent = request.headers.get("origin")
        site = request.headers.get("sec-fetch-site")
        if (sent is not None and sent != origin) or site == "cross-site":
            raise ApprovalError(
                f"the console refuses a request sent from another origin ({str(sent)[:80]}): {origin} only"
            )

    return Depends(check)


def console_router(db: Database, settings: Settings, origin: str) -> APIRouter:
    """The console's routes; ``origin`` is the console's origin as browsers see it."""
    router = APIRouter(prefix="/console", include_in_schema=False, dependencies=[same_origin(origin)])

    @router.get("/")
    def pending() -> HTMLResponse:
        return _pending_page(db)

    @router.get("/withdrawals/{withdrawal_id}")
    def withdrawal(withdrawal_id: WithdrawalId) -> HTMLResponse:
        return _withdrawal_page(db, withdrawal_id)

    @router.get("/register")
    def register_page() -> HTMLResponse:
        return page("Register a security key", _REGISTER)

    @router.get("/console.js")
    def script() -> Response:
        return Response(assets.SCRIPT, media_type="text/javascript")

    @router.get("/console.css")
    def style() -> Response:
        return Response(assets.STYLE, media_type="text/css")

    @router.get("/api/employees/{name}")
    def employee(name: EmployeeName) -> dict[str, Any]:
        """The employee's security keys for this console (what the browser may ask to sign)."""
        return console_keys(db, settings, origin, name)

    @router.post("/api/withdrawals/{withdrawal_id}/approve")
    def approve(withdrawal_id: WithdrawalId, body: ApprovalBody) -> dict[str, Any]:
        assertion = Assertion(
            unb64url(body.authenticator_data, "authenticator_data"),
            unb64url(body.client_data_json, "client_data_json"),
            unb64url(body.signature, "signature"),
        )
        return approve_with_security_key(
            db, settings, withdrawal_id, body.employee, body.credential_id, assertion.encode()
        )

    @router.post("/api/register")
    def register(body: RegistrationBody) -> dict[str, str]:
        """The credential the security key made, as the founders' roster lists it."""
        att = unb64url(body.attestation_object, "attestation_object")
        client = unb64url(body.client_data_json, "client_data_json")
        return credential_from_registration(att, client, origin).to_dict()

    return router
