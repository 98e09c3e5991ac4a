"""The continuous audit: the ledger recomputed, reserves against liabilities, proof of liabilities.

* :func:`audit_ledger` recomputes the ledger from its entries with SQL aggregation (one
  ``GROUP BY`` per transaction, one per account, one sum): every transaction sums to zero
  and has the entries it says, all entries sum to zero, every cached balance equals its
  entries' sum, the running head equals the recomputation, the hold of every confirmed or
  failed withdrawal is empty, no hold holds less than nothing (emptied twice: someone
  credited or paid twice), and no withdrawal is settled more than once. Every entry and
  transaction row must be the one the audit log recorded when it was posted
  (custody.books.ledger_log.log_problems): an entry re-pointed to another account, deleted or
  inserted by SQL is found even when the balances were fixed up to match. Any mismatch raises
  the trading halt (source ``ledger``).
* :func:`audit_reserves` adds up the unspent outputs at our addresses at a block height
  (through the chain backend), writes BitMEX's proof of reserves (custody.books.reserves_proof)
  and compares the total with the liabilities' root sum at that height; reserves short of
  liabilities raise the halt (source ``reserves``).
* :func:`audit_log_check` re-hashes the whole audit log: an edited, deleted, inserted or
  reordered entry is found and named; the log is compared with its witnesses (checkpoints
  and notifications kept outside the database: custody.control.witness), which catch a
  truncated or wholly re-hashed log; and the ledger's entries and the address rows are
  compared with what the log recorded. Any of it raises the halt (source ``audit-log``).
* :func:`write_liabilities` writes the proof of liabilities in BitMEX's format
  (custody.books.liabilities), with each account's number and private nonce
  (custody.books.liability_accounts).
"""

# size(audit_ledger): a list of independent recomputations (sums, heads, per-account totals) in one
#   pass over the books; split once the books' current changes land
# size(audit_reserves): the reserves audit's steps (snapshot at one height, sum by address, compare
#   with the books) in one pass; split with audit_ledger

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from custody.books import blockscan, ledger, ledger_log, liabilities, liability_accounts, reserves_proof
from custody.chain.types import ChainBackend
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, epochs, halt, witness
from custody.control.roster import current_roster, load_trust
from custody.errors import CustodyError, InputError, NodeError, VerificationFailed
from custody.issuance import record, row_check
from custody.issuance.issuer import count_addresses
from custody.store.db import Database
from custody.store.models import AuditHead, LedgerAccount, LedgerHead

SHOWN = 20
"""Problems of one kind listed in full; more are counted."""

_TXNS = text(
    """
    SELECT e.txn_id, e.n, e.s, t.id, t.entries, t.total, t.event, t.ref
    FROM (SELECT txn_id, COUNT(*) AS n, SUM(amount) AS s FROM ledger_entry GROUP BY txn_id) AS e
    LEFT JOIN ledger_txn AS t ON t.id = e.txn_id
    WHERE t.id IS NULL OR e.s <> 0 OR e.n <> t.entries OR t.total <> 0
    ORDER BY e.txn_id
    LIMIT :limit
    """
)
_EMPTY_TXNS = text(
    """
    SELECT t.id, t.event, t.ref FROM ledger_txn AS t
    WHERE NOT EXISTS (SELECT 1 FROM ledger_entry AS e WHERE e.txn_id = t.id)
    ORDER BY t.id LIMIT :limit
    """
)
_ACCOUNTS = text(
    """
    SELECT e.account_id, e.s, a.key, a.balance
    FROM (SELECT account_id, SUM(amount) AS s FROM ledger_entry GROUP BY account_id) AS e
    LEFT JOIN ledger_account AS a ON a.id = e.account_id
    WHERE a.id IS NULL OR a.balance <> e.s
    ORDER BY e.account_id
    LIMIT :limit
    """
)
_IDLE_ACCOUNTS = text(
    """
    SELECT a.key, a.balance FROM ledger_account AS a
    WHERE a.balance <> 0 AND NOT EXISTS (SELECT 1 FROM ledger_entry AS e WHERE e.account_id = a.id)
    ORDER BY a.id LIMIT :limit
    """
)
_SETTLED_HOLDS = text(
    """
    SELECT a.key, a.balance, w.status FROM ledger_account AS a
    JOIN withdrawal AS w ON a.key = 'held:withdrawal-' || CAST(w.id AS TEXT)
    WHERE w.status IN ('confirmed', 'failed') AND a.balance <> 0
    ORDER BY w.id LIMIT :limit
    """
)
_OVERDRAWN_HOLDS = text(
    """
    SELECT a.key, a.balance FROM ledger_account AS a
    WHERE a.kind = 'held' AND a.balance > 0
    ORDER BY a.id LIMIT :limit
    """
)
"""A hold is filled at the request and emptied once (settled, released or moved into a batch):
below zero (a debit balance), it was emptied twice, and someone was credited or paid twice."""


def _events(events: Sequence[str]) -> str:
    return ", ".join(f"'{e}'" for e in events)


_SETTLED_TWICE = text(
    f"""
    SELECT ref, SUM(CASE WHEN event IN ({_events(ledger.SETTLED_EVENTS)}) THEN 1 ELSE -1 END) AS standing
    FROM ledger_txn WHERE event IN ({_events(ledger.SETTLED_EVENTS + ledger.UNSETTLED_EVENTS)})
    GROUP BY ref
    HAVING SUM(CASE WHEN event IN ({_events(ledger.SETTLED_EVENTS)}) THEN 1 ELSE -1 END) NOT IN (0, 1)
    ORDER BY ref LIMIT :limit
    """
)
"""A settlement is posted once and reversed at most as often (custody.books.ledger._settles_once,
which reads these rows as the tool posts: an insider who re-labels one for a moment slips a
second settlement past it, which no hold shows for a self-transfer)."""


def _more(rows: Sequence[Any]) -> str:
    return f" (and more: the first {SHOWN} are listed)" if len(rows) > SHOWN else ""


def audit_ledger(db: Database, settings: Settings, *, halt_on_failure: bool = True) -> dict[str, Any]:  # noqa: C901 - a list of independent recomputations; left while the books change
    """Recompute the whole ledger and compare; raise the halt (source ledger) on any mismatch.

    Returns the report (``ok``, ``problems``, counts, ``halt_id``). Raises StorageError.
    """
    db.check_schema()
    started = time.perf_counter()
    problems: list[str] = []
    warnings: list[str] = []
    with db.transaction() as s:
        conn = s.connection()
        head = s.get(LedgerHead, 1)
        total, count = conn.execute(text("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM ledger_entry")).one()
        txns = conn.execute(text("SELECT COUNT(*) FROM ledger_txn")).scalar_one()
        cached_total, accounts = conn.execute(
            text("SELECT COALESCE(SUM(balance), 0), COUNT(*) FROM ledger_account")
        ).one()
        limit = {"limit": SHOWN + 1}
        bad_txns = conn.execute(_TXNS, limit).all()
        empty = conn.execute(_EMPTY_TXNS, limit).all()
        bad_accounts = conn.execute(_ACCOUNTS, limit).all()
        idle = conn.execute(_IDLE_ACCOUNTS, limit).all()
        holds = conn.execute(_SETTLED_HOLDS, limit).all()
        overdrawn = conn.execute(_OVERDRAWN_HOLDS, limit).all()
        twice = conn.execute(_SETTLED_TWICE, limit).all()
        negative = s.exec(
            select(LedgerAccount).where(LedgerAccount.kind == "customer", col(LedgerAccount.balance) > 0)
        ).all()
        unlogged = ledger_log.log_problems(s, SHOWN)
    total, count, txns, cached_total = int(total), int(count), int(txns), int(cached_total)
    if total != 0:
        problems.append(f"all {count} entries sum to {total} sat, not zero")
    for txn_id, n, s_, t_id, t_entries, t_total, event, ref in bad_txns[:SHOWN]:
        if t_id is None:
            problems.append(f"{n} entries (sum {s_} sat) belong to ledger transaction #{txn_id}, which does not exist")
            continue
        what = f"ledger transaction #{txn_id} ({event} for {ref})"
        if s_ != 0:
            problems.append(f"{what}: its entries sum to {s_} sat, not zero")
        if n != t_entries:
            problems.append(f"{what}: it has {n} entries, and says {t_entries}")
        if t_total != 0:
            problems.append(f"{what}: it was recorded with a total of {t_total} sat")
    if bad_txns:
        problems[-1] += _more(bad_txns)
    for txn_id, event, ref in empty[:SHOWN]:
        problems.append(f"ledger transaction #{txn_id} ({event} for {ref}) has no entries{_more(empty)}")
    for account_id, s_, key, balance in bad_accounts[:SHOWN]:
        if key is None:
            problems.append(f"entries (sum {s_} sat) belong to account #{account_id}, which does not exist")
        else:
            problems.append(f"account {key}: its cached balance is {balance} sat, its entries sum to {s_} sat")
    if bad_accounts:
        problems[-1] += _more(bad_accounts)
    for key, balance in idle[:SHOWN]:
        problems.append(f"account {key} has a cached balance of {balance} sat and no entries{_more(idle)}")
    if cached_total != 0:
        problems.append(f"the cached balances of all {accounts} accounts sum to {cached_total} sat, not zero")
    if head is None:
        problems.append("the ledger head is missing")
    else:
        if head.total != total:
            problems.append(f"the ledger head's running total is {head.total} sat; the entries sum to {total} sat")
        if head.entries != count:
            problems.append(f"the ledger head counts {head.entries} entries; there are {count}")
        if head.txns != txns:
            problems.append(f"the ledger head counts {head.txns} transactions; there are {txns}")
    for key, balance, status in holds[:SHOWN]:
        problems.append(f"{key} belongs to a {status} withdrawal and still holds {-balance} sat{_more(holds)}")
    for key, balance in overdrawn[:SHOWN]:
        problems.append(
            f"{key} holds {-balance} sat, less than nothing: it was released or settled more often than it was "
            f"filled{_more(overdrawn)}"
        )
    for ref, standing in twice[:SHOWN]:
        problems.append(
            f"{ref} has {standing} settlement(s) standing in the ledger (settlements less their reversals): "
            f"settled {'more than once' if standing > 1 else 'back more often than settled'}{_more(twice)}"
        )
    problems += unlogged
    for a in negative:
        warnings.append(f"account {a.name!r} is negative: {-a.balance} sat")
    report: dict[str, Any] = {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "entries": count,
        "transactions": txns,
        "accounts": accounts,
        "total_sat": total,
        "head": {"total_sat": head.total, "entries": head.entries, "transactions": head.txns} if head else None,
        "seconds": round(time.perf_counter() - started, 3),
        "halt_id": None,
    }
    if problems and halt_on_failure:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _halt_first(
            db,
            settings,
            report,
            reason=f"ledger audit failed: {problems[0]}{more}",
            source="ledger",
        )
    _record(db, "audit.ledger", {"ok": not problems, "failures": len(problems), "entries": count}, report)
    return report


def audit_reserves(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    height: int | None = None,
    proof: Path | None = None,
) -> dict[str, Any]:
    """Coins on chain at our addresses after block ``height`` (the tip by default) against the
    liabilities' root sum at the same height; BitMEX's proof of reserves written to ``proof``.

    At the tip, liabilities are what ``custody audit liabilities`` would publish now
    (custody.books.liability_accounts.owed), and at least every root published at that
    height; below the tip, the roots published at that height (the audit log keeps them),
    of which there must be one. Reserves short of liabilities, or a stored address holding
    coins that is not the policy's address at its index, raise the halt (source reserves).
    Raises InputError (a past height with nothing published, a height off the chain, an
    unwritable file), NodeError, StorageError.
    """
    db.check_schema()
    with db.transaction(read_only=True) as s:  # one snapshot of the rows, read in chunks
        every = epochs.store_epochs(s)  # old policies' addresses hold coins until swept
        policy = every[-1].policy
        snapshot, holding = blockscan.unspent_of_store(s, backend, height)
        ledger_asset = ledger.totals(s).asset
    addresses = [reserves_proof.StoredAddress(a.chain, a.idx, a.address, a.script_pubkey) for a in holding]
    at_tip = height is None or snapshot.height == backend.tip_height()
    built = reserves_proof.build(every, addresses, snapshot)
    with db.transaction() as s:
        published = liability_accounts.published_at(s, snapshot.height)
    current = liability_accounts.owed(db, backend) if at_tip else None
    if current is None and not published:
        raise InputError(
            f"no liabilities were published at height {snapshot.height}: below the tip, reserves are compared "
            "with the liabilities published at the same height (custody audit liabilities, run at that tip)"
        )
    liabilities_sat = max(([current.total] if current else []) + [int(p["root_value_sat"]) for p in published])
    if proof is not None:
        _write(proof, built.text(), private=False)
    difference = built.total - liabilities_sat
    ok = difference >= 0 and not built.unproven
    report: dict[str, Any] = {
        "ok": ok,
        "network": policy.network.name,
        "height": snapshot.height,
        "block_hash": snapshot.block_hash,
        "tip_height": backend.tip_height() if not at_tip else snapshot.height,
        "reserves_sat": built.total,
        "outputs": built.outputs,
        "addresses": len(built.document["address"]),
        "liabilities_sat": liabilities_sat,
        "ledger_liabilities_sat": current.total if current else None,
        "published_liabilities": [
            {"seq": p["seq"], "root_value_sat": p["root_value_sat"], "root_digest": p["root_digest"]} for p in published
        ],
        "customers_sat": current.customers if current else None,
        "held_sat": current.held if current else None,
        "settling_sat": sum(amount for _, amount in current.settling) if current else None,
        "settling_withdrawals": [wid for wid, _ in current.settling] if current else [],
        "negative_accounts": current.negative if current else [],
        "difference_sat": difference,
        "ledger_asset_sat": ledger_asset,
        "unproven": built.unproven,
        "proof": str(proof) if proof is not None else None,
        "at": iso(now()),
        "halt_id": None,
    }
    if not ok:
        reasons = []
        if difference < 0:
            reasons.append(
                f"reserves short by {-difference} sat: {built.total} sat on chain at our addresses against "
                f"{liabilities_sat} sat of customer liabilities (height {snapshot.height})"
            )
        reasons += built.unproven[:3]
        more = f" (and {len(built.unproven) - 3} more)" if len(built.unproven) > 3 else ""
        _halt_first(db, settings, report, reason="; ".join(reasons) + more, source="reserves")
    _record(
        db,
        "audit.reserves",
        {
            "ok": ok,
            "failures": int(difference < 0) + len(built.unproven),
            "reserves_sat": built.total,
            "liabilities_sat": liabilities_sat,
            "height": snapshot.height,
            "block_hash": snapshot.block_hash,
            "tip_height": report["tip_height"],
        },
        report,
    )
    return report


def _halt_first(db: Database, settings: Settings, report: dict[str, Any], *, reason: str, source: str) -> None:
    """Raise the halt before anything else is written: the halt file and hook first, then the
    store. Where it stands goes into the report (``halt_id``, ``halt_stored``, ``halt_error``)."""
    raised = halt.raise_halt(db, settings, reason=reason, source=source, actor="auditor")
    report["halt_id"] = raised.id
    report["halt_stored"] = raised.stored
    report["engine_halted"] = raised.engine_halted
    if not raised.stored or not raised.engine_halted:
        report["halt_error"] = raised.describe()
    report.setdefault("warnings", []).extend(raised.state.warnings)


def _record(db: Database, event: str, payload: dict[str, Any], report: dict[str, Any]) -> None:
    """Every audit run is itself a custody event in the log. After a halt, a store that
    cannot record the run is a warning: the command still exits 3 for the halt."""
    try:
        with db.transaction() as s:
            audit_log.append(s, event, "auditor", payload)
    except CustodyError as exc:
        if report.get("ok", True):
            raise
        report.setdefault("warnings", []).append(f"the audit run could not be recorded: {exc}")


def _schema_or_halt(db: Database, settings: Settings, halt_on_failure: bool) -> None:
    """db.check_schema, halting first (with ``halt_on_failure``) when a key the chain check
    pages by is gone: nothing it would read is sound then. Raises what check_schema raises."""
    try:
        db.check_schema()
    except VerificationFailed as exc:
        if halt_on_failure:
            _halt_first(db, settings, {}, reason=f"the audit log cannot be verified: {exc}", source="audit-log")
        raise


def audit_log_check(
    db: Database,
    settings: Settings,
    *,
    halt_on_failure: bool = True,
    against: Sequence[Path] = (),
    progress: Callable[[int, int], None] | None = None,
    rows_apart: int | None = None,
) -> dict[str, Any]:
    """Verify the audit log and what the tool keeps beside it; on any break, raise the trading halt.

    The chain re-hashed entry by entry; the employees' keys against the log; the log against
    every witness (the local witness file when there is one, and each of ``against``): a log
    shorter than witnessed or diverging from it was truncated or rewritten; the ledger's
    entries and the address rows against the postings and issuances the log recorded. With
    two cores or more and at least ``rows_apart`` address rows (:data:`ROWS_APART`), the rows
    are checked in a second process while this one re-hashes the chain
    (custody.issuance.row_check: the same problems, named the same way).

    ``progress`` is called with the rows checked so far and the rows to check (the log's
    entries, then the address rows), as the chain and the rows are walked.
    Returns ``{"ok", "entries", "problems": [{"seq", "reason"}], "witnesses", "halt_id"}``.
    Raises InputError for a witness that cannot be read (before anything is checked),
    RowCheckFailed (exit 1) when the rows' process gave no result (killed, failed): never a pass;
    VerificationFailed, after the halt, for a store whose paged reads could skip rows
    (custody.store.db.require_paged_keys).
    """
    _schema_or_halt(db, settings, halt_on_failure)
    witnesses = _witnesses(settings, against)
    apart: row_check.RowCheck | None = None
    try:
        with db.transaction(read_only=True) as s:  # one snapshot; writers go on meanwhile
            addresses = count_addresses(s)  # the snapshot taken: the worker's begins after it
            apart = _rows_apart(db, addresses, ROWS_APART if rows_apart is None else rows_apart)
            total = 0
            if progress is not None:
                head = s.get(AuditHead, 1)
                total = (head.seq if head is not None else 0) + addresses
                progress(0, total)
            tally = hashlib.sha256()
            problems, count = audit_log.verify_chain_counted(
                s,
                None
                if progress is None
                else lambda done: progress(done + _done(apart), max(total, done + _done(apart))),
                tally=None if apart is None else (record.ISSUED, tally),
            )
            try:  # the roster rows must stand against the founders' manifest pinned here
                current_roster(s, load_trust(settings))
            except VerificationFailed as exc:
                problems.append(audit_log.ChainProblem(0, str(exc)))
            for _, checkpoints in witnesses:
                problems += witness.compare(s, checkpoints)
            problems += [audit_log.ChainProblem(0, why) for why in ledger_log.log_problems(s, SHOWN)]
            rows = _row_problems(s, apart, tally.hexdigest(), count, total, progress)
            problems += [audit_log.ChainProblem(0, why) for why in rows]
    finally:
        if apart is not None:
            apart.close()
    report: dict[str, Any] = {
        "ok": not problems,
        "entries": count,
        "problems": [{"seq": p.seq, "reason": p.reason} for p in problems],
        "witnesses": [
            {"source": source, "checkpoints": len(cps), "highest_seq": max((c.seq for c in cps), default=None)}
            for source, cps in witnesses
        ],
        "halt_id": None,
    }
    if problems and halt_on_failure:
        first = problems[0]
        reason = f"the audit log is broken at entry {first.seq}: {first.reason} ({len(problems)} problem(s))"
        # A forged entry past the head makes every append fail: the store cannot record the
        # halt, but the halt file says halted (raise_halt writes it first) and keeps it pending.
        _halt_first(db, settings, report, reason=reason, source="audit-log")
    return report


def _witnesses(settings: Settings, against: Sequence[Path]) -> list[tuple[str, list[witness.Checkpoint]]]:
    """The local witness file's checkpoints when there is one, then each of ``against``'s."""
    witnesses: list[tuple[str, list[witness.Checkpoint]]] = []
    if settings.witness_file.exists():
        witnesses.append((str(settings.witness_file), witness.read(settings.witness_file)))
    for path in against:
        witnesses.append((str(path), witness.read(path)))
    return witnesses


ROWS_APART = 100_000
"""Address rows from which ``audit log --verify`` checks them in a second process (on two
cores or more): below, starting it costs more than it saves."""


def _rows_apart(db: Database, addresses: int, least: int) -> row_check.RowCheck | None:
    """The rows' check started in its own process, when there are cores and rows enough for it."""
    if addresses < least or row_check.cores() < 2:
        return None
    batches = {"address": record.ROW_BATCH, "issued": record.ISSUED_CHUNK, "chain": audit_log.CHAIN_BATCH}
    try:
        return row_check.RowCheck(db.url, SHOWN, batches)
    except OSError:  # no process to be had (no memory, no process slot): the rows checked here, as before
        return None


def _done(apart: row_check.RowCheck | None) -> int:
    return 0 if apart is None else apart.done


def _row_problems(
    s: Session,
    apart: row_check.RowCheck | None,
    tally: str,
    count: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> list[str]:
    """The address rows' problems (the first SHOWN): the worker's, when it judged them against
    the very issuances this snapshot's chain check read (``tally``), else checked here."""
    if apart is not None:
        while progress is not None and not apart.wait(0.2):
            progress(count + apart.done, max(total, count + apart.done))
        found = apart.result()
        if found.issued == tally:
            if progress is not None:
                progress(count + found.rows, max(total, count + found.rows))
            return found.problems
    rows = record.iter_address_rows(s)
    if progress is not None:
        rows = _counted(rows, count, total, progress)
    return [record.problem(f) for f in record.check_rows(s, rows)[:SHOWN]]


def _counted(
    rows: Iterable[tuple[Any, ...]], before: int, total: int, progress: Callable[[int, int], None]
) -> Iterator[tuple[Any, ...]]:
    """``rows``, calling ``progress`` every PROGRESS_EVERY rows and at the end, counted on from ``before``."""
    done = before
    for row in rows:
        yield row
        done += 1
        if done % audit_log.PROGRESS_EVERY == 0:
            progress(done, max(total, done))
    progress(done, max(total, done))


def write_liabilities(db: Database, backend: ChainBackend, out: Path, nonces_dir: Path) -> dict[str, Any]:
    """Write the proof of liabilities at the chain's tip to ``out`` in BitMEX's format.

    Every liability account (custody.books.liability_accounts.owed) gets its stable number
    and its account nonce, read from or written to ``nonces_dir`` (one private file per
    account, to hand to its customer). The published root is recorded in the audit log
    (``audit.liabilities``) with its height, for ``custody audit reserves`` at that height.
    Raises Conflict (a nonce file missing or replaced), InputError (unwritable files),
    NodeError (the chain kept moving), StorageError.
    """
    db.check_schema()
    for _ in range(3):
        tip = backend.unspent_at([])
        owed = liability_accounts.owed(db, backend)
        if backend.tip_height() == tip.height:
            break
    else:
        raise NodeError("the chain's tip moved three times while the liabilities were read; try again")
    with db.transaction() as s:
        numbers = liability_accounts.assign_numbers(s, list(owed.balances))
    issued = liability_accounts.nonces(db, nonces_dir, numbers)
    tree = liabilities.build(
        {numbers[key]: amount for key, amount in owed.balances.items()},
        {n.number: n.nonce for n in issued},
        tip.height,
    )
    _write(out, tree.text(), private=False)
    root = tree.root
    with db.transaction() as s:
        liability_accounts.record_published(
            s, tip.height, tip.block_hash, root.digest.hex(), root.value, len(tree.rows[-1]), len(owed.balances)
        )
    return {
        "out": str(out),
        "height": tip.height,
        "block_hash": tip.block_hash,
        "root": {"digest": root.digest.hex(), "value_sat": root.value},
        "leaves": len(tree.rows[-1]),
        "accounts": len(owed.balances),
        "nonces_dir": str(nonces_dir),
        "new_nonces": [
            {"ledger_account": n.ledger_key, "number": n.number, "file": str(n.path)} for n in issued if n.new
        ],
        "negative_accounts": owed.negative,
        "settling_withdrawals": [wid for wid, _ in owed.settling],
    }


def _write(path: Path, content: str, *, private: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
