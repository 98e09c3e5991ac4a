"""Every policy of a store that rotated its keys: the chain of founders' manifests, checked
here on its own (standard library and coincurve only), and the records routed to the policy
whose indexes they fall in.

A rotation manifest names its predecessor by digest (``previous``) and carries, beside the
signatures of every one of its own founders, the approvals (``predecessor_signatures``) of at
least m founders of its predecessor; all are BIP-137 signed messages over
``custody founders-manifest sha256:<digest>``, the digest being SHA-256 of the manifest's
canonical JSON without those two lists (docs/FORMATS.md). Epoch N issues receive indexes from
``receive_from`` and change indexes from ``change_from`` until epoch N+1 begins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import coincurve

from .core import Failure, Report
from .errors import ManifestError
from .export import AddressRecord
from .files import MANIFEST_MAX_BYTES, read_checked
from .manifest import Manifest, parse_manifest
from .parallel import verify_records

UNSIGNED = ("signatures", "predecessor_signatures")
_MAGIC = b"Bitcoin Signed Message:\n"


@dataclass(frozen=True)
class ManifestDocument:
    """A manifest as a file holds it: the parsed policy, its digest and its signatures."""

    manifest: Manifest
    digest: str
    previous: str | None
    signatures: dict[str, str]
    approvals: dict[str, str]

    @property
    def fingerprint(self) -> str:
        return "-".join(self.digest[i : i + 4] for i in range(0, 16, 4))


def _signature_map(obj: dict[str, Any], name: str) -> dict[str, str]:
    raw = obj.get(name, [])
    if not isinstance(raw, list):
        raise ManifestError(f"'{name}' must be a list")
    out: dict[str, str] = {}
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("founder"), str):
            raise ManifestError(f"each entry of '{name}' is an object with 'founder' and 'signature'")
        out[entry["founder"]] = str(entry.get("signature"))
    return out


def parse_document(obj: Any) -> ManifestDocument:
    """Raises ManifestError for what is not a founders' manifest."""
    if not isinstance(obj, dict):
        raise ManifestError("a manifest is a JSON object")
    body = {k: v for k, v in obj.items() if k not in UNSIGNED}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    previous = body.get("previous")
    if previous is not None and not isinstance(previous, str):
        raise ManifestError("'previous' must be a digest")
    return ManifestDocument(
        parse_manifest(body),
        hashlib.sha256(canonical.encode()).hexdigest(),
        previous,
        _signature_map(obj, "signatures"),
        _signature_map(obj, "predecessor_signatures"),
    )


def load_document(path: str | Path) -> ManifestDocument:
    """Read a manifest file. Raises ManifestError, FileRefused."""
    try:
        data = read_checked(path, MANIFEST_MAX_BYTES, "manifest")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    return parse_document(obj)


def _message_hash(message: str) -> bytes:
    data = message.encode("utf-8")
    # compact sizes: both lengths are below 253, one byte each (messages here are short)
    payload = bytes([len(_MAGIC)]) + _MAGIC + bytes([len(data)]) + data
    return hashlib.sha256(hashlib.sha256(payload).digest()).digest()


def signed_by(pubkey: bytes, message: str, signature: str) -> bool:
    """True when ``signature`` (base64, 65 bytes, compressed-key header) is ``pubkey``'s."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    if len(raw) != 65 or not 31 <= raw[0] <= 34:
        return False
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            raw[1:] + bytes([raw[0] - 31]), _message_hash(message), hasher=None
        )
    except (ValueError, TypeError):
        return False
    return bytes(key.format(compressed=True)) == pubkey


def _valid(doc: ManifestDocument, of: Manifest, sigs: dict[str, str]) -> set[str]:
    message = f"custody founders-manifest sha256:{doc.digest}"
    keys = {f.name: f.key.key for f in of.founders}
    return {name for name, sig in sigs.items() if name in keys and signed_by(keys[name], message, sig)}


def chain_problems(chain: Sequence[ManifestDocument]) -> list[str]:
    """Why ``chain`` (the first manifest, then each rotation) is not a founders-approved chain."""
    if not chain:
        return ["no manifest"]
    out = []
    for n, doc in enumerate(chain):
        own = _valid(doc, doc.manifest, doc.signatures)
        missing = sorted({f.name for f in doc.manifest.founders} - own)
        if missing:
            out.append(f"manifest {doc.fingerprint}: not validly signed by {', '.join(missing)}")
        if n == 0:
            if doc.previous is not None:
                out.append(f"the first manifest {doc.fingerprint} names a predecessor")
            continue
        before = chain[n - 1]
        if doc.previous != before.digest:
            out.append(f"manifest {doc.fingerprint} does not name {before.fingerprint} as its predecessor")
        if doc.manifest.network != before.manifest.network:
            out.append(f"manifest {doc.fingerprint} changes the network")
        approved = _valid(doc, before.manifest, doc.approvals)
        if len(approved) < before.manifest.threshold:
            out.append(
                f"rotation {doc.fingerprint} is approved by {len(approved)} founder(s) of {before.fingerprint}; "
                f"it needs {before.manifest.threshold}"
            )
    return out


class Epoch(NamedTuple):
    """One policy and where its indexes begin."""

    manifest: Manifest
    receive_from: int
    change_from: int


def epoch_index(epochs: Sequence[Epoch], chain: int, index: int) -> int:
    """The position in ``epochs`` of the policy that derives ``chain``/``index``."""
    found = 0
    for n, e in enumerate(epochs[1:], start=1):
        if index >= (e.receive_from if chain == 0 else e.change_from):
            found = n
    return found


def range_problems(epochs: Sequence[Epoch]) -> list[str]:
    """Epoch boundaries that go backwards."""
    return [
        f"epoch {n} begins before epoch {n - 1}"
        for n in range(1, len(epochs))
        if epochs[n].receive_from < epochs[n - 1].receive_from or epochs[n].change_from < epochs[n - 1].change_from
    ]


def verify_epochs(
    epochs: Sequence[Epoch],
    records: Callable[[], Iterable[AddressRecord]],
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    spill_at: int | None = None,
    spill_dir: str | None = None,
) -> Report:
    """Every record checked against the policy of its epoch: one pass over ``records()`` per
    epoch. A record derived from the wrong policy (or from none) is a failure. Raises
    SpillError as :func:`custody.verify.verify_records` does."""
    total = Report(failures=[Failure("(policy epochs)", -1, -1, problem) for problem in range_problems(epochs)])
    done = 0
    for n, epoch in enumerate(epochs):
        mine = (r for r in records() if epoch_index(epochs, r.chain, r.index) == n)

        def step(count: int, base: int = done) -> None:
            if progress is not None:
                progress(base + count)

        report = verify_records(
            epoch.manifest, mine, workers=workers, progress=step, spill_at=spill_at, spill_dir=spill_dir
        )
        done += report.checked
        total.merge(report)  # a record is of one epoch: the counts add up exactly
    return total
