"""The founders' key manifest (``custody-founders-manifest``, version 1; docs/FORMATS.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bip32 import HARDENED, ExtendedPublicKey, parse_extended_public_key
from .errors import DecodeError, ManifestError
from .files import MANIFEST_MAX_BYTES, read_checked
from .networks import NETWORKS, PUBLIC_VERSIONS

MANIFEST_FORMAT = "custody-founders-manifest"
MANIFEST_VERSION = 1
SCRIPT_TYPES = ("p2wsh", "p2sh-p2wsh", "p2sh")
#: Most founders per script type: a p2sh redeem script must fit in 520 bytes (15 keys);
#: OP_CHECKMULTISIG takes at most 20 keys.
MAX_FOUNDERS = {"p2sh": 15, "p2sh-p2wsh": 20, "p2wsh": 20}

_ORIGIN = re.compile(r"^\[([0-9a-fA-F]{8})((?:/[0-9]+['hH]?)*)\](.*)$", re.DOTALL)


@dataclass(frozen=True)
class KeyOrigin:
    """Where a founder's key comes from: master fingerprint and derivation path."""

    fingerprint: bytes
    path: tuple[int, ...]

    def __str__(self) -> str:
        steps = "".join(f"/{i - HARDENED}'" if i >= HARDENED else f"/{i}" for i in self.path)
        return f"[{self.fingerprint.hex()}{steps}]"


@dataclass(frozen=True)
class Founder:
    """One founder: a name and an account-level extended public key."""

    name: str
    xpub: str
    key: ExtendedPublicKey
    origin: KeyOrigin | None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: m-of-n over the founders' keys, one script type, one network."""

    network: str
    threshold: int
    script_type: str
    founders: tuple[Founder, ...]

    @property
    def n(self) -> int:
        """The number of founders (keys per script)."""
        return len(self.founders)


def _parse_origin(text: str, where: str) -> tuple[KeyOrigin | None, str]:
    if not text.startswith("["):
        return None, text
    match = _ORIGIN.match(text)
    if match is None:
        raise ManifestError(
            f"{where}: malformed key origin; expected [fingerprint/path] such as [5c9e228d/48'/1'/0'/2']"
        )
    path: list[int] = []
    for step in match.group(2).split("/")[1:]:
        hardened = step[-1] in "'hH"
        number = int(step[:-1] if hardened else step)
        if number >= HARDENED:
            raise ManifestError(f"{where}: key origin step {step} is out of range")
        path.append(number + HARDENED if hardened else number)
    return KeyOrigin(bytes.fromhex(match.group(1)), tuple(path)), match.group(3)


def _int_field(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise ManifestError(f"'{name}' must be an integer, got {value!r}")
    return value


def parse_manifest(obj: dict[str, Any]) -> Manifest:  # noqa: C901 - one refusal per manifest field; the verifier stays apart
    """Validate a decoded manifest and return it.

    Raises ManifestError naming the problem: unknown format or newer version, unknown
    network, threshold outside 1..n, unknown script type, too many founders, an invalid or
    private or other-network key, a malformed key origin, duplicate names or keys.
    """
    if not isinstance(obj, dict):
        raise ManifestError("a manifest is a JSON object")
    if obj.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"not a founders' manifest: format is {obj.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    version = _int_field(obj, "version")
    if version > MANIFEST_VERSION:
        raise ManifestError(f"manifest version {version} is newer than this verifier understands ({MANIFEST_VERSION})")
    if version < 1:
        raise ManifestError(f"invalid manifest version {version}")
    network_name = obj.get("network")
    if not isinstance(network_name, str) or network_name not in NETWORKS:
        raise ManifestError(f"unknown network {network_name!r}; expected one of {', '.join(NETWORKS)}")
    network = NETWORKS[network_name]
    script_type = obj.get("script_type")
    if not isinstance(script_type, str) or script_type not in SCRIPT_TYPES:
        raise ManifestError(f"unknown script_type {script_type!r}; expected one of {', '.join(SCRIPT_TYPES)}")
    threshold = _int_field(obj, "threshold")
    entries = obj.get("founders")
    if not isinstance(entries, list) or not entries:
        raise ManifestError("'founders' must be a non-empty list")
    n = len(entries)
    if n > MAX_FOUNDERS[script_type]:
        raise ManifestError(f"{n} founders, but {script_type} allows at most {MAX_FOUNDERS[script_type]}")
    if not 1 <= threshold <= n:
        raise ManifestError(f"threshold {threshold} is not in 1..{n} (the number of founders)")
    founders: list[Founder] = []
    names: set[str] = set()
    seen_keys: dict[tuple[bytes, bytes], str] = {}
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ManifestError(f"founder {position} must be an object with 'name' and 'xpub'")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"founder {position} has no name")
        where = f"founder {name!r}"
        if name in names:
            raise ManifestError(f"{where} is listed twice")
        names.add(name)
        text = entry.get("xpub")
        if not isinstance(text, str) or not text:
            raise ManifestError(f"{where} has no xpub")
        origin, key_text = _parse_origin(text.strip(), where)
        try:
            key = parse_extended_public_key(key_text)
        except DecodeError as exc:
            raise ManifestError(f"{where}: invalid extended public key: {exc}") from None
        if key.version != network.xpub_version:
            raise ManifestError(
                f"{where}: key is a {PUBLIC_VERSIONS[key.version]} key, but the manifest's network is {network.name}"
            )
        ident = (key.key, key.chain_code)
        if ident in seen_keys:
            raise ManifestError(f"{where} has the same key as founder {seen_keys[ident]!r} (public key and chain code)")
        seen_keys[ident] = name
        founders.append(Founder(name, text, key, origin))
    return Manifest(network.name, threshold, script_type, tuple(founders))


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file.

    Raises ManifestError if the file cannot be read, is not JSON, or is invalid;
    FileRefused (unread) when it is larger than MANIFEST_MAX_BYTES or not a file.
    """
    try:
        data = read_checked(path, MANIFEST_MAX_BYTES, "manifest")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestError(f"manifest {path} is nested too deeply to be a manifest") from None
    return parse_manifest(obj)
