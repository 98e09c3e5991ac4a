"""The address export (``custody-address-export``, version 1, JSON Lines; docs/FORMATS.md).

A header line, one line per address, a trailer ``{"end": true, "count": N}``. Reading is
streaming: the records come from an iterator that raises ExportError, naming the line, at a
malformed line, a missing trailer (a truncated file) or a count that disagrees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ExportError
from .files import EXPORT_MAX_BYTES, EXPORT_MAX_LINE, open_checked
from .manifest import SCRIPT_TYPES
from .networks import NETWORKS

EXPORT_FORMAT = "custody-address-export"
EXPORT_VERSION = 1


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """One issued address as exported (or as stored): where it was derived and what it is."""

    chain: int
    index: int
    address: str
    script: bytes | None = None
    script_pubkey: bytes | None = None
    account: str | None = None


@dataclass(frozen=True)
class ExportHeader:
    """The first line of an export."""

    format: str
    version: int
    network: str
    threshold: int
    script_type: str
    descriptors: dict[str, str] = field(default_factory=dict, hash=False)
    exported_at: str | None = None
    # a store that rotated its keys: (manifest digest, receive_from, change_from) of each policy
    epochs: tuple[tuple[str, int, int], ...] = ()


def _parse_epochs(raw: Any) -> tuple[tuple[str, int, int], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ExportError("line 1: 'epochs' must be a list")
    out = []
    for e in raw:
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("manifest_digest"), str)
            or type(e.get("receive_from")) is not int
            or type(e.get("change_from")) is not int
        ):
            raise ExportError("line 1: each epoch is {manifest_digest, receive_from, change_from}")
        out.append((e["manifest_digest"], e["receive_from"], e["change_from"]))
    return tuple(out)


def parse_header(line: bytes | str) -> ExportHeader:
    """Validate the header line. Raises ExportError (always naming line 1)."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ExportError(f"line 1: the header is not valid JSON: {exc}") from None
    except RecursionError:
        raise ExportError("line 1: the header is nested too deeply to be an export header") from None
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else None
        raise ExportError(f"line 1: not an address export: format is {got!r}")
    version = obj.get("version")
    if type(version) is not int or version < 1:
        raise ExportError(f"line 1: invalid export version {version!r}")
    if version > EXPORT_VERSION:
        raise ExportError(
            f"line 1: export version {version} is newer than this verifier understands ({EXPORT_VERSION})"
        )
    network = obj.get("network")
    if not isinstance(network, str) or network not in NETWORKS:
        raise ExportError(f"line 1: unknown network {network!r}")
    threshold = obj.get("threshold")
    if type(threshold) is not int:
        raise ExportError(f"line 1: threshold must be an integer, got {threshold!r}")
    script_type = obj.get("script_type")
    if script_type not in SCRIPT_TYPES:
        raise ExportError(f"line 1: unknown script_type {script_type!r}")
    descriptors = obj.get("descriptors", {})
    if not isinstance(descriptors, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in descriptors.items()
    ):
        raise ExportError("line 1: 'descriptors' must map names to descriptor strings")
    exported_at = obj.get("exported_at")
    if exported_at is not None and not isinstance(exported_at, str):
        raise ExportError("line 1: 'exported_at' must be a string")
    return ExportHeader(
        EXPORT_FORMAT,
        version,
        str(network),
        threshold,
        str(script_type),
        descriptors,
        exported_at,
        _parse_epochs(obj.get("epochs")),
    )


@dataclass(frozen=True)
class Trailer:
    """The last line: how many address lines the writer wrote."""

    count: int


Fields = tuple[int, int, str, bytes | None, bytes | None, str | None]

# The C scanner behind json.loads, called directly: no encoding detection, no whitespace
# regex; anything it does not take whole goes through json.loads for the same result.
_scan_once = getattr(json.JSONDecoder(), "scan_once", None)


def _loads(line: bytes | str, lineno: int) -> Any:
    if _scan_once is not None and type(line) is str:
        try:
            obj, end = _scan_once(line, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(line) or not line[end:].strip(" \t\n\r"):
                return obj
    try:
        return json.loads(line)
    except RecursionError:
        raise ExportError(f"line {lineno}: nested too deeply to be an address record") from None
    except ValueError as exc:
        if not line.strip():
            raise ExportError(f"line {lineno}: empty line") from None
        raise ExportError(f"line {lineno}: not valid JSON ({exc})") from None


def parse_fields(line: bytes | str, lineno: int) -> Fields | Trailer:
    """Parse one line after the header into (chain, index, address, script, script_pubkey,
    account), or the trailer.

    Raises ExportError naming ``lineno`` if the line is empty, not a JSON object, or lacks
    or mistypes a field. Values in range but wrong (chain 7, a bad address) are not errors
    here: the verifier reports them as failures.
    """
    obj = _loads(line, lineno)
    if type(obj) is not dict:
        raise ExportError(f"line {lineno}: not a JSON object")
    get = obj.get
    chain = get("chain")
    index = get("index")
    address = get("address")
    script = get("script")
    script_pubkey = get("script_pubkey")
    account = get("account")
    if type(chain) is int and type(index) is int and type(address) is str:
        if (account is None or type(account) is str) and "end" not in obj:
            try:
                return (
                    chain,
                    index,
                    address,
                    None if script is None else bytes.fromhex(script),
                    None if script_pubkey is None else bytes.fromhex(script_pubkey),
                    account,
                )
            except (TypeError, ValueError):
                pass  # named below
    if "end" in obj:
        count = get("count")
        if obj["end"] is not True or type(count) is not int or count < 0:
            raise ExportError(f'line {lineno}: malformed trailer; expected {{"end": true, "count": N}}')
        return Trailer(count)
    if type(chain) is not int:
        raise ExportError(f"line {lineno}: 'chain' must be an integer, got {chain!r}")
    if type(index) is not int:
        raise ExportError(f"line {lineno}: 'index' must be an integer, got {index!r}")
    if type(address) is not str:
        raise ExportError(f"line {lineno}: 'address' must be a string, got {address!r}")
    if account is not None and type(account) is not str:
        raise ExportError(f"line {lineno}: 'account' must be a string or null")
    for name, value in (("script", script), ("script_pubkey", script_pubkey)):
        if value is not None and type(value) is not str:
            raise ExportError(f"line {lineno}: '{name}' must be a hex string or null")
        if value is not None:
            try:
                bytes.fromhex(value)
            except ValueError:
                raise ExportError(f"line {lineno}: '{name}' is not valid hex") from None
    raise ExportError(f"line {lineno}: malformed record")  # pragma: no cover


def parse_line(line: bytes | str, lineno: int) -> AddressRecord | Trailer:
    """Parse one line after the header: an AddressRecord or the Trailer.

    Raises ExportError naming ``lineno`` (see ``parse_fields``).
    """
    item = parse_fields(line, lineno)
    if isinstance(item, Trailer):
        return item
    return AddressRecord(*item)


class ExportRecords(Iterator[AddressRecord]):
    """The address records of an open export, read one line at a time.

    Raises ExportError from ``__next__`` at a malformed line, data after the trailer, a file
    that ends without its trailer, or a trailer count that disagrees. Closes the file at the
    end, on error, or on ``close()``.
    """

    def __init__(self, f: IO[bytes], path: str) -> None:
        self._f: IO[bytes] | None = f
        self.path = path
        self.lineno = 1  # the header has been read
        self.count = 0
        self.trailer_line: int | None = None
        self.trailer_count = 0

    def __iter__(self) -> ExportRecords:
        return self

    def __next__(self) -> AddressRecord:
        f = self._f
        if f is None:
            raise StopIteration
        try:
            while True:
                line = _readline(f, self.lineno + 1)
                if not line:
                    self.finish()
                    raise StopIteration
                self.lineno += 1
                if self.trailer_line is not None:
                    if line.strip():
                        raise ExportError(f"line {self.lineno}: data after the trailer")
                    continue
                item = parse_line(line, self.lineno)
                if isinstance(item, Trailer):
                    self.trailer_line = self.lineno
                    self.trailer_count = item.count
                    continue
                self.count += 1
                return item
        except BaseException:
            self.close()
            raise

    def raw_batches(self, size: int) -> Iterator[tuple[int, bytes]]:
        """Yield (number of the first line, a block of whole lines) for parsing elsewhere.

        Blocks are about ``size`` bytes and end after a newline (except at the end of the
        file). The consumer parses the lines with ``parse_fields``, sets ``count``,
        ``trailer_line`` and ``trailer_count`` and then calls ``finish()``.
        """
        f = self._f
        if f is None:
            return
        try:
            carry = b""
            while True:
                data = f.read(size)
                if not data:
                    if carry:
                        self.lineno += 1
                        yield self.lineno, carry
                    return
                data = carry + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one long line: keep reading, up to EXPORT_MAX_LINE
                    if len(data) > EXPORT_MAX_LINE:
                        raise ExportError(f"line {self.lineno + 1}: longer than {EXPORT_MAX_LINE} bytes")
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                first = self.lineno + 1
                self.lineno += block.count(b"\n")
                yield first, block
        except BaseException:
            self.close()
            raise

    def finish(self) -> None:
        """Check the trailer at the end of the file and close it.

        Raises ExportError if there was no trailer or its count disagrees.
        """
        self.close()
        if self.trailer_line is None:
            raise ExportError(
                f"line {self.lineno}: the file ends without its trailer (truncated after {self.count} address lines)"
            )
        if self.trailer_count != self.count:
            raise ExportError(
                f"line {self.trailer_line}: the trailer says {self.trailer_count} addresses, the file has {self.count}"
            )

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def _readline(f: IO[bytes], lineno: int) -> bytes:
    """The next line, at most EXPORT_MAX_LINE bytes (a device or a corrupted file may have
    no newline at all). Raises ExportError naming the line when it is longer."""
    line = f.readline(EXPORT_MAX_LINE + 1)
    if len(line) > EXPORT_MAX_LINE:
        raise ExportError(f"line {lineno}: longer than {EXPORT_MAX_LINE} bytes")
    return line


def read_export(path: str | Path) -> tuple[ExportHeader, ExportRecords]:
    """Open an export, validate its header, and return it with an iterator over its records.

    Raises ExportError if the file cannot be opened or its header is invalid, FileRefused
    (unread) when it is larger than EXPORT_MAX_BYTES or not a file; the iterator raises
    ExportError later for problems further down (see ExportRecords), a line longer than
    EXPORT_MAX_LINE included.
    """
    try:
        f = open_checked(path, EXPORT_MAX_BYTES, "export")  # handed to the iterator, which closes it
    except OSError as exc:
        raise ExportError(f"cannot read export {path}: {exc.strerror or exc}") from None
    try:
        first = _readline(f, 1)
        if not first:
            raise ExportError("line 1: the file is empty (no header)")
        header = parse_header(first)
    except BaseException:
        f.close()
        raise
    return header, ExportRecords(f, str(path))
