"""Requesting a withdrawal with a security key (WebAuthn), as the approval console does.

A request signs the exact transaction (its withdrawal id, inputs, outputs and fee) and the
account, so it is made in two steps, as the browser must ask the key between them:

1. :func:`draft_request` records the request as ``custody withdraw request`` does (the same
   halt guard, rulebook, coin selection, verified change address, reservation, ledger hold and
   audit entry), for an employee with the request role and a security key in the founders'
   roster, and returns the request statement's digest: the WebAuthn challenge;
2. :func:`sign_request_with_security_key` checks the requester's assertion over exactly that
   statement against the roster (authenticator data, client data with the challenge and the
   credential's origin, the signature) and stores it as the request's signature, recorded in
   the audit log with the assertion.

Until step 2 nobody can approve the withdrawal (:func:`custody.withdraw.records._refuse_unsigned_request`),
and the offline signer verifies the stored assertion again from the PSBT with the roster
pinned on its machine (:func:`custody.identity.approvals.request_standing`). A request never
signed holds its coins and the customer's balance until it is cancelled: by any employee with
``custody withdraw cancel``, or by its requester in the console with the same security key
(:func:`cancel_with_security_key`, through the same :func:`custody.withdraw.queue.cancel`).
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.roster import Trust, check_pinned, load_trust, security_key
from custody.errors import ApprovalError, Conflict
from custody.faults import pause_point
from custody.identity.approvals import request_digest
from custody.identity.statements import statement_digest
from custody.identity.webauthn import assertion_problem, decode_assertion
from custody.store.db import Database
from custody.store.models import WithdrawalRow
from custody.withdraw import queue
from custody.withdraw import records as wd_records
from custody.withdraw.limits import Limits
from custody.withdraw.webauthn_approval import REQUEST_SIGNED, _check_counter


def draft_request(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    account: str,
    destination: str,
    amount: str,
    requester: str,
    fee_rate: str | None = None,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Record ``requester``'s withdrawal request, to be signed next with their security key; the
    withdrawal as :func:`custody.withdraw.queue.show_withdrawal` shows it, with ``request_digest``
    (hex), the challenge. Raises what :func:`custody.withdraw.queue.request_withdrawal` raises,
    and ApprovalError when the requester has no security key in the founders' roster."""
    w = queue.request_withdrawal(
        db,
        settings,
        backend,
        account=account,
        destination=destination,
        amount=amount,
        fee_rate=fee_rate,
        requester=requester,
        key=None,
        limits=limits,
    )
    return {**w, "request_digest": request_challenge(db, int(w["id"]))}


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
