"""Employee identities: a name and a registered public key, enabled or disabled."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlmodel import Session, col, select

from custody.clock import now
from custody.control import audit_log
from custody.errors import ApprovalError, Conflict, NotFound, StorageError
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.keyfile import EmployeeKey
from custody.identity.statements import parse_pubkey
from custody.policy.model import _check_name
from custody.store.db import Database
from custody.store.models import AuditEntry, EmployeeRow


def add_employee(db: Database, name: str, pubkey_hex: str, actor: str = "operator") -> EmployeeRow:
    """Register an employee. Raises InputError, Conflict (name or key taken)."""
    name = _check_name(name)
    pubkey = parse_pubkey(pubkey_hex)
    db.check_schema()
    with db.transaction() as s:
        if s.exec(select(EmployeeRow).where(EmployeeRow.name == name)).first():
            raise Conflict(f"employee {name} exists already")
        if s.exec(select(EmployeeRow).where(EmployeeRow.pubkey == pubkey)).first():
            raise Conflict("that public key is registered to another employee")
        row = EmployeeRow(name=name, pubkey=pubkey, enabled=True, created_at=now())
        s.add(row)
        audit_log.append(s, "employee.added", actor, {"name": name, "pubkey": pubkey})
        s.flush()
        return row


def disable_employee(db: Database, name: str, actor: str = "operator") -> EmployeeRow:
    """Disable an employee: their approvals and lifts count no more. Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        row = s.exec(select(EmployeeRow).where(EmployeeRow.name == name)).first()
        if row is None:
            raise NotFound(f"no employee named {name}")
        if row.enabled:
            row.enabled = False
            row.disabled_at = now()
            s.add(row)
            audit_log.append(s, "employee.disabled", actor, {"name": name})
        return row


def list_employees(db: Database) -> list[EmployeeRow]:
    db.check_schema()
    with db.transaction() as s:
        return list(s.exec(select(EmployeeRow).order_by(col(EmployeeRow.name))).all())


def recorded_keys(s: Session) -> dict[str, str]:
    """Each employee's public key as the audit log recorded it when they were added."""
    keys: dict[str, str] = {}
    for payload in s.exec(select(AuditEntry.payload).where(AuditEntry.event == "employee.added")):
        doc = json.loads(payload)
        keys[str(doc.get("name"))] = str(doc.get("pubkey"))
    return keys


def check_registry(s: Session, rows: Sequence[EmployeeRow] | None = None) -> None:
    """Raise StorageError when an employee's key in the store is not the one the audit log
    recorded when they were added: a key swapped in the database is caught here."""
    recorded = recorded_keys(s)
    for row in rows if rows is not None else s.exec(select(EmployeeRow)).all():
        if recorded.get(row.name) != row.pubkey:
            raise StorageError(
                f"employee {row.name}'s public key in the store is not the one recorded when they were added: "
                "the store was tampered with"
            )


def authenticate(s: Session, name: str, key: EmployeeSigner | EmployeeKey) -> EmployeeRow:
    """The enabled employee ``name`` whose registered public key is ``key``'s.

    ``key`` is an EmployeeSigner (key file or token) or a decrypted EmployeeKey. Raises
    NotFound (no such employee), ApprovalError (disabled, or the key is not theirs).
    """
    row = s.exec(select(EmployeeRow).where(EmployeeRow.name == name)).first()
    if row is None:
        raise NotFound(f"no employee named {name}")
    if not row.enabled:
        raise ApprovalError(f"employee {name} is disabled")
    check_registry(s, [row])
    if row.pubkey != key.public_key.hex():
        raise ApprovalError(f"the key given (file or token) is not the registered key of employee {name}")
    return row
