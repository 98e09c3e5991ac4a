"""Who is owed what, under which account number and nonce, for the proof of liabilities.

* :func:`owed` reads what the exchange owes: every customer account (zero included) and
  every withdrawal hold, less the holds whose transaction the chain already confirms
  (their coins have left; ``custody sync`` settles them). A negative balance (a customer
  who owes the exchange after a reorganisation) counts as zero and is reported.
* :func:`assign_numbers` gives each such ledger account a stable number, once: drawn at
  random among twelve-digit numbers (so that a number says nothing of how many customers
  there are or when one joined), stored in ``liability_account`` and recorded in the audit
  log (``liabilities.account_numbered``) in the same transaction.
* :func:`nonces` reads each account's 32-byte account nonce from its file in the nonces
  directory, or draws one and writes the file (mode 0600, never overwritten). The file is
  what the customer is given, once, privately. The store keeps only the nonce's SHA-256
  (``liabilities.nonce_issued`` in the audit log), so a nonce file that goes missing or is
  replaced is refused, never silently renewed: a renewed nonce would break every check
  the customer makes with the one they were given.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from custody.books import ledger
from custody.chain.types import ChainBackend
from custody.clock import now
from custody.control import audit_log
from custody.errors import Conflict, InputError
from custody.files import SECRET_FILE_MAX, read_limited_text
from custody.store.db import Database
from custody.store.models import AuditEntry, LedgerAccount, LiabilityAccountRow, WithdrawalRow

NUMBER_LOW = 10**11
NUMBER_HIGH = 10**12 - 1
NONCE_FORMAT = "custody-account-nonce"
NONCE_VERSION = 1
PUBLISHED_EVENT = "audit.liabilities"


@dataclass(frozen=True)
class Owed:
    """Satoshis owed per ledger account key (negative ones already counted as zero)."""

    balances: dict[str, int]
    negative: list[str]  # accounts below zero, counted as zero
    settling: list[tuple[int, int]]  # (withdrawal id, amount) left out: confirmed on chain
    customers: int
    held: int

    @property
    def total(self) -> int:
        return sum(self.balances.values())


def owed(db: Database, backend: ChainBackend) -> Owed:
    """What the proof of liabilities counts, now. Raises NodeError, StorageError."""
    with db.transaction() as s:
        rows = s.exec(
            select(LedgerAccount)
            .where(col(LedgerAccount.kind).in_(ledger.LIABILITY_KINDS))
            .order_by(col(LedgerAccount.key))
        ).all()
        broadcast = {
            ledger.held(w.id or 0): (w.id or 0, w.txid or "")
            for w in s.exec(select(WithdrawalRow).where(WithdrawalRow.status == "broadcast")).all()
            if w.txid
        }
    balances: dict[str, int] = {}
    negative: list[str] = []
    settling: list[tuple[int, int]] = []
    for a in rows:
        amount = -a.balance
        if amount < 0:
            negative.append(a.key)
            amount = 0
        if a.kind == "held" and amount and a.key in broadcast:
            wid, txid = broadcast[a.key]
            if backend.tx_status(txid).confirmations > 0:
                settling.append((wid, amount))
                continue
        if a.kind == "customer" or amount:
            balances[a.key] = amount
    customers = sum(v for k, v in balances.items() if k.startswith("customer:"))
    return Owed(balances, negative, settling, customers, sum(balances.values()) - customers)


def assign_numbers(s: Session, keys: Sequence[str], actor: str = "auditor") -> dict[str, int]:
    """The account number of each ledger key, assigning (and logging) the missing ones."""
    rows = {r.ledger_key: r.number for r in s.exec(select(LiabilityAccountRow)).all()}
    taken = set(rows.values())
    for key in keys:
        if key in rows:
            continue
        number = secrets.randbelow(NUMBER_HIGH - NUMBER_LOW + 1) + NUMBER_LOW
        while number in taken:
            number = secrets.randbelow(NUMBER_HIGH - NUMBER_LOW + 1) + NUMBER_LOW
        taken.add(number)
        rows[key] = number
        s.add(LiabilityAccountRow(number=number, ledger_key=key, assigned_at=now()))
        s.flush()
        audit_log.append(s, "liabilities.account_numbered", actor, {"ledger_account": key, "number": number})
    return {key: rows[key] for key in keys}


def account_numbers(db: Database) -> dict[str, int]:
    """Every ledger key's account number so far."""
    with db.transaction() as s:
        return {r.ledger_key: r.number for r in s.exec(select(LiabilityAccountRow)).all()}


# ---------------------------------------------------------------- account nonces


@dataclass(frozen=True)
class AccountNonce:
    ledger_key: str
    number: int
    nonce: bytes
    path: Path
    new: bool  # drawn by this run: its file is to be given to the customer


def nonce_path(directory: Path, number: int) -> Path:
    return directory / f"{number}.json"


def nonce_document(ledger_key: str, number: int, nonce: bytes) -> dict[str, Any]:
    """The nonce file a customer is given (docs/FORMATS.md)."""
    return {
        "format": NONCE_FORMAT,
        "version": NONCE_VERSION,
        "ledger_account": ledger_key,
        "account_number": number,
        "account_nonce": nonce.hex(),
    }


def read_nonce_file(path: Path) -> tuple[str, int, bytes]:
    """(ledger key, account number, account nonce) of a nonce file. Raises InputError."""
    try:
        doc = json.loads(read_limited_text(path, SECRET_FILE_MAX, "nonce file"))
    except FileNotFoundError:
        raise InputError(f"nonce file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"nonce file {path} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != NONCE_FORMAT or doc.get("version") != NONCE_VERSION:
        raise InputError(f"{path} is not a {NONCE_FORMAT} file of version {NONCE_VERSION}")
    key, number, nonce_hex = doc.get("ledger_account"), doc.get("account_number"), doc.get("account_nonce")
    if not isinstance(key, str) or not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise InputError(f"nonce file {path} has no ledger account or account number")
    try:
        nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
    except ValueError:
        nonce = b""
    if len(nonce) != 32:
        raise InputError(f"nonce file {path}: the account nonce must be 64 hex digits")
    return key, number, nonce


def nonces(db: Database, directory: Path, numbers: Mapping[str, int], actor: str = "auditor") -> list[AccountNonce]:
    """The account nonce of each ``numbers`` entry (ledger key -> number), from ``directory``.

    Every existing file is checked before anything is written: a file for another account,
    a file whose nonce is not the one recorded, or a recorded nonce whose file is missing
    is refused (Conflict), with nothing written. Then missing nonces are drawn and their
    files written (0600, fsync'ed, never overwritten) before their SHA-256 is recorded, so
    a run killed in between finds the file the next time and records it then.
    Raises Conflict, InputError (unreadable or unwritable files), StorageError.
    """
    with db.transaction() as s:
        recorded = {r.number: r.nonce_sha256 for r in s.exec(select(LiabilityAccountRow)).all()}
    found: dict[int, tuple[str, bytes]] = {}
    for key, number in numbers.items():
        path = nonce_path(directory, number)
        digest = recorded.get(number)
        if path.exists():
            file_key, file_number, nonce = read_nonce_file(path)
            if (file_key, file_number) != (key, number):
                raise Conflict(f"nonce file {path} is for account {file_number} ({file_key}), not {number} ({key})")
            if digest is not None and hashlib.sha256(nonce).hexdigest() != digest:
                raise Conflict(
                    f"nonce file {path} holds another nonce than the one issued to account {number} ({key}): "
                    "it was replaced; restore the issued file from a backup"
                )
            found[number] = (key, nonce)
        elif digest is not None:
            raise Conflict(
                f"the nonce of account {number} ({key}) was issued, and its file {path} is missing: restore it "
                f"from a backup (is {directory} the nonces directory of earlier runs?); a new nonce would "
                "break the checks its customer makes"
            )
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InputError(f"cannot create the nonces directory {directory}: {exc.strerror}") from None
    out: list[AccountNonce] = []
    to_record: list[tuple[str, int, bytes]] = []
    for key, number in numbers.items():
        path = nonce_path(directory, number)
        if number in found:
            nonce = found[number][1]
            out.append(AccountNonce(key, number, nonce, path, new=False))
            if recorded.get(number) is None:
                to_record.append((key, number, nonce))  # written by a run that stopped before recording
            continue
        nonce = secrets.token_bytes(32)
        _write_new(path, json.dumps(nonce_document(key, number, nonce), indent=1) + "\n")
        out.append(AccountNonce(key, number, nonce, path, new=True))
        to_record.append((key, number, nonce))
    _fsync_dir(directory)
    if to_record:
        with db.transaction() as s:
            rows = {r.number: r for r in s.exec(select(LiabilityAccountRow)).all()}
            for key, number, nonce in to_record:
                row = rows[number]
                row.nonce_sha256 = hashlib.sha256(nonce).hexdigest()
                s.add(row)
                audit_log.append(
                    s,
                    "liabilities.nonce_issued",
                    actor,
                    {"ledger_account": key, "number": number, "nonce_sha256": row.nonce_sha256},
                )
    return out


def _write_new(path: Path, content: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"nonce file {path} appeared while this run wrote the nonces") from None
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)  # never leave a half-written nonce for the next run to adopt
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- published roots


def record_published(
    s: Session, height: int, block_hash: str, root_digest: str, root_value: int, leaves: int, accounts: int
) -> None:
    audit_log.append(
        s,
        PUBLISHED_EVENT,
        "auditor",
        {
            "height": height,
            "block_hash": block_hash,
            "root_digest": root_digest,
            "root_value_sat": root_value,
            "leaves": leaves,
            "accounts": accounts,
        },
    )


def published_at(s: Session, height: int) -> list[dict[str, Any]]:
    """The liabilities published at ``height`` (from the audit log), oldest first."""
    found = []
    for entry in s.exec(
        select(AuditEntry).where(AuditEntry.event == PUBLISHED_EVENT).order_by(col(AuditEntry.seq))
    ).all():
        try:
            payload = json.loads(entry.payload)
        except ValueError:
            continue
        if isinstance(payload, dict) and payload.get("height") == height:
            found.append({"seq": entry.seq, **payload})
    return found
