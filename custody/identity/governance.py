"""Which founders govern a roster or a rulebook: the founders of the policy epoch it was made in.

A key rotation (custody.policy.rotation) hands the policy to new founders. From then on only they
sign rosters and rulebooks; what the founders before them signed stays valid for the history it
governed, and the roster and rulebook in force at the rotation stay in force until the new
founders sign the next one. The rotation manifest says which those are: its body names them in
``carries`` (``{"roster": {"serial": N, "digest": HEX} | null, "rulebook": ... | null}``), so the
quorum that approved the rotation (m current founders and every new founder) also fixed where the
old founders' documents end. A rotation without ``carries`` carries nothing.

A document (roster or rulebook) is valid against a chain of epochs E0, E1, ... En when

* it names the manifest of some epoch Ek (its ``manifest`` field) and m founders of Ek signed it;
* if k < n, it is no later than what the rotation to Ek+1 carried of its kind (the same serial
  with the same digest, or a lower serial): the founders of Ek signed nothing after that that
  counts, so a founder rotated out keeps no vote and a quorum of old founders cannot enrol anyone;
* if k > 0, it comes after what the rotation to Ek carried of its kind (a higher serial).

Nothing here reads a store or a file: the store and the offline signer each build a
:class:`Governance` from the chain of manifests they checked (custody.policy.rotation.check_chain)
and ask it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from custody.identity.founders_documents import Founders, FoundersDocument, is_digest, signature_problems

CARRIES = "carries"
KINDS = ("roster", "rulebook")


@dataclass(frozen=True)
class Carried:
    """A document a rotation carries over: its serial and digest."""

    serial: int
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"serial": self.serial, "digest": self.digest}


def carried_problems(value: object) -> list[str]:
    """Why ``value`` is not a rotation's ``carries`` field (empty: it is)."""
    if not isinstance(value, dict) or set(value) != set(KINDS):
        return [f"its {CARRIES} is {{roster, rulebook}}, each {{serial, digest}} or null"]
    out = []
    for kind in KINDS:
        entry = value[kind]
        if entry is None:
            continue
        serial = entry.get("serial") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or set(entry) != {"serial", "digest"}
            or not isinstance(serial, int)
            or isinstance(serial, bool)
            or not 1 <= serial < 2**53
            or not is_digest(entry["digest"])
        ):
            out.append(f"its {CARRIES}.{kind} is {{serial, digest}} or null")
    return out


def carried_of(body: Mapping[str, Any]) -> dict[str, Carried | None]:
    """What a rotation manifest's body carries, by kind (nothing when it has no ``carries``).
    The caller checked the shape (:func:`carried_problems`); a malformed entry carries nothing."""
    value = body.get(CARRIES)
    if carried_problems(value):
        return dict.fromkeys(KINDS)
    assert isinstance(value, dict)
    return {k: Carried(value[k]["serial"], value[k]["digest"]) if value[k] else None for k in KINDS}


def carries(roster: FoundersDocument | None, rulebook: FoundersDocument | None) -> dict[str, Any]:
    """The ``carries`` field of a rotation drafted while ``roster`` and ``rulebook`` are in force."""
    docs = (roster, rulebook)
    return {kind: Carried(d.serial, d.digest).to_dict() if d else None for kind, d in zip(KINDS, docs, strict=True)}


@dataclass(frozen=True)
class Era:
    """One epoch's founders, and what the rotation into it carried from before (epoch 0: nothing)."""

    founders: Founders
    carried: Mapping[str, Carried | None]

    @property
    def fingerprint(self) -> str:
        d = self.founders.manifest
        return "-".join(d[i : i + 4] for i in range(0, 16, 4))


class _Manifest(Protocol):
    """What :func:`governance_of` reads of a checked founders' manifest (custody.policy.manifest)."""

    @property
    def digest(self) -> str: ...

    @property
    def body(self) -> dict[str, Any]: ...

    @property
    def policy(self) -> Any: ...

    def founder_pubkeys(self) -> dict[str, bytes]: ...


@dataclass(frozen=True, eq=False)
class Governance:
    """The founders of every epoch, first to newest. Two are equal when their manifests are (a
    manifest's digest covers its founders, threshold and what it carries)."""

    eras: tuple[Era, ...]

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(e.founders.manifest for e in self.eras)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Governance) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def newest(self) -> Founders:
        """Who signs a new roster or rulebook now."""
        return self.eras[-1].founders

    @property
    def manifests(self) -> frozenset[str]:
        return frozenset(e.founders.manifest for e in self.eras)

    def problems(self, doc: FoundersDocument) -> list[str]:
        """Why ``doc`` is not a valid founders' document of this chain (empty: it is)."""
        k = next((i for i, e in enumerate(self.eras) if e.founders.manifest == doc.manifest), None)
        if k is None:
            return signature_problems(doc, self.newest)  # names the other manifest, and the signatures
        out = signature_problems(doc, self.eras[k].founders)
        before = self.eras[k].carried.get(doc.KIND) if k else None
        if before is not None and doc.serial <= before.serial:
            out.append(
                f"it is signed under the founders' manifest {self.eras[k].fingerprint}, whose rotation carried "
                f"{doc.KIND} #{before.serial}: it must come after that one"
            )
        if k + 1 < len(self.eras):
            after = self.eras[k + 1].carried.get(doc.KIND)
            later = after is None or doc.serial > after.serial
            if later or (after is not None and doc.serial == after.serial and doc.digest != after.digest):
                kept = f"only {doc.KIND} #{after.serial} and those before it" if after else f"no {doc.KIND}"
                out.append(
                    f"it is signed by the founders of manifest {self.eras[k].fingerprint}, which the founders rotated "
                    f"away from ({self.eras[k + 1].fingerprint}); {kept} of theirs stand, carried by that rotation: "
                    f"a new {doc.KIND} needs {self.newest.threshold} founders of the newest manifest"
                )
        return out


def single(founders: Founders) -> Governance:
    """A chain of one epoch (no rotation)."""
    return Governance((Era(founders, dict.fromkeys(KINDS)),))


def governance_of(chain: Sequence[_Manifest]) -> Governance:
    """The governance of a CHECKED chain of manifests (the first one, then each rotation)."""
    eras = []
    for i, m in enumerate(chain):
        founders = Founders(m.policy.network.name, m.digest, m.policy.threshold, m.founder_pubkeys())
        eras.append(Era(founders, carried_of(m.body) if i else dict.fromkeys(KINDS)))
    return Governance(tuple(eras))
