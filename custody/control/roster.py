"""The store's side of the root of trust: the applied founders-signed employee roster, proposals
for the next roster, and suspensions (the pinned manifests they rest on: custody.control.trust).

Nothing here takes the store's word for who the founders or the employees are: the manifests are
the ones pinned on this machine (every founder's signature checked), and every roster row is
checked against the founders of its policy epoch before anyone is authenticated by it.
A roster can only be added by the founders' signatures (m of n, serial + 1, chained to the one
before); the online machine can propose, never enrol.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlmodel import Session, col, select

from custody.clock import now
from custody.config import Settings
from custody.control import audit_log
from custody.control.trust import (
    Trust,
    check_pinned,
    check_store_policy,
    founders_of,
    load_trust,
    manifest_in_store,
    pin_manifest,
    read_pinned,
    store_governance,
    store_trust,
    trust_from_pinned,
    trust_from_stored,
)
from custody.errors import ApprovalError, Conflict, InputError, NotFound, VerificationFailed
from custody.files import read_bounded
from custody.identity.approvals import RegistryEntry
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.founders_documents import FoundersDocument
from custody.identity.roster import (
    ROLES,
    SUSPENSION_DOMAIN,
    SUSPENSION_QUORUM,
    Employee,
    Roster,
    Suspension,
    check_employees,
    check_name,
    in_force,
    load_roster,
    parse_suspension,
    suspension_signers,
)
from custody.identity.statements import parse_pubkey, sign_statement
from custody.identity.webauthn import Credential, parse_credential
from custody.store.db import Database
from custody.store.models import RosterProposal, RosterRow, RulebookProposal, SuspensionRow

DEFAULT_ROLES = ROLES


__all__ = [  # the trust this roster is checked against lives in custody.control.trust; found here too
    "Trust",
    "check_pinned",
    "check_store_policy",
    "founders_of",
    "load_trust",
    "manifest_in_store",
    "pin_manifest",
    "read_pinned",
    "store_governance",
    "store_trust",
    "trust_from_pinned",
    "trust_from_stored",
]


# ---------------------------------------------------------------- the applied roster


def _row_roster(row: RosterRow, trust: Trust) -> Roster:
    try:
        roster = load_roster(row.document.encode())
    except InputError as exc:
        raise VerificationFailed(f"the store's roster #{row.serial} is unreadable: {exc}") from None
    problems = trust.governance.problems(roster)
    if roster.serial != row.serial or roster.digest != row.digest:
        problems.append("its serial or digest disagree with the row")
    if problems:
        raise VerificationFailed(
            f"the store's roster #{row.serial} does not stand against the pinned founders' manifests: "
            + "; ".join(problems)
        )
    return roster


def current_roster(s: Session, trust: Trust) -> Roster | None:
    """The newest applied roster, its founders' signatures checked (None before the first).

    Raises VerificationFailed when it does not stand (a row edited, inserted or swapped).
    """
    rows = list(s.exec(select(RosterRow).order_by(col(RosterRow.serial).desc()).limit(2)).all())
    if not rows:
        return None
    roster = _row_roster(rows[0], trust)
    if len(rows) > 1 and roster.previous != rows[1].digest:
        raise VerificationFailed(f"the store's roster #{roster.serial} does not follow roster #{rows[1].serial}")
    return roster


def _suspensions(s: Session) -> list[Suspension]:
    out = []
    for row in s.exec(select(SuspensionRow).order_by(col(SuspensionRow.id))).all():
        try:
            out.append(parse_suspension(json.loads(row.document)))
        except (InputError, ValueError):
            continue  # an unreadable suspension suspends nobody; the log still has it
    return out


@dataclass(frozen=True)
class Standing:
    """The roster in force and who is suspended under it."""

    roster: Roster | None
    suspended: dict[str, str]  # name -> suspension digest

    def refusal(self, name: str, role: str | None) -> str | None:
        """Why ``name`` may not act in ``role`` (None: they may; role None: any enabled,
        unsuspended employee, as for raising a halt)."""
        e = self.roster.employee(name) if self.roster else None
        if e is None:
            return "not an employee of the founders' roster"
        if not e.enabled:
            return "disabled in the founders' roster"
        if name in self.suspended:
            return "suspended"
        if role is not None and role not in e.roles:
            return f"has no {role} role in the founders' roster"
        return None

    def registry(self, role: str) -> dict[str, RegistryEntry]:
        if self.roster is None:
            return {}
        return {
            e.name: RegistryEntry(e.name, e.keys, self.refusal(e.name, role), e.webauthn) for e in self.roster.employees
        }


def standing(s: Session, trust: Trust) -> Standing:
    roster = current_roster(s, trust)
    return Standing(roster, in_force(_suspensions(s), roster, trust.governance.manifests) if roster else {})


def authenticate(s: Session, trust: Trust, name: str, key: EmployeeSigner, role: str | None) -> Employee:
    """The roster employee ``name``, allowed ``role``, whose roster key ``key`` is.

    Raises NotFound (no roster, or nobody of that name), ApprovalError (disabled, suspended,
    no such role, or the key is not theirs), VerificationFailed (the roster does not stand).
    """
    e = employee_in_role(s, trust, name, role)
    if key.public_key.hex() not in e.keys:
        raise ApprovalError(f"the key given (file or token) is not one of {name}'s keys in the founders' roster")
    return e


def security_key(s: Session, trust: Trust, name: str, role: str | None, credential_id: str | None) -> Credential:
    """The roster employee ``name``'s security key ``credential_id`` (None: any of theirs, the first),
    ``name`` allowed ``role``. Raises what :func:`employee_in_role` raises, and ApprovalError when
    the security key is not theirs (or they have none)."""
    e = employee_in_role(s, trust, name, role)
    credential = next((c for c in e.webauthn if credential_id in (None, c.id)), None)
    if credential is None:
        raise ApprovalError(f"this security key is not {name}'s in the founders' roster")
    return credential


def employee_in_role(s: Session, trust: Trust, name: str, role: str | None) -> Employee:
    """The roster employee ``name``, allowed ``role`` (None: any enabled, unsuspended employee).

    Raises NotFound (no roster, or nobody of that name), ApprovalError (disabled, suspended,
    no such role), VerificationFailed (the roster does not stand).
    """
    st = standing(s, trust)
    if st.roster is None:
        raise NotFound("there is no founders-signed roster yet: no employee can act (`custody roster`)")
    e = st.roster.employee(name)
    if e is None:
        raise NotFound(f"no employee named {name!r} in the founders' roster #{st.roster.serial}")
    refusal = st.refusal(name, role)
    if refusal is not None:
        raise ApprovalError(f"{name} may not {role or 'act'}: {refusal}")
    return e


# ---------------------------------------------------------------- proposals


@dataclass(frozen=True)
class Change:
    """One change to the roster: add, disable, enable, set roles, add a key, clear a suspension."""

    kind: str  # add | disable | enable | roles | key | webauthn | clear
    name: str
    pubkey: str | None = None
    roles: tuple[str, ...] = ()
    digest: str | None = None
    credential: Credential | None = None  # webauthn: a security key's credential


def webauthn_change(name: str, path: Path) -> Change:
    """Add the security-key credential in ``path`` (what the approval console's registration
    page shows: ``{id, public_key, rp_id, origin}``) to employee ``name``. Raises InputError."""
    try:
        doc = json.loads(read_bounded(path, 64 * 1024, "WebAuthn credential"))
    except FileNotFoundError:
        raise InputError(f"no WebAuthn credential file {path}") from None
    except ValueError:
        raise InputError(f"{path} is not a JSON WebAuthn credential") from None
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k in ("id", "public_key", "rp_id", "origin")}
    return Change("webauthn", name, credential=parse_credential(doc, str(path)))


def parse_roles(text: str) -> tuple[str, ...]:
    roles = tuple(sorted({r.strip() for r in text.split(",") if r.strip()}))
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise InputError(f"roles are a comma-separated list of {', '.join(ROLES)}; got {text!r}")
    return roles


def _apply_change(employees: dict[str, Employee], cleared: set[str], c: Change) -> None:
    e = employees.get(c.name)
    if c.kind == "add":
        if e is not None:
            raise Conflict(f"{c.name} is in the roster already (use --enable, --roles or --key)")
        assert c.pubkey is not None
        employees[c.name] = Employee(check_name(c.name), (parse_pubkey(c.pubkey),), frozenset(c.roles or DEFAULT_ROLES))
        return
    if c.kind == "clear":
        assert c.digest is not None
        cleared.add(c.digest)
        return
    if e is None:
        raise NotFound(f"no employee named {c.name!r} in the roster")
    if c.kind == "disable":
        employees[c.name] = replace(e, enabled=False)
    elif c.kind == "enable":
        employees[c.name] = replace(e, enabled=True)
    elif c.kind == "roles":
        employees[c.name] = replace(e, roles=frozenset(c.roles))
    elif c.kind == "key":
        assert c.pubkey is not None
        employees[c.name] = replace(e, keys=(*e.keys, parse_pubkey(c.pubkey)))
    elif c.kind == "webauthn":
        assert c.credential is not None
        if any(w.id == c.credential.id for w in e.webauthn):
            raise Conflict(f"{c.name} has this WebAuthn credential already")
        employees[c.name] = replace(e, webauthn=(*e.webauthn, c.credential))
    else:
        raise InputError(f"unknown roster change {c.kind!r}")


def open_proposal(s: Session) -> RosterProposal | None:
    return s.exec(select(RosterProposal).where(RosterProposal.status == "open")).first()


def propose(db: Database, settings: Settings, changes: Sequence[Change], actor: str = "operator") -> Roster:
    """Add ``changes`` to the open proposal for the next roster (made from the current one).

    A proposal changes nothing until m founders sign it offline and it is applied.
    Raises InputError, Conflict, NotFound, VerificationFailed.
    """
    trust = load_trust(settings)
    db.check_schema()
    with db.transaction() as s:
        current = current_roster(s, trust)
        row = open_proposal(s)
        if row is not None:
            base = load_roster(row.document.encode())
            if base.serial != (current.serial + 1 if current else 1) or base.manifest != trust.founders.manifest:
                row.status = "superseded"
                s.add(row)
                row = None
        if row is None:
            base = Roster(
                trust.founders.network,
                trust.founders.manifest,
                current.serial + 1 if current else 1,
                current.digest if current else None,
                current.employees if current else (),
                (),
            )
        employees = {e.name: e for e in base.employees}
        cleared = set(base.cleared_suspensions)
        for c in changes:
            _apply_change(employees, cleared, c)
        check_employees(list(employees.values()))
        proposal = Roster(
            base.network,
            base.manifest,
            base.serial,
            base.previous,
            tuple(sorted(employees.values(), key=lambda e: e.name)),
            tuple(sorted(cleared)),
        )
        document = json.dumps(proposal.to_document())
        if row is None:
            s.add(
                RosterProposal(
                    serial=proposal.serial, document=document, status="open", created_by=actor, created_at=now()
                )
            )
        else:
            row.document = document
            s.add(row)
        audit_log.append(
            s,
            "roster.proposed",
            actor,
            {
                "serial": proposal.serial,
                "digest": proposal.digest,
                "changes": [
                    {"kind": c.kind, "name": c.name, "pubkey": c.pubkey, "roles": list(c.roles), "digest": c.digest}
                    for c in changes
                ],
            },
        )
        return proposal


def discard_proposal(db: Database, actor: str = "operator") -> Roster:
    """Drop the open proposal (it enrolled nobody). Raises NotFound."""
    return discard_open(db, "roster", open_proposal, load_roster, actor)


D = TypeVar("D", bound=FoundersDocument)
P = TypeVar("P", RosterProposal, RulebookProposal)


def discard_open(
    db: Database, kind: str, find: Callable[[Session], P | None], load: Callable[[bytes], D], actor: str
) -> D:
    """Drop the open ``kind`` proposal (``find`` finds its row, ``load`` reads its document):
    the row marked discarded, in the audit log too (``<kind>.discarded``). Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        row, dropped = open_document(s, kind, find, load)
        row.status = "discarded"
        s.add(row)
        audit_log.append(s, f"{dropped.KIND}.discarded", actor, {"serial": dropped.serial, "digest": dropped.digest})
        return dropped


def open_document(
    s: Session, kind: str, find: Callable[[Session], P | None], load: Callable[[bytes], D], hint: str = ""
) -> tuple[P, D]:
    """The open ``kind`` proposal's row (``find`` finds it) and its document (``load`` reads it).
    Raises NotFound, its message ending with ``hint``."""
    row = find(s)
    if row is None:
        raise NotFound(f"no {kind} proposal is open{hint}")
    return row, load(row.document.encode())


def proposal(db: Database) -> Roster:
    """The open proposal. Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        hint = " (`custody roster propose` or `custody employee keygen`)"
        return open_document(s, "roster", open_proposal, load_roster, hint)[1]


def apply_roster(db: Database, settings: Settings, data: bytes, actor: str = "operator") -> Roster:
    """Apply a founders-signed roster: m founders of the pinned manifest, the next serial,
    chained to the current roster. Raises InputError, ApprovalError (signatures), Conflict
    (not the next serial, or not chained)."""
    trust = load_trust(settings)
    roster = load_roster(data)
    problems = trust.governance.problems(roster)
    if problems:
        raise ApprovalError(f"roster #{roster.serial} is not signed as the founders' roster: " + "; ".join(problems))
    db.check_schema()
    with db.transaction() as s:
        current = current_roster(s, trust)
        expected = current.serial + 1 if current else 1
        if roster.serial != expected:
            raise Conflict(
                f"roster #{roster.serial} is not the next roster (the store has #{expected - 1}): "
                "rosters only go up, one at a time"
            )
        if roster.previous != (current.digest if current else None):
            raise Conflict(f"roster #{roster.serial} does not follow the store's roster #{expected - 1}")
        s.add(
            RosterRow(
                serial=roster.serial, digest=roster.digest, document=json.dumps(roster.to_document()), applied_at=now()
            )
        )
        row = open_proposal(s)
        if row is not None:
            row.status = "applied" if load_roster(row.document.encode()).digest == roster.digest else "superseded"
            s.add(row)
        audit_log.append(
            s,
            "roster.applied",
            actor,
            {
                "serial": roster.serial,
                "digest": roster.digest,
                "signed_by": sorted(roster.signatures),
                "employees": [e.to_dict() for e in roster.employees],
                "cleared_suspensions": list(roster.cleared_suspensions),
            },
        )
    return roster


def roster_view(db: Database, settings: Settings) -> dict[str, Any]:
    """The roster in force, who is suspended, and the open proposal."""
    trust = load_trust(settings)
    db.check_schema()
    with db.transaction() as s:
        st = standing(s, trust)
        row = open_proposal(s)
        pending = load_roster(row.document.encode()) if row else None
        sus = [
            {
                "employee": x.employee,
                "reason": x.reason,
                "digest": x.digest,
                "signed_by": [n for n, _ in x.signatures],
                "in_force": st.suspended.get(x.employee) == x.digest,
            }
            for x in _suspensions(s)
        ]
    r = st.roster
    return {
        "manifest": trust.newest.fingerprint,
        "serial": r.serial if r else None,
        "digest": r.digest if r else None,
        "signed_by": sorted(r.signatures) if r else [],
        "employees": [e.to_dict() | {"suspended": e.name in st.suspended} for e in (r.employees if r else ())],
        "suspensions": sus,
        "proposal": pending.to_document() if pending else None,
    }


def export_roster(db: Database) -> dict[str, Any]:
    """The newest applied roster's document (for a signer machine to pin)."""
    db.check_schema()
    with db.transaction() as s:
        row = s.exec(select(RosterRow).order_by(col(RosterRow.serial).desc())).first()
        if row is None:
            raise NotFound("no roster has been applied yet")
        return dict(json.loads(row.document))


def suspension_documents(s: Session) -> list[dict[str, Any]]:
    return [x.to_dict() for x in _suspensions(s)]


# ---------------------------------------------------------------- suspensions


def suspend(
    db: Database, settings: Settings, target: str, reason: str, name: str, key: EmployeeSigner
) -> tuple[Suspension, bool]:
    """``name`` signs the suspension of ``target``; in force at two distinct roster employees.

    Any enabled roster employee may sign (not the target). Returns the suspension with the
    signatures so far and whether it is in force. Raises InputError, NotFound, ApprovalError.
    """
    reason = " ".join(reason.split())[:500]
    if not reason:
        raise InputError("a suspension needs a reason")
    if name == target:
        raise ApprovalError("an employee cannot sign their own suspension")
    trust = load_trust(settings)
    db.check_schema()
    with db.transaction() as s:
        st = standing(s, trust)
        if st.roster is None:
            raise NotFound("there is no founders-signed roster yet")
        if st.roster.employee(target) is None:
            raise NotFound(f"no employee named {target!r} in the founders' roster")
        signer = st.roster.employee(name)
        if signer is None:
            raise NotFound(f"no employee named {name!r} in the founders' roster")
        if not signer.enabled or name in st.suspended:
            raise ApprovalError(f"{name} may not sign a suspension: disabled or suspended")
        if key.public_key.hex() not in signer.keys:
            raise ApprovalError(f"the key given is not one of {name}'s keys in the founders' roster")
        draft = Suspension(st.roster.network, st.roster.manifest, st.roster.serial, target, reason, ())
        row = s.exec(select(SuspensionRow).where(SuspensionRow.digest == draft.digest)).first()
        sigs = dict(parse_suspension(json.loads(row.document)).signatures) if row else {}
        sigs[name] = sign_statement(key, SUSPENSION_DOMAIN, draft.fields())
        sus = Suspension(draft.network, draft.manifest, draft.serial, target, reason, tuple(sorted(sigs.items())))
        if row is None:
            s.add(
                SuspensionRow(digest=sus.digest, employee=target, document=json.dumps(sus.to_dict()), created_at=now())
            )
        else:
            row.document = json.dumps(sus.to_dict())
            s.add(row)
        signers = suspension_signers(sus, st.roster, trust.governance.manifests)
        active = len(signers) >= SUSPENSION_QUORUM
        audit_log.append(
            s,
            "employee.suspended" if active else "employee.suspension_signed",
            name,
            {"employee": target, "reason": reason, "digest": sus.digest, "signed_by": signers},
            sigs[name],
        )
        return sus, active
