"""The store's side of the rulebook: proposals, the applied chain of founders-signed rulebooks,
and which one is in force at a height.

Like the roster, nothing here takes the store's word: every applied row is re-read, its founders'
signatures checked against the manifest pinned on this machine and its place in the chain
(serial, previous, effective height, loosening delay) checked again, on every use. The online
machine proposes; a quorum of founders signs offline; ``apply`` accepts only the next rulebook
in the chain, and a loosening one only when it was proposed here first (so everyone was told)
and takes effect no earlier than its delay allows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from custody.bitcoin.destinations import address_of
from custody.bitcoin.network import get_network
from custody.chain.types import ChainBackend
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.control.roster import Trust, discard_open, load_trust, open_document, store_trust
from custody.errors import ApprovalError, Conflict, InputError, NotFound, VerificationFailed
from custody.identity.rulebook import DEFAULT_RULES, RULE_FIELDS, Rulebook, Rules, load_rulebook, parse_rules
from custody.identity.rulebook_chain import check_chain, earliest_effective, loosened, rulebook_at, successor_problems
from custody.store.db import Database
from custody.store.models import AuditEntry, RulebookProposal, RulebookRow

# ---------------------------------------------------------------- the applied chain


@dataclass(frozen=True)
class Chain:
    """Every applied rulebook, #1 to #N, each checked against the founders and the one before."""

    books: tuple[Rulebook, ...]

    @property
    def newest(self) -> Rulebook | None:
        return self.books[-1] if self.books else None

    def at(self, height: int) -> Rulebook | None:
        """The rulebook in force at ``height`` (None: the built-in defaults)."""
        return rulebook_at(self.books, height)

    @property
    def rules_newest(self) -> Rules:
        return self.books[-1].rules if self.books else DEFAULT_RULES

    def rules_at(self, height: int) -> Rules:
        book = self.at(height)
        return book.rules if book else DEFAULT_RULES

    @property
    def effective(self) -> dict[int, int]:
        return {b.serial: b.effective_height for b in self.books}

    def documents(self) -> list[dict[str, Any]]:
        return [b.to_document() for b in self.books]


def chain(s: Session, trust: Trust) -> Chain:
    """The applied rulebooks. Raises VerificationFailed when a row does not stand (edited,
    inserted, deleted from the middle, or not signed by the founders of its policy epoch)."""
    books = []
    for row in s.exec(select(RulebookRow).order_by(col(RulebookRow.serial))).all():
        try:
            book = load_rulebook(row.document.encode())
        except InputError as exc:
            raise VerificationFailed(f"the store's rulebook #{row.serial} is unreadable: {exc}") from None
        if (book.serial, book.digest, book.effective_height) != (row.serial, row.digest, row.effective_height):
            raise VerificationFailed(f"the store's rulebook #{row.serial}: its serial, digest or height disagree")
        books.append(book)
    try:
        check_chain(books, trust.governance)
    except ApprovalError as exc:
        raise VerificationFailed(f"the store's rulebooks do not stand against the pinned manifests: {exc}") from None
    logged = _applied_in_log(s)
    rows = {b.serial: b.digest for b in books}
    if logged != rows:
        missing = sorted(set(logged) - set(rows)) or sorted(k for k in rows if logged.get(k) != rows[k])
        raise VerificationFailed(
            f"the store's rulebooks are not those the audit log recorded as applied (rulebook #{missing[0]} "
            "differs or is missing): a row was deleted, or the log was edited"
        )
    return Chain(tuple(books))


def _applied_in_log(s: Session) -> dict[int, str]:
    """Serial -> digest of every rulebook the audit log recorded as applied."""
    out = {}
    for entry in s.exec(select(AuditEntry).where(AuditEntry.event == "rulebook.applied")).all():
        try:
            payload = json.loads(entry.payload)
            out[int(payload["serial"])] = str(payload["digest"])
        except (ValueError, KeyError, TypeError):
            out[-entry.seq] = "unreadable"
    return out


def store_chain(s: Session) -> Chain:
    """The applied rulebooks, checked against the store's founders-signed manifest."""
    return chain(s, store_trust(s))


# ---------------------------------------------------------------- proposals


_PROPOSE = " (`custody rules propose`)"
"""How a missing proposal's message ends."""


def _open(s: Session) -> RulebookProposal | None:
    return s.exec(select(RulebookProposal).where(RulebookProposal.status == "open")).first()


def _proposed_rules(base: Rules, changes: Mapping[str, Any], serial: int, network: str) -> Rules:
    """``base`` with the sections of ``changes`` replaced; allowlist entries keep the serial that
    added them (a new entry gets ``serial``). Raises InputError."""
    unknown = set(changes) - RULE_FIELDS
    if unknown:
        raise InputError(
            f"unknown rulebook section(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(RULE_FIELDS))}"
        )
    merged = base.to_dict() | dict(changes)
    draft = parse_rules(merged, serial, network)
    before = {d.key: d.added_serial for d in base.allowlist}
    allowlist = tuple(
        d if d.added_serial else type(d)(d.script_pubkey, d.account, d.label, before.get(d.key, serial))
        for d in draft.allowlist
    )
    return Rules(
        draft.tiers,
        draft.max_withdrawal_sat,
        draft.velocity,
        allowlist,
        draft.outside,
        draft.cooling_off_blocks,
        draft.fees,
        draft.self_transfer_approvals,
        draft.loosening_delay_blocks,
        draft.bump,
    )


def propose(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    changes: Mapping[str, Any],
    *,
    effective_height: int | None = None,
    actor: str = "operator",
) -> tuple[Rulebook, list[str]]:
    """Propose the next rulebook: the current one with ``changes`` (sections of a rulebook body).

    It takes effect at ``effective_height``, by default the earliest allowed: at once when it
    only tightens, else the chain's tip now plus the current rulebook's loosening delay. The
    proposal is an audit event every recipient is told of. Returns the proposal and what it
    loosens. Raises InputError, Conflict (an effective height before the delay allows),
    VerificationFailed, NodeError.
    """
    trust = load_trust(settings)
    tip = backend.tip_height()
    db.check_schema()
    with db.transaction() as s:
        c = chain(s, trust)
        current = c.newest
        serial = current.serial + 1 if current else 1
        base = c.rules_newest
        rules = _proposed_rules(base, changes, serial, trust.founders.network)
        floor = earliest_effective(current, rules, tip)
        height = floor if effective_height is None else effective_height
        book = Rulebook(
            trust.founders.network,
            trust.founders.manifest,
            serial,
            current.digest if current else None,
            tip,
            height,
            rules,
        )
        problems = successor_problems(current, book)
        if problems:
            raise Conflict(f"rulebook #{serial} cannot take effect as proposed: " + "; ".join(problems))
        looser = loosened(base, rules)
        for row in s.exec(select(RulebookProposal).where(RulebookProposal.status == "open")).all():
            row.status = "superseded"
            s.add(row)
        s.add(
            RulebookProposal(
                serial=serial,
                digest=book.digest,
                document=json.dumps(book.to_document()),
                status="open",
                created_by=actor,
                created_at=now(),
            )
        )
        audit_log.append(
            s,
            "rulebook.proposed",
            actor,
            {
                "serial": serial,
                "digest": book.digest,
                "proposed_height": tip,
                "effective_height": height,
                "loosens": looser,
                "rules": rules.to_dict(),
            },
        )
        return book, looser


def proposal(db: Database) -> Rulebook:
    """The open proposal. Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        return open_document(s, "rulebook", _open, load_rulebook, _PROPOSE)[1]


def export_document(db: Database, settings: Settings, current: bool = False) -> dict[str, Any]:
    """The open proposal (or, with ``current``, the newest applied rulebook) for the founders,
    with the rulebook before it under ``previous_rulebook`` so that a founder sees what changes."""
    trust = load_trust(settings)
    db.check_schema()
    with db.transaction() as s:
        books = chain(s, trust).books
        if current:
            if not books:
                raise NotFound("no rulebook has been applied yet")
            book = books[-1]
        else:
            _, book = open_document(s, "rulebook", _open, load_rulebook, _PROPOSE)
        before = next((b for b in books if b.serial == book.serial - 1), None)
        return book.to_document() | {"previous_rulebook": before.to_document() if before else None}


def discard(db: Database, actor: str = "operator") -> Rulebook:
    """Drop the open proposal (it was never in force). Raises NotFound."""
    return discard_open(db, "rulebook", _open, load_rulebook, actor)


def _was_proposed(s: Session, digest: str) -> bool:
    """Whether the audit log records the proposal of exactly this rulebook (everyone was told)."""
    for entry in s.exec(select(AuditEntry).where(AuditEntry.event == "rulebook.proposed")).all():
        try:
            if json.loads(entry.payload).get("digest") == digest and audit_log.intact(entry):
                return True
        except (ValueError, AttributeError):
            continue
    return False


def apply(db: Database, settings: Settings, data: bytes, actor: str = "operator") -> tuple[Rulebook, list[str]]:
    """Apply a rulebook m founders signed: the next in the chain, taking effect no earlier than
    allowed; a loosening one only when it was proposed here (and so told to every recipient).

    Raises InputError, ApprovalError (signatures), Conflict (not the next, too early, never
    proposed), VerificationFailed.
    """
    trust = load_trust(settings)
    book = load_rulebook(data)
    problems = trust.governance.problems(book)
    if problems:
        raise ApprovalError(f"rulebook #{book.serial} is not signed as the founders' rulebook: " + "; ".join(problems))
    db.check_schema()
    with db.transaction() as s:
        c = chain(s, trust)
        refused = successor_problems(c.newest, book)
        if refused:
            raise Conflict(f"rulebook #{book.serial} cannot be applied: " + "; ".join(refused))
        looser = loosened(c.rules_newest, book.rules)
        if looser and not _was_proposed(s, book.digest):
            raise Conflict(
                f"rulebook #{book.serial} loosens ({'; '.join(looser)}) but was never proposed here: propose it "
                "with `custody rules propose`, so that every operator and recipient is told, then sign that"
            )
        s.add(
            RulebookRow(
                serial=book.serial,
                digest=book.digest,
                effective_height=book.effective_height,
                document=json.dumps(book.to_document()),
                applied_at=now(),
            )
        )
        for row in s.exec(select(RulebookProposal).where(RulebookProposal.status == "open")).all():
            row.status = "applied" if row.digest == book.digest else "superseded"
            s.add(row)
        audit_log.append(
            s,
            "rulebook.applied",
            actor,
            {
                "serial": book.serial,
                "digest": book.digest,
                "proposed_height": book.proposed_height,
                "effective_height": book.effective_height,
                "signed_by": sorted(book.signatures),
                "loosens": looser,
            },
        )
    return book, looser


# ---------------------------------------------------------------- views


def rules_view(rules: Rules, network: str) -> dict[str, Any]:
    """The rules as a person reads them: each allowlisted destination with its address."""
    out = rules.to_dict()
    net = get_network(network)
    for d in out["destinations"]["allowlist"]:
        d["address"] = address_of(bytes.fromhex(d["script_pubkey"]), net)
    return out


def book_view(book: Rulebook | None, network: str) -> dict[str, Any]:
    if book is None:
        return {"serial": 0, "digest": None, "built_in": True, "rules": rules_view(DEFAULT_RULES, network)}
    return {
        "serial": book.serial,
        "digest": book.digest,
        "fingerprint": fingerprint(book.digest),
        "built_in": False,
        "proposed_height": book.proposed_height,
        "effective_height": book.effective_height,
        "signed_by": sorted(book.signatures),
        "rules": rules_view(book.rules, network),
    }


def fingerprint(digest: str) -> str:
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def show(db: Database, settings: Settings, backend: ChainBackend) -> dict[str, Any]:
    """The rulebook in force at the chain's tip, any applied one still waiting for its height,
    and the open proposal."""
    trust = load_trust(settings)
    tip = backend.tip_height()
    db.check_schema()
    with db.transaction() as s:
        c = chain(s, trust)
        row = _open(s)
        pending = load_rulebook(row.document.encode()) if row else None
    network = trust.founders.network
    proposed = None
    if pending is not None:
        proposed = book_view(pending, network) | {"loosens": loosened(c.rules_newest, pending.rules)}
    return {
        "height": tip,
        "manifest": trust.newest.fingerprint,
        "in_force": book_view(c.at(tip), network),
        "waiting": [book_view(b, network) for b in c.books if b.effective_height > tip],
        "proposal": proposed,
        "applied": [{"serial": b.serial, "digest": b.digest, "effective_height": b.effective_height} for b in c.books],
        "as_of": iso(now()),
    }


def chain_documents(s: Session) -> list[dict[str, Any]]:
    """Every applied rulebook's document, #1 first: what a PSBT carries to the signers."""
    return [json.loads(r.document) for r in s.exec(select(RulebookRow).order_by(col(RulebookRow.serial))).all()]


def previous_of(books: Sequence[Rulebook], book: Rulebook) -> Rulebook | None:
    return next((b for b in books if b.serial == book.serial - 1), None)
