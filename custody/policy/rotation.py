"""Key rotation: a new founders' manifest that the current founders' quorum approves.

A rotation manifest is a founders' manifest (custody.policy.manifest) whose body also names its
predecessor by digest (``"previous": "<hex>"``). It is used only when

* every founder of the NEW policy signed it (each proves they hold the key they publish, as at
  the first key ceremony), and
* at least m founders of the PREDECESSOR (its own threshold) approved it: the same Bitcoin
  signed message ``custody founders-manifest sha256:<digest>``, made with their predecessor
  account key, kept in ``predecessor_signatures``.

So the quorum that can move the coins today is the one that decides who holds them tomorrow;
a minority of today's founders, or tomorrow's founders alone, cannot rotate. The network never
changes; the script type, the threshold and the founders may.

Its body also says which employee roster and rulebook it carries over (``carries``: the serial and
digest of each in force when it was drafted, or null): they stay in force after the rotation until
the new founders sign the next ones, and nothing the old founders sign after them counts
(custody.identity.governance). A rotation without ``carries`` carries nothing.

A chain of manifests (the first one, then each rotation) is what a machine pins: each link is
checked against the one before it, never against what the online store says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import coincurve

from custody.bitcoin.message import sign_message, verify_message
from custody.errors import InputError
from custody.policy.manifest import SignedManifest
from custody.policy.model import Policy

PREVIOUS = "previous"
CARRIES = "carries"  # custody.identity.governance reads it
_DIGEST = re.compile(r"[0-9a-f]{64}")


def previous_of(m: SignedManifest) -> str | None:
    """The digest of the manifest ``m`` rotates from (None: a first manifest)."""
    value = m.body.get(PREVIOUS)
    return value if isinstance(value, str) else None


def _carried_entry_ok(entry: object) -> bool:
    if entry is None:
        return True
    if not isinstance(entry, dict) or set(entry) != {"serial", "digest"}:
        return False
    serial, digest = entry["serial"], entry["digest"]
    return (
        isinstance(serial, int)
        and not isinstance(serial, bool)
        and 1 <= serial < 2**53
        and isinstance(digest, str)
        and _DIGEST.fullmatch(digest) is not None
    )


def carries_ok(value: object) -> bool:
    """Whether ``value`` is a ``carries`` field: ``{roster, rulebook}``, each ``{serial, digest}`` or null."""
    return (
        isinstance(value, dict)
        and set(value) == {"roster", "rulebook"}
        and all(_carried_entry_ok(v) for v in value.values())
    )


def draft_rotation(current: SignedManifest, new: Policy, carries: Mapping[str, Any] | None = None) -> SignedManifest:
    """An unsigned rotation manifest from ``current`` to ``new``, carrying over ``carries`` (the
    roster and rulebook in force, custody.identity.governance.carries; None: nothing).

    Raises InputError when the network differs or the new policy is the current one.
    """
    if new.network != current.policy.network:
        raise InputError(
            f"a rotation keeps the network: the current policy is on {current.policy.network.name}, "
            f"the new one on {new.network.name}"
        )
    if new.to_manifest() == current.policy.to_manifest():
        raise InputError("the new policy is the current one: nothing to rotate")
    if carries is not None and not carries_ok(carries):
        raise InputError("what a rotation carries is {roster, rulebook}, each {serial, digest} or null")
    extra = {CARRIES: dict(carries)} if carries is not None else {}
    return SignedManifest(new.to_manifest() | {PREVIOUS: current.digest} | extra, {}, new)


def approve_rotation(
    m: SignedManifest, current: SignedManifest, founder: str, account_key: coincurve.PrivateKey
) -> SignedManifest:
    """Add current founder ``founder``'s approval of rotation ``m``.

    Raises InputError when ``m`` does not rotate from ``current``, ``founder`` is not a current
    founder, or the key is not theirs.
    """
    if previous_of(m) != current.digest:
        raise InputError(f"this rotation does not follow the founders' manifest {current.fingerprint}")
    pub = current.founder_pubkeys().get(founder)
    if pub is None:
        raise InputError(f"{founder} is not a founder of the current manifest {current.fingerprint}")
    if account_key.public_key.format(compressed=True) != pub:
        raise InputError(f"this key is not the key of founder {founder}'s xpub in the current manifest")
    return m.with_approval(founder, sign_message(account_key, m.message))


def approvers(m: SignedManifest, current: SignedManifest) -> list[str]:
    """The current founders whose approval of ``m`` is valid."""
    keys = current.founder_pubkeys()
    return sorted(
        name for name, sig in m.approvals.items() if name in keys and verify_message(keys[name], m.message, sig)
    )


def rotation_problems(m: SignedManifest, current: SignedManifest) -> list[str]:
    """Why ``m`` may not succeed ``current`` (empty: it may)."""
    out = []
    if previous_of(m) != current.digest:
        out.append(f"it does not name the founders' manifest {current.fingerprint} as its predecessor")
    extra = {CARRIES: m.body[CARRIES]} if CARRIES in m.body else {}
    if m.body != m.policy.to_manifest() | {PREVIOUS: previous_of(m)} | extra:
        out.append("it is not in canonical form (draft it with `custody rotate draft`)")
    if extra and not carries_ok(extra[CARRIES]):
        out.append("what it carries is not {roster, rulebook}, each {serial, digest} or null")
    if m.policy.network != current.policy.network:
        out.append(f"it is for network {m.policy.network.name}, not {current.policy.network.name}")
    out.extend(m.problems())
    keys = current.founder_pubkeys()
    for name in sorted(m.approvals):
        if name not in keys:
            out.append(f"an approval by {name!r}, who is not a founder of the current manifest")
        elif not verify_message(keys[name], m.message, m.approvals[name]):
            out.append(f"current founder {name}'s approval is not valid for this manifest")
    good = approvers(m, current)
    need = current.policy.threshold
    if len(good) < need:
        out.append(
            f"approved by {len(good)} of the current founders ({', '.join(good) or 'none'}); "
            f"the current policy needs {need}"
        )
    return out


def check_rotation(m: SignedManifest, current: SignedManifest) -> SignedManifest:
    """Return ``m`` when it may succeed ``current``; raise InputError naming every problem."""
    problems = rotation_problems(m, current)
    if problems:
        raise InputError(f"the rotation manifest {m.fingerprint} cannot be used: " + "; ".join(problems))
    return m


def check_chain(chain: Sequence[SignedManifest]) -> list[SignedManifest]:
    """Check a pinned chain: a first manifest every founder signed, then rotations each approved
    by its predecessor's quorum. Returns the chain; raises InputError naming the broken link."""
    if not chain:
        raise InputError("no founders' manifest")
    first = chain[0]
    if previous_of(first) is not None or PREVIOUS in first.body:
        raise InputError(f"the first founders' manifest {first.fingerprint} names a predecessor")
    first.check()
    return check_links(chain)


def check_links(chain: Sequence[SignedManifest]) -> list[SignedManifest]:
    """The links of ``chain`` after its first manifest, which the caller checked (:func:`check_chain`):
    each rotation approved by its predecessor's quorum. Raises InputError naming the broken link."""
    for before, after in zip(chain, chain[1:], strict=False):
        check_rotation(after, before)
    return list(chain)
