"""Documents a quorum of founders signs: the employee roster and the withdrawal rulebook.

Each is a versioned body (``serial`` 1, 2, 3 ..., each chained to the digest of the one it
replaces by ``previous``), bound to one founders' manifest by its digest, and signed by at
least the manifest's threshold m of its founders, each as a Bitcoin signed message
(custody.bitcoin.message) of

    custody <kind> <network> #<serial> sha256:<hex digest of the body>

with the key behind their xpub. The digest is SHA-256 of the body's canonical JSON. This module
holds what the kinds share: the canonical form, the founders a document is checked against,
the signature list, the header fields, and counting valid signatures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from custody.bitcoin.message import sign_message, verify_message
from custody.errors import InputError

HEADER_FIELDS = frozenset({"format", "version", "network", "manifest", "serial", "previous"})
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class Founders:
    """What a document is checked against: the pinned manifest's founders, threshold and digest."""

    network: str
    manifest: str
    threshold: int
    pubkeys: Mapping[str, bytes]


class FoundersDocument:
    """What a founders-signed document shares; a subclass is a frozen dataclass with the fields
    ``network``, ``manifest``, ``serial``, ``previous`` and ``signatures`` (founder -> base64),
    and says what its ``body()`` is."""

    KIND: ClassVar[str]  # "roster", "rulebook": the document's key and its word in the message
    FORMAT: ClassVar[str]  # "custody-roster", ...
    VERSION: ClassVar[int]
    network: str
    manifest: str
    serial: int
    previous: str | None
    signatures: Mapping[str, str]

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def header(self) -> dict[str, Any]:
        """The fields every body starts with."""
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "network": self.network,
            "manifest": self.manifest,
            "serial": self.serial,
            "previous": self.previous,
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.body()).encode()).hexdigest()

    @property
    def message(self) -> str:
        return f"custody {self.KIND} {self.network} #{self.serial} sha256:{self.digest}"

    def to_document(self) -> dict[str, Any]:
        return {
            self.KIND: self.body(),
            "signatures": [{"founder": n, "signature": s} for n, s in sorted(self.signatures.items())],
        }

    def with_signature(self, founder: str, signature: str) -> Self:
        return dataclasses.replace(self, signatures=dict(self.signatures) | {founder: signature})  # type: ignore[type-var]

    def unsigned(self) -> Self:
        return dataclasses.replace(self, signatures={})  # type: ignore[type-var]


@dataclass(frozen=True)
class Header:
    network: str
    manifest: str
    serial: int
    previous: str | None


def parse_header(
    doc: object, kind: str, fmt: str, version: int, fields: frozenset[str]
) -> tuple[dict[str, Any], Header]:
    """The body of a ``{kind: BODY, "signatures": [...]}`` document and its header fields,
    checked: its format and version, exactly ``fields`` (the header's included), a serial from 1,
    ``previous`` null for #1 and a digest otherwise. Raises InputError."""
    if not isinstance(doc, dict) or not isinstance(doc.get(kind), dict):
        raise InputError(f"not a custody {kind} document")
    body = doc[kind]
    if body.get("format") != fmt:
        raise InputError(f"not a custody {kind}: format is {str(body.get('format'))[:40]!r}")
    if body.get("version") != version:
        raise InputError(f"unsupported {kind} format version {str(body.get('version'))[:20]!r}")
    if set(body) != fields:
        raise InputError(f"a {kind} body has exactly the fields {', '.join(sorted(fields))}")
    serial = body["serial"]
    if not isinstance(serial, int) or isinstance(serial, bool) or not 1 <= serial < 2**53:
        raise InputError(f"the {kind}'s serial is a whole number from 1")
    for f in ("network", "manifest"):
        if not isinstance(body[f], str) or not body[f]:
            raise InputError(f"the {kind}'s {f} is missing")
    previous = body["previous"]
    if not (previous is None or is_digest(previous)):
        raise InputError(f"the {kind}'s previous is the hex digest of the {kind} it replaces, or null")
    if (previous is None) != (serial == 1):
        raise InputError(f"only {kind} #1 has no previous {kind}")
    return body, Header(body["network"], body["manifest"], serial, previous)


def parse_signatures(doc: dict[str, Any], kind: str) -> dict[str, str]:
    """The ``signatures`` list of a document: founder name -> base64. Raises InputError."""
    sigs: dict[str, str] = {}
    raw = doc.get("signatures", [])
    if not isinstance(raw, list):
        raise InputError(f"the {kind}'s signatures are a list")
    for entry in raw:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("founder"), str)
            or not isinstance(entry.get("signature"), str)
        ):
            raise InputError(f'each {kind} signature is {{"founder": NAME, "signature": BASE64}}')
        if entry["founder"] in sigs:
            raise InputError(f"founder {entry['founder']!r} signed the {kind} twice")
        sigs[entry["founder"]] = entry["signature"]
    return sigs


def check_canonical(doc: FoundersDocument, body: dict[str, Any], order: str) -> None:
    """Raise InputError unless ``body`` is ``doc``'s canonical body (``order`` says what is sorted)."""
    if canonical_json(doc.body()) != canonical_json(body):
        raise InputError(f"the {doc.KIND} body is not in its canonical order ({order})")


def load_json(data: bytes, limit: int, kind: str) -> object:
    """A document file's bytes as JSON. Raises InputError (too large, not JSON)."""
    if len(data) > limit:
        raise InputError(f"a {kind} is at most {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise InputError(f"the {kind} is not valid JSON") from None


def signature_problems(doc: FoundersDocument, founders: Founders) -> list[str]:
    """Why ``doc`` is not signed by at least m founders of ``founders`` (empty: it is)."""
    out = []
    if doc.network != founders.network:
        out.append(f"it is for network {doc.network!r}, the manifest says {founders.network}")
    if doc.manifest != founders.manifest:
        out.append("it belongs to another founders' manifest")
    valid = []
    for name, sig in doc.signatures.items():
        pub = founders.pubkeys.get(name)
        if pub is None:
            out.append(f"it carries a signature by {name!r}, who is not a founder")
        elif not verify_message(pub, doc.message, sig):
            out.append(f"founder {name}'s signature does not verify")
        else:
            valid.append(name)
    if len(valid) < founders.threshold:
        out.append(
            f"{len(valid)} valid founder signature(s) ({', '.join(sorted(valid)) or 'none'}); "
            f"a {doc.KIND} needs {founders.threshold}"
        )
    return out


D = TypeVar("D", bound=FoundersDocument)


def sign_document(doc: D, founder: str, account_key: Any, founders: Founders) -> D:
    """``doc`` with ``founder``'s signature added (``account_key``: coincurve private key of their
    xpub). Raises InputError when ``founder`` is not a founder or the key is not theirs."""
    pub = founders.pubkeys.get(founder)
    if pub is None:
        raise InputError(f"{founder} is not a founder of the pinned manifest")
    if account_key.public_key.format(compressed=True) != pub:
        raise InputError(f"this key is not founder {founder}'s")
    return doc.with_signature(founder, sign_message(account_key, doc.message))


def rollback_problem(
    kind: str, serial: int, digest_at: Mapping[int, str], seen_serial: int, seen: str | None
) -> str | None:
    """Why a document (or chain) whose newest serial is ``serial`` rolls back what a machine has
    seen (``seen_serial`` with digest ``seen``); ``digest_at``: the digests it carries by serial.
    None when it does not."""
    if seen is None:
        return None
    if serial < seen_serial:
        return (
            f"{kind} #{serial} is older than {kind} #{seen_serial}, which this signer has seen: "
            f"a {kind} is never rolled back"
        )
    carried = digest_at.get(seen_serial)
    if carried is not None and carried != seen:
        return (
            f"{kind} #{seen_serial} is not the {kind} #{seen_serial} this signer has seen (two {kind}s with one serial)"
        )
    return None
