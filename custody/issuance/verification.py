"""Running the independent verifier over the store or an export, and acting on its report.

The verifier itself (``custody.verify``) knows nothing of the store or the halt; this module
feeds it and, on a mismatch, raises the trading halt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from custody import verify
from custody.config import Settings
from custody.control import audit_log, epochs, halt
from custody.errors import CustodyError, InputError, StorageError, VerificationFailed
from custody.files import EXPORT_MAX, check_size
from custody.issuance import record
from custody.issuance.issuer import count_addresses, iter_addresses
from custody.store.db import Database


@dataclass(frozen=True)
class Outcome:
    report: verify.Report
    halt_id: int | None
    store: bool  # whether a custody store was there to record the run (and the halt)
    halt: halt.RaisedHalt | None = None
    warnings: tuple[str, ...] = ()


def load_auditor_manifest(path: Path) -> verify.Manifest:
    """Raises InputError for a missing or invalid manifest."""
    try:
        return verify.load_manifest(path)
    except FileNotFoundError:
        raise InputError(f"manifest {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"manifest {path}: {exc}") from None


def load_auditor_chain(paths: Sequence[Path]) -> list[verify.ManifestDocument]:
    """The manifests the auditors hold: the first, then each rotation, in order. Several must be
    a chain the independent verifier accepts (each rotation signed by its founders and approved
    by its predecessor's quorum). Raises InputError."""
    docs = []
    for path in paths:
        try:
            docs.append(verify.load_document(path))
        except FileNotFoundError:
            raise InputError(f"manifest {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"manifest {path}: {exc}") from None
    if len(docs) > 1:
        problems = verify.chain_problems(docs)
        if problems:
            raise InputError("the manifests given are not a founders-approved chain: " + "; ".join(problems))
    return docs


def _epoch_failure(reason: str) -> verify.Report:
    return verify.Report(checked=0, failures=[verify.Failure("(policy epochs)", -1, -1, reason)])


def _matched(
    chain: Sequence[verify.ManifestDocument], store: Sequence[tuple[str, int, int]]
) -> list[verify.Epoch] | str:
    """The auditors' manifests for the store's (or export's) epochs, or why they do not match."""
    out = []
    for n, (digest, receive_from, change_from) in enumerate(store):
        if n >= len(chain) or chain[n].digest != digest:
            return (
                f"policy epoch {n} (manifest {digest[:16]}) is not the manifest given at position {n + 1}: "
                "give --manifest for the first policy and for each rotation, in order"
            )
        out.append(verify.Epoch(chain[n].manifest, receive_from, change_from))
    return out


def _store_report(
    db: Database,
    chain: Sequence[verify.ManifestDocument],
    workers: int,
    progress: Callable[[int], None] | None,
    spill_dir: str | None,
) -> verify.Report:
    """Every address row re-derived, then checked against the log's issuances, all in ONE read
    transaction: one snapshot (SQLite's WAL, PostgreSQL's repeatable read), read in chunks by
    key. A writer's row that lands meanwhile is in neither pass; none can be slipped in
    between two chunks, or between the derivations and the log check, and be seen by one only."""
    try:
        db.check_schema()
    except VerificationFailed as exc:  # a key the reads page by is gone (custody.store.db.require_paged_keys)
        return verify.Report(checked=0, failures=[verify.Failure("(store schema)", -1, -1, str(exc))])
    with db.transaction(read_only=True) as s:
        try:
            stored = epochs.store_epochs(s)
        except VerificationFailed as exc:
            return _epoch_failure(str(exc))
        if len(stored) == 1:  # never rotated: every address against the first manifest
            matched: list[verify.Epoch] | str = [verify.Epoch(chain[0].manifest, 0, 0)]
        else:
            matched = _matched(chain, [(e.manifest.digest, e.receive_from, e.change_from) for e in stored])
        if isinstance(matched, str):
            return _epoch_failure(matched)
        report = verify.verify_epochs(
            matched, lambda: store_records(s), workers=workers, progress=progress, spill_dir=spill_dir
        )
        report.merge(verify.Report(failures=record.check_rows(s, iter_addresses(s))))
    return report


def _export_report(
    chain: Sequence[verify.ManifestDocument],
    export: Path,
    workers: int,
    progress: Callable[[int], None] | None,
    spill_dir: str | None,
) -> verify.Report:
    header, records = verify.read_export(export)
    records.close()
    if not header.epochs:
        return verify.verify_export(chain[0].manifest, export, workers=workers, progress=progress, spill_dir=spill_dir)
    matched = _matched(chain, header.epochs)
    if isinstance(matched, str):
        return _epoch_failure(matched)
    verify.check_header(matched[-1].manifest, header)

    def again() -> verify.ExportRecords:
        return verify.read_export(export)[1]

    return verify.verify_epochs(matched, again, workers=workers, progress=progress, spill_dir=spill_dir)


def store_records(s: Session) -> Iterator[verify.AddressRecord]:
    """Every issued address of the store as the verifier's records, read in the caller's
    transaction (constant memory)."""
    for row in iter_addresses(s):
        yield verify.AddressRecord(
            chain=row.chain,
            index=row.idx,
            address=row.address,
            script=bytes.fromhex(row.script),
            script_pubkey=bytes.fromhex(row.script_pubkey),
            account=row.account,
        )


def count_store(db: Database) -> int:
    """How many addresses the store holds (for a progress bar); 0 for a store whose paged reads
    could skip rows, which :func:`run` then reports as a failure (and halts)."""
    try:
        db.check_schema()
    except VerificationFailed:
        return 0
    with db.transaction(read_only=True) as s:
        return count_addresses(s)


def _report(
    db: Database,
    chain: Sequence[verify.ManifestDocument],
    export: Path | None,
    workers: int,
    progress: Callable[[int], None] | None,
    spill_dir: str | None = None,
) -> verify.Report:
    """The verifier's report on the export or the store; a malformed export is a failure in it.
    Raises InputError (an export refused unread), StorageError (see :func:`run`)."""
    try:
        if export is not None:
            return _export_report(chain, export, workers, progress, spill_dir)
        return _store_report(db, chain, workers, progress, spill_dir)
    except verify.FileRefused as exc:
        raise InputError(str(exc)) from None
    except verify.SpillError as exc:  # no answer: neither a pass nor a halt (the disk, not the addresses)
        raise StorageError(str(exc)) from None
    except verify.ExportError as exc:
        return verify.Report(checked=0, failures=[verify.Failure("(export file)", -1, -1, str(exc))])


def run(
    db: Database,
    settings: Settings,
    chain: Sequence[verify.ManifestDocument],
    export: Path | None,
    *,
    workers: int,
    progress: Callable[[int], None] | None = None,
    raise_halt: bool = True,
) -> Outcome:
    """Verify the export (or the store's addresses) against the manifests the auditors hold
    (``chain``: the first, then each rotation), record the run, halt on any mismatch.

    Each address is re-derived from the policy of its epoch. A malformed or truncated export,
    or a store's (export's) policy that is not the auditors' manifest, is a verification
    failure. Raises InputError when the export does not exist; StorageError when the store is
    unusable or a large run's temporary files fail (``$TMPDIR``: no room, or changed).
    """
    if export is not None and not export.exists():
        raise InputError(f"export {export} does not exist")
    if export is not None:
        try:
            check_size(export, EXPORT_MAX, "address export")
        except OSError as exc:
            raise InputError(f"cannot read export {export}: {exc.strerror or exc}") from None
    report = _report(db, chain, export, workers, progress, settings.spill_dir)
    try:
        store = export is None or db.exists()
    except StorageError:
        store = True  # a store that cannot be reached now is still a store: halt it (fail closed)
    raised = None
    if not report.ok and raise_halt and store:
        # Halt first: the halt file and the hook before anything else touches the store, so a
        # crash, a full disk or a dead database from here on still leaves the engine halted.
        first = report.failures[0]
        reason = (
            f"address verification failed: {report.failure_count} problem(s) in "
            f"{report.failed_records} record(s); first: "
            f"{first.address} at {first.chain}/{first.index}: {first.reason}"
        )
        raised = halt.raise_halt(db, settings, reason=reason, source="verification", actor="verifier")
    warnings: list[str] = []
    if store:
        try:
            with db.transaction() as s:
                audit_log.append(
                    s,
                    "verification.run",
                    "verifier",
                    {
                        "source": str(export) if export else "store",
                        "checked": report.checked,
                        "failures": report.failure_count,
                    },
                )
        except CustodyError as exc:
            if report.ok:
                raise
            warnings.append(f"the verification run could not be recorded: {exc}")
    return Outcome(report, raised.id if raised else None, store, raised, tuple(warnings))
