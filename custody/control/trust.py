"""What a machine believes about its founders: the founders-signed manifest pinned here, the
rotations pinned beside it, and the store's copy of them (checked against each other).

Every roster and rulebook is checked against :attr:`Trust.governance`: after a key rotation, the
founders of the policy epoch it belongs to (custody.identity.governance).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sqlmodel import Session, col, select

from custody.config import Settings
from custody.control.wallet import StoredPolicy, policy_from_stored, stored_policy
from custody.errors import InputError, StorageError, VerificationFailed
from custody.files import read_bounded, write_atomic
from custody.identity.founders_documents import Founders
from custody.identity.governance import Governance, governance_of
from custody.policy.manifest import MAX_MANIFEST_BYTES, SignedManifest, load_signed_manifest
from custody.policy.model import Policy
from custody.policy.rotation import check_chain as check_manifest_chain
from custody.store.db import Database
from custody.store.models import PolicyEpochRow, SignedManifestRow


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
def _checked_chain(documents: tuple[bytes, ...], where: str) -> tuple[SignedManifest, ...]:
    """The manifests in ``documents`` (the first, then each rotation), every link checked.
    Raises VerificationFailed naming ``where``."""
    try:
        chain = [load_signed_manifest(d) for d in documents]
        return tuple(check_manifest_chain(chain))
    except InputError as exc:
        raise VerificationFailed(f"{where} cannot be trusted: {exc}") from None


def load_trust(settings: Settings) -> Trust:
    """The pinned manifest, every founder's signature checked, and the rotations pinned beside it.

    Raises StorageError (none pinned), VerificationFailed (unreadable, or not signed by every
    founder: exit 3, nothing may act on it).
    """
    path = settings.manifest
    data = read_pinned(path)
    trust_from_pinned(path, data)
    from custody.control.epochs import read_rotations, rotations_path  # epochs imports this module

    rotations = tuple(json.dumps(m.to_document()).encode() for m in read_rotations(rotations_path(settings)))
    chain = _checked_chain((data, *rotations), "the founders' manifests pinned on this machine")
    return Trust(chain[0], chain[1:])


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
    (its rotations not read: :func:`load_trust`). Raises VerificationFailed."""
    return Trust(_checked_chain((data,), f"the pinned founders' manifest {path}")[0])


def pin_manifest(path: Path, m: SignedManifest) -> None:
    """Write the signed manifest to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, json.dumps(m.to_document(), indent=2) + "\n")


def manifest_in_store(db: Database) -> SignedManifest:
    """The signed manifest the store carries (checked: every founder signed). Raises StorageError,
    VerificationFailed."""
    db.check_schema()
    with db.transaction() as s:
        row = s.get(SignedManifestRow, 1)
        if row is None:
            raise StorageError("the store carries no founders-signed manifest")
        try:
            return load_signed_manifest(row.document.encode()).check()
        except InputError as exc:
            raise VerificationFailed(f"the store's founders' manifest cannot be trusted: {exc}") from None


def store_trust(s: Session) -> Trust:
    """The founders-signed manifest the store carries, checked: every founder signed it and it
    is the store's policy, with the rotations the store applied. What the online views count
    approvals against; every step that acts also compares it with the manifest pinned on this
    machine (:func:`check_pinned`).

    Raises StorageError (none: a store from before signed manifests), VerificationFailed.
    """
    row = s.get(SignedManifestRow, 1)
    first = trust_from_stored(None if row is None else (row.digest, row.document), stored_policy(s))
    # The rotations the store applied (custody.control.epochs re-checks their rows in full):
    # rosters and rulebooks follow their founders.
    epochs = s.exec(select(PolicyEpochRow.document).order_by(col(PolicyEpochRow.epoch))).all()
    if not epochs:
        return first
    assert row is not None  # trust_from_stored raised otherwise
    chain = _checked_chain((row.document.encode(), *(d.encode() for d in epochs)), "the store's policy epochs")
    return Trust(chain[0], chain[1:])


def trust_from_stored(manifest: tuple[str, str] | None, policy: StoredPolicy) -> Trust:
    """The store's first manifest from the text read: the signed manifest row's (digest,
    document) and the stored policy's, checked (every founder signed it; it is the store's
    policy). Raises StorageError, VerificationFailed."""
    if manifest is None:
        raise StorageError("the store carries no founders-signed manifest (`custody manifest adopt FILE`)")
    digest, document = manifest
    m = _checked_chain((document.encode(),), "the store's founders' manifest")[0]
    if m.digest != digest:
        raise VerificationFailed("the store's founders' manifest does not match its recorded digest")
    trust = Trust(m)
    check_store_policy(policy_from_stored(policy), trust)
    return trust


def store_governance(s: Session) -> Governance | None:
    """The store's governance (:func:`store_trust`); None when the store carries no founders-signed
    manifest or its chain does not stand: then no roster or rulebook of the store can be believed."""
    try:
        return store_trust(s).governance
    except (StorageError, VerificationFailed):
        return None


def check_pinned(s: Session, pinned: Trust) -> Trust:
    """The store's trust, required to be the manifest pinned on this machine. Raises
    VerificationFailed on any difference (the store or the pin was swapped)."""
    mine = store_trust(s)
    if mine.manifest.digest != pinned.manifest.digest:
        raise VerificationFailed(
            f"the store's founders' manifest {mine.manifest.fingerprint} is not the one pinned on this machine "
            f"({pinned.manifest.fingerprint})"
        )
    return mine


def check_store_policy(policy: Policy, trust: Trust) -> None:
    """Raise VerificationFailed when the store's policy is not the founders-signed one."""
    if policy.to_manifest() != trust.manifest.body:
        raise VerificationFailed(
            f"the store's policy differs from the founders-signed manifest {trust.manifest.fingerprint} "
            "pinned on this machine: the store was tampered with, or belongs to other founders"
        )
