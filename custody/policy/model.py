"""The multisig wallet policy: network, threshold m, founders' keys, script type.

A policy is immutable once stored. Descriptors are BIP-380/383 ``sortedmulti`` ones that
Bitcoin Core accepts as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from custody.bitcoin.descriptors import add_checksum
from custody.bitcoin.keys import OriginKey, parse_origin_xpub
from custody.bitcoin.network import Network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.errors import InputError

RECEIVE = 0  # deposit addresses: xpub/0/i
CHANGE = 1  # change addresses: xpub/1/i
BRANCHES = (RECEIVE, CHANGE)  # the derivation branches below each founder's account key


@dataclass(frozen=True)
class Founder:
    """One founder: a name and an account-level extended public key with its origin."""

    name: str
    key: OriginKey


@dataclass(frozen=True)
class Policy:
    """An m-of-n multisig policy over the founders' keys on one network."""

    network: Network
    threshold: int
    script_type: ScriptType
    founders: tuple[Founder, ...]

    @property
    def n(self) -> int:
        return len(self.founders)

    def descriptor(self, chain: int) -> str:
        """The ranged output descriptor of ``chain`` (0 receive, 1 change), with checksum."""
        if chain not in BRANCHES:
            raise InputError(f"chain must be 0 (receive) or 1 (change), not {chain}")
        keys = ",".join(f"{f.key}/{chain}/*" for f in self.founders)
        return add_checksum(self.script_type.wrap(f"sortedmulti({self.threshold},{keys})"))

    def multipath_descriptor(self) -> str:
        """Receive and change in one BIP-389 descriptor (``xpub/<0;1>/*``), with checksum."""
        keys = ",".join(f"{f.key}/<{RECEIVE};{CHANGE}>/*" for f in self.founders)
        return add_checksum(self.script_type.wrap(f"sortedmulti({self.threshold},{keys})"))

    def descriptors(self) -> dict[str, str]:
        return {"receive": self.descriptor(RECEIVE), "change": self.descriptor(CHANGE)}

    def to_manifest(self) -> dict[str, object]:
        """The founders' key manifest (docs/FORMATS.md)."""
        return {
            "format": "custody-founders-manifest",
            "version": 1,
            "network": self.network.name,
            "threshold": self.threshold,
            "script_type": self.script_type.value,
            "founders": [{"name": f.name, "xpub": str(f.key)} for f in self.founders],
        }


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or any(ch.isspace() or ch in "=,[]()#" for ch in name):
        raise InputError(f"bad name {name!r}: 1 to 64 characters, no spaces and none of = , [ ] ( ) #")
    return name


def make_policy(
    network: Network,
    threshold: int,
    script_type: ScriptType,
    founders: Iterable[tuple[str, str]],
) -> Policy:
    """Validate and build a policy from ``(name, "[origin]xpub")`` pairs.

    Raises InputError for: no founders, a repeated name, the same key twice (compared by
    public key and chain code, not by string), a key of another network, a bad checksum,
    a private key, threshold < 1 or > n, n above the script type's limit.
    """
    parsed: list[Founder] = []
    for name, text in founders:
        name = _check_name(name)
        try:
            key = parse_origin_xpub(text, network)
        except InputError as exc:
            raise InputError(f"founder {name}: {exc}") from None
        parsed.append(Founder(name, key))
    if not parsed:
        raise InputError("a policy needs at least one founder key")
    names = [f.name for f in parsed]
    if len(set(names)) != len(names):
        raise InputError("two founders have the same name")
    seen: dict[tuple[bytes, bytes], str] = {}
    for f in parsed:
        ident = f.key.xpub.identity()
        if ident in seen:
            raise InputError(f"founders {seen[ident]} and {f.name} have the same key")
        seen[ident] = f.name
    # Two keys with different chain codes but the same public key would still give the
    # same children only by accident; a repeated public key is refused outright.
    pubs = [f.key.xpub.public_key for f in parsed]
    if len(set(pubs)) != len(pubs):
        raise InputError("two founders share a public key")
    n = len(parsed)
    if n > script_type.max_keys:
        raise InputError(f"{n} keys is above the limit of {script_type.max_keys} for {script_type.value}")
    if not 1 <= threshold <= n:
        raise InputError(f"threshold must be between 1 and {n} (the number of founders), not {threshold}")
    return Policy(network, threshold, script_type, tuple(parsed))


def policy_from_manifest(doc: object) -> Policy:
    """Build a policy from a founders' manifest (docs/FORMATS.md).

    Raises InputError for a document that is not a valid version-1 manifest.
    """
    from custody.bitcoin.network import get_network

    if not isinstance(doc, dict) or doc.get("format") != "custody-founders-manifest":
        raise InputError("not a custody founders' manifest")
    if doc.get("version") != 1:
        raise InputError(f"unsupported manifest version {doc.get('version')!r}")
    try:
        founders = [(str(f["name"]), str(f["xpub"])) for f in doc["founders"]]
        threshold = doc["threshold"]
        if not isinstance(threshold, int) or isinstance(threshold, bool):
            raise InputError("manifest threshold must be an integer")
        return make_policy(
            get_network(str(doc["network"])), threshold, parse_script_type(str(doc["script_type"])), founders
        )
    except (KeyError, TypeError) as exc:
        raise InputError(f"manifest is missing or mangles a field: {exc}") from None
