"""The founders-signed manifest: the root of every rule.

The founders' manifest (network, threshold, script type, each founder's account xpub with its
key origin; docs/FORMATS.md) is signed by EVERY founder at the key ceremony, each with the key
behind the xpub they published, as a Bitcoin signed message (custody.bitcoin.message) of

    custody founders-manifest sha256:<hex digest of the manifest>

The digest is SHA-256 of the manifest's canonical JSON (sorted keys, no spaces, ASCII), the
``signatures`` field left out. A manifest is only used once every founder's signature is
there and valid; its short fingerprint (the digest's first 16 hex digits, in groups of four)
is what people compare aloud when they pin it on another machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coincurve

from custody.bitcoin.message import sign_message, verify_message
from custody.errors import Conflict, InputError
from custody.files import write_atomic
from custody.policy.model import Policy, policy_from_manifest

SIGNATURES = "signatures"
# A rotation manifest (custody.policy.rotation) also carries the current founders' approvals;
# like the signatures, they are not part of what is signed.
APPROVALS = "predecessor_signatures"
UNSIGNED_FIELDS = (SIGNATURES, APPROVALS)
MAX_MANIFEST_BYTES = 256 * 1024


def canonical_json(doc: Any) -> str:
    """The one serialization every signature is made over: sorted keys, no spaces, ASCII."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def short_fingerprint(digest_hex: str) -> str:
    """``abcd-ef01-2345-6789``: the first 64 bits of a digest, to read aloud."""
    return "-".join(digest_hex[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class SignedManifest:
    """A manifest document with its founders' signatures (checked or not: see :meth:`check`)."""

    body: dict[str, Any]  # the manifest without its signatures
    signatures: dict[str, str]  # founder name -> base64 signature
    policy: Policy
    approvals: dict[str, str] = field(default_factory=dict)  # a rotation's: predecessor founder -> signature

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.body).encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        return short_fingerprint(self.digest)

    @property
    def message(self) -> str:
        return f"custody founders-manifest sha256:{self.digest}"

    def founder_pubkeys(self) -> dict[str, bytes]:
        """Each founder's account public key: what their signatures are checked against."""
        return {f.name: f.key.xpub.public_key for f in self.policy.founders}

    def problems(self) -> list[str]:
        """Why this manifest may not be used (empty: every founder signed it, validly)."""
        out = []
        keys = self.founder_pubkeys()
        for name in self.signatures:
            if name not in keys:
                out.append(f"a signature by {name!r}, who is not a founder of this manifest")
        for name, pub in keys.items():
            sig = self.signatures.get(name)
            if sig is None:
                out.append(f"founder {name} has not signed it")
            elif not verify_message(pub, self.message, sig):
                out.append(f"founder {name}'s signature is not valid for this manifest")
        return out

    def check(self) -> SignedManifest:
        """Return self when every founder signed it; raise InputError naming what is missing."""
        problems = self.problems()
        if problems:
            raise InputError(
                f"the founders' manifest {self.fingerprint} is not signed by every founder: " + "; ".join(problems)
            )
        return self

    def to_document(self) -> dict[str, Any]:
        sigs = [
            {"founder": f.name, "signature": self.signatures[f.name]}
            for f in self.policy.founders
            if f.name in self.signatures
        ]
        doc = self.body | {SIGNATURES: sigs}
        if self.approvals:
            doc[APPROVALS] = [{"founder": n, "signature": sig} for n, sig in sorted(self.approvals.items())]
        return doc

    def with_signature(self, founder: str, signature: str) -> SignedManifest:
        return SignedManifest(self.body, self.signatures | {founder: signature}, self.policy, self.approvals)

    def with_approval(self, founder: str, signature: str) -> SignedManifest:
        return SignedManifest(self.body, self.signatures, self.policy, self.approvals | {founder: signature})


def unsigned(policy: Policy) -> SignedManifest:
    """A new manifest for ``policy``, signed by nobody yet."""
    return SignedManifest(policy.to_manifest(), {}, policy)


def parse_signed_manifest(doc: object) -> SignedManifest:
    """Read a manifest document, signed or not (call :meth:`SignedManifest.check` to insist).

    Raises InputError for a document that is not a valid manifest or whose signatures field
    is malformed.
    """
    if not isinstance(doc, dict):
        raise InputError("not a custody founders' manifest")
    body = {k: v for k, v in doc.items() if k not in UNSIGNED_FIELDS}
    policy = policy_from_manifest(body)
    return SignedManifest(body, _signature_list(doc, SIGNATURES), policy, _signature_list(doc, APPROVALS))


def _signature_list(doc: dict[str, Any], name: str) -> dict[str, str]:
    raw = doc.get(name, [])
    if not isinstance(raw, list):
        raise InputError(f"the manifest's {name} must be a list")
    sigs: dict[str, str] = {}
    for entry in raw:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("founder"), str)
            or not isinstance(entry.get("signature"), str)
        ):
            raise InputError(f'each entry of the manifest\'s {name} is {{"founder": NAME, "signature": BASE64}}')
        if entry["founder"] in sigs:
            raise InputError(f"founder {entry['founder']!r} appears twice in the manifest's {name}")
        sigs[entry["founder"]] = entry["signature"]
    return sigs


def load_signed_manifest(data: bytes) -> SignedManifest:
    """Parse a manifest file's bytes. Raises InputError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise InputError(f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise InputError("the manifest is not valid JSON") from None
    return parse_signed_manifest(doc)


def sign_manifest(m: SignedManifest, founder: str, account_key: coincurve.PrivateKey) -> SignedManifest:
    """Add ``founder``'s signature, made with the private key of their account xpub.

    Raises InputError when ``founder`` is not in the manifest or the key is not theirs.
    """
    pub = m.founder_pubkeys().get(founder)
    if pub is None:
        raise InputError(f"{founder} is not a founder of this manifest")
    if account_key.public_key.format(compressed=True) != pub:
        raise InputError(f"this key is not the key of founder {founder}'s xpub in the manifest")
    return m.with_signature(founder, sign_message(account_key, m.message))


def write_manifest(path: Path, document: dict[str, Any], overwrite: bool = False) -> None:
    """Write a manifest document to ``path`` atomically (temporary file, fsync, rename).

    Raises Conflict when ``path`` exists and ``overwrite`` is not given, StorageError when it
    cannot be written.
    """
    if path.exists() and not overwrite:
        raise Conflict(f"{path} exists already; not overwritten")
    write_atomic(path, json.dumps(document, indent=2) + "\n")
