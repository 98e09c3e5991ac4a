"""Employee approvals, each bound to one exact transaction.

An approval signs the digest of a statement that names the network, the withdrawal, the
unsigned transaction's id, every input's outpoint and amount, every output's script and
amount, and the fee. The same statement is rebuilt from the transaction itself at every
later step (store, offline signer, broadcast), so any change to the transaction after
approval voids every approval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitcoin.core import b2lx

from custody.errors import InputError
from custody.identity.employee_keys import DigestSigner, EmployeeSigner
from custody.identity.statements import sign_statement, statement_digest, verify_statement
from custody.identity.webauthn import PREFIX as WEBAUTHN
from custody.identity.webauthn import Credential, assertion_problem

APPROVAL_DOMAIN = "custody/withdrawal-approval/v1"
REQUIRED_APPROVALS = 2
"""The fewest approvals any withdrawal needs; the rulebook's tiers may ask for more."""


@dataclass(frozen=True)
class TxSummary:
    """What an approval commits to."""

    network: str
    withdrawal_id: int
    txid: str  # of the unsigned transaction, display order
    inputs: tuple[tuple[str, int], ...]  # ("txid:vout", amount in satoshis)
    outputs: tuple[tuple[str, int], ...]  # (scriptPubKey hex, amount in satoshis)
    fee: int

    def fields(self) -> list[object]:
        return [
            self.network,
            self.withdrawal_id,
            self.txid,
            [list(i) for i in self.inputs],
            [list(o) for o in self.outputs],
            self.fee,
        ]

    def digest(self) -> str:
        return statement_digest(APPROVAL_DOMAIN, self.fields()).hex()


def summarize(network: str, withdrawal_id: int, tx: Any, input_amounts: Sequence[int]) -> TxSummary:
    """The approval statement of ``tx`` (a python-bitcoinlib transaction).

    Raises InputError when the amounts do not match the inputs or outputs exceed inputs.
    """
    if len(input_amounts) != len(tx.vin):
        raise InputError("every input's amount is needed to approve a transaction")
    inputs = tuple(
        (f"{b2lx(i.prevout.hash)}:{i.prevout.n}", int(a)) for i, a in zip(tx.vin, input_amounts, strict=True)
    )
    outputs = tuple((bytes(o.scriptPubKey).hex(), int(o.nValue)) for o in tx.vout)
    fee = sum(a for _, a in inputs) - sum(a for _, a in outputs)
    if fee < 0:
        raise InputError("the transaction spends more than its inputs hold")
    return TxSummary(network, withdrawal_id, b2lx(tx.GetTxid()), inputs, outputs, fee)


def sign_approval(key: EmployeeSigner | DigestSigner, summary: TxSummary) -> str:
    """An employee's signature over the summary (hex DER, low S).

    ``key``: an EmployeeSigner (key file or token), or a coincurve-shaped private key.
    Raises KeyFileError when a token fails.
    """
    return sign_statement(key, APPROVAL_DOMAIN, summary.fields())


@dataclass(frozen=True)
class Approval:
    employee: str
    pubkey: str
    signature: str

    def to_dict(self) -> dict[str, str]:
        return {"employee": self.employee, "pubkey": self.pubkey, "signature": self.signature}


@dataclass(frozen=True)
class RegistryEntry:
    """An employee as the roster (checked against the founders) says: their keys, and why they
    may not approve (None: they may)."""

    name: str
    pubkeys: tuple[str, ...]
    refusal: str | None = None
    webauthn: tuple[Credential, ...] = ()  # security keys (custody.identity.webauthn)

    def credential(self, fingerprint: str) -> Credential | None:
        return next((c for c in self.webauthn if c.fingerprint == fingerprint), None)


@dataclass(frozen=True)
class ApprovalCheck:
    """Which approvals count, and why the others do not."""

    valid: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]  # (employee, reason)
    required: int = REQUIRED_APPROVALS  # the rulebook's tier for this withdrawal
    tier: str | None = None

    @property
    def enough(self) -> bool:
        return len(self.valid) >= self.required

    def explain(self) -> str:
        tier = f" (tier {self.tier})" if self.tier else ""
        parts = [f"{len(self.valid)} of {self.required} valid approvals{tier} ({', '.join(self.valid) or 'none'})"]
        parts += [f"{name}: {why}" for name, why in self.rejected]
        return "; ".join(parts)


def check_approvals(
    summary: TxSummary,
    approvals: Sequence[Approval],
    registry: Mapping[str, RegistryEntry],
    requester: str,
    required: int = REQUIRED_APPROVALS,
    tier: str | None = None,
) -> ApprovalCheck:
    """Count distinct employees of the registry who may approve (never the requester) and whose
    signature, made with one of their roster keys, verifies over exactly ``summary``; ``required``
    of them are enough (the rulebook's tier ``tier``)."""
    valid: list[str] = []
    rejected: list[tuple[str, str]] = []
    for a in approvals:
        entry = registry.get(a.employee)
        if entry is None:
            rejected.append((a.employee, "not an employee of the founders' roster"))
        elif entry.refusal is not None:
            rejected.append((a.employee, entry.refusal))
        elif a.employee == requester:
            rejected.append((a.employee, "the requester cannot approve their own withdrawal"))
        else:
            problem = approval_problem(a, entry, summary)
            if problem is not None:
                rejected.append((a.employee, problem))
            elif a.employee not in valid:
                valid.append(a.employee)
    return ApprovalCheck(tuple(sorted(valid)), tuple(rejected), required, tier)


def approval_problem(a: Approval, entry: RegistryEntry, summary: TxSummary) -> str | None:
    """Why ``a`` is not ``entry``'s signature over exactly ``summary`` (None: it is): a secp256k1
    signature by one of their roster keys, or a WebAuthn assertion by one of their roster
    security keys whose challenge is the statement's digest."""
    if a.pubkey.startswith(WEBAUTHN):
        credential = entry.credential(a.pubkey)
        if credential is None:
            return "signed with a security key that is not theirs in the roster"
        return assertion_problem(credential, a.signature, bytes.fromhex(summary.digest()))
    if a.pubkey not in entry.pubkeys:
        return "signed with a key that is not theirs in the roster"
    if not verify_statement(a.pubkey, a.signature, APPROVAL_DOMAIN, summary.fields()):
        return "signature does not cover this exact transaction"
    return None


REQUEST_DOMAIN = "custody/withdrawal-request/v2"


def request_fields(summary: TxSummary, account: str) -> list[object]:
    """What a requester signs: the exact transaction (as approvers see it) and the account."""
    return [*summary.fields(), account]


def sign_request(key: EmployeeSigner | DigestSigner, summary: TxSummary, account: str) -> str:
    """The requester's signature over the exact transaction and the account (hex DER, low S)."""
    return sign_statement(key, REQUEST_DOMAIN, request_fields(summary, account))


def request_problem(
    summary: TxSummary,
    account: str,
    requester: str,
    pubkey: str,
    signature: str,
    registry: Mapping[str, RegistryEntry],
) -> str | None:
    """Why the request signature does not stand (None: it does). ``registry`` holds who may request."""
    entry = registry.get(requester)
    if entry is None:
        return f"the requester {requester!r} is not an employee of the founders' roster"
    if entry.refusal is not None:
        return f"the requester {requester}: {entry.refusal}"
    if pubkey.startswith(WEBAUTHN):
        credential = entry.credential(pubkey)
        if credential is None:
            return f"the request is signed with a security key that is not {requester}'s in the roster"
        problem = assertion_problem(credential, signature, request_digest(summary, account))
        return None if problem is None else f"{requester}'s request: {problem}"
    if pubkey not in entry.pubkeys:
        return f"the request is signed with a key that is not {requester}'s in the roster"
    if not verify_statement(pubkey, signature, REQUEST_DOMAIN, request_fields(summary, account)):
        return f"{requester}'s request signature does not cover this exact transaction and account"
    return None


def request_digest(summary: TxSummary, account: str) -> bytes:
    """The request statement's digest: what a requester's security key signs as its WebAuthn challenge."""
    return statement_digest(REQUEST_DOMAIN, request_fields(summary, account))


def request_standing(
    summary: TxSummary, account: str, requester: str, signature: str, registry: Mapping[str, RegistryEntry]
) -> str | None:
    """Why the stored request (``signature``: a secp256k1 signature by one of the requester's roster
    keys, or a WebAuthn assertion by one of their roster security keys) does not stand for exactly
    ``summary`` and ``account`` (None: it does). ``registry`` holds who may request."""
    entry = registry.get(requester)
    if entry is None or entry.refusal is not None:
        return request_problem(summary, account, requester, "", signature, registry)
    if not signature:
        return f"{requester} has not signed the request yet (it awaits their security key)"
    assertion = signature.startswith("{")  # a WebAuthn assertion's JSON, not hex
    keys = tuple(c.fingerprint for c in entry.webauthn) if assertion else entry.pubkeys
    problem = f"the request is signed with a {'security key' if assertion else 'key'} that is not {requester}'s"
    for key in keys:
        problem = request_problem(summary, account, requester, key, signature, registry) or ""
        if not problem:
            return None
    return problem


@dataclass(frozen=True)
class Member:
    """One withdrawal inside a batch: its own approved transaction and its approvals."""

    summary: TxSummary
    change_output: int | None
    check: ApprovalCheck

    @property
    def payments(self) -> list[tuple[str, int]]:
        return [o for n, o in enumerate(self.summary.outputs) if n != self.change_output]


def check_batch(batch: TxSummary, change_output: int | None, members: Sequence[Member]) -> list[str]:
    """Why a batch transaction is not covered by its members' approvals (empty: it is).

    A batch is approved by the union of its members' approvals when every member is
    approved for its own transaction, the batch spends exactly the members' inputs (same
    amounts), pays exactly every member's payments plus one change output, and its fee is
    no higher than the members' fees together.
    """
    problems = []
    if len(members) < 2:
        problems.append("a batch needs at least two withdrawals")
    for m in members:
        if not m.check.enough:
            problems.append(f"withdrawal #{m.summary.withdrawal_id}: {m.check.explain()}")
    wanted_inputs = sorted(i for m in members for i in m.summary.inputs)
    if sorted(batch.inputs) != wanted_inputs:
        problems.append("the batch does not spend exactly its members' inputs")
    payments = sorted(p for m in members for p in m.payments)
    outputs = sorted(o for n, o in enumerate(batch.outputs) if n != change_output)
    if outputs != payments:
        problems.append("the batch does not pay exactly its members' payments")
    if batch.fee > sum(m.summary.fee for m in members):
        problems.append(f"the batch fee {batch.fee} sat is above its members' fees together")
    return problems
