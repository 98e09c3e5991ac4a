"""The approval console's request page: an employee requests a withdrawal with her security key.

Nothing is recorded without the requester's key. The employee (request role and a security
key for this console in the founders' roster) names the account, destination and amount; the
server answers the record statement's digest (those, her name, a fresh nonce and the moment:
:func:`custody.withdraw.webauthn_request.record_challenge`, nothing stored); the browser has
the security key sign it, and only an assertion that stands records the request, with its
exact transaction (:func:`custody.withdraw.webauthn_request.record_with_security_key`). The
server then answers the request statement's digest (that transaction and the account); the
key signs it, and the assertion is stored as the request's signature. Until then nobody can
approve the withdrawal. A request recorded and never signed holds the customer's balance: its
requester cancels it here with the same security key
(:func:`custody.withdraw.webauthn_request.cancel_with_security_key`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.service.console import NAME_PATTERN, page, same_origin
from custody.service.console_halt import REASON_PATTERN, Signed
from custody.store.db import Database
from custody.withdraw import limits as wd_limits
from custody.withdraw import webauthn_request as wr

WithdrawalId = Annotated[int, Path(ge=1, le=2**31 - 1)]
_TEXT = r"^[\x20-\x7e]{1,128}$"


class RequestBody(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    account: str = Field(min_length=1, max_length=128, pattern=_TEXT)
    destination: str = Field(min_length=1, max_length=128, pattern=_TEXT)
    amount: str = Field(min_length=1, max_length=32, pattern=r"^[0-9.]+$")


class SignedRecord(Signed):
    """The request's content again, with the record challenge's nonce and moment, and the
    requester's assertion over them: every field required (no assertion, nothing recorded)."""

    account: str = Field(min_length=1, max_length=128, pattern=_TEXT)
    destination: str = Field(min_length=1, max_length=128, pattern=_TEXT)
    amount: str = Field(min_length=1, max_length=32, pattern=r"^[0-9.]+$")
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    at: str = Field(pattern=r"^[0-9T:.Z-]{20,40}$")


class CancelRequest(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    reason: str = Field(pattern=REASON_PATTERN)


class SignedCancel(Signed):
    reason: str = Field(pattern=REASON_PATTERN)


_FORM = (
    "<p>Your security key signs twice. First your request (account, destination, amount): only "
    "then is the withdrawal recorded, with its exact transaction. Then that transaction and the "
    "account: nobody can approve it before, and you can never approve it.</p>"
    "<form id=request><label>Employee <input id=employee required pattern='[a-z][a-z0-9._-]{0,31}'></label> "
    "<label>Account <input id=account required maxlength=128></label> "
    "<label>Destination <input id=destination required maxlength=128 size=48></label> "
    "<label>Amount (BTC) <input id=amount required pattern='[0-9.]+' size=12></label> "
    "<button type=submit>Request with security key</button></form><p id=result role=status></p>"
)


def request_router(
    db: Database,
    settings: Settings,
    origin: str,
    backend: Callable[[], ChainBackend],
    state_lock: threading.Lock,
    after: Callable[[], object],
) -> APIRouter:
    """The request page and its calls; ``backend`` opens the chain backend, ``state_lock``
    serializes state changes in this process, ``after`` runs after each one (the witness)."""
    router = APIRouter(prefix="/console", include_in_schema=False, dependencies=[same_origin(origin)])

    @router.get("/request")
    def request_page() -> HTMLResponse:
        return page("Request a withdrawal", _FORM)

    @router.post("/api/requests/challenge")
    def record_challenge(body: RequestBody) -> dict[str, str]:
        """What the requester's security key signs before anything is recorded (nothing stored)."""
        c = wr.record_challenge(body.employee, body.account, body.destination, body.amount)
        return {"digest": c.digest, "nonce": c.nonce, "at": c.at}

    @router.post("/api/requests")
    def record(body: SignedRecord) -> dict[str, Any]:
        with state_lock:
            w = wr.record_with_security_key(
                db,
                settings,
                backend(),
                account=body.account,
                destination=body.destination,
                amount=body.amount,
                requester=body.employee,
                nonce=body.nonce,
                at=body.at,
                credential_id=body.credential_id,
                assertion=body.assertion(),
                limits=wd_limits.limits_from_settings(settings),
            )
        after()
        return {"id": w["id"], "request_digest": w["request_digest"]}

    @router.post("/api/withdrawals/{withdrawal_id}/request")
    def sign(withdrawal_id: WithdrawalId, body: Signed) -> dict[str, Any]:
        with state_lock:
            w = wr.sign_request_with_security_key(
                db, settings, withdrawal_id, body.employee, body.credential_id, body.assertion()
            )
        after()
        return w

    _cancel_routes(router, db, settings, state_lock, after)
    return router


def _cancel_routes(
    router: APIRouter, db: Database, settings: Settings, state_lock: threading.Lock, after: Callable[[], object]
) -> None:
    """The calls that cancel a request recorded and never signed, with its requester's key."""

    @router.post("/api/withdrawals/{withdrawal_id}/cancel/challenge")
    def cancel_challenge(withdrawal_id: WithdrawalId, body: CancelRequest) -> dict[str, str]:
        return {"digest": wr.cancel_challenge(db, withdrawal_id, body.employee, body.reason)}

    @router.post("/api/withdrawals/{withdrawal_id}/cancel")
    def cancel(withdrawal_id: WithdrawalId, body: SignedCancel) -> dict[str, Any]:
        with state_lock:
            w = wr.cancel_with_security_key(
                db, settings, withdrawal_id, body.employee, body.reason, body.credential_id, body.assertion()
            )
        after()
        return w
