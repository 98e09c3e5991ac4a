"""Raising and lifting a halt with a security key (WebAuthn), as the approval console does.

The statements are the ones a key file signs (:mod:`custody.control.halt`): a raise names
the employee, the reason and the moment; a lift names the exact halt. Their digests are the
WebAuthn challenges. A raise needs any one enabled, unsuspended employee of the founders'
roster; a lift counts once per employee with the lift role, and the halt is lifted at two
distinct employees, whatever mix of key files and security keys they signed with. The
assertion is stored as the signature, so the store, the log's re-derivation and a later
reader check it against the roster like a key file's signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, halt_log
from custody.control import halt as halt_lib
from custody.control import halt_lift as lift_lib
from custody.control.roster import check_pinned, load_trust, security_key
from custody.errors import ApprovalError, Conflict, InputError, NotFound
from custody.identity.statements import statement_digest
from custody.identity.webauthn import decode_assertion, signs_statement
from custody.store.db import Database
from custody.store.models import HaltLift, HaltRow


@dataclass(frozen=True)
class Challenge:
    """What the browser asks the security key to sign: the statement's digest, and for a raise
    the moment the statement names."""

    digest: str
    at: str | None = None


def raise_challenge(name: str, reason: str) -> Challenge:
    """The statement a security key signs to halt trading now. Raises InputError."""
    reason = reason.strip()
    if not reason:
        raise InputError("a halt needs a reason")
    at = iso(now(), "microseconds") or ""
    return Challenge(statement_digest(halt_lib.RAISE_DOMAIN, [name, reason, at]).hex(), at)


def raise_with_security_key(
    db: Database, settings: Settings, name: str, reason: str, at: str, credential_id: str, assertion: str
) -> halt_lib.RaisedHalt:
    """Halt trading on ``name``'s security-key assertion over ``[name, reason, at]``.

    Raises InputError, NotFound, ApprovalError (not theirs, disabled, suspended, the assertion
    does not stand) before anything is halted; see :func:`custody.control.halt.raise_halt`.
    """
    decode_assertion(assertion)
    reason = reason.strip()
    with db.transaction() as s:
        credential = security_key(s, check_pinned(s, load_trust(settings)), name, None, credential_id)
    if not signs_statement(credential, assertion, halt_lib.RAISE_DOMAIN, [name, reason, at]):
        raise ApprovalError(f"{name}'s halt request is refused: the security key did not sign this statement")
    return halt_lib.raise_halt(db, settings, reason=reason, source="employee", actor=name, signature=assertion, at=at)


def lift_challenge(db: Database, halt_id: int) -> Challenge:
    """The statement a security key signs to consent to lifting ``halt_id``. Raises NotFound."""
    with db.transaction() as s:
        h = s.get(HaltRow, halt_id)
        if h is None or not h.active:
            raise NotFound(f"no active halt #{halt_id}")
        return Challenge(statement_digest(halt_log.LIFT_DOMAIN, lift_lib.lift_statement(h)).hex())


def lift_with_security_key(
    db: Database, settings: Settings, halt_id: int, name: str, credential_id: str, assertion: str
) -> lift_lib.LiftResult:
    """Add ``name``'s security-key consent to lifting ``halt_id``; lifted at two distinct employees.

    Raises InputError, NotFound, Conflict (not active), ApprovalError (no lift role, not their
    key, the assertion does not stand).
    """
    decode_assertion(assertion)
    trust = load_trust(settings)
    with db.transaction() as s:
        h = s.exec(select(HaltRow).where(HaltRow.id == halt_id).with_for_update()).first()
        if h is None or not h.active:
            raise Conflict(f"halt #{halt_id} is not active") if h is not None else NotFound(f"no halt #{halt_id}")
        credential = security_key(s, check_pinned(s, trust), name, "lift", credential_id)
        if not signs_statement(credential, assertion, halt_log.LIFT_DOMAIN, lift_lib.lift_statement(h)):
            raise ApprovalError(f"{name}'s lift of halt #{halt_id} is refused: the security key did not sign it")
        for old in s.exec(select(HaltLift).where(HaltLift.halt_id == halt_id, HaltLift.employee == name)).all():
            s.delete(old)  # one consent per employee: the newest
        s.flush()
        s.add(HaltLift(halt_id=halt_id, employee=name, pubkey=credential.fingerprint, signature=assertion, at=now()))
        audit_log.append(
            s, "halt.lift_signed", name, {"halt_id": halt_id, "webauthn": credential.fingerprint}, assertion
        )
        s.flush()
        signers, lifted = lift_lib.conclude_lift(s, trust, h)
    state = halt_lib.publish(db, settings) if lifted else None
    return lift_lib.LiftResult(halt_id, signers, lifted, halt_log.LIFT_QUORUM, state)
