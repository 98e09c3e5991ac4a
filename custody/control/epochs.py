"""Policy epochs: the first policy and every rotation to a new quorum after it.

Epoch 0 is the store's first policy (its founders-signed manifest). Each later epoch is a
rotation manifest (custody.policy.rotation) approved by the quorum of the epoch before it.
Derivation indexes never restart: an epoch issues receive indexes from ``receive_from`` and
change indexes from ``change_from`` (the counters when it was applied) until the next epoch
begins, so an address's (chain, index) alone says which policy it belongs to and stays unique.

What a machine believes is the chain PINNED on it: the first manifest (``founders-manifest.json``)
and, beside it, the rotations it pinned (``founders-rotations.json``, docs/FORMATS.md), each link
checked against the one before. The store's epoch rows are re-checked the same way on every read
and must be that chain, digest for digest: a row an insider wrote by SQL with too few approvals,
or one the founders signed that was never pinned here, stops every step that reads the epochs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, func, select

from custody.clock import now
from custody.config import Settings
from custody.control import audit_log, halt, rulebook
from custody.control.roster import current_roster, read_pinned, store_trust, trust_from_pinned, trust_from_stored
from custody.control.wallet import StoredPolicy, policy_from_stored, stored_policy
from custody.errors import Conflict, InputError, StorageError, VerificationFailed
from custody.faults import crash_point
from custody.files import read_bounded, write_atomic
from custody.identity.governance import carried_of, carries
from custody.policy.generator import AddressDeriver, DerivedAddress
from custody.policy.manifest import MAX_MANIFEST_BYTES, SignedManifest, load_signed_manifest, parse_signed_manifest
from custody.policy.model import RECEIVE, Policy
from custody.policy.rotation import approvers, check_links, check_rotation, previous_of
from custody.store.db import Database
from custody.store.models import AddressRow, AuditEntry, Counter, PolicyEpochRow, SignedManifestRow, WithdrawalRow

ROTATIONS_NAME = "founders-rotations.json"
ROTATIONS_FORMAT = "custody-founders-rotations"
MAX_ROTATIONS_BYTES = 64 * MAX_MANIFEST_BYTES
ROTATED = "policy.rotated"
_OPEN_WITHDRAWALS = ("requested", "approved", "signed")


@dataclass(frozen=True)
class Epoch:
    """One policy and the derivation indexes it issues from."""

    number: int
    manifest: SignedManifest
    receive_from: int
    change_from: int

    @property
    def policy(self) -> Policy:
        return self.manifest.policy

    def starts(self, chain: int) -> int:
        return self.receive_from if chain == RECEIVE else self.change_from

    def to_dict(self) -> dict[str, Any]:
        p = self.policy
        return {
            "epoch": self.number,
            "manifest_digest": self.manifest.digest,
            "fingerprint": self.manifest.fingerprint,
            "previous": previous_of(self.manifest),
            "threshold": p.threshold,
            "n": p.n,
            "script_type": p.script_type.value,
            "founders": [f.name for f in p.founders],
            "receive_from": self.receive_from,
            "change_from": self.change_from,
            "descriptors": p.descriptors(),
        }


def epoch_of(epochs: Sequence[Epoch], chain: int, index: int) -> Epoch:
    """The epoch whose policy derives ``chain``/``index``: the newest that had begun by then."""
    found = epochs[0]
    for e in epochs[1:]:
        if index >= e.starts(chain):
            found = e
    return found


class Derivers:
    """Derive any issued (chain, index) with the policy of its epoch."""

    def __init__(self, epochs: Sequence[Epoch]) -> None:
        self.epochs = list(epochs)
        self._derivers = {e.number: AddressDeriver(e.policy) for e in self.epochs}

    def derive(self, chain: int, index: int) -> DerivedAddress:
        return self._derivers[epoch_of(self.epochs, chain, index).number].derive(chain, index)

    def policy(self, chain: int, index: int) -> Policy:
        return epoch_of(self.epochs, chain, index).policy


# ---------------------------------------------------------------- what this machine pinned


def rotations_path(settings: Settings) -> Path:
    return settings.manifest.with_name(ROTATIONS_NAME)


def read_rotations(path: Path) -> list[SignedManifest]:
    """The rotation manifests pinned in ``path`` (none when it does not exist), unchecked: see
    :func:`pinned_chain`. Raises VerificationFailed for an unreadable file."""
    return _parse_rotations(path, _rotation_bytes(path))


def _rotation_bytes(path: Path) -> bytes | None:
    try:
        return read_bounded(path, MAX_ROTATIONS_BYTES, "the pinned rotations")
    except FileNotFoundError:
        return None


def _parse_rotations(path: Path, data: bytes | None) -> list[SignedManifest]:
    if data is None:
        return []
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != ROTATIONS_FORMAT or doc.get("version") != 1:
            raise InputError(f"not a {ROTATIONS_FORMAT} version 1 document")
        if not isinstance(doc.get("manifests"), list):
            raise InputError("its manifests are not a list")
        return [parse_signed_manifest(m) for m in doc["manifests"]]
    except (ValueError, RecursionError, InputError) as exc:
        raise VerificationFailed(f"the pinned rotations {path} cannot be read: {exc}") from None


# What was checked, keyed by every byte it was checked from (the pinned files, the store's rows):
# a changed byte is a new key, judged anew; a failure is never kept. Bounded: a few entries.
_CACHE_SIZE = 8
_pinned_checked: dict[tuple[str, bytes, str, bytes | None], tuple[SignedManifest, ...]] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value


def pinned_chain(settings: Settings) -> list[SignedManifest]:
    """The first manifest pinned here and every rotation pinned beside it, each link checked.

    Both files are read on every call; what they say is checked once per process for the same
    bytes (the signatures are most of a single-address issuance's own work).

    Raises StorageError (nothing pinned), VerificationFailed (a link does not stand: exit 3).
    """
    path, rotations = settings.manifest, rotations_path(settings)
    first_bytes = read_pinned(path)
    rotation_bytes = _rotation_bytes(rotations)
    key = (str(path), first_bytes, str(rotations), rotation_bytes)
    chain = _pinned_checked.get(key)
    if chain is None:
        first = trust_from_pinned(path, first_bytes).manifest  # every founder's signature checked
        try:
            chain = tuple(check_links([first, *_parse_rotations(rotations, rotation_bytes)]))
        except InputError as exc:
            raise VerificationFailed(f"the founders' manifests pinned on this machine do not stand: {exc}") from None
        _remember(_pinned_checked, key, chain)
    return list(chain)


def pin_rotation(settings: Settings, m: SignedManifest) -> list[SignedManifest]:
    """Pin rotation ``m`` on this machine after the newest pinned manifest; return the new chain.
    Pinning the newest again changes nothing.

    Raises InputError (``m`` does not follow the newest pinned manifest, or lacks signatures or
    approvals), VerificationFailed, StorageError.
    """
    chain = pinned_chain(settings)
    if m.digest == chain[-1].digest:
        return chain
    check_rotation(m, chain[-1])
    chain.append(m)
    doc = {"format": ROTATIONS_FORMAT, "version": 1, "manifests": [c.to_document() for c in chain[1:]]}
    write_atomic(rotations_path(settings), json.dumps(doc, indent=2) + "\n")
    return chain


# ---------------------------------------------------------------- what the store holds


_RawEpoch = tuple[int, str, str, str, int, int]  # a policy_epoch row as read
_StoreText = tuple[StoredPolicy, tuple[str, str] | None, tuple[_RawEpoch, ...], tuple[str, ...]]
_epochs_checked: dict[_StoreText, tuple[Epoch, ...]] = {}


def _logged(payloads: Iterable[str]) -> dict[int, dict[str, Any]]:
    """The rotations the audit log recorded (their payloads in log order), by epoch number."""
    out: dict[int, dict[str, Any]] = {}
    for text in payloads:
        try:
            payload = json.loads(text)
            out[int(payload["epoch"])] = payload
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable entry vouches for nothing
    return out


def _first_epoch(policy: StoredPolicy, manifest: tuple[str, str] | None, any_rotation: bool) -> Epoch:
    if any_rotation:
        return Epoch(0, trust_from_stored(manifest, policy).manifest, 0, 0)
    # A store without rotations needs no signed manifest row to issue (stores from before them).
    parsed = policy_from_stored(policy)
    return Epoch(0, SignedManifest(parsed.to_manifest(), {}, parsed), 0, 0)


def _row_epoch(row: _RawEpoch, before: Epoch, logged: dict[str, Any] | None) -> Epoch:
    number, digest, previous, document, receive_from, change_from = row
    try:
        m = load_signed_manifest(document.encode())
        check_rotation(m, before.manifest)
    except InputError as exc:
        raise VerificationFailed(f"the store's policy epoch {number} does not stand: {exc}") from None
    epoch = Epoch(number, m, receive_from, change_from)
    facts = (epoch.number, m.digest, previous_of(m), epoch.receive_from, epoch.change_from)
    if (
        number != before.number + 1
        or m.digest != digest
        or previous != before.manifest.digest
        or receive_from < before.receive_from
        or change_from < before.change_from
    ):
        raise VerificationFailed(
            f"the store's policy epoch {number} disagrees with its manifest or with epoch {before.number}"
        )
    if logged is None or facts != tuple(
        logged.get(k) for k in ("epoch", "manifest_digest", "previous", "receive_from", "change_from")
    ):
        raise VerificationFailed(
            f"the store's policy epoch {number} is not the rotation the audit log recorded: "
            "it was written or changed outside custody"
        )
    return epoch


def _read_store(s: Session) -> _StoreText:
    """Everything :func:`store_epochs` judges, as text, read in this transaction."""
    rows = s.exec(select(PolicyEpochRow).order_by(col(PolicyEpochRow.epoch))).all()
    raw = tuple((r.epoch, r.digest, r.previous, r.document, r.receive_from, r.change_from) for r in rows)
    if not raw:
        return stored_policy(s), None, (), ()
    signed = s.get(SignedManifestRow, 1)
    logged = s.exec(select(AuditEntry.payload).where(AuditEntry.event == ROTATED).order_by(col(AuditEntry.seq))).all()
    return stored_policy(s), None if signed is None else (signed.digest, signed.document), raw, tuple(logged)


def _judge(text: _StoreText) -> tuple[Epoch, ...]:
    policy, manifest, rows, payloads = text
    epochs = [_first_epoch(policy, manifest, bool(rows))]
    logged = _logged(payloads)
    for row in rows:
        epochs.append(_row_epoch(row, epochs[-1], logged.get(row[0])))
    if len(logged) > len(rows):
        raise VerificationFailed("the audit log records a rotation the store no longer has: its row was deleted")
    return tuple(epochs)


def store_epochs(s: Session) -> list[Epoch]:
    """Every epoch of the store, each rotation re-checked against the one before it and against
    its audit log entry.

    The rows are read on every call; they are judged once per process for the same text
    (every column of the policy, the signed manifest, every epoch row and every rotation entry
    of the log is the key: a row written or edited by SQL is judged anew).

    Raises StorageError (no policy), VerificationFailed (a row that does not stand: written by
    SQL, too few approvals, out of order, not what the log recorded).
    """
    text = _read_store(s)
    epochs = _epochs_checked.get(text)
    if epochs is None:
        epochs = _judge(text)
        _remember(_epochs_checked, text, epochs)
    return list(epochs)


def check_epochs_pinned(epochs: Sequence[Epoch], chain: Sequence[SignedManifest]) -> None:
    """Raise VerificationFailed unless the store's epochs are exactly the chain pinned here."""
    mine = [e.manifest.digest for e in epochs]
    pinned = [m.digest for m in chain]
    if mine != pinned:
        raise VerificationFailed(
            f"the store's policies ({len(mine)}: newest {epochs[-1].manifest.fingerprint}) are not the founders' "
            f"manifests pinned on this machine ({len(pinned)}: newest {chain[-1].fingerprint}): "
            "pin the rotation here (`custody rotate pin`), or the store was tampered with"
        )


def pinned_epochs(s: Session, settings: Settings) -> list[Epoch]:
    """The store's epochs, required to be this machine's pinned chain."""
    epochs = store_epochs(s)
    check_epochs_pinned(epochs, pinned_chain(settings))
    return epochs


def current_policy(s: Session) -> Policy:
    """The newest policy: the one new addresses come from."""
    return store_epochs(s)[-1].policy


def newest_only(s: Session, rows: Iterable[AddressRow]) -> list[AddressRow]:
    """The address rows of the newest policy (all of them before any rotation)."""
    newest = store_epochs(s)[-1]
    return [a for a in rows if a.idx >= newest.starts(a.chain)]


def load_epochs(db: Database) -> list[Epoch]:
    db.check_schema()
    with db.transaction() as s:
        return store_epochs(s)


def _counter(s: Session, name: str) -> int:
    row = s.get(Counter, name)
    if row is None:
        raise StorageError(f"the store has no {name} counter: run `custody init`")
    return int(row.next_value)


def carried_now(s: Session) -> dict[str, Any]:
    """What a rotation drafted now carries over (custody.identity.governance): the store's roster
    and newest rulebook, which stay in force until the new founders sign the next ones."""
    trust = store_trust(s)
    return carries(current_roster(s, trust), rulebook.chain(s, trust).newest)


def draft_carries(db: Database) -> dict[str, Any]:
    db.check_schema()
    with db.transaction() as s:
        return carried_now(s)


def _check_carries(s: Session, m: SignedManifest) -> dict[str, Any]:
    """Raise Conflict unless ``m`` carries exactly the store's roster and rulebook in force."""
    now_carried = carried_now(s)
    said, store = carried_of(m.body), carried_of({"carries": now_carried})
    if said != store:

        def serials(c: dict[str, Any]) -> str:
            return ", ".join(f"{k} #{v.serial if v else 'none'}" for k, v in c.items())

        raise Conflict(
            f"the rotation {m.fingerprint} carries {serials(said)}, not the store's in force ({serials(store)}): "
            "one was applied since it was drafted (or it was drafted elsewhere); draft the rotation again"
        )
    return now_carried


def apply_rotation(db: Database, settings: Settings, m: SignedManifest, actor: str = "operator") -> Epoch:
    """Make rotation ``m`` the store's newest policy: pinned on this machine, then recorded with
    its audit entry in one transaction. From then on new addresses come from it.

    Raises HaltedError, InputError (``m`` does not follow the newest policy or lacks signatures
    or approvals), Conflict (already applied; a withdrawal between request and broadcast, whose
    change would belong to the old policy), VerificationFailed, StorageError.
    """
    db.check_schema()
    with db.transaction() as s:
        halt.guard(s)
        newest = store_epochs(s)[-1]
        if m.digest == newest.manifest.digest:
            raise Conflict(f"the rotation {m.fingerprint} is applied already (epoch {newest.number})")
        check_rotation(m, newest.manifest)
        _check_carries(s, m)
    chain = pin_rotation(settings, m)
    crash_point("rotate.pinned")
    with db.transaction() as s:
        halt.guard(s)
        epochs = store_epochs(s)
        check_epochs_pinned([*epochs, Epoch(epochs[-1].number + 1, m, 0, 0)], chain)
        open_count = s.exec(
            select(func.count()).select_from(WithdrawalRow).where(col(WithdrawalRow.status).in_(_OPEN_WITHDRAWALS))
        ).one()
        if open_count:
            raise Conflict(
                f"{open_count} withdrawal(s) are between request and broadcast: broadcast or cancel them, then rotate"
            )
        carried = _check_carries(s, m)
        s.exec(select(Counter).with_for_update()).all()  # no address is issued while the epoch begins
        epoch = Epoch(epochs[-1].number + 1, m, _counter(s, "receive"), _counter(s, "change"))
        s.add(
            PolicyEpochRow(
                epoch=epoch.number,
                digest=m.digest,
                previous=epochs[-1].manifest.digest,
                document=json.dumps(m.to_document()),
                receive_from=epoch.receive_from,
                change_from=epoch.change_from,
                applied_at=now(),
            )
        )
        audit_log.append(
            s,
            ROTATED,
            actor,
            epoch.to_dict()
            | {"approved_by": approvers(m, epochs[-1].manifest), "signed_by": sorted(m.signatures), "carries": carried},
        )
    crash_point("rotate.committed")
    return epoch
