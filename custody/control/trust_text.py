"""The founders' trust from the text read, with no store: the checked chain of manifests, the
stored policy parsed, and the governance of rosters and rulebooks (custody.identity.governance).

custody.control.trust reads that text through the ORM; custody.control.halt_light reads it
through a plain cursor. Both build what they believe here, so the two cannot differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from custody.bitcoin.keys import parse_origin_xpub
from custody.bitcoin.network import get_network
from custody.bitcoin.script import parse_script_type
from custody.errors import InputError, StorageError, VerificationFailed
from custody.files import read_bounded
from custody.identity.founders_documents import Founders
from custody.identity.governance import Governance, governance_of
from custody.policy.manifest import MAX_MANIFEST_BYTES, SignedManifest, load_signed_manifest
from custody.policy.model import Founder, Policy
from custody.policy.rotation import check_chain as check_manifest_chain


@dataclass(frozen=True)
class Trust:
    """What this machine believes: the founders-signed manifest pinned here and the rotations
    pinned beside it (each approved by its predecessor's quorum; custody.control.epochs)."""

    manifest: SignedManifest  # the first manifest
    rotations: tuple[SignedManifest, ...] = ()

    @property
    def policy(self) -> Policy:
        return self.manifest.policy

    @property
    def newest(self) -> SignedManifest:
        return self.rotations[-1] if self.rotations else self.manifest

    @property
    def founders(self) -> Founders:
        """Who signs a new roster or rulebook now: the newest manifest's founders."""
        return founders_of(self.newest)

    @cached_property
    def governance(self) -> Governance:
        """Which founders each roster and rulebook is checked against (custody.identity.governance)."""
        return governance_of([self.manifest, *self.rotations])


def founders_of(m: SignedManifest) -> Founders:
    return Founders(m.policy.network.name, m.digest, m.policy.threshold, m.founder_pubkeys())


@functools.lru_cache(maxsize=16)
def checked_chain(documents: tuple[bytes, ...], where: str) -> tuple[SignedManifest, ...]:
    """The manifests in ``documents`` (the first, then each rotation), every link checked.
    Raises VerificationFailed naming ``where``."""
    try:
        chain = [load_signed_manifest(d) for d in documents]
        return tuple(check_manifest_chain(chain))
    except InputError as exc:
        raise VerificationFailed(f"{where} cannot be trusted: {exc}") from None


def read_pinned(path: Path) -> bytes:
    """The pinned manifest's bytes, unchecked (:func:`trust_from_pinned`). Raises StorageError
    (none pinned), VerificationFailed (unreadable)."""
    try:
        return read_bounded(path, MAX_MANIFEST_BYTES, "the pinned founders' manifest")
    except FileNotFoundError:
        raise StorageError(
            f"no founders' manifest is pinned at {path}: `custody init MANIFEST` (first machine) or "
            "`custody manifest pin` (another machine), or set CUSTODY_MANIFEST"
        ) from None


def trust_from_pinned(path: Path, data: bytes) -> Trust:
    """The first manifest pinned at ``path`` from its bytes, every founder's signature checked
    (its rotations not read: custody.control.trust.load_trust). Raises VerificationFailed."""
    return Trust(checked_chain((data,), f"the pinned founders' manifest {path}")[0])


# ---------------------------------------------------------------- the store's text

StoredPolicy = tuple[str, int, str, tuple[tuple[str, str], ...]] | None
"""The stored policy's text as read (network, threshold, script type, founders' names and
xpubs), None when the store has none: what :func:`policy_from_stored` parses."""

StoredManifest = tuple[str, str] | None
"""The signed manifest row's (digest, document), None when the store has none."""


def policy_from_stored(stored: StoredPolicy) -> Policy:
    """The policy of a stored policy's text. Raises StorageError when there is none or it is
    unreadable."""
    if stored is None:
        raise StorageError("the store has no policy: run `custody init` first")
    try:
        return _parsed_policy(*stored)
    except Exception as exc:  # a stored policy that does not parse is a damaged store
        raise StorageError(f"the stored policy is damaged: {exc}") from None


@functools.lru_cache(maxsize=8)
def _parsed_policy(network_name: str, threshold: int, script: str, founders: tuple[tuple[str, str], ...]) -> Policy:
    """The policy parsed from its stored text, once per process for the same text (parsing
    the xpubs was a fifth of a single-address issuance). Keyed by every stored value, so a
    row changed in the store is parsed, and judged, anew."""
    network = get_network(network_name)
    parsed = tuple(Founder(name, parse_origin_xpub(xpub, network)) for name, xpub in founders)
    return Policy(network, threshold, parse_script_type(script), parsed)


def check_store_policy(policy: Policy, trust: Trust) -> None:
    """Raise VerificationFailed when the store's policy is not the founders-signed one."""
    if policy.to_manifest() != trust.manifest.body:
        raise VerificationFailed(
            f"the store's policy differs from the founders-signed manifest {trust.manifest.fingerprint} "
            "pinned on this machine: the store was tampered with, or belongs to other founders"
        )


def trust_from_stored(manifest: StoredManifest, policy: StoredPolicy) -> Trust:
    """The store's first manifest from the text read, checked (every founder signed it; it is
    the store's policy). Raises StorageError, VerificationFailed."""
    if manifest is None:
        raise StorageError("the store carries no founders-signed manifest (`custody manifest adopt FILE`)")
    digest, document = manifest
    m = checked_chain((document.encode(),), "the store's founders' manifest")[0]
    if m.digest != digest:
        raise VerificationFailed("the store's founders' manifest does not match its recorded digest")
    trust = Trust(m)
    check_store_policy(policy_from_stored(policy), trust)
    return trust


def store_trust_from_text(manifest: StoredManifest, epochs: tuple[str, ...], policy: StoredPolicy) -> Trust:
    """The store's trust from its text: the first manifest (:func:`trust_from_stored`) and the
    rotations it applied (custody.control.epochs re-checks their rows in full), every link
    checked. Raises StorageError, VerificationFailed."""
    first = trust_from_stored(manifest, policy)
    if not epochs or manifest is None:
        return first
    chain = checked_chain((manifest[1].encode(), *(d.encode() for d in epochs)), "the store's policy epochs")
    return Trust(chain[0], chain[1:])


def governance_from_text(
    manifest: StoredManifest, epochs: tuple[str, ...], policy: StoredPolicy, pinned: Path | None = None
) -> Governance | None:
    """The store's governance (:func:`store_trust_from_text`); None when the store carries no
    founders-signed manifest or its chain does not stand: then no roster or rulebook of the store
    can be believed. With ``pinned`` (the manifest pinned on this machine), None as well unless
    the store's first manifest is that one (:func:`pinned_digest`): a store given founders of
    someone's own by SQL, every one of whom signed, stands on its own text."""
    try:
        trust = store_trust_from_text(manifest, epochs, policy)
    except (StorageError, VerificationFailed):
        return None
    if pinned is not None and trust.manifest.digest != pinned_digest(pinned):
        return None
    return trust.governance


def pinned_digest(path: Path) -> str | None:
    """The digest of the manifest pinned at ``path``; None when it is missing or unreadable. Its
    signatures are not checked here: it is compared with a manifest whose every signature was."""
    try:
        return _digest_of(read_bounded(path, MAX_MANIFEST_BYTES, "the pinned founders' manifest"))
    except (OSError, InputError):
        return None


@functools.lru_cache(maxsize=8)
def _digest_of(data: bytes) -> str | None:
    try:
        return load_signed_manifest(data).digest
    except InputError:
        return None
