"""What a machine believes about its founders: the founders-signed manifest pinned here, the
rotations pinned beside it, and the store's copy of them (checked against each other).

Every roster and rulebook is checked against :attr:`Trust.governance`: after a key rotation, the
founders of the policy epoch it belongs to (custody.identity.governance).
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlmodel import Session, col, select

from custody.config import Settings
from custody.control.trust_text import (
    StoredManifest,
    StoredPolicy,
    Trust,
    check_store_policy,
    founders_of,
    governance_from_text,
    read_pinned,
    store_trust_from_text,
    trust_from_pinned,
    trust_from_stored,
)
from custody.control.wallet import stored_policy
from custody.errors import VerificationFailed
from custody.files import write_atomic
from custody.identity.governance import Governance
from custody.policy.manifest import SignedManifest
from custody.store.db import Database
from custody.store.models import PolicyEpochRow, SignedManifestRow

__all__ = [  # what lives in trust_text, found here too
    "Trust",
    "check_store_policy",
    "founders_of",
    "read_pinned",
    "trust_from_pinned",
    "trust_from_stored",
]


def load_trust(settings: Settings) -> Trust:
    """The pinned manifest, every founder's signature checked, and the rotations pinned beside it,
    each link checked (custody.control.epochs.pinned_chain: one check per process for the same bytes).

    Raises StorageError (none pinned), VerificationFailed (unreadable, or not signed by every
    founder, or a rotation that does not follow: exit 3, nothing may act on it).
    """
    from custody.control.epochs import pinned_chain  # epochs imports this module

    first, *rotations = pinned_chain(settings)
    return Trust(first, tuple(rotations))


def pin_manifest(path: Path, m: SignedManifest) -> None:
    """Write the signed manifest to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, json.dumps(m.to_document(), indent=2) + "\n")


def manifest_in_store(db: Database) -> SignedManifest:
    """The founders-signed manifest the store carries, checked as every reader of the store checks
    it (:func:`trust_from_stored`): every founder signed it, it is the document of the row's recorded
    digest, and it is the store's policy. Raises StorageError, VerificationFailed."""
    db.check_schema()
    with db.transaction() as s:
        manifest, _, policy = store_text(s)
        return trust_from_stored(manifest, policy).manifest


def store_trust(s: Session) -> Trust:
    """The founders-signed manifest the store carries, checked: every founder signed it and it
    is the store's policy, with the rotations the store applied. What the online views count
    approvals against; every step that acts also compares it with the manifest pinned on this
    machine (:func:`check_pinned`).

    Raises StorageError (none: a store from before signed manifests), VerificationFailed.
    """
    return store_trust_from_text(*store_text(s))


def store_text(s: Session) -> tuple[StoredManifest, tuple[str, ...], StoredPolicy]:
    """What the store's trust is built from, as text: the signed manifest row's (digest,
    document), the policy epochs' documents in order, the stored policy."""
    row = s.get(SignedManifestRow, 1)
    epochs = s.exec(select(PolicyEpochRow.document).order_by(col(PolicyEpochRow.epoch))).all()
    return None if row is None else (row.digest, row.document), tuple(epochs), stored_policy(s)


def store_governance(s: Session) -> Governance | None:
    """The store's governance (:func:`store_trust`); None when the store carries no founders-signed
    manifest or its chain does not stand: then no roster or rulebook of the store can be believed."""
    return governance_from_text(*store_text(s))


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
