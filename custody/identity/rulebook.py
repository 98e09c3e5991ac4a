"""The founders-signed rulebook: what a withdrawal may be, checked by the store and again by
every offline signer.

A rulebook is a founders-signed document like the roster (custody.identity.founders_documents:
serial, previous, bound to the manifest, m founders' signed messages of
``custody rulebook <network> #<serial> sha256:<digest>``). Its rules, all amounts in integer
satoshis and all times in blocks:

* ``tiers``: by amount, how many distinct approvers (never the requester) a withdrawal needs;
  ascending ``up_to_sat``, the last without a bound; never fewer than two;
* ``max_withdrawal_sat``: the most one withdrawal may pay (null: no maximum);
* ``velocity``: rolling windows of ``window_blocks`` in which withdrawals together (``global``)
  or one account's (``account``) may pay at most ``max_sat``;
* ``destinations``: an allowlist of scriptPubKeys (for one account, or any), each usable from
  the ``effective_height`` of the rulebook that added it plus ``cooling_off_blocks``; a
  destination outside it is refused, allowed, or needs the approvals of a named tier;
* ``fees``: the most fee in satoshis, in sat/vB, as a share of the amount (basis points), and
  for a batch's transaction;
* ``self_transfer``: the approvals a transaction paying only custody needs (a cancel, a
  child-pays-for-parent, a consolidation: every output re-derives from the policy);
* ``bump`` (optional): the approvals a fee-only replacement (RBF) of a signed withdrawal needs,
  and the most fee and fee rate it may pay; absent, two approvals and the ``fees`` caps;
* ``loosening_delay_blocks``: how long the NEXT rulebook waits when it loosens anything.

Heights: ``proposed_height`` (the chain's tip when it was proposed) and ``effective_height``
(from which block it applies). A rulebook that only tightens may apply at once; one that
loosens anything applies only from ``proposed_height`` plus the previous rulebook's
``loosening_delay_blocks``. The rulebook in force at a height is the newest whose
``effective_height`` is at most that height; before any, :data:`DEFAULT_RULES` apply.

:mod:`custody.identity.rulebook_chain`: the chain of rulebooks and what loosens one.
:mod:`custody.identity.rulebook_judge`: its :func:`judge` applies a rulebook to one transaction;
the store and the offline signer call it
with their own history (the store's withdrawals; the signer's journal) and their own idea of
the height (the tip; the transaction's locktime).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, ClassVar

from custody.bitcoin.amounts import MAX_MONEY, parse_fee_rate
from custody.bitcoin.destinations import parse_destination
from custody.bitcoin.network import get_network
from custody.errors import InputError
from custody.identity.approvals import REQUIRED_APPROVALS
from custody.identity.founders_documents import (
    HEADER_FIELDS,
    FoundersDocument,
    check_canonical,
    load_json,
    parse_header,
    parse_signatures,
    sign_document,
)

FORMAT = "custody-rulebook"
FORMAT_VERSION = 1
MAX_RULEBOOK_BYTES = 1024 * 1024
MAX_CHAIN_BYTES = 8 * 1024 * 1024
MIN_APPROVALS = REQUIRED_APPROVALS
MAX_APPROVALS = 20
MAX_TIERS = 16
MAX_VELOCITY = 32
MAX_ALLOWLIST = 4000
MAX_BLOCKS = 10_000_000
LOCKTIME_THRESHOLD = 500_000_000
"""nLockTime values from here on are timestamps, not heights (BIP-113's threshold)."""
SCOPES = ("global", "account")
OUTSIDE = ("refuse", "allow")  # or "tier:<name>"
RULE_FIELDS = frozenset(
    {
        "tiers",
        "max_withdrawal_sat",
        "velocity",
        "destinations",
        "cooling_off_blocks",
        "fees",
        "self_transfer",
        "bump",
        "loosening_delay_blocks",
    }
)
OPTIONAL_FIELDS = frozenset({"bump"})
"""Sections a rulebook may leave out (one signed before they existed): their defaults apply."""
BODY_FIELDS = HEADER_FIELDS | RULE_FIELDS | {"proposed_height", "effective_height"}

_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
_LABEL_RE = re.compile(r"^[ -~]{0,64}$")  # printable ASCII: shown to founders on their terminals
_ACCOUNT_RE = re.compile(r"^[!-~]{1,128}$")
_SCRIPT_RE = re.compile(r"^(?:[0-9a-f]{2}){1,100}$")


# ---------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class Tier:
    name: str
    up_to_sat: int | None  # None: no upper bound (the last tier)
    approvals: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "up_to_sat": self.up_to_sat, "approvals": self.approvals}


@dataclass(frozen=True)
class Velocity:
    name: str
    scope: str  # global | account
    window_blocks: int
    max_sat: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope, "window_blocks": self.window_blocks, "max_sat": self.max_sat}

    def at_least_as_tight_as(self, other: Velocity) -> bool:
        """Every withdrawal this rule lets through, ``other`` lets through too."""
        scope_ok = self.scope == other.scope or self.scope == "global"
        return scope_ok and self.window_blocks >= other.window_blocks and self.max_sat <= other.max_sat


@dataclass(frozen=True)
class Destination:
    script_pubkey: str  # hex
    account: str | None  # None: any account may pay it
    label: str
    added_serial: int  # the rulebook that added it: its cooling-off counts from that one's effective height

    @property
    def key(self) -> tuple[str, str]:
        return self.script_pubkey, self.account or ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "script_pubkey": self.script_pubkey,
            "account": self.account,
            "label": self.label,
            "added_serial": self.added_serial,
        }


@dataclass(frozen=True)
class Fees:
    max_fee_sat: int
    max_fee_rate: Decimal  # sat/vB
    max_fee_share_bp: int  # basis points of the amount paid
    max_batch_fee_sat: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_fee_sat": self.max_fee_sat,
            "max_fee_rate": rate_text(self.max_fee_rate),
            "max_fee_share_bp": self.max_fee_share_bp,
            "max_batch_fee_sat": self.max_batch_fee_sat,
        }


@dataclass(frozen=True)
class BumpRule:
    """Who approves a fee-only replacement, and up to what fee (``bump``)."""

    approvals: int
    max_fee_sat: int
    max_fee_rate: Decimal  # sat/vB

    def to_dict(self) -> dict[str, Any]:
        return {
            "approvals": self.approvals,
            "max_fee_sat": self.max_fee_sat,
            "max_fee_rate": rate_text(self.max_fee_rate),
        }


def rate_text(rate: Decimal) -> str:
    return format(rate.normalize(), "f")


@dataclass(frozen=True)
class Rules:
    """What a rulebook says (everything but its header and heights)."""

    tiers: tuple[Tier, ...]
    max_withdrawal_sat: int | None
    velocity: tuple[Velocity, ...]
    allowlist: tuple[Destination, ...]
    outside: str  # refuse | allow | tier:<name>
    cooling_off_blocks: int
    fees: Fees
    self_transfer_approvals: int
    loosening_delay_blocks: int
    bump: BumpRule | None = None  # None: the section is absent (see bump_rule)

    def bump_rule(self) -> BumpRule:
        """The bump rule in force: the section, or two approvals and the ``fees`` caps."""
        if self.bump is not None:
            return self.bump
        return BumpRule(MIN_APPROVALS, self.fees.max_fee_sat, self.fees.max_fee_rate)

    def to_dict(self) -> dict[str, Any]:
        return self._sections() | ({"bump": self.bump.to_dict()} if self.bump is not None else {})

    def _sections(self) -> dict[str, Any]:
        return {
            "tiers": [t.to_dict() for t in self.tiers],
            "max_withdrawal_sat": self.max_withdrawal_sat,
            "velocity": [v.to_dict() for v in sorted(self.velocity, key=lambda v: v.name)],
            "destinations": {
                "allowlist": [d.to_dict() for d in sorted(self.allowlist, key=lambda d: (d.key, d.added_serial))],
                "outside": self.outside,
            },
            "cooling_off_blocks": self.cooling_off_blocks,
            "fees": self.fees.to_dict(),
            "self_transfer": {"approvals": self.self_transfer_approvals},
            "loosening_delay_blocks": self.loosening_delay_blocks,
        }

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def tier_for(self, amount: int) -> Tier:
        return next(t for t in self.tiers if t.up_to_sat is None or amount <= t.up_to_sat)

    def outside_approvals(self) -> int | None:
        """The approvals a destination outside the allowlist needs (None: refused or allowed as is)."""
        if self.outside.startswith("tier:"):
            t = self.tier(self.outside[5:])
            return t.approvals if t else None
        return None


DEFAULT_RULES = Rules(
    tiers=(Tier("standard", None, MIN_APPROVALS),),
    max_withdrawal_sat=None,
    velocity=(),
    allowlist=(),
    outside="allow",
    cooling_off_blocks=0,
    fees=Fees(max_fee_sat=1_000_000, max_fee_rate=Decimal(500), max_fee_share_bp=1000, max_batch_fee_sat=1_000_000),
    self_transfer_approvals=MIN_APPROVALS,
    loosening_delay_blocks=0,
)
"""What applies before the founders sign a rulebook: two approvals, any destination, the fee
caps that were CUSTODY_MAX_FEE's and CUSTODY_MAX_FEE_RATE's defaults, a fee of at most 10% of
the amount, no velocity limit."""


@dataclass(frozen=True)
class Rulebook(FoundersDocument):
    """A rulebook body (what founders sign) with its signatures."""

    KIND: ClassVar[str] = "rulebook"
    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = FORMAT_VERSION
    network: str
    manifest: str
    serial: int
    previous: str | None
    proposed_height: int
    effective_height: int
    rules: Rules
    signatures: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return (
            self.header()
            | {
                "proposed_height": self.proposed_height,
                "effective_height": self.effective_height,
            }
            | self.rules.to_dict()
        )


# ---------------------------------------------------------------- reading


def _whole(value: object, what: str, low: int = 0, high: int = MAX_MONEY) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{what} is a whole number from {low} to {high}")
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InputError(f"{what}: a name is 1 to 32 lower-case ASCII letters, digits, '.', '_' or '-'")
    return value


def _fields(entry: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or set(entry) != keys:
        raise InputError(f"{what} is {{{', '.join(sorted(keys))}}}")
    return entry


def _tiers(raw: object) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TIERS:
        raise InputError(f"tiers are a list of 1 to {MAX_TIERS} tiers")
    tiers = []
    for i, entry in enumerate(raw):
        e = _fields(entry, {"name", "up_to_sat", "approvals"}, f"tier {i + 1}")
        name = _name(e["name"], f"tier {i + 1}")
        up_to = None if e["up_to_sat"] is None else _whole(e["up_to_sat"], f"tier {name}'s up_to_sat", 1)
        approvals = _whole(e["approvals"], f"tier {name}'s approvals", MIN_APPROVALS, MAX_APPROVALS)
        tiers.append(Tier(name, up_to, approvals))
    if len({t.name for t in tiers}) != len(tiers):
        raise InputError("two tiers have one name")
    finite = [t.up_to_sat for t in tiers if t.up_to_sat is not None]
    if tiers[-1].up_to_sat is not None or len(finite) != len(tiers) - 1:
        raise InputError("only the last tier has no upper bound (up_to_sat null), and it must have none")
    if any(a >= b for a, b in zip(finite, finite[1:], strict=False)):
        raise InputError("tiers are in ascending order of up_to_sat")
    return tuple(tiers)


def _velocity(raw: object) -> tuple[Velocity, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_VELOCITY:
        raise InputError(f"velocity is a list of at most {MAX_VELOCITY} limits")
    out = []
    for i, entry in enumerate(raw):
        e = _fields(entry, {"name", "scope", "window_blocks", "max_sat"}, f"velocity limit {i + 1}")
        name = _name(e["name"], f"velocity limit {i + 1}")
        if e["scope"] not in SCOPES:
            raise InputError(f"velocity limit {name}: scope is global or account")
        window = _whole(e["window_blocks"], f"velocity limit {name}'s window_blocks", 1, MAX_BLOCKS)
        out.append(Velocity(name, e["scope"], window, _whole(e["max_sat"], f"velocity limit {name}'s max_sat")))
    if len({v.name for v in out}) != len(out):
        raise InputError("two velocity limits have one name")
    return tuple(out)


def _account(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ACCOUNT_RE.fullmatch(value):
        raise InputError(f"{what}: an account is 1 to 128 printable ASCII characters without spaces, or null")
    return value


def _destination(entry: object, i: int, serial: int, network: str | None) -> Destination:
    """One allowlist entry. With ``network`` (a proposal being written), ``address`` may stand for
    ``script_pubkey`` and ``added_serial`` may be left out (the caller fills it in)."""
    what = f"allowlist entry {i + 1}"
    if not isinstance(entry, dict):
        raise InputError(f"{what} is an object")
    e = dict(entry)
    if network is not None:
        address = e.pop("address", None)
        if address is not None:
            spk = parse_destination(str(address), get_network(network)).script_pubkey.hex()
            if e.setdefault("script_pubkey", spk) != spk:
                raise InputError(f"{what}: the address and the script_pubkey given are not the same destination")
        e.setdefault("added_serial", 0)
        e.setdefault("label", "")
        e.setdefault("account", None)
    e = _fields(e, {"script_pubkey", "account", "label", "added_serial"}, what)
    if not isinstance(e["script_pubkey"], str) or not _SCRIPT_RE.fullmatch(e["script_pubkey"]):
        raise InputError(f"{what}: script_pubkey is the destination's scriptPubKey in lower-case hex")
    if not isinstance(e["label"], str) or not _LABEL_RE.fullmatch(e["label"]):
        raise InputError(f"{what}: a label is at most 64 printable ASCII characters")
    low = 0 if network is not None else 1
    added = _whole(e["added_serial"], f"{what}'s added_serial", low, serial)
    return Destination(e["script_pubkey"], _account(e["account"], what), e["label"], added)


def _destinations(raw: object, serial: int, network: str | None) -> tuple[tuple[Destination, ...], str]:
    d = _fields(raw, {"allowlist", "outside"}, "destinations")
    if not isinstance(d["allowlist"], list) or len(d["allowlist"]) > MAX_ALLOWLIST:
        raise InputError(f"the allowlist is a list of at most {MAX_ALLOWLIST} destinations")
    allowlist = tuple(_destination(e, i, serial, network) for i, e in enumerate(d["allowlist"]))
    if len({x.key for x in allowlist}) != len(allowlist):
        raise InputError("a destination is listed twice for one account")
    outside = d["outside"]
    if not isinstance(outside, str) or not (outside in OUTSIDE or outside.startswith("tier:")):
        raise InputError("destinations.outside is refuse, allow or tier:<name>")
    return allowlist, outside


def _fees(raw: object) -> Fees:
    f = _fields(raw, {"max_fee_sat", "max_fee_rate", "max_fee_share_bp", "max_batch_fee_sat"}, "fees")
    if not isinstance(f["max_fee_rate"], str):
        raise InputError("fees.max_fee_rate is a decimal number in a string (sat/vB)")
    rate = parse_fee_rate(f["max_fee_rate"])
    return Fees(
        _whole(f["max_fee_sat"], "fees.max_fee_sat"),
        rate,
        _whole(f["max_fee_share_bp"], "fees.max_fee_share_bp", 0, 10_000),
        _whole(f["max_batch_fee_sat"], "fees.max_batch_fee_sat"),
    )


def _bump(raw: object) -> BumpRule | None:
    if raw is None:
        return None
    b = _fields(raw, {"approvals", "max_fee_sat", "max_fee_rate"}, "bump")
    if not isinstance(b["max_fee_rate"], str):
        raise InputError("bump.max_fee_rate is a decimal number in a string (sat/vB)")
    return BumpRule(
        _whole(b["approvals"], "bump.approvals", MIN_APPROVALS, MAX_APPROVALS),
        _whole(b["max_fee_sat"], "bump.max_fee_sat"),
        parse_fee_rate(b["max_fee_rate"]),
    )


def parse_rules(body: Mapping[str, Any], serial: int, network: str | None = None) -> Rules:
    """The rules of a rulebook body (or of a proposal, with ``network``: see :func:`_destination`).
    Raises InputError."""
    allowlist, outside = _destinations(body["destinations"], serial, network)
    st = _fields(body["self_transfer"], {"approvals"}, "self_transfer")
    maximum = body["max_withdrawal_sat"]
    rules = Rules(
        tiers=_tiers(body["tiers"]),
        max_withdrawal_sat=None if maximum is None else _whole(maximum, "max_withdrawal_sat", 1),
        velocity=_velocity(body["velocity"]),
        allowlist=allowlist,
        outside=outside,
        cooling_off_blocks=_whole(body["cooling_off_blocks"], "cooling_off_blocks", 0, MAX_BLOCKS),
        fees=_fees(body["fees"]),
        self_transfer_approvals=_whole(st["approvals"], "self_transfer.approvals", MIN_APPROVALS, MAX_APPROVALS),
        loosening_delay_blocks=_whole(body["loosening_delay_blocks"], "loosening_delay_blocks", 0, MAX_BLOCKS),
        bump=_bump(body.get("bump")),
    )
    if outside.startswith("tier:") and rules.tier(outside[5:]) is None:
        raise InputError(f"destinations.outside names tier {outside[5:]!r}, which the rulebook does not have")
    return rules


def parse_rulebook(doc: object) -> Rulebook:
    """Read a rulebook document ``{"rulebook": BODY, "signatures": [...]}``, signed or not.

    Checks its shape, not its signatures or its place in the chain (:func:`check_chain`).
    Raises InputError.
    """
    raw_body = doc.get("rulebook") if isinstance(doc, dict) else None
    absent = OPTIONAL_FIELDS - set(raw_body) if isinstance(raw_body, dict) else frozenset()
    body, h = parse_header(doc, "rulebook", FORMAT, FORMAT_VERSION, BODY_FIELDS - absent)
    proposed = _whole(body["proposed_height"], "proposed_height", 0, LOCKTIME_THRESHOLD - 1)
    effective = _whole(body["effective_height"], "effective_height", 0, LOCKTIME_THRESHOLD - 1)
    rules = parse_rules(body, h.serial)
    assert isinstance(doc, dict)
    book = Rulebook(
        h.network, h.manifest, h.serial, h.previous, proposed, effective, rules, parse_signatures(doc, "rulebook")
    )
    check_canonical(book, body, "tiers ascending, velocity limits by name, the allowlist by script and account")
    return book


def load_rulebook(data: bytes) -> Rulebook:
    """Parse a rulebook file's bytes. Raises InputError."""
    return parse_rulebook(load_json(data, MAX_RULEBOOK_BYTES, "rulebook"))


def parse_chain(docs: object) -> list[Rulebook]:
    """A list of rulebook documents (a PSBT's record). Raises InputError."""
    if not isinstance(docs, list):
        raise InputError("the rulebooks are a list of rulebook documents")
    return [parse_rulebook(d) for d in docs]


sign_rulebook = sign_document
"""Add a founder's signature (``account_key``: coincurve private key of their xpub)."""


def with_heights(book: Rulebook, proposed_height: int, effective_height: int) -> Rulebook:
    return replace(book, proposed_height=proposed_height, effective_height=effective_height, signatures={})
