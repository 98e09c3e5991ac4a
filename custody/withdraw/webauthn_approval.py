"""Approving a withdrawal with a security key (WebAuthn), as the approval console does.

The console shows the employee the withdrawal and its statement digest; the browser asks the
security key to sign that digest as the WebAuthn challenge; this module checks the assertion
against the founders' roster (the credential must be the employee's, the employee must hold
the approve role) and stores it as the employee's approval, exactly like a key file's
signature: the same halt guard, rulebook, self-approval refusal and audit entry, and the
offline signer checks it again from the PSBT with the roster pinned on its machine.

The security key's signature counter is kept with the approvals themselves and the requests
it recorded and signed: a counter that is not above the highest one already stored for that
credential is refused (a cloned key, or an assertion played again), unless the key keeps no
counter (always 0).
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from custody.clock import now
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.roster import check_pinned, load_trust, standing
from custody.control.wallet import policy_from_session
from custody.errors import ApprovalError, Conflict, NotFound
from custody.faults import crash_point
from custody.identity.approvals import RegistryEntry
from custody.identity.webauthn import Credential, assertion_problem, decode_assertion
from custody.store.db import Database
from custody.store.models import ApprovalRow, AuditEntry
from custody.withdraw import records as wd_records
from custody.withdraw import states as wd_states

REQUEST_SIGNED = "withdrawal.request_signed"
"""The audit event of a request signed with a security key (custody.withdraw.webauthn_request)."""
REQUESTED = "withdrawal.requested"
"""The audit event of a request recorded, in the console on the requester's security key."""


def _entry(s: Session, settings: Settings, name: str) -> RegistryEntry:
    """The roster's approver ``name`` (checked against the pinned manifest). Raises NotFound, ApprovalError."""
    st = standing(s, check_pinned(s, load_trust(settings)))
    if st.roster is None:
        raise NotFound("there is no founders-signed roster yet: no employee can approve")
    entry = st.registry("approve").get(name)
    if entry is None:
        raise NotFound(f"no employee named {name!r} in the founders' roster #{st.roster.serial}")
    if entry.refusal is not None:
        raise ApprovalError(f"{name} may not approve: {entry.refusal}")
    return entry


def _credential(entry: RegistryEntry, credential_id: str) -> Credential:
    credential = next((c for c in entry.webauthn if c.id == credential_id), None)
    if credential is None:
        raise ApprovalError(f"this security key is not {entry.name}'s in the founders' roster")
    return credential


def _count(credential: Credential, text: str) -> int:
    """A stored assertion's counter, if ``credential`` made it (over whatever challenge); 0 for
    anything else: a row or an audit entry planted by SQL with a high counter would otherwise
    lock the employee's key out for good."""
    if assertion_problem(credential, text, None) is not None:
        return 0
    return decode_assertion(text).sign_count


def _check_counter(s: Session, credential: Credential, count: int) -> None:
    """Refuse a signature counter at or below one already stored for this credential: in its
    approvals, and in the requests it recorded and signed (their audit entries name it)."""
    stored = list(s.exec(select(ApprovalRow.signature).where(ApprovalRow.pubkey == credential.fingerprint)).all())
    requests = select(AuditEntry.signature).where(
        col(AuditEntry.event).in_((REQUEST_SIGNED, REQUESTED)),
        col(AuditEntry.payload).contains(credential.fingerprint, autoescape=True),
    )
    stored += [text or "" for text in s.exec(requests).all()]
    highest = max((_count(credential, text) for text in stored), default=0)
    if (count or highest) and count <= highest:
        raise ApprovalError(
            f"the security key's signature counter {count} is not above {highest}, the highest already used: "
            "a cloned key or a replayed assertion"
        )


def approve_with_security_key(
    db: Database, settings: Settings, withdrawal_id: int, name: str, credential_id: str, assertion: str
) -> dict[str, Any]:
    """Store employee ``name``'s WebAuthn ``assertion`` (:func:`custody.identity.webauthn.decode_assertion`'s
    form) over withdrawal ``withdrawal_id``'s statement, made with their roster credential ``credential_id``.

    Raises HaltedError, NotFound, InputError (malformed), ApprovalError (not theirs, no approve
    role, self-approval, the assertion does not stand, counter not increasing), PolicyViolation,
    Conflict (not awaiting approval), VerificationFailed.
    """
    decoded = decode_assertion(assertion)
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = wd_records._get(s, withdrawal_id, lock=True)
        wd_records._not_in_batch(row)
        if row.kind == wd_states.BATCH:
            raise Conflict(f"#{withdrawal_id} is a batch: its members' approvals are its approvals")
        if row.status not in (wd_states.REQUESTED, wd_states.APPROVED):
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; approvals are closed")
        credential = _credential(_entry(s, settings, name), credential_id)
        if name == row.requester:
            raise ApprovalError(f"{name} requested withdrawal #{withdrawal_id} and cannot approve it")
        summary = wd_records._summary(policy, row, wd_records._inputs(s, withdrawal_id))
        wd_records._refuse_unsigned_request(s, row, summary)
        wd_records._enforce(s, policy, row)
        problem = assertion_problem(credential, assertion, bytes.fromhex(summary.digest()))
        if problem is not None:
            raise ApprovalError(f"{name}'s approval of withdrawal #{withdrawal_id} is refused: {problem}")
        _check_counter(s, credential, decoded.sign_count)
        existing = s.exec(
            select(ApprovalRow).where(ApprovalRow.withdrawal_id == withdrawal_id, ApprovalRow.employee == name)
        ).first()
        if existing is not None:
            s.delete(existing)  # the newest approval of an employee is theirs (an older one may be of an older tx)
            s.flush()
        digest = summary.digest()
        s.add(
            ApprovalRow(
                withdrawal_id=withdrawal_id,
                employee=name,
                pubkey=credential.fingerprint,
                digest=digest,
                signature=assertion,
                at=now(),
            )
        )
        s.flush()
        payload = {"withdrawal_id": withdrawal_id, "digest": digest, "webauthn": credential.fingerprint}
        audit_log.append(s, "withdrawal.approved", name, payload, assertion)
        _, check = wd_records._check(s, policy, row)
        if check.enough and row.status == wd_states.REQUESTED:
            wd_records._touch(s, row, wd_states.next_state(row.status, wd_states.Event.APPROVED))
        result = wd_records.view(s, policy, row)
    crash_point("withdrawal.approved")
    return result
