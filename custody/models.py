"""SQLModel tables. Private keys are never stored here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1


class Meta(SQLModel, table=True):
    """Key/value facts about the store itself, such as its schema version."""

    __tablename__ = "custody_meta"
    key: str = Field(primary_key=True, max_length=64)
    value: str


class PolicyRow(SQLModel, table=True):
    """The one wallet policy of this store (id is always 1)."""

    __tablename__ = "policy"
    id: int = Field(default=1, primary_key=True)
    network: str = Field(max_length=16)
    threshold: int
    script_type: str = Field(max_length=16)
    created_at: datetime


class FounderRow(SQLModel, table=True):
    __tablename__ = "founder"
    id: int | None = Field(default=None, primary_key=True)
    position: int = Field(unique=True)
    name: str = Field(unique=True, max_length=64)
    xpub: str = Field(sa_column=Column(Text, nullable=False))  # "[fp/path]xpub"


class Counter(SQLModel, table=True):
    """Next free index of a derivation chain; bumped under a row lock."""

    __tablename__ = "counter"
    name: str = Field(primary_key=True, max_length=32)
    next_value: int = Field(sa_column=Column(BigInteger, nullable=False))


class AddressRow(SQLModel, table=True):
    __tablename__ = "address"
    __table_args__ = (UniqueConstraint("chain", "idx", name="uq_address_chain_idx"),)
    id: int | None = Field(default=None, primary_key=True)
    chain: int
    idx: int = Field(sa_column=Column("idx", BigInteger, nullable=False))
    account: str = Field(index=True, max_length=128)
    address: str = Field(unique=True, max_length=100)
    script_pubkey: str = Field(sa_column=Column(Text, nullable=False))  # hex
    script: str = Field(sa_column=Column(Text, nullable=False))  # hex multisig script
    created_at: datetime


class EmployeeRow(SQLModel, table=True):
    __tablename__ = "employee"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    pubkey: str = Field(unique=True, max_length=66)  # compressed secp256k1, hex
    enabled: bool = True
    created_at: datetime
    disabled_at: datetime | None = None


class AuditHead(SQLModel, table=True):
    """The tip of the audit log's hash chain; locked by every append (id is always 1)."""

    __tablename__ = "audit_head"
    id: int = Field(default=1, primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(max_length=64)


class AuditEntry(SQLModel, table=True):
    """One custody event. Append-only; each entry hashes the one before it."""

    __tablename__ = "audit_log"
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime
    event: str = Field(max_length=64)
    actor: str = Field(max_length=64)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON
    signature: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class HaltRow(SQLModel, table=True):
    """A trading halt. Active until two distinct employees sign its lift."""

    __tablename__ = "halt"
    id: int | None = Field(default=None, primary_key=True)
    raised_at: datetime
    raised_by: str = Field(max_length=64)
    source: str = Field(max_length=32)  # employee, verification, ledger, reserves
    reason: str = Field(sa_column=Column(Text, nullable=False))
    signature: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    active: bool = Field(default=True, index=True)
    lifted_at: datetime | None = None


class HaltLift(SQLModel, table=True):
    """One employee's signed consent to lift one halt."""

    __tablename__ = "halt_lift"
    __table_args__ = (UniqueConstraint("halt_id", "employee", name="uq_halt_lift_employee"),)
    id: int | None = Field(default=None, primary_key=True)
    halt_id: int = Field(foreign_key="halt.id", index=True)
    employee: str = Field(max_length=64)
    pubkey: str = Field(max_length=66)
    signature: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime


class IncidentRow(SQLModel, table=True):
    """An incident on the status view; every halt opens one."""

    __tablename__ = "incident"
    id: int | None = Field(default=None, primary_key=True)
    halt_id: int | None = Field(default=None, foreign_key="halt.id", index=True)
    title: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(max_length=16)  # investigating, identified, monitoring, resolved
    components: str = Field(sa_column=Column(Text, nullable=False))  # JSON list
    opened_at: datetime
    resolved_at: datetime | None = None


class IncidentUpdate(SQLModel, table=True):
    __tablename__ = "incident_update"
    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(foreign_key="incident.id", index=True)
    at: datetime
    status: str = Field(max_length=16)
    message: str = Field(sa_column=Column(Text, nullable=False))
    actor: str = Field(max_length=64)


class WithdrawalRow(SQLModel, table=True):
    """A withdrawal and its unsigned (then signed, then final) transaction.

    The transaction in ``unsigned_tx`` is the one employees approve; the other columns are
    derived from it and are re-checked against it at every step.
    """

    __tablename__ = "withdrawal"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default="single", max_length=8)  # single, or batch (of approved singles)
    account: str = Field(index=True, max_length=128)
    requester: str = Field(max_length=64)
    request_signature: str = Field(sa_column=Column(Text, nullable=False))
    destination: str = Field(max_length=100)
    destination_spk: str = Field(sa_column=Column(Text, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))  # satoshis
    fee: int = Field(sa_column=Column(BigInteger, nullable=False))
    fee_rate: str = Field(max_length=32)  # sat/vB, decimal text
    change_index: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    change_amount: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    status: str = Field(index=True, max_length=16)
    unsigned_tx: str = Field(sa_column=Column(Text, nullable=False))  # hex
    psbt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # base64, signatures merged
    final_tx: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # hex
    txid: str | None = Field(default=None, max_length=64)
    batch_id: int | None = Field(default=None, index=True)
    confirmations: int = 0
    block_height: int | None = None
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime
    updated_at: datetime


class WithdrawalInput(SQLModel, table=True):
    __tablename__ = "withdrawal_input"
    id: int | None = Field(default=None, primary_key=True)
    withdrawal_id: int = Field(foreign_key="withdrawal.id", index=True)
    position: int
    txid: str = Field(max_length=64)
    vout: int
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    script_pubkey: str = Field(sa_column=Column(Text, nullable=False))
    chain: int
    idx: int = Field(sa_column=Column("idx", BigInteger, nullable=False))
    prev_tx: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # hex, for p2sh


class ReservedInput(SQLModel, table=True):
    """An unspent output held by one pending withdrawal; the primary key forbids two."""

    __tablename__ = "reserved_input"
    outpoint: str = Field(primary_key=True, max_length=80)  # txid:vout
    withdrawal_id: int = Field(foreign_key="withdrawal.id", index=True)


class ApprovalRow(SQLModel, table=True):
    """One employee's signature over one withdrawal's exact transaction."""

    __tablename__ = "approval"
    __table_args__ = (UniqueConstraint("withdrawal_id", "employee", name="uq_approval_employee"),)
    id: int | None = Field(default=None, primary_key=True)
    withdrawal_id: int = Field(foreign_key="withdrawal.id", index=True)
    employee: str = Field(max_length=64)
    pubkey: str = Field(max_length=66)
    digest: str = Field(max_length=64)
    signature: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime
