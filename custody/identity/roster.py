"""The founders-signed employee roster: who may request, approve and lift, with which keys.

A roster is a versioned document (``serial`` 1, 2, 3 ...) bound to one founders' manifest (by
its digest) and signed by at least the policy's threshold m of its founders, each as a
Bitcoin signed message (custody.bitcoin.message) of

    custody roster <network> #<serial> sha256:<hex digest of the roster body>

with the key behind their xpub. Nothing else can add an employee, a key or a role: the store,
the approval code and the offline signer all check a roster's founder signatures against a
manifest pinned on their own machine before they believe a word of it.

Each employee has a plain name (lower-case ASCII letters, digits, ``.``, ``_``, ``-``; no two
names that look alike), one or more compressed secp256k1 public keys, roles (``request``,
``approve``, ``lift``) and ``enabled``. A disabled employee stays listed, so their name is
never handed to someone else.

Suspensions are the fast way to take rights away: two enabled employees of the roster (not
the one suspended) sign a statement naming the employee and the roster serial; from then on
that employee counts for nothing, in the store and at every signer that has seen it, until a
later roster of the founders clears it (``cleared_suspensions``). A suspension can only take
rights away, so the worst that two colluding employees can do with it is stop a third.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from custody.errors import ApprovalError, InputError
from custody.identity.founders_documents import (
    HEADER_FIELDS,
    Founders,
    FoundersDocument,
    canonical_json,
    check_canonical,
    is_digest,
    load_json,
    parse_header,
    parse_signatures,
    sign_document,
    signature_problems,
)
from custody.identity.statements import parse_pubkey, statement_digest, verify_statement
from custody.identity.webauthn import Credential, parse_credential

__all__ = ["Founders", "canonical_json"]  # re-exported: the roster's callers found them here

FORMAT = "custody-roster"
FORMAT_VERSION = 1
ROLES = ("request", "approve", "lift")
SUSPENSION_DOMAIN = "custody/suspension/v1"
SUSPENSION_QUORUM = 2
MAX_ROSTER_BYTES = 1024 * 1024
MAX_EMPLOYEES = 1000
MAX_KEYS = 8
MAX_CREDENTIALS = 8

_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
# Characters that read alike in most fonts, mapped to one representative (a small "skeleton"
# in the spirit of Unicode TR39, for the ASCII names we allow).
_LOOKALIKE = str.maketrans({"0": "o", "1": "l", "i": "l", "|": "l", "5": "s", "2": "z", "8": "b", "_": "-", ".": "-"})


def skeleton(name: str) -> str:
    """What a name looks like: two names with one skeleton are refused in one roster."""
    return name.translate(_LOOKALIKE).replace("rn", "m").replace("vv", "w").replace("cl", "d")


def check_name(name: object) -> str:
    """An employee name as the roster allows it. Raises InputError for anything else: upper case,
    spaces, non-ASCII letters (a Cyrillic 'а' in 'аlice'), control characters, over 32 characters."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = name if isinstance(name, str) else type(name).__name__
        raise InputError(
            f"bad employee name {ascii(shown)[:60]}: 1 to 32 characters, lower-case ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter"
        )
    return name


@dataclass(frozen=True)
class Employee:
    name: str
    keys: tuple[str, ...]  # compressed public keys, hex
    roles: frozenset[str]
    enabled: bool = True
    webauthn: tuple[Credential, ...] = ()  # security keys that may sign approvals (WebAuthn)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "keys": list(self.keys), "roles": sorted(self.roles)}
        d["enabled"] = self.enabled
        if self.webauthn:  # absent when none: rosters made before WebAuthn keep their digest
            d["webauthn"] = [c.to_dict() for c in self.webauthn]
        return d

    def may(self, role: str) -> bool:
        return self.enabled and role in self.roles


@dataclass(frozen=True)
class Roster(FoundersDocument):
    """A roster body (what founders sign) with its signatures; see :func:`verify_roster`."""

    KIND: ClassVar[str] = "roster"
    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = FORMAT_VERSION
    network: str
    manifest: str  # digest of the founders' manifest it belongs to
    serial: int
    previous: str | None  # digest of the roster body it replaces (None for serial 1)
    employees: tuple[Employee, ...]
    cleared_suspensions: tuple[str, ...] = ()
    signatures: Mapping[str, str] = field(default_factory=dict)  # founder name -> base64

    def body(self) -> dict[str, Any]:
        return self.header() | {
            "employees": [e.to_dict() for e in sorted(self.employees, key=lambda e: e.name)],
            "cleared_suspensions": sorted(self.cleared_suspensions),
        }

    def employee(self, name: str) -> Employee | None:
        return next((e for e in self.employees if e.name == name), None)

    def owner_of(self, pubkey_hex: str) -> Employee | None:
        return next((e for e in self.employees if pubkey_hex in e.keys), None)


def _credentials(name: str, entry: object) -> tuple[Credential, ...]:
    if not isinstance(entry, list) or not 1 <= len(entry) <= MAX_CREDENTIALS:
        raise InputError(f"employee {name}: 'webauthn' is a list of 1 to {MAX_CREDENTIALS} credentials (or absent)")
    creds = tuple(parse_credential(c, f"employee {name}, WebAuthn credential {i + 1}") for i, c in enumerate(entry))
    if len({c.id for c in creds}) != len(creds):
        raise InputError(f"employee {name}: a WebAuthn credential is listed twice")
    return creds


def _employee(entry: object, where: str) -> Employee:
    fields = {"name", "keys", "roles", "enabled"}
    if not isinstance(entry, dict) or not fields <= set(entry) <= fields | {"webauthn"}:
        raise InputError(f"{where}: an employee is {{name, keys, roles, enabled[, webauthn]}}")
    name = check_name(entry["name"])
    keys = entry["keys"]
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS or not all(isinstance(k, str) for k in keys):
        raise InputError(f"employee {name}: 'keys' is a list of 1 to {MAX_KEYS} public keys (hex)")
    parsed = tuple(parse_pubkey(k) for k in keys)
    if len(set(parsed)) != len(parsed):
        raise InputError(f"employee {name}: a key is listed twice")
    roles = entry["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) and r in ROLES for r in roles):
        raise InputError(f"employee {name}: roles are among {', '.join(ROLES)}")
    if not isinstance(entry["enabled"], bool):
        raise InputError(f"employee {name}: 'enabled' is true or false")
    creds = _credentials(name, entry["webauthn"]) if "webauthn" in entry else ()
    return Employee(name, parsed, frozenset(roles), entry["enabled"], creds)


def check_employees(employees: Sequence[Employee]) -> None:
    """The roster-wide rules: unique names that do not look alike, no key shared by two."""
    if len(employees) > MAX_EMPLOYEES:
        raise InputError(f"a roster lists at most {MAX_EMPLOYEES} employees")
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for e in employees:
        check_name(e.name)
        other = names.get(skeleton(e.name))
        if other is not None:
            raise InputError(f"employee names {other!r} and {e.name!r} look alike; a roster never lists two such names")
        names[skeleton(e.name)] = e.name
        for k in e.keys:
            if k in keys:
                raise InputError(f"employees {keys[k]} and {e.name} share a public key")
            keys[k] = e.name
        for c in e.webauthn:
            if c.fingerprint in keys:
                raise InputError(f"employees {keys[c.fingerprint]} and {e.name} share a WebAuthn credential")
            keys[c.fingerprint] = e.name
            # The credential id is not in what the key signs: one key under two ids approves as both.
            point = "p256:" + c.point.hex()
            if keys.setdefault(point, e.name) != e.name:
                raise InputError(
                    f"employees {keys[point]} and {e.name} share a security key "
                    "(one public key under two credential ids)"
                )


def parse_roster(doc: object) -> Roster:  # noqa: C901 - one refusal per roster field, each naming it
    """Read a roster document ``{"roster": BODY, "signatures": [...]}``, signed or not.

    Checks its shape and the roster-wide rules, not its signatures (:func:`verify_roster`).
    Raises InputError.
    """
    body, h = parse_header(doc, "roster", FORMAT, FORMAT_VERSION, HEADER_FIELDS | {"employees", "cleared_suspensions"})
    if not isinstance(body["employees"], list):
        raise InputError("the roster's employees are a list")
    employees = tuple(_employee(e, f"employee {i + 1}") for i, e in enumerate(body["employees"]))
    check_employees(employees)
    cleared = body["cleared_suspensions"]
    if not isinstance(cleared, list) or not all(is_digest(c) for c in cleared):
        raise InputError("cleared_suspensions is a list of suspension digests")
    assert isinstance(doc, dict)
    sigs = parse_signatures(doc, "roster")
    roster = Roster(h.network, h.manifest, h.serial, h.previous, employees, tuple(cleared), sigs)
    check_canonical(roster, body, "employees by name, clearings sorted")
    return roster


def load_roster(data: bytes) -> Roster:
    """Parse a roster file's bytes. Raises InputError."""
    return parse_roster(load_json(data, MAX_ROSTER_BYTES, "roster"))


def roster_problems(roster: Roster, founders: Founders) -> list[str]:
    """Why ``roster`` is not a valid founders' roster for ``founders`` (empty: it is). After a key
    rotation, check against every epoch's founders instead (custody.identity.governance)."""
    return signature_problems(roster, founders)


def verify_roster(roster: Roster, founders: Founders) -> Roster:
    """Return ``roster`` when at least m founders of the pinned manifest signed exactly it.

    Raises ApprovalError (exit 4) naming every problem.
    """
    problems = roster_problems(roster, founders)
    if problems:
        raise ApprovalError(f"roster #{roster.serial} is not valid: " + "; ".join(problems))
    return roster


sign_roster = sign_document
"""Add a founder's signature (``account_key``: coincurve private key of their xpub)."""


# ---------------------------------------------------------------- suspensions


@dataclass(frozen=True)
class Suspension:
    """Two roster employees' signed statement that ``employee`` may no longer act."""

    network: str
    manifest: str
    serial: int  # the roster serial the signers acted under
    employee: str
    reason: str
    signatures: tuple[tuple[str, str], ...]  # (employee, hex DER signature)

    def fields(self) -> list[object]:
        return [self.network, self.manifest, self.serial, self.employee, self.reason]

    @property
    def digest(self) -> str:
        return statement_digest(SUSPENSION_DOMAIN, self.fields()).hex()

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "manifest": self.manifest,
            "serial": self.serial,
            "employee": self.employee,
            "reason": self.reason,
            "signatures": [{"employee": n, "signature": s} for n, s in self.signatures],
        }


def parse_suspension(doc: object) -> Suspension:
    """Raises InputError for a malformed suspension."""
    try:
        assert isinstance(doc, dict)
        sigs = tuple((str(s["employee"]), str(s["signature"])) for s in doc["signatures"])
        serial = doc["serial"]
        assert isinstance(serial, int) and not isinstance(serial, bool)
        return Suspension(
            str(doc["network"]),
            str(doc["manifest"]),
            serial,
            check_name(doc["employee"]),
            str(doc["reason"])[:500],
            sigs,
        )
    except (AssertionError, KeyError, TypeError):
        raise InputError("a suspension is {network, manifest, serial, employee, reason, signatures}") from None


def suspension_signers(s: Suspension, roster: Roster, manifests: Collection[str] = ()) -> list[str]:
    """The distinct enabled employees of ``roster`` (never the one suspended) whose signature
    over the suspension verifies with one of their roster keys. A suspension names the manifest
    of the roster it was signed under: ``roster``'s, or one of ``manifests`` (the founders'
    manifests of every policy epoch: a suspension outlives a key rotation)."""
    if s.network != roster.network or s.manifest not in {roster.manifest, *manifests} or s.serial > roster.serial:
        return []
    ok: list[str] = []
    for name, sig in s.signatures:
        e = roster.employee(name)
        if e is None or not e.enabled or name == s.employee or name in ok:
            continue
        if any(verify_statement(k, sig, SUSPENSION_DOMAIN, s.fields()) for k in e.keys):
            ok.append(name)
    return ok


def in_force(suspensions: Iterable[Suspension], roster: Roster, manifests: Collection[str] = ()) -> dict[str, str]:
    """Employee name -> suspension digest, for every suspension two roster employees signed
    and no later roster of the founders cleared (``manifests``: as for :func:`suspension_signers`)."""
    out: dict[str, str] = {}
    for s in suspensions:
        if s.digest in roster.cleared_suspensions:
            continue
        if len(suspension_signers(s, roster, manifests)) >= SUSPENSION_QUORUM:
            out.setdefault(s.employee, s.digest)
    return out
