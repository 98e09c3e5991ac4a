"""The independent address verifier: re-derives every deposit address from the founders' keys.

Independence is the point: this package uses only the Python standard library and coincurve
(libsecp256k1), with its own base58check, bech32/bech32m, script template, BIP-32 and network
code. It imports nothing else of custody and not python-bitcoinlib (tests/test_architecture.py
and the import-linter contracts enforce it).

Public API::

    load_manifest(path) -> Manifest                 # raises ManifestError, FileRefused
    parse_manifest(obj) -> Manifest                 # raises ManifestError
    read_export(path) -> (ExportHeader, Iterator[AddressRecord])   # raises ExportError, FileRefused
    check_header(manifest, header) -> None          # raises ExportError on any discrepancy
    verify_records(manifest, records, *, workers=1, progress=None, spill_at=None, spill_dir=None) -> Report
    verify_export(manifest, path, *, workers=1, progress=None, spill_at=None, spill_dir=None) -> Report
        # raise SpillError when the temporary files of a large set (beyond SPILL_AT records)
        # cannot be written or come back changed: no report, never a pass
    verify_address(manifest, chain, index, address) -> list[str]   # empty = good
    load_document(path) / parse_document(obj) -> ManifestDocument  # a manifest with digest and signatures
    chain_problems(documents) -> list[str]          # a rotation chain: every link founders-approved
    verify_epochs(epochs, records_factory, *, workers=1, progress=None) -> Report   # several policies
"""

from .core import Failure, Report, check_header, verify_address
from .epochs import Epoch, ManifestDocument, chain_problems, epoch_index, load_document, parse_document, verify_epochs
from .errors import DecodeError, ExportError, FileRefused, ManifestError, SpillError
from .export import AddressRecord, ExportHeader, ExportRecords, read_export
from .manifest import Founder, KeyOrigin, Manifest, load_manifest, parse_manifest
from .parallel import verify_export, verify_records

__all__ = [
    "AddressRecord",
    "DecodeError",
    "Epoch",
    "ExportError",
    "ExportHeader",
    "ExportRecords",
    "Failure",
    "FileRefused",
    "Founder",
    "KeyOrigin",
    "Manifest",
    "ManifestDocument",
    "ManifestError",
    "Report",
    "SpillError",
    "chain_problems",
    "check_header",
    "epoch_index",
    "load_document",
    "load_manifest",
    "parse_document",
    "parse_manifest",
    "read_export",
    "verify_address",
    "verify_epochs",
    "verify_export",
    "verify_records",
]
