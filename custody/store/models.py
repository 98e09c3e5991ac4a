"""SQLModel tables. Private keys are never stored here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from custody.store.schema_version import SCHEMA_VERSION as SCHEMA_VERSION


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


ADDRESS_SCRIPT_INDEX = "ix_address_script_pubkey"


class AddressRow(SQLModel, table=True):
    __tablename__ = "address"
    __table_args__ = (
        UniqueConstraint("chain", "idx", name="uq_address_chain_idx"),
        Index(ADDRESS_SCRIPT_INDEX, "script_pubkey"),  # the block scanner's lookup (custody.books.blockscan)
    )
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


class SignedManifestRow(SQLModel, table=True):
    """The founders-signed manifest of this store (id is always 1), for other machines to pin."""

    __tablename__ = "signed_manifest"
    id: int = Field(default=1, primary_key=True)
    digest: str = Field(max_length=64)
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON, with the founders' signatures
    created_at: datetime


class PolicyEpochRow(SQLModel, table=True):
    """A policy that succeeded the first one (custody.control.epochs); rows are never changed.

    Epoch 0 is the first policy (``policy``, ``founder`` and ``signed_manifest``); each row here
    is a rotation manifest approved by its predecessor's quorum. Derivation indexes go on across
    epochs: epoch N issues receive indexes from ``receive_from`` and change indexes from
    ``change_from`` (the counters when it was applied) until the next epoch begins.
    """

    __tablename__ = "policy_epoch"
    epoch: int = Field(primary_key=True)
    digest: str = Field(max_length=64, unique=True)
    previous: str = Field(max_length=64)
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON, signatures and approvals included
    receive_from: int = Field(sa_column=Column(BigInteger, nullable=False))
    change_from: int = Field(sa_column=Column(BigInteger, nullable=False))
    applied_at: datetime


class RosterRow(SQLModel, table=True):
    """An applied founders-signed employee roster; serials only go up, rows are never changed."""

    __tablename__ = "roster"
    serial: int = Field(primary_key=True)
    digest: str = Field(max_length=64, unique=True)
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON, with the founders' signatures
    applied_at: datetime


class RosterProposal(SQLModel, table=True):
    """The next roster as proposed on the online machine, waiting for the founders' signatures."""

    __tablename__ = "roster_proposal"
    id: int | None = Field(default=None, primary_key=True)
    serial: int
    document: str = Field(sa_column=Column(Text, nullable=False))  # unsigned roster JSON
    status: str = Field(max_length=16)  # open, applied, superseded
    created_by: str = Field(max_length=64)
    created_at: datetime


class SuspensionRow(SQLModel, table=True):
    """A suspension of an employee, in force once two roster employees have signed it."""

    __tablename__ = "suspension"
    id: int | None = Field(default=None, primary_key=True)
    digest: str = Field(max_length=64, unique=True)
    employee: str = Field(max_length=64, index=True)
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON with the signatures so far
    created_at: datetime


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
    event: str = Field(max_length=64, index=True)
    actor: str = Field(max_length=64)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON
    signature: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
    # Canonical JSON {"user", "host", "command"?} of the process that appended it; None before
    # schema 5. Covered by the hash when present (custody.control.audit_log.entry_hash).
    origin: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


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


class RulebookRow(SQLModel, table=True):
    """An applied founders-signed rulebook; serials only go up, rows are never changed."""

    __tablename__ = "rulebook"
    serial: int = Field(primary_key=True)
    digest: str = Field(max_length=64, unique=True)
    effective_height: int = Field(sa_column=Column(BigInteger, nullable=False))
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON, with the founders' signatures
    applied_at: datetime


class RulebookProposal(SQLModel, table=True):
    """The next rulebook as proposed on the online machine, waiting for the founders' signatures."""

    __tablename__ = "rulebook_proposal"
    id: int | None = Field(default=None, primary_key=True)
    serial: int
    digest: str = Field(max_length=64)
    document: str = Field(sa_column=Column(Text, nullable=False))  # unsigned rulebook JSON
    status: str = Field(max_length=16)  # open, applied, superseded, discarded
    created_by: str = Field(max_length=64)
    created_at: datetime


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
    prev_tx: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # hex, every input's


class ReservedInput(SQLModel, table=True):
    """An unspent output held by one pending withdrawal; the primary key forbids two."""

    __tablename__ = "reserved_input"
    outpoint: str = Field(primary_key=True, max_length=80)  # txid:vout
    withdrawal_id: int = Field(foreign_key="withdrawal.id", index=True)


class ReplacementRow(SQLModel, table=True):
    """A transaction that replaces or settles a signed withdrawal's: a fee bump (RBF), a cancel
    (a self-transfer double-spending its inputs) or a child paying for it (CPFP).

    ``withdrawal_id`` is the replacement's own row (kind bump, cancel or cpfp), approved and
    signed like any withdrawal; ``original_id`` the customer's withdrawal (or batch) it is for;
    ``replaces_id`` the version whose transaction it replaces (the original, or an earlier bump).
    """

    __tablename__ = "replacement"
    withdrawal_id: int = Field(primary_key=True, foreign_key="withdrawal.id")
    original_id: int = Field(foreign_key="withdrawal.id", index=True)
    replaces_id: int = Field(foreign_key="withdrawal.id")
    kind: str = Field(max_length=8)


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


# ---------------------------------------------------------------- the ledger (custody.books.ledger)


class LedgerHead(SQLModel, table=True):
    """Running totals of the whole ledger, updated with every posting (id is always 1).

    ``total`` is the sum of every entry (always 0 in a healthy ledger); the per-event check
    reads this one row, so it costs the same at any size. Its row lock serializes postings.
    """

    __tablename__ = "ledger_head"
    id: int = Field(default=1, primary_key=True)
    total: int = Field(sa_column=Column(BigInteger, nullable=False))
    entries: int = Field(sa_column=Column(BigInteger, nullable=False))
    txns: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerAccount(SQLModel, table=True):
    """One account of the chart (see custody.books.ledger); ``balance`` caches the sum of its entries."""

    __tablename__ = "ledger_account"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=160)  # "customer:alice", "asset:onchain", ...
    kind: str = Field(index=True, max_length=16)  # asset, customer, held, expense, income
    name: str = Field(max_length=140)
    balance: int = Field(sa_column=Column(BigInteger, nullable=False))  # debit positive
    created_at: datetime


class LedgerTxn(SQLModel, table=True):
    """One balanced posting: the entries of one custody event. ``total`` is 0 when posted."""

    __tablename__ = "ledger_txn"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime
    event: str = Field(max_length=64, index=True)
    ref: str = Field(index=True, max_length=160)  # "withdrawal:7", "deposit:TXID:VOUT"
    memo: str = Field(sa_column=Column(Text, nullable=False))
    entries: int
    total: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerEntry(SQLModel, table=True):
    """One line of a posting, in satoshis: debit positive, credit negative."""

    __tablename__ = "ledger_entry"
    id: int | None = Field(default=None, primary_key=True)
    txn_id: int = Field(foreign_key="ledger_txn.id", index=True)
    account_id: int = Field(foreign_key="ledger_account.id", index=True)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))


class LiabilityAccountRow(SQLModel, table=True):
    """The stable number of one liability account of the ledger in the proof of liabilities.

    Assigned once (custody.books.liability_accounts), at random, and never changed; shown to
    the customer with their account nonce. The nonce itself is never stored: only its
    SHA-256, so that a nonce file lost or replaced is noticed instead of silently renewed.
    """

    __tablename__ = "liability_account"
    number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    ledger_key: str = Field(unique=True, max_length=160)  # "customer:alice", "held:withdrawal-7"
    nonce_sha256: str | None = Field(default=None, max_length=64)
    assigned_at: datetime


class DepositRow(SQLModel, table=True):
    """An output paying one of our deposit addresses, followed from first sight to credit."""

    __tablename__ = "deposit"
    id: int | None = Field(default=None, primary_key=True)
    outpoint: str = Field(unique=True, max_length=80)  # txid:vout
    txid: str = Field(index=True, max_length=64)
    vout: int
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    account: str = Field(index=True, max_length=128)
    address: str = Field(max_length=100)
    address_index: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str = Field(index=True, max_length=16)  # pending, credited, reversed, dropped
    height: int | None = None
    confirmations: int = 0
    spent: bool = False  # gone from the unspent set while its transaction stays confirmed
    final: bool = Field(default=False, index=True)  # buried deep enough to stop re-checking
    credit_txn: int | None = None  # the ledger transaction of the latest credit
    first_seen_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- block scanner (custody.books.blockscan)


class ScanBlockRow(SQLModel, table=True):
    """A block the scanner read, by height: the highest row is its cursor, the hashes find a reorg."""

    __tablename__ = "scan_block"
    height: int = Field(primary_key=True)
    hash: str = Field(max_length=64)


class ScanOutputRow(SQLModel, table=True):
    """An output of a scanned block paying one of our addresses, and what spent it (if a block did).

    An observation cache: the sync checks a row against the chain before it credits from it.
    """

    __tablename__ = "scan_output"
    outpoint: str = Field(primary_key=True, max_length=80)  # txid:vout
    txid: str = Field(max_length=64)
    vout: int
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    script_pubkey: str = Field(sa_column=Column(Text, nullable=False))  # hex
    chain: int = Field(index=True)
    height: int = Field(index=True)
    spent_height: int | None = Field(default=None, index=True)
    spent_by: str | None = Field(default=None, max_length=64)


class ScanMempoolRow(SQLModel, table=True):
    """A mempool transaction the scanner already examined (dropped when it leaves the mempool)."""

    __tablename__ = "scan_mempool"
    txid: str = Field(primary_key=True, max_length=64)


# ---------------------------------------------------------------- notifications (custody.notify.outbox)


class NotifyRecipient(SQLModel, table=True):
    """Who is told of custody events: an email address or a webhook URL.

    Removal is a flag (the row and its cursor stay for the record). An email recipient may
    carry a PGP public key (never a private one); mail to them is then encrypted as well.
    A webhook's HMAC secret is not stored here: it stays in the custody home of the machine
    that added it, and ``secret_sha256`` recognises it there.
    """

    __tablename__ = "notify_recipient"
    __table_args__ = (UniqueConstraint("kind", "target", name="uq_notify_recipient_target"),)
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=8)  # email, webhook
    target: str = Field(max_length=2000)  # the address, or the http(s) URL
    pgp_fingerprint: str | None = Field(default=None, max_length=64)
    pgp_key: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # armored public key
    secret_sha256: str | None = Field(default=None, max_length=64)
    active: bool = Field(default=True, index=True)
    created_at: datetime
    removed_at: datetime | None = None


class NotifyCursor(SQLModel, table=True):
    """One recipient's place in the audit log, and the retry state of its next entry.

    Every notifiable audit entry after ``delivered_seq`` is pending for the recipient;
    ``failing_seq`` is the entry that last failed (``attempts`` times), retried not before
    ``next_attempt_at``. A deliverer holds the recipient while ``lease_until`` lies ahead,
    so two processes never send the same entry at once.
    """

    __tablename__ = "notify_cursor"
    recipient_id: int = Field(primary_key=True, foreign_key="notify_recipient.id")
    delivered_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    delivered_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    last_delivered_at: datetime | None = None
    failing_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    attempts: int = 0
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = None


# ---------------------------------------------------------------- the HTTP service (custody.service)


class ServiceNonce(SQLModel, table=True):
    """A signed request's nonce that ``custody serve`` accepted, kept until it can no longer be
    replayed; shared by every instance on this store (custody.service.nonces)."""

    __tablename__ = "service_nonce"
    nonce: str = Field(primary_key=True, max_length=64)
    expires_at: float = Field(index=True)  # Unix seconds
