"""Creating the store with its policy, and reading the policy back."""

from __future__ import annotations

import json

from sqlmodel import Session, col, select

from custody.clock import now
from custody.control import audit_log
from custody.control.trust_text import StoredPolicy, policy_from_stored
from custody.errors import Conflict, InputError
from custody.policy.manifest import SignedManifest
from custody.policy.model import BRANCHES, Policy
from custody.store.db import Database
from custody.store.models import Counter, FounderRow, PolicyRow, SignedManifestRow

__all__ = ["StoredPolicy", "policy_from_stored"]  # parsed in custody.control.trust_text, found here too

COUNTER_NAMES = {0: "receive", 1: "change"}


def init_store(db: Database, signed: SignedManifest, actor: str = "operator") -> None:
    """Create the schema and store the policy of the founders-signed manifest ``signed`` (and the
    manifest itself, for other machines to pin); refuse when a policy exists already.

    Raises InputError (not signed by every founder, or not in canonical form), Conflict (a policy
    exists: nothing is overwritten), StorageError.
    """
    signed.check()
    policy = signed.policy
    if policy.to_manifest() != signed.body:
        raise InputError("the manifest is not in canonical form: draft it with `custody manifest draft`")
    db.ensure_schema()
    with db.transaction() as s:
        if s.get(PolicyRow, 1) is not None:
            raise Conflict(
                "this store has a policy already; a policy is never overwritten "
                "(use another --db or CUSTODY_HOME for a new one)"
            )
        s.add(
            PolicyRow(
                id=1,
                network=policy.network.name,
                threshold=policy.threshold,
                script_type=policy.script_type.value,
                created_at=now(),
            )
        )
        for position, founder in enumerate(policy.founders):
            s.add(FounderRow(position=position, name=founder.name, xpub=str(founder.key)))
        for chain in BRANCHES:
            if s.get(Counter, COUNTER_NAMES[chain]) is None:
                s.add(Counter(name=COUNTER_NAMES[chain], next_value=0))
        s.add(
            SignedManifestRow(id=1, digest=signed.digest, document=json.dumps(signed.to_document()), created_at=now())
        )
        audit_log.append(
            s,
            "policy.set",
            actor,
            policy.to_manifest()
            | {
                "descriptors": policy.descriptors(),
                "manifest_digest": signed.digest,
                "signed_by": sorted(signed.signatures),
            },
        )


def stored_policy(s: Session) -> StoredPolicy:
    """The stored policy's text, unparsed (None when there is none)."""
    row = s.get(PolicyRow, 1)
    if row is None:
        return None
    founders = s.exec(select(FounderRow).order_by(col(FounderRow.position))).all()
    return row.network, row.threshold, row.script_type, tuple((f.name, f.xpub) for f in founders)


def policy_from_session(s: Session) -> Policy:
    """The stored policy. Raises StorageError when there is none or it is unreadable."""
    return policy_from_stored(stored_policy(s))


def load_policy(db: Database) -> Policy:
    """Open the store and return its policy. Raises StorageError."""
    db.check_schema()
    with db.transaction() as s:
        return policy_from_session(s)
