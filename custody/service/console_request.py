"""The approval console's request page: an employee requests a withdrawal and signs it with a security key.

The employee (request role and a security key for this console in the founders' roster)
names the account, destination and amount; the server records the request with its exact
transaction and answers the request statement's digest; the browser has the security key
sign it, and :mod:`custody.withdraw.webauthn_request` checks the assertion against the roster
before storing it as the request's signature. Until then nobody can approve the withdrawal.
A request never signed holds the customer's balance: its requester cancels it here with the
same security key (:func:`custody.withdraw.webauthn_request.cancel_with_security_key`).
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
from custody.service.console import NAME_PATTERN, console_keys, page, same_origin
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


class CancelRequest(BaseModel):
    employee: str = Field(pattern=NAME_PATTERN)
    reason: str = Field(pattern=REASON_PATTERN)


class SignedCancel(Signed):
    reason: str = Field(pattern=REASON_PATTERN)


_FORM = (
    "<p>The withdrawal is recorded with its exact transaction, then your security key signs that "
    "transaction and the account: nobody can approve it before, and you can never approve it.</p>"
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
    """The request page and its two calls; ``backend`` opens the chain backend, ``state_lock``
    serializes state changes in this process, ``after`` runs after each one (the witness)."""
    router = APIRouter(prefix="/console", include_in_schema=False, dependencies=[same_origin(origin)])

    @router.get("/request")
    def request_page() -> HTMLResponse:
        return page("Request a withdrawal", _FORM)

    @router.post("/api/requests")
    def draft(body: RequestBody) -> dict[str, Any]:
        console_keys(db, settings, origin, body.employee)  # a key of theirs for this console, or nothing is recorded
        with state_lock:
            w = wr.draft_request(
                db,
                settings,
                backend(),
                account=body.account,
                destination=body.destination,
                amount=body.amount,
                requester=body.employee,
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

    return router
