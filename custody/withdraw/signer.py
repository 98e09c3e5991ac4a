"""The offline founder signer: no store, no node; only the PSBT, a key file and what is pinned
on its own machine (the founders-signed manifest, and beside it the newest roster it has seen).

It believes nothing the online machine wrote without checking it against those pins. Before it
adds a single signature it checks, from the PSBT and the pins alone, that:

* the pinned manifest is signed by every founder, the PSBT is for its policy and network, and
  the key is one of its founders';
* the PSBT's employee roster is signed by at least m founders of the pinned manifest it belongs
  to (after a key rotation: of its policy epoch, and no later than the roster the next rotation
  carried; custody.identity.governance), and is not older than the newest roster this machine
  has seen (nor a different roster with the same serial);
* the requester is an enabled, unsuspended roster employee with the request role whose signature
  covers exactly this transaction and the account: made with one of their roster keys, or a
  WebAuthn assertion of one of their roster security keys whose challenge is the request
  statement's digest, made at the credential's origin (as approvals made in the console);
* at least two distinct roster employees with the approve role, enabled, not suspended, none of
  them the requester, signed exactly this transaction, each with one of their roster keys;
* every input spends one of the policy's own scripts, re-derived here from the manifest, and the
  change output (if any) re-derives from the policy's change chain; after a key rotation (the
  rotation manifests pinned beside the first one, each approved by its predecessor's quorum) the
  policy is the newest pinned one, or an older one for a sweep, whose every output must then
  re-derive from the newest policy's change chain;
* the PSBT's chain of founders-signed rulebooks is signed, chained and not older than the newest
  this machine has seen; the transaction's locktime (its height: "now") is a height, and not
  below the highest height in this machine's journal; and the rulebook in force at that height
  allows it: the approvals its tier needs, the maximum, the destinations, the fee caps, and the
  velocity limits, counted from this machine's own journal of what it signed.

:func:`review` does all of that and returns what a founder should look at before signing
(destinations and amounts, the verified change, fee and fee rate, requester, approvers, the
statement's digest, the rulebook and tier); :func:`sign_reviewed` then remembers the roster,
suspensions and rulebook it saw, appends the transaction to the journal (``signer-journal.jsonl``,
fsynced) and only then adds the signatures (RFC 6979, low S; signing twice adds nothing).
"""

# size(module): the OFFLINE signer's whole trust boundary in one file that imports neither the store
#   nor the chain (a contract says so); helper bump changes it now (replacements), so it is split
#   after that lands
# size(review): the offline signer's checks, read top to bottom in one place at the trust boundary

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcoin.core import CTransaction, b2lx
from bitcoin.core.serialize import SerializationError

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.amounts import format_btc
from custody.bitcoin.destinations import address_of
from custody.bitcoin.script import ScriptType
from custody.bitcoin.txbuild import tx_vsize
from custody.clock import iso, now
from custody.errors import ApprovalError, Conflict, InputError, PolicyViolation, StorageError
from custody.faults import crash_point
from custody.files import locked_lines, read_bounded, write_atomic
from custody.identity.approvals import (
    Approval,
    ApprovalCheck,
    Member,
    RegistryEntry,
    TxSummary,
    check_approvals,
    check_batch,
    request_standing,
    summarize,
)
from custody.identity.founders_documents import FoundersDocument, rollback_problem
from custody.identity.governance import Governance, governance_of
from custody.identity.keyfile import FounderKey
from custody.identity.replacement_rules import judge_bump
from custody.identity.roster import (
    Roster,
    Suspension,
    in_force,
    parse_roster,
    parse_suspension,
)
from custody.identity.rulebook import LOCKTIME_THRESHOLD, Rulebook, parse_chain, parse_rulebook
from custody.identity.rulebook_chain import chain_rollback, check_chain, rulebook_at
from custody.identity.rulebook_judge import Counted, Need, Payout, Spend, Verdict, judge
from custody.policy.generator import AddressDeriver, DerivedAddress
from custody.policy.manifest import SignedManifest
from custody.policy.model import BRANCHES, CHANGE, Policy
from custody.policy.rotation import check_chain as check_manifest_chain
from custody.withdraw.replace_check import BUMP, SELF_TRANSFERS, check_bump, check_self_transfer, replaced_tx

# The PSBT's proprietary records (identifier "custody"), written by custody.withdraw.psbt_io:
PROPRIETARY_ID = b"custody"
PROP_META = 0  # JSON: network, withdrawal (or batch members), requester and their signature, change output, policy
PROP_APPROVALS = 1  # JSON: the approvals of the withdrawal
# 2 was the store's unsigned employee registry: never read any more
PROP_ROSTER = 3  # JSON: the founders-signed roster the approvals were made under
PROP_SUSPENSIONS = 4  # JSON: suspensions signed by roster employees
PROP_RULEBOOKS = 5  # JSON: every applied founders-signed rulebook, #1 first
STATE_NAME = "signer-state.json"
JOURNAL_NAME = "signer-journal.jsonl"
JOURNAL_FORMAT = "custody-signer-journal"
MAX_STATE_BYTES = 4 * 1024 * 1024
MAX_JOURNAL_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SignResult:
    withdrawal_id: int
    founder: str
    signatures_added: int
    approvals: tuple[str, ...]


# ---------------------------------------------------------------- what the signer machine remembers


@dataclass
class SignerState:
    """What this signer machine has seen, kept beside its pinned manifest: the newest roster
    (serial and digest) and every suspension, so that neither can be rolled back by a PSBT."""

    path: Path
    manifest: str
    serial: int = 0
    digest: str | None = None
    suspensions: dict[str, dict[str, Any]] = field(default_factory=dict)  # digest -> document
    rulebook_serial: int = 0
    rulebook_digest: str | None = None

    @property
    def journal(self) -> Path:
        return self.path.with_name(JOURNAL_NAME)

    @classmethod
    def load(cls, path: Path, manifest: SignedManifest) -> SignerState:
        """Raises StorageError when the state file is unreadable or for another manifest."""
        try:
            data = read_bounded(path, MAX_STATE_BYTES, "the signer's state")
        except FileNotFoundError:
            return cls(path, manifest.digest)
        except InputError as exc:
            raise StorageError(str(exc)) from None
        try:
            doc = json.loads(data)
            if doc.get("format") != "custody-signer-state" or doc.get("version") != 1:
                raise ValueError("not a custody signer state file")
            if doc["manifest"] != manifest.digest:
                raise ValueError("it belongs to another founders' manifest")
            roster = doc["roster"]
            serial = int(roster["serial"]) if roster else 0
            digest = str(roster["digest"]) if roster else None
            suspensions = {str(k): dict(v) for k, v in doc["suspensions"].items()}
            rulebook = doc.get("rulebook")  # absent in a state written before rulebooks
            book_serial = int(rulebook["serial"]) if rulebook else 0
            book_digest = str(rulebook["digest"]) if rulebook else None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StorageError(f"the signer's state {path} is unreadable: {exc}; restore it from a backup") from None
        return cls(path, manifest.digest, serial, digest, suspensions, book_serial, book_digest)

    def save(self) -> None:
        doc = {
            "format": "custody-signer-state",
            "version": 1,
            "manifest": self.manifest,
            "roster": {"serial": self.serial, "digest": self.digest} if self.digest else None,
            "suspensions": self.suspensions,
            "rulebook": {"serial": self.rulebook_serial, "digest": self.rulebook_digest}
            if self.rulebook_digest
            else None,
        }
        write_atomic(self.path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- the journal of what this machine signed


@dataclass(frozen=True)
class JournalEntry:
    """One transaction this signer machine signed (JSON Lines, one entry a line)."""

    txid: str
    withdrawal_id: int
    kind: str
    height: int  # the transaction's locktime
    fee: int
    rulebook: int  # the serial applied (0: the built-in rules)
    founder: str
    payouts: tuple[Payout, ...]

    def line(self, manifest: str) -> bytes:
        doc = {
            "format": JOURNAL_FORMAT,
            "version": 1,
            "manifest": manifest,
            "txid": self.txid,
            "withdrawal_id": self.withdrawal_id,
            "kind": self.kind,
            "height": self.height,
            "fee": self.fee,
            "rulebook": self.rulebook,
            "founder": self.founder,
            "payouts": [
                {
                    "withdrawal_id": p.withdrawal_id,
                    "account": p.account,
                    "fee": p.fee,
                    "payments": [{"script_pubkey": spk, "amount": a} for spk, a in p.payments],
                }
                for p in self.payouts
            ],
            "at": iso(now()),
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _journal_entry(doc: Any, manifest: str) -> JournalEntry:
    if doc.get("format") != JOURNAL_FORMAT or doc.get("version") != 1:
        raise ValueError("not a custody signer journal entry")
    if doc["manifest"] != manifest:
        raise ValueError("it belongs to another founders' manifest")
    payouts = tuple(
        Payout(
            int(p["withdrawal_id"]),
            str(p["account"]),
            tuple((str(x["script_pubkey"]), int(x["amount"])) for x in p["payments"]),
            int(p["fee"]),
        )
        for p in doc["payouts"]
    )
    return JournalEntry(
        str(doc["txid"]),
        int(doc["withdrawal_id"]),
        str(doc["kind"]),
        int(doc["height"]),
        int(doc["fee"]),
        int(doc["rulebook"]),
        str(doc["founder"]),
        payouts,
    )


@dataclass(frozen=True)
class Journal:
    """What this signer machine has signed, read back whole. Its velocity counts come from here,
    never from the online machine; its highest height is a floor for the next locktime."""

    entries: tuple[JournalEntry, ...]

    @classmethod
    def load(cls, path: Path, manifest: str) -> Journal:
        """Raises StorageError for a damaged line (a torn last line, a crash's, is skipped)."""
        try:
            data = read_bounded(path, MAX_JOURNAL_BYTES, "the signer's journal")
        except FileNotFoundError:
            return cls(())
        except InputError as exc:
            raise StorageError(str(exc)) from None
        return cls.parse(data, path, manifest)

    @classmethod
    def parse(cls, data: bytes, path: Path, manifest: str) -> Journal:
        """Raises StorageError for a damaged line or a journal too large to read."""
        if len(data) > MAX_JOURNAL_BYTES:
            raise StorageError(f"the signer's journal {path} is larger than {MAX_JOURNAL_BYTES} bytes")
        entries = []
        for n, raw in enumerate(data.split(b"\n")[:-1], 1):  # after the last newline: an append never completed
            try:
                entries.append(_journal_entry(json.loads(raw), manifest))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise StorageError(
                    f"the signer's journal {path} is damaged at line {n} ({exc}): restore it from a backup"
                ) from None
        return cls(tuple(entries))

    @property
    def height(self) -> int:
        """The highest height this machine has signed at (0: none)."""
        return max((e.height for e in self.entries), default=0)

    def find(self, txid: str) -> JournalEntry | None:
        """The entry of transaction ``txid`` (its unsigned txid), if this machine signed it."""
        return next((e for e in self.entries if e.txid == txid), None)

    def counted(self, txid: str) -> Iterator[Counted]:
        """Every payout signed here, once per transaction, but ``txid``'s own; a bump pays what
        the transaction it replaces paid, which counts already."""
        seen = {txid}
        for e in self.entries:
            if e.txid in seen or e.kind == BUMP:
                continue
            seen.add(e.txid)
            for p in e.payouts:
                yield Counted(e.height, p.account, p.amount)


def _record_in_journal(state: SignerState, r: Review) -> None:
    """Append ``r``'s transaction to the journal beside the state, fsynced, after checking again,
    under the journal's lock, what another signing on this machine may have changed since the
    review: the height floor and velocity. Raises PolicyViolation, StorageError."""
    assert r.entry is not None and r.spend is not None
    try:
        with locked_lines(state.journal, whole=True) as f:
            journal = Journal.parse(f.data, state.journal, state.manifest)
            _height(r.height, journal)
            verdict = _judged(r.book, r.effective, r.spend, r.withdrawal_id, r.replaced_fee, journal, r.entry.txid)
            _refuse(verdict, r.withdrawal_id)
            f.append(r.entry.line(state.manifest))
    except OSError as exc:
        raise StorageError(f"cannot write the signer's journal {state.journal}: {exc.strerror or exc}") from None


def state_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(STATE_NAME)


def _pinnable(
    doc: FoundersDocument,
    pinned: SignedManifest,
    rotations: Sequence[SignedManifest],
    seen_serial: int,
    seen_digest: str | None,
) -> None:
    """Raise ApprovalError unless m founders of its epoch's pinned manifest signed ``doc``
    (custody.identity.governance) and it is not older than, nor another than, the one of its kind
    this machine has seen. Raises InputError when the pinned chain does not stand."""
    pinned.check()
    problems = governance_of(check_manifest_chain([pinned, *rotations])).problems(doc)
    if problems:
        raise ApprovalError(f"{doc.KIND} #{doc.serial} is not the founders' {doc.KIND}: " + "; ".join(problems))
    rollback = rollback_problem(doc.KIND, doc.serial, {doc.serial: doc.digest}, seen_serial, seen_digest)
    if rollback:
        raise ApprovalError(rollback)


def pin_roster(
    doc: object, pinned: SignedManifest, state: SignerState, rotations: Sequence[SignedManifest] = ()
) -> Roster:
    """Remember a founders' roster on this signer machine without waiting for a PSBT to carry it
    (for example right after the founders signed one that disables an employee).

    Raises ApprovalError (not m founders of its epoch's pinned manifest, signed by founders rotated
    away from after the rotation, older than or forking the one seen), InputError, StorageError.
    """
    roster = parse_roster(doc)
    _pinnable(roster, pinned, rotations, state.serial, state.digest)
    state.serial, state.digest = roster.serial, roster.digest
    state.save()
    return roster


def pin_rulebook(
    doc: object, pinned: SignedManifest, state: SignerState, rotations: Sequence[SignedManifest] = ()
) -> Rulebook:
    """Remember a founders' rulebook on this signer machine now (for example one that tightens):
    from then on every PSBT must carry it, or a newer one. Raises as :func:`pin_roster`."""
    book = parse_rulebook(doc)
    _pinnable(book, pinned, rotations, state.rulebook_serial, state.rulebook_digest)
    state.rulebook_serial, state.rulebook_digest = book.serial, book.digest
    state.save()
    return book


# ---------------------------------------------------------------- reading the PSBT


def _prop_raw(p: psbt_lib.Psbt, subtype: int) -> bytes | None:
    return p.proprietary.get(psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b""))


def _prop_json(p: psbt_lib.Psbt, subtype: int, what: str, error: type[Exception] = InputError) -> Any:
    raw = _prop_raw(p, subtype)
    if raw is None:
        raise error(f"the PSBT carries no {what}: export it with `custody withdraw export`")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5000-digit number, nested too deep
        raise InputError(f"the PSBT's {what} is not valid JSON") from None


def _our_position(
    derivations: dict[bytes, psbt_lib.KeyOrigin], fingerprint: bytes, base: tuple[int, ...]
) -> tuple[int, int] | None:
    """(chain, index) of this founder's key (master ``fingerprint``, account path ``base``) among an
    input's or output's derivations."""
    for origin in derivations.values():
        if origin.fingerprint == fingerprint and origin.path[: len(base)] == base and len(origin.path) == len(base) + 2:
            chain, index = origin.path[-2:]
            if chain in BRANCHES:
                return chain, index
    return None


class _Derivations:
    """What one review derives, each once: the policy's script at (chain, index) and this founder's
    private key there (a 500-input spend asks for the same founder's account key 500 times).

    Made afresh by each review from that review's policy and founder key and dropped with it: a
    derivation made for one policy, network or founder never answers for another.
    """

    def __init__(self, founder: FounderKey, deriver: AddressDeriver) -> None:
        self.fingerprint = founder.master.fingerprint
        self.account_path = founder.account_path
        self._founder = founder
        self._deriver = deriver
        self._chains: dict[int, Any] = {}  # chain -> the founder's ExtendedPrivateKey at account/chain
        self._scripts: dict[tuple[int, int], DerivedAddress] = {}
        self._keys: dict[tuple[int, int], Any] = {}

    def position(self, derivations: dict[bytes, psbt_lib.KeyOrigin]) -> tuple[int, int] | None:
        return _our_position(derivations, self.fingerprint, self.account_path)

    def script(self, chain: int, index: int) -> DerivedAddress:
        where = (chain, index)
        if where not in self._scripts:
            self._scripts[where] = self._deriver.derive(chain, index)
        return self._scripts[where]

    def private_key(self, chain: int, index: int) -> Any:
        """This founder's ``coincurve.PrivateKey`` at account/chain/index (the path
        ``master.derive(account_path + (chain, index))`` takes, its first steps made once)."""
        where = (chain, index)
        if where not in self._keys:
            if chain not in self._chains:
                self._chains[chain] = self._founder.master.derive((*self.account_path, chain))
            self._keys[where] = self._chains[chain].child(index).private_key()
        return self._keys[where]


def _expect(derived: DerivedAddress, script_type: ScriptType, redeem: bytes | None, witness: bytes | None) -> bool:
    if script_type is ScriptType.P2SH:
        return redeem == derived.script and witness is None
    if script_type is ScriptType.P2WSH:
        return witness == derived.script and redeem is None
    return witness == derived.script and redeem == b"\x00\x20" + hashlib.sha256(derived.script).digest()


def _spent_output(p: psbt_lib.Psbt, n: int) -> psbt_lib.WitnessUtxo:
    """The amount and script input ``n`` spends, from its previous transaction (required for
    every input: a witness UTXO alone lets an online machine lie about amounts, the 2020 segwit
    fee attack), checked against the outpoint and against the witness UTXO when there is one.

    Raises InputError.
    """
    pin = p.inputs[n]
    prevout = p.tx.vin[n].prevout
    if pin.non_witness_utxo is None:
        raise InputError(f"input {n}: the PSBT carries no previous transaction for it (non_witness_utxo)")
    prev = pin.non_witness_utxo
    if b2lx(prev.GetTxid()) != b2lx(prevout.hash) or prevout.n >= len(prev.vout):
        raise InputError(f"input {n}: its previous transaction does not match the outpoint it spends")
    out = prev.vout[prevout.n]
    spent = psbt_lib.WitnessUtxo(int(out.nValue), bytes(out.scriptPubKey))
    if pin.witness_utxo is not None and pin.witness_utxo != spent:
        raise InputError(f"input {n}: its witness UTXO disagrees with the output of its previous transaction")
    return spent


def _roster(p: psbt_lib.Psbt, governance: Governance, state: SignerState) -> Roster:
    """The PSBT's roster, checked against the pinned manifests and this machine's state."""
    doc = _prop_json(p, PROP_ROSTER, "founders-signed employee roster", ApprovalError)
    roster = parse_roster(doc)
    problems = governance.problems(roster)
    if problems:
        raise ApprovalError(f"the PSBT's roster #{roster.serial} is not the founders' roster: " + "; ".join(problems))
    rollback = rollback_problem("roster", roster.serial, {roster.serial: roster.digest}, state.serial, state.digest)
    if rollback:
        raise ApprovalError(f"the PSBT's {rollback}")
    return roster


def _suspended(
    p: psbt_lib.Psbt, roster: Roster, state: SignerState, manifests: frozenset[str]
) -> tuple[dict[str, str], list[Suspension]]:
    docs = _prop_json(p, PROP_SUSPENSIONS, "suspension list") if _prop_raw(p, PROP_SUSPENSIONS) else []
    if not isinstance(docs, list):
        raise InputError("the PSBT's suspension list is malformed")
    seen = [parse_suspension(d) for d in docs] + [parse_suspension(d) for d in state.suspensions.values()]
    return in_force(seen, roster, manifests), seen


@dataclass(frozen=True)
class Review:
    """Everything the checks established, for a person to read before signing."""

    withdrawal_id: int
    withdrawal_kind: str  # single, batch, sweep, bump, cancel, cpfp, consol
    founder: str
    network: str
    requester: str
    account: str
    outputs: tuple[dict[str, Any], ...]  # address, amount_sat, change (verified)
    inputs: int
    input_total: int
    fee: int
    fee_rate: float  # sat/vB (2 decimals), estimated from the signed size
    approvals: tuple[str, ...]
    digest: str  # the approval statement's digest (of the batch, for a batch)
    roster_serial: int
    manifest: str  # fingerprint
    height: int  # the transaction's locktime: the height the rules were applied at
    journal_height: int  # the highest height this machine had signed at before
    rulebook_serial: int  # 0: the built-in rules (no founders-signed rulebook seen)
    needs: dict[int, Need]
    keys: dict[bytes, Any] = field(repr=False, compare=False, default_factory=dict)  # pubkey -> private key
    roster: Roster | None = field(repr=False, compare=False, default=None)
    suspensions: tuple[Suspension, ...] = field(repr=False, compare=False, default=())
    rulebooks: tuple[Rulebook, ...] = field(repr=False, compare=False, default=())
    book: Rulebook | None = field(repr=False, compare=False, default=None)  # in force at ``height``
    effective: dict[int, int] = field(repr=False, compare=False, default_factory=dict)
    spend: Spend | None = field(repr=False, compare=False, default=None)
    entry: JournalEntry | None = field(repr=False, compare=False, default=None)
    replaced_fee: int | None = None  # a bump: the fee of the transaction it replaces

    @property
    def short_digest(self) -> str:
        return "-".join(self.digest[i : i + 4] for i in range(0, 16, 4))

    def to_dict(self) -> dict[str, Any]:
        return {
            "withdrawal_id": self.withdrawal_id,
            "withdrawal_kind": self.withdrawal_kind,
            "founder": self.founder,
            "network": self.network,
            "requester": self.requester,
            "account": self.account,
            "outputs": list(self.outputs),
            "inputs": self.inputs,
            "input_total_sat": self.input_total,
            "fee_sat": self.fee,
            "fee_rate": self.fee_rate,
            "approvals": list(self.approvals),
            "digest": self.digest,
            "short_digest": self.short_digest,
            "roster_serial": self.roster_serial,
            "manifest": self.manifest,
            "height": self.height,
            "journal_height": self.journal_height,
            "rulebook_serial": self.rulebook_serial,
            "built_in_rules": self.rulebook_serial == 0,
            "tiers": {str(k): {"tier": n.tier, "approvals": n.approvals, "why": n.why} for k, n in self.needs.items()},
        }


def _registry(roster: Roster, suspended: dict[str, str], role: str) -> dict[str, RegistryEntry]:
    def refusal(name: str) -> str | None:
        e = roster.employee(name)
        if e is None:
            return "not in the founders' roster"
        if not e.enabled:
            return "disabled in the founders' roster"
        if name in suspended:
            return "suspended"
        return None if role in e.roles else f"has no {role} role in the founders' roster"

    return {e.name: RegistryEntry(e.name, e.keys, refusal(e.name), e.webauthn) for e in roster.employees}


def _check_request(summary: TxSummary, entry: dict[str, Any], requesters: dict[str, RegistryEntry], what: str) -> None:
    requester, signature, account = entry.get("requester"), entry.get("request_signature"), entry.get("account")
    if not isinstance(requester, str) or not isinstance(signature, str) or not isinstance(account, str):
        raise ApprovalError(f"{what}: the PSBT carries no signed request (requester, account, signature)")
    problem = request_standing(summary, account, requester, signature, requesters)
    if problem is not None:
        raise ApprovalError(f"{what}: {problem}")


@dataclass(frozen=True)
class _BatchMember:
    summary: TxSummary
    entry: dict[str, Any]
    change_output: int | None

    @property
    def payout(self) -> Payout:
        payments = tuple(o for n, o in enumerate(self.summary.outputs) if n != self.change_output)
        return Payout(self.summary.withdrawal_id, str(self.entry.get("account")), payments, self.summary.fee)


def _batch_members(policy: Policy, meta: dict[str, Any]) -> list[_BatchMember]:
    """A batch's members as the PSBT describes them (each checked by :func:`_batch_check`)."""
    members = []
    try:
        for m in meta["members"]:
            tx = CTransaction.deserialize(bytes.fromhex(m["unsigned_tx"]))
            wid = int(m["withdrawal_id"])
            member_summary = summarize(policy.network.name, wid, tx, [int(a) for a in m["amounts"]])
            change_output = m["change_output"]
            members.append(_BatchMember(member_summary, m, change_output if isinstance(change_output, int) else None))
    except (KeyError, TypeError, ValueError, OverflowError, SerializationError) as exc:
        # OverflowError: int(Infinity); SerializationError: a member's transaction does not decode
        raise InputError(f"the PSBT's batch members are malformed: {exc}") from None
    ids = [m.summary.withdrawal_id for m in members]
    if len(set(ids)) != len(ids):
        raise InputError("the PSBT's batch lists one withdrawal twice")
    return members


def _batch_check(
    parsed: Sequence[_BatchMember],
    summary: TxSummary,
    change: int | None,
    approvers: dict[str, RegistryEntry],
    requesters: dict[str, RegistryEntry],
    verdict: Verdict,
) -> ApprovalCheck:
    """A batch counts when every member is requested and approved (as many approvers as its tier
    needs) for its own transaction and the batch spends, pays and charges exactly what the
    members were approved for."""
    members = []
    try:
        for m in parsed:
            wid = m.summary.withdrawal_id
            _check_request(m.summary, m.entry, requesters, f"batch member #{wid}")
            approvals = [
                Approval(str(a["employee"]), str(a["pubkey"]), str(a["signature"])) for a in m.entry["approvals"]
            ]
            need = verdict.needs[wid]
            check = check_approvals(
                m.summary, approvals, approvers, str(m.entry["requester"]), need.approvals, need.tier
            )
            members.append(Member(m.summary, m.change_output, check))
    except (KeyError, TypeError) as exc:
        raise InputError(f"the PSBT's batch members are malformed: {exc}") from None
    problems = check_batch(summary, change, members)
    valid = tuple(sorted({name for m in members for name in m.check.valid}))
    return ApprovalCheck(valid if not problems else (), tuple(("batch", p) for p in problems))


def _rulebooks(p: psbt_lib.Psbt, founders: Governance, state: SignerState) -> list[Rulebook]:
    """The PSBT's rulebooks, checked: each signed by m founders of its epoch's pinned manifest and
    following the one before, and the chain not older than what this machine has seen."""
    raw = _prop_raw(p, PROP_RULEBOOKS)
    books = parse_chain(_prop_json(p, PROP_RULEBOOKS, "rulebook list")) if raw is not None else []
    check_chain(books, founders)
    rollback = chain_rollback(books, state.rulebook_serial, state.rulebook_digest)
    if rollback:
        raise ApprovalError(f"the PSBT's {rollback}")
    return books


def _height(height: int, journal: Journal) -> int:
    """The transaction's locktime, the height this signer takes as now: a height (not a time),
    never below the highest height this machine has signed at."""
    if height >= LOCKTIME_THRESHOLD:
        raise PolicyViolation(f"rule locktime: the transaction's locktime {height} is a time, not a block height")
    if height < journal.height:
        raise PolicyViolation(
            f"rule locktime: the transaction's locktime is height {height}, below height {journal.height} at which "
            "this signer has signed already: its idea of the height never goes backwards"
        )
    return height


def _refuse(verdict: Verdict, withdrawal_id: int) -> None:
    if verdict.violations:
        book = f"rulebook #{verdict.serial}" if verdict.serial else "the built-in rules"
        raise PolicyViolation(
            f"withdrawal #{withdrawal_id} is refused by {book} at height {verdict.height}: {verdict.explain()}"
        )


def _judged(
    book: Rulebook | None,
    effective: dict[int, int],
    spend: Spend,
    withdrawal_id: int,
    replaced_fee: int | None,
    journal: Journal,
    txid: str,
) -> Verdict:
    """The rulebook's verdict: on a bump, its ``bump`` rule (a replacement of a transaction
    that paid ``replaced_fee``); on anything else, every rule, velocity from the journal."""
    if replaced_fee is not None:
        return judge_bump(book, withdrawal_id, spend.height, spend.fee, spend.vsize, replaced_fee)
    return judge(book, effective, spend, journal.counted(txid))


def _kind_checks(
    kind: str, meta: dict[str, Any], p: psbt_lib.Psbt, change: set[int], input_total: int, journal: Journal
) -> int | None:
    """A bump's fee-only replacement check (returns the fee it replaces) or a self-transfer's
    every-output-is-ours check. Raises PolicyViolation, InputError (an unknown kind)."""
    if kind == BUMP:
        old = replaced_tx(meta)
        entry = journal.find(b2lx(old.GetTxid()))
        payments = [pay for payout in entry.payouts for pay in payout.payments] if entry else None
        return check_bump(p.tx, old, change, payments, entry.fee if entry else None, input_total)
    if kind in SELF_TRANSFERS:
        check_self_transfer(kind, p.tx, change)
    elif kind not in ("single", "batch", "sweep"):  # a sweep's outputs are checked by _moved_to
        raise InputError(f"the PSBT is of a kind this signer does not know: {kind[:20]!r}")
    return None


def _our_inputs(p: psbt_lib.Psbt, policy: Policy, derivations: _Derivations) -> tuple[list[int], dict[bytes, Any]]:
    """Each input's amount, and this founder's private key for each, once every input is shown
    to spend one of the policy's scripts (re-derived here). Raises InputError."""
    amounts: list[int] = []
    keys: dict[bytes, Any] = {}
    for n, pin in enumerate(p.inputs):
        where = derivations.position(pin.bip32_derivations)
        if where is None:
            raise InputError(f"input {n} is not one of our policy's scripts (no derivation for this founder)")
        derived = derivations.script(*where)
        spent = _spent_output(p, n)
        if spent.script_pubkey != derived.script_pubkey or not _expect(
            derived, policy.script_type, pin.redeem_script, pin.witness_script
        ):
            raise InputError(f"input {n} is not one of our policy's scripts at {where[0]}/{where[1]}")
        amounts.append(spent.amount)
        key = derivations.private_key(*where)
        keys[key.public_key.format(compressed=True)] = key
    return amounts, keys


def _verified_change(p: psbt_lib.Psbt, change: int | None, derivations: _Derivations) -> set[int]:
    """The outputs that re-derive from the policy's change chain; one claimed as change that does
    not is refused (InputError)."""
    verified_change: set[int] = set()
    for n, out in enumerate(p.outputs):
        claims = derivations.position(out.bip32_derivations) if out.bip32_derivations else None
        if n == change or claims is not None:
            if claims is None or claims[0] != CHANGE:
                raise InputError(f"output {n} is marked as change but does not derive from the policy's change chain")
            derived = derivations.script(*claims)
            if bytes(p.tx.vout[n].scriptPubKey) != derived.script_pubkey:
                raise InputError(f"output {n}: the change output is not ours (it does not re-derive from the policy)")
            verified_change.add(n)
    return verified_change


def _spent_policy(meta: dict[str, Any], pinned: SignedManifest, rotations: Sequence[SignedManifest]) -> Policy:
    """The pinned policy the PSBT spends from: normally the newest pinned here. After a key rotation
    (``rotations``: the rotation manifests pinned beside the first one, each approved by the
    quorum before it, re-checked here) an older policy's coins may only move to the newest policy
    (custody.control.epochs), never out: :func:`_moved_to` checks every output.

    Raises InputError (another network or policy, a pinned chain that does not stand).
    """
    chain = check_manifest_chain([pinned, *rotations])
    network = pinned.policy.network
    if meta.get("network") != network.name:
        raise InputError(f"the PSBT is for network {meta.get('network')!r}, the manifest says {network.name}")
    for m in reversed(chain):
        if meta.get("policy") == m.policy.to_manifest():
            return m.policy
    raise InputError("the PSBT is for another policy than the founders' manifests pinned here")


def _moved_to(p: psbt_lib.Psbt, newest: Policy) -> set[int]:
    """Every output, once each re-derives from the newest pinned policy's change chain (at the
    position its derivations claim); the coins of a policy the founders rotated away from move
    nowhere else. Raises InputError."""
    deriver = AddressDeriver(newest)
    for n, out in enumerate(p.outputs):
        paths = {tuple(origin.path[-2:]) for origin in out.bip32_derivations.values()}
        if len(paths) != 1 or len(next(iter(paths))) != 2:
            raise InputError(
                f"output {n}: the coins of a policy the founders rotated away from move only to the newest policy, "
                "and this output claims no position of it"
            )
        chain, index = next(iter(paths))
        if (
            chain != CHANGE
            or not 0 <= index < 2**31
            or bytes(p.tx.vout[n].scriptPubKey) != deriver.derive(chain, index).script_pubkey
        ):
            raise InputError(
                f"output {n} does not re-derive from the newest pinned policy's change chain: the coins of a policy "
                "the founders rotated away from move only to the newest policy"
            )
    return set(range(len(p.outputs)))


def review(
    p: psbt_lib.Psbt,
    founder: FounderKey,
    pinned: SignedManifest,
    state: SignerState,
    rotations: Sequence[SignedManifest] = (),
) -> Review:
    """Check everything (see the module's docstring) without signing; return what to show.

    Raises InputError (not our policy, a foreign input or change, malformed data),
    ApprovalError (roster, request or approvals missing or invalid), StorageError (state).
    """
    pinned.check()
    meta = _prop_json(p, PROP_META, "withdrawal metadata")
    if not isinstance(meta, dict):
        raise InputError("the PSBT's withdrawal metadata is malformed")
    policy = _spent_policy(meta, pinned, rotations)  # checks the pinned chain
    # Rosters and rulebooks: signed by the founders of their policy epoch (custody.identity.governance).
    founders = governance_of([pinned, *rotations])
    names = [f.name for f in policy.founders if f.key.xpub.identity() == founder.account.xpub.identity()]
    if not names or founder.network != policy.network:
        raise InputError("this key is not one of the policy's founders' keys")
    derivations = _Derivations(founder, AddressDeriver(policy))

    amounts, keys = _our_inputs(p, policy, derivations)
    change = meta.get("change_output")
    change = change if isinstance(change, int) and not isinstance(change, bool) else None
    newest = (rotations or [pinned])[-1].policy
    if policy.to_manifest() == newest.to_manifest():
        verified_change = _verified_change(p, change, derivations)
    else:  # an older policy's coins: a sweep, every output the newest policy's
        verified_change = _moved_to(p, newest)

    withdrawal_id = meta.get("withdrawal_id")
    if not isinstance(withdrawal_id, int) or isinstance(withdrawal_id, bool):
        raise InputError("the PSBT's withdrawal metadata is malformed")
    summary = summarize(policy.network.name, withdrawal_id, p.tx, amounts)

    roster = _roster(p, founders, state)
    suspended, suspensions = _suspended(p, roster, state, founders.manifests)
    approvers = _registry(roster, suspended, "approve")
    requesters = _registry(roster, suspended, "request")
    books = _rulebooks(p, founders, state)
    if books and books[-1].serial > state.rulebook_serial:
        # Remembered at once, even if this PSBT is refused below: it can only tighten what this
        # machine accepts from now on.
        state.rulebook_serial, state.rulebook_digest = books[-1].serial, books[-1].digest
        state.save()
    journal = Journal.load(state.journal, pinned.digest)
    height = _height(int(p.tx.nLockTime), journal)
    kind = str(meta.get("kind") or "single")
    replaced_fee = _kind_checks(kind, meta, p, verified_change, sum(amounts), journal)
    vsize = tx_vsize(
        policy.script_type, policy.threshold, policy.n, len(p.inputs), [bytes(o.scriptPubKey) for o in p.tx.vout]
    )
    batch = kind == "batch"
    members = _batch_members(policy, meta) if batch else []
    payouts = [m.payout for m in members] or [
        Payout(
            withdrawal_id,
            str(meta.get("account")),
            tuple(o for n, o in enumerate(summary.outputs) if n not in verified_change),
            summary.fee,
        )
    ]
    txid = b2lx(p.tx.GetTxid())
    book = rulebook_at(books, height)
    effective = {b.serial: b.effective_height for b in books}
    spend = Spend(height, tuple(payouts), summary.fee, vsize, batch)
    verdict = _judged(book, effective, spend, withdrawal_id, replaced_fee, journal, txid)
    if batch:
        check = _batch_check(members, summary, change, approvers, requesters, verdict)
    else:
        _check_request(summary, meta, requesters, f"withdrawal #{withdrawal_id}")
        try:
            approvals = [
                Approval(str(a["employee"]), str(a["pubkey"]), str(a["signature"]))
                for a in _prop_json(p, PROP_APPROVALS, "approval bundle")
            ]
        except (KeyError, TypeError):
            raise InputError("the PSBT's approval bundle is malformed") from None
        need = verdict.needs[withdrawal_id]
        check = check_approvals(summary, approvals, approvers, str(meta.get("requester")), need.approvals, need.tier)
    if not check.enough:
        raise ApprovalError(f"withdrawal #{withdrawal_id}: {check.explain()}")
    _refuse(verdict, withdrawal_id)

    outputs = tuple(
        {
            "n": n,
            "address": address_of(bytes(o.scriptPubKey), policy.network) or f"script {bytes(o.scriptPubKey).hex()}",
            "amount_sat": int(o.nValue),
            "amount": format_btc(int(o.nValue)),
            "change": n in verified_change,
        }
        for n, o in enumerate(p.tx.vout)
    )
    return Review(
        withdrawal_id=withdrawal_id,
        withdrawal_kind=kind,
        founder=names[0],
        network=policy.network.name,
        requester=str(meta.get("requester")),
        account=str(meta.get("account")),
        outputs=outputs,
        inputs=len(p.inputs),
        input_total=sum(amounts),
        fee=summary.fee,
        fee_rate=round(summary.fee / vsize, 2),
        approvals=check.valid,
        digest=summary.digest(),
        roster_serial=roster.serial,
        manifest=pinned.fingerprint,
        height=height,
        journal_height=journal.height,
        rulebook_serial=verdict.serial,
        needs={k: v for k, v in verdict.needs.items()},
        keys=keys,
        roster=roster,
        suspensions=tuple(suspensions),
        rulebooks=tuple(books),
        book=book,
        effective=effective,
        spend=spend,
        entry=JournalEntry(
            txid,
            withdrawal_id,
            kind,
            height,
            summary.fee,
            verdict.serial,
            names[0],
            tuple(payouts),
        ),
        replaced_fee=replaced_fee,
    )


def sign_reviewed(p: psbt_lib.Psbt, r: Review, state: SignerState) -> SignResult:
    """Remember the roster, suspensions and rulebook seen, journal the transaction, then add the
    founder's signatures.

    Raises Conflict (this founder has signed already: nothing added), StorageError (state, journal).
    """
    assert r.roster is not None and r.entry is not None
    if r.roster.serial > state.serial:
        state.serial, state.digest = r.roster.serial, r.roster.digest
    for s in r.suspensions:
        state.suspensions.setdefault(s.digest, s.to_dict())
    if r.rulebooks and r.rulebooks[-1].serial > state.rulebook_serial:
        state.rulebook_serial, state.rulebook_digest = r.rulebooks[-1].serial, r.rulebooks[-1].digest
    state.save()  # before signing: a crash after it leaves the newer roster remembered, never the older
    _record_in_journal(state, r)  # before signing too: nothing signed here goes uncounted
    crash_point("signer.journaled")
    added = psbt_lib.sign(p, r.keys)
    if added == 0:
        raise Conflict(f"{r.founder} has signed this PSBT already; a founder's signatures count once")
    return SignResult(r.withdrawal_id, r.founder, added, r.approvals)


def check_and_sign(
    p: psbt_lib.Psbt,
    founder: FounderKey,
    pinned: SignedManifest,
    state: SignerState,
    rotations: Sequence[SignedManifest] = (),
) -> SignResult:
    """:func:`review`, then :func:`sign_reviewed` (for scripts that have shown nothing)."""
    return sign_reviewed(p, review(p, founder, pinned, state, rotations), state)
