"""verify_records: batches of records checked in-process or by a pool of worker processes.

The main process only reads and batches; workers parse export lines (when the records come
straight from ``read_export``), derive, compare and diagnose, and send back failures and
compact fingerprints (8-byte BLAKE2b of the address, chain << 32 | index) for the cross-set
checks, which run in the main process at the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from .core import (
    BatchResult,
    Checker,
    Collector,
    RecordTuple,
    Report,
    Spec,
    check_batch,
    check_header,
    spec_of,
)
from .errors import ExportError
from .export import AddressRecord, ExportRecords, read_export
from .manifest import Manifest

BATCH_RECORDS = 2000
BATCH_BYTES = 250_000  # raw export lines per batch (about 500 records)

Batch = tuple[list[RecordTuple] | None, tuple[int, bytes] | None]

_worker_checker: Checker | None = None


def _init_worker(spec: Spec) -> None:
    global _worker_checker
    _worker_checker = Checker(spec)


def _run_batch(batch: Batch) -> BatchResult:
    assert _worker_checker is not None
    return check_batch(_worker_checker, records=batch[0], lines=batch[1])


def _record_batches(records: Iterable[AddressRecord]) -> Iterator[Batch]:
    chunk: list[RecordTuple] = []
    for r in records:
        chunk.append(
            (
                getattr(r, "chain", None),
                getattr(r, "index", None),
                getattr(r, "address", None),
                getattr(r, "script", None),
                getattr(r, "script_pubkey", None),
            )
        )
        if len(chunk) >= BATCH_RECORDS:
            yield chunk, None
            chunk = []
    if chunk:
        yield chunk, None


def _line_batches(records: ExportRecords) -> Iterator[Batch]:
    for first, lines in records.raw_batches(BATCH_BYTES):
        yield None, (first, lines)


class _Run:
    """Feeds results, in order, to the collector and keeps the export's trailer state."""

    def __init__(
        self,
        records: Iterable[AddressRecord],
        progress: Callable[[int], None] | None,
        spill_at: int | None = None,
        spill_dir: str | None = None,
    ):
        self.export = records if isinstance(records, ExportRecords) else None
        self.collector = Collector(spill_at=spill_at, spill_dir=spill_dir)
        self.progress = progress

    def take(self, batch: Batch, result: BatchResult) -> None:
        export = self.export
        if export is not None:
            lines = batch[1]
            assert lines is not None
            if export.trailer_line is not None:  # a previous batch ended with the trailer
                for offset, raw in enumerate(lines[1].split(b"\n")):
                    if raw.strip():
                        export.close()
                        raise ExportError(f"line {lines[0] + offset}: data after the trailer")
            if result.error is not None:
                export.close()
                raise ExportError(result.error[1])
            if result.after_trailer is not None:
                export.close()
                raise ExportError(f"line {result.after_trailer}: data after the trailer")
            if result.trailer is not None:
                export.trailer_line, export.trailer_count = result.trailer
            export.count += result.records
        self.collector.add(result)
        if self.progress is not None:
            self.progress(self.collector.checked)

    def finish(self) -> Report:
        if self.export is not None:
            self.export.finish()
        return self.collector.report()


def verify_records(
    manifest: Manifest,
    records: Iterable[AddressRecord],
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    spill_at: int | None = None,
    spill_dir: str | None = None,
) -> Report:
    """Check every record against the founders' keys, then the set as a whole.

    ``progress`` is called after each batch with the number of records checked so far.
    A bad record is a Failure in the report, never an exception. Beyond ``spill_at`` records
    (default :data:`custody.verify.core.SPILL_AT`) the cross-set checks sort their keys
    through temporary files in ``spill_dir`` (default ``$TMPDIR``). Raises ValueError if
    ``workers`` < 1, ExportError (from the export iterator) for a malformed, truncated or
    miscounted export, and SpillError when the temporary files cannot be written or come
    back changed (no report: never a pass).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    spec = spec_of(manifest)
    run = _Run(records, progress, spill_at, spill_dir)
    batches = _line_batches(run.export) if run.export is not None else _record_batches(records)
    try:
        try:
            if workers == 1:
                checker = Checker(spec)
                for batch in batches:
                    run.take(batch, check_batch(checker, records=batch[0], lines=batch[1]))
            else:
                _in_pool(spec, workers, batches, run)
        finally:
            if run.export is not None:
                run.export.close()
        return run.finish()
    finally:
        run.collector.close()


def _in_pool(spec: Spec, workers: int, batches: Iterator[Batch], run: _Run) -> None:
    # concurrent.futures rather than multiprocessing.Pool: a worker that dies raises
    # BrokenProcessPool instead of hanging, and shutting down on an error (a malformed
    # export line) waits only for the few batches in flight, where Pool.terminate() can
    # deadlock against its own task feeder.
    pending: deque[tuple[Batch, Future[BatchResult]]] = deque()
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_run_batch, batch)))
                while len(pending) > 2 * workers:
                    done, future = pending.popleft()
                    run.take(done, future.result())
            while pending:
                done, future = pending.popleft()
                run.take(done, future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def verify_export(
    manifest: Manifest,
    path: str | Path,
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    spill_at: int | None = None,
    spill_dir: str | None = None,
) -> Report:
    """Read an export, check its header against the manifest, and verify every record.

    Raises ExportError for an unreadable or malformed export, or a header whose network,
    threshold or script type disagrees with the manifest (all discrepancies listed);
    SpillError as :func:`verify_records` does.
    """
    header, records = read_export(path)
    try:
        check_header(manifest, header)
    except ExportError:
        records.close()
        raise
    return verify_records(manifest, records, workers=workers, progress=progress, spill_at=spill_at, spill_dir=spill_dir)
