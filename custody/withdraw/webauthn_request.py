"""Requesting a withdrawal with a security key (WebAuthn), as the approval console does.

Nothing is recorded in an employee's name without her security key, and the offline signer
holds her to the exact transaction. The transaction (its withdrawal id, the coins chosen, the
verified change address, the fee) exists only once the request is recorded (the id is the
row's, the coins are reserved by recording), so the key signs twice:

1. :func:`record_challenge` makes the record statement (``custody/withdrawal-record/v1``:
   the requester, account, destination, amount in satoshis, a fresh random nonce and the
   moment) and answers its digest, the WebAuthn challenge; it stores nothing.
   :func:`record_with_security_key` records the request only on the requester's assertion
   over exactly that statement, checked in the request's own transaction under the halt
   guard's lock: one of her roster security keys (request role), the assertion standing
   (challenge, origin, relying party, UP and UV, signature), the moment not older than
   :data:`RECORD_WINDOW` seconds, the nonce never used before (a row of ``service_nonce``,
   shared by every ``custody serve`` instance on the store), the key's signature counter
   above every one it used. Then as ``custody withdraw request`` does (the same halt guard,
   rulebook, coin selection, verified change address, reservation, ledger hold); the
   ``withdrawal.requested`` entry keeps the assertion, and answers the request statement's
   digest;
2. :func:`sign_request_with_security_key` checks her assertion over exactly that request
   statement (the exact transaction and the account) against the roster and stores it as the
   request's signature, recorded in the audit log with the assertion.

Until step 2 nobody can approve the withdrawal (:func:`custody.withdraw.records._refuse_unsigned_request`),
and the offline signer verifies the stored assertion again from the PSBT with the roster
pinned on its machine (:func:`custody.identity.approvals.request_standing`). A request
recorded and never signed holds its coins and the customer's balance until it is cancelled:
by any employee with ``custody withdraw cancel``, or by its requester in the console with the
same security key (:func:`cancel_with_security_key`, through the same
:func:`custody.withdraw.queue.cancel`); a requester holds at most
:data:`custody.withdraw.records.MAX_UNSIGNED_REQUESTS` of them at once.

Why not one signature: fixing the transaction before recording would mean reserving its
coins and issuing its change address (storing) before any signature, which is what step 1
forbids; and a request signature over the content alone (destination, amount) would not bind
one withdrawal: the offline signer, which keeps no memory of earlier PSBTs, could not tell
one assertion used for two withdrawals.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from custody.bitcoin.amounts import parse_btc_amount
from custody.chain.types import ChainBackend
from custody.clock import iso, now, parse_iso
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.roster import Trust, check_pinned, load_trust, security_key
from custody.errors import ApprovalError, Conflict, CustodyError, InputError
from custody.faults import pause_point
from custody.identity.approvals import request_digest
from custody.identity.statements import statement_digest
from custody.identity.webauthn import assertion_problem, decode_assertion
from custody.store.db import Database
from custody.store.models import ServiceNonce, WithdrawalRow
from custody.withdraw import queue
from custody.withdraw import records as wd_records
from custody.withdraw.limits import Limits
from custody.withdraw.webauthn_approval import REQUEST_SIGNED, _check_counter

RECORD_DOMAIN = "custody/withdrawal-record/v1"
RECORD_WINDOW = 300
"""Seconds a record challenge stands: the browser asks the key for at most 120."""
_NONCE_PREFIX = "console-record:"  # its rows in service_nonce, beside the API's request nonces


@dataclass(frozen=True)
class RecordChallenge:
    """What the browser asks the requester's security key to sign before anything is recorded:
    the record statement's digest (hex), and the nonce and moment it names."""

    digest: str
    nonce: str
    at: str


def record_fields(requester: str, account: str, destination: str, amount_sat: int, nonce: str, at: str) -> list[object]:
    """The record statement's fields: who, which customer, where, how much, and what makes it fresh."""
    return [requester, account, destination, amount_sat, nonce, at]


def record_challenge(requester: str, account: str, destination: str, amount: str) -> RecordChallenge:
    """The statement ``requester``'s security key signs to record this request (nothing stored).
    Raises InputError (the amount)."""
    nonce, at = secrets.token_hex(16), iso(now(), "microseconds") or ""
    fields = record_fields(requester, account, destination, parse_btc_amount(amount), nonce, at)
    return RecordChallenge(statement_digest(RECORD_DOMAIN, fields).hex(), nonce, at)


def _fresh(at: str, nonce: str) -> float:
    """Refuse a record statement older than the window, or from the future; its nonce row's
    expiry (Unix seconds). Raises ApprovalError, InputError (not a time, not a nonce)."""
    moment, current = parse_iso(at), now()
    if moment is None:
        raise InputError("the record challenge's moment is not an ISO 8601 time")
    if moment > current + timedelta(seconds=60):
        raise ApprovalError("the record challenge names a moment in the future: ask the console for a new one")
    if moment < current - timedelta(seconds=RECORD_WINDOW):
        raise ApprovalError(
            f"the record challenge is older than {RECORD_WINDOW} seconds: ask the console for a new one"
        )
    if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
        raise InputError("the record challenge's nonce is 32 lower-case hex digits")
    return moment.timestamp() + 2 * RECORD_WINDOW


def _claim(s: Session, nonce: str, until: float) -> None:
    """Use the record challenge's nonce once, for every instance on this store. The caller holds
    the halt guard's lock (every state change takes it first), so no other transaction inserts
    it meanwhile; an expired row is one whose moment the window refuses already. Raises ApprovalError."""
    key = _NONCE_PREFIX + nonce
    if s.get(ServiceNonce, key) is not None:
        raise ApprovalError("this record challenge was used already: a replayed assertion records nothing")
    s.add(ServiceNonce(nonce=key, expires_at=until))
    s.flush()


def record_with_security_key(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    account: str,
    destination: str,
    amount: str,
    requester: str,
    nonce: str,
    at: str,
    credential_id: str,
    assertion: str,
    fee_rate: str | None = None,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Record ``requester``'s withdrawal request on her WebAuthn ``assertion`` over the record
    statement (:func:`record_challenge`'s, with ``nonce`` and ``at``), made with her roster
    credential ``credential_id``; the withdrawal as :func:`custody.withdraw.queue.show_withdrawal`
    shows it, with ``request_digest`` (hex), the challenge of step 2.

    Raises InputError (malformed), NotFound, ApprovalError (no request role, not her key, the
    assertion does not stand, the challenge expired or used already, counter not increasing),
    Conflict (she has too many unsigned requests), and what
    :func:`custody.withdraw.queue.request_withdrawal` raises. Nothing is stored when it raises."""
    decoded = decode_assertion(assertion)
    fields = record_fields(requester, account, destination, parse_btc_amount(amount), nonce, at)
    digest = statement_digest(RECORD_DOMAIN, fields)

    verified: list[float] = []

    def proof(s: Session, trust: Trust) -> tuple[str, dict[str, Any]]:
        credential = security_key(s, trust, requester, "request", credential_id)
        problem = assertion_problem(credential, assertion, digest)
        if problem is not None:
            raise ApprovalError(f"{requester}'s withdrawal request is refused, nothing recorded: {problem}")
        until = _fresh(at, nonce)
        verified.append(until)
        _claim(s, nonce, until)
        _check_counter(s, credential, decoded.sign_count)
        return assertion, {"record_digest": digest.hex(), "webauthn": credential.fingerprint}

    try:
        w = queue.request_withdrawal(
            db,
            settings,
            backend,
            account=account,
            destination=destination,
            amount=amount,
            fee_rate=fee_rate,
            requester=requester,
            key=proof,
            limits=limits,
        )
    except BaseException:
        if verified:  # her real assertion, refused later (halted, no coins): it records nothing later either
            _claim_alone(db, nonce, verified[0])
        raise
    return {**w, "request_digest": request_challenge(db, int(w["id"]))}


def _claim_alone(db: Database, nonce: str, until: float) -> None:
    """The nonce of a verified record assertion whose request was refused, used in a transaction
    of its own, as the API claims a refused request's nonce: played again once the refusal's
    cause is gone (a halt lifted, coins arrived), it records nothing. Best effort: the caller
    raises the refusal itself."""
    try:
        with db.transaction() as s:
            if s.get(ServiceNonce, _NONCE_PREFIX + nonce) is None:
                s.add(ServiceNonce(nonce=_NONCE_PREFIX + nonce, expires_at=until))
    except CustodyError:
        pass


def request_challenge(db: Database, withdrawal_id: int) -> str:
    """The digest (hex) of ``withdrawal_id``'s request statement. Raises NotFound, StorageError."""
    with db.transaction() as s:
        row = wd_records._get(s, withdrawal_id)
        summary = wd_records._summary(policy_from_session(s), row, wd_records._inputs(s, withdrawal_id))
        return request_digest(summary, row.account).hex()


def sign_request_with_security_key(
    db: Database, settings: Settings, withdrawal_id: int, name: str, credential_id: str, assertion: str
) -> dict[str, Any]:
    """Store ``name``'s WebAuthn ``assertion`` over withdrawal ``withdrawal_id``'s request statement,
    made with their roster credential ``credential_id``, as the request's signature.

    Raises HaltedError, NotFound, InputError (malformed), Conflict (not awaiting its requester's
    signature), ApprovalError (not the requester, no request role, not their key, the assertion
    does not stand, counter not increasing), StorageError (the row disagrees with its transaction).
    """
    decoded = decode_assertion(assertion)
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = wd_records._get(s, withdrawal_id, lock=True)
        if not wd_records.awaiting_request_signature(row):
            raise Conflict(f"withdrawal #{withdrawal_id} does not await its requester's security key")
        if name != row.requester:
            raise ApprovalError(f"{name} did not request withdrawal #{withdrawal_id}: only its requester signs it")
        credential = security_key(s, check_pinned(s, load_trust(settings)), name, "request", credential_id)
        summary = wd_records._summary(policy, row, wd_records._inputs(s, withdrawal_id))
        digest = request_digest(summary, row.account)
        problem = assertion_problem(credential, assertion, digest)
        if problem is not None:
            raise ApprovalError(f"{name}'s request of withdrawal #{withdrawal_id} is refused: {problem}")
        _check_counter(s, credential, decoded.sign_count)
        pause_point("webauthn.counter_checked")
        row.request_signature = assertion
        s.add(row)
        s.flush()
        payload = {"withdrawal_id": withdrawal_id, "digest": digest.hex(), "webauthn": credential.fingerprint}
        audit_log.append(s, REQUEST_SIGNED, name, payload, assertion)
        return wd_records.view(s, policy, row)


CANCEL_DOMAIN = "custody/withdrawal-cancel-unsigned/v1"


def _cancel_digest(s: Session, row: WithdrawalRow, name: str, reason: str) -> bytes:
    """The statement a requester's security key signs to cancel her unsigned request: the
    withdrawal, its request statement's digest (this exact transaction), who and why."""
    summary = wd_records._summary(policy_from_session(s), row, wd_records._inputs(s, row.id or 0))
    return statement_digest(CANCEL_DOMAIN, [row.id, request_digest(summary, row.account).hex(), name, reason])


def cancel_challenge(db: Database, withdrawal_id: int, name: str, reason: str) -> str:
    """The digest (hex) ``name``'s security key signs to cancel ``withdrawal_id`` for ``reason``.
    Raises NotFound, Conflict (not a request awaiting its requester's signature)."""
    with db.transaction() as s:
        row = wd_records._get(s, withdrawal_id)
        if not wd_records.awaiting_request_signature(row):
            raise Conflict(f"withdrawal #{withdrawal_id} does not await its requester's security key")
        return _cancel_digest(s, row, name, reason).hex()


def cancel_with_security_key(
    db: Database, settings: Settings, withdrawal_id: int, name: str, reason: str, credential_id: str, assertion: str
) -> dict[str, Any]:
    """Cancel ``withdrawal_id``, a request its requester ``name`` never signed, on her WebAuthn
    ``assertion`` over :func:`cancel_challenge`'s statement: through :func:`custody.withdraw.queue.cancel`,
    as ``custody withdraw cancel`` does (its inputs and the customer's hold released, recorded
    in the audit log with the assertion). Raises InputError (malformed), NotFound, Conflict (not
    awaiting its requester's signature), ApprovalError (not the requester, not her key, the
    assertion does not stand), and what that function raises."""
    decode_assertion(assertion)

    def proof(s: Session, trust: Trust, row: WithdrawalRow) -> str:
        if not wd_records.awaiting_request_signature(row):
            raise Conflict(f"withdrawal #{withdrawal_id} does not await its requester's security key")
        if name != row.requester:
            raise ApprovalError(
                f"{name} did not request withdrawal #{withdrawal_id}: only its requester cancels it here"
            )
        credential = security_key(s, trust, name, None, credential_id)
        problem = assertion_problem(credential, assertion, _cancel_digest(s, row, name, reason))
        if problem is not None:
            raise ApprovalError(f"{name}'s cancel of withdrawal #{withdrawal_id} is refused: {problem}")
        return assertion

    return queue.cancel(db, withdrawal_id, name, proof, reason, settings=settings)
