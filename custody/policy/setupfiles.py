"""Wallet setup files other wallets and signers import, and reading them back into a draft
of the founders' manifest.

Written (:func:`export_policy`), one format each:

* ``bsms``: a BIP-129 round 2 descriptor record: ``BSMS 1.0``, the descriptor template
  (``xpub/**``), the path restrictions ``/0/*,/1/*`` and the wallet's first address, four
  lines and no newline after the last (the reference implementation splits on ``\\n`` into
  exactly four fields).
* ``coldcard``: Coldcard's multisig setup text file (``Name:``, ``Policy: M of N``,
  ``Format:``, ``Derivation:`` and one ``XFP: xpub`` line per key).
* ``caravan``: Caravan's wallet configuration JSON (``addressType``, ``network``,
  ``quorum``, ``extendedPublicKeys`` with ``bip32Path`` and ``xfp``).
* ``specter``: Specter Desktop's wallet JSON (``label``, ``blockheight``, the receive
  ``descriptor``, ``devices``).
* ``sparrow``: the layout of Sparrow's own "Output Descriptor" export. Sparrow's importer
  reads a text file by paragraphs: it drops ``#`` lines, JOINS adjacent lines, splits at blank
  lines and takes the first paragraph. So the BIP-389 ``<0;1>/*`` descriptor comes first,
  alone in its paragraph; the receive and change descriptors follow, each in its own.
* ``descriptor``: one BIP-389 multipath descriptor with its checksum.

Read (:func:`read_setup_files`): the same formats, BSMS round 1 key records (one file per
founder, each signature checked against the key it carries) and encrypted BSMS records (with
the session's token). What is read becomes a :class:`Draft`, which
:func:`custody.policy.model.make_policy` validates like any other manifest draft. Only
``sortedmulti`` over extended keys with the receive/change branches ``/0/*`` and ``/1/*`` is
accepted: anything else would give other addresses than custody derives.
"""

# size(module): every wallet's setup file (Sparrow, Specter, BSMS, Electrum, Coldcard) in one place,
#   a few lines over; each export is short

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from custody.bitcoin.descriptors import check_checksum, descriptor_checksum
from custody.bitcoin.keys import HARDENED, format_path, parse_origin_xpub, split_origin
from custody.bitcoin.message import verify_message
from custody.bitcoin.network import Network
from custody.bitcoin.script import ScriptType
from custody.errors import InputError
from custody.policy.generator import AddressDeriver
from custody.policy.model import CHANGE, RECEIVE, Policy, make_policy

FORMATS = ("bsms", "coldcard", "caravan", "specter", "sparrow", "descriptor")
MAX_SETUP_FILE_BYTES = 256 * 1024
BSMS_VERSION = "BSMS 1.0"
BSMS_PATHS = f"/{RECEIVE}/*,/{CHANGE}/*"
COLDCARD_MAX_KEYS = 15  # Coldcard's MAX_SIGNERS
COLDCARD_NAME = re.compile(r"[\x20-\x7e]{1,20}")

_CARAVAN_TYPES = {ScriptType.P2WSH: "P2WSH", ScriptType.P2SH_P2WSH: "P2SH-P2WSH", ScriptType.P2SH: "P2SH"}
_COLDCARD_TYPES = {ScriptType.P2WSH: "P2WSH", ScriptType.P2SH_P2WSH: "P2SH-P2WSH", ScriptType.P2SH: "P2SH"}
# Caravan's network names ("signet" included); every test network's keys are tpub.
_CARAVAN_NETWORKS = {"mainnet": "mainnet", "testnet": "testnet", "signet": "signet", "regtest": "regtest"}
_BSMS_TOKEN = re.compile(r"00|[0-9a-f]{16}|[0-9a-f]{32}")


@dataclass(frozen=True)
class Draft:
    """What a setup file says of the policy; ``None`` where the file does not say it."""

    source: str  # the format it was read as
    threshold: int | None
    script_type: ScriptType | None
    founders: tuple[tuple[str, str], ...]  # (name, "[origin]xpub")
    first_address: str | None = None  # a BSMS descriptor record's first address, checked by the caller
    network: str | None = None  # a Caravan file's network


# --------------------------------------------------------------------------- writing


def _name_ok(name: str) -> str:
    if not COLDCARD_NAME.fullmatch(name):
        raise InputError("the wallet name must be 1 to 20 printable ASCII characters (Coldcard's limit)")
    return name


def _origin(policy: Policy) -> None:
    for f in policy.founders:
        if f.key.origin is None:
            raise InputError(f"founder {f.name}'s key has no key origin [fingerprint/path]; this format needs it")


def bsms_descriptor_record(policy: Policy) -> str:
    """BIP-129 round 2: version, descriptor template, path restrictions, first address."""
    keys = ",".join(f"{f.key}/**" for f in policy.founders)
    template = policy.script_type.wrap(f"sortedmulti({policy.threshold},{keys})")
    first = AddressDeriver(policy).derive(RECEIVE, 0).address
    return "\n".join([BSMS_VERSION, template, BSMS_PATHS, first])


def coldcard_file(policy: Policy, name: str) -> str:
    """Coldcard's multisig setup file (docs/FORMATS.md)."""
    _name_ok(name)
    _origin(policy)
    if policy.n > COLDCARD_MAX_KEYS:
        raise InputError(f"Coldcard takes at most {COLDCARD_MAX_KEYS} keys; this policy has {policy.n}")
    lines = [
        "# Coldcard multisig setup file, written by custody",
        "#",
        f"Name: {name}",
        f"Policy: {policy.threshold} of {policy.n}",
        f"Format: {_COLDCARD_TYPES[policy.script_type]}",
    ]
    last = None
    for f in policy.founders:
        assert f.key.origin is not None
        path = format_path(f.key.origin.path)
        if path != last:
            lines += ["", f"Derivation: {path}", ""]
            last = path
        lines.append(f"{f.key.origin.fingerprint.hex().upper()}: {f.key.xpub}")
    return "\n".join(lines) + "\n"


def caravan_file(policy: Policy, name: str) -> str:
    """Caravan's wallet configuration JSON."""
    keys = []
    for f in policy.founders:
        origin = f.key.origin
        keys.append(
            {
                "name": f.name,
                "bip32Path": format_path(origin.path) if origin else "Unknown",
                "xpub": str(f.key.xpub),
                "xfp": origin.fingerprint.hex() if origin else "00000000",
            }
        )
    doc = {
        "name": name,
        "addressType": _CARAVAN_TYPES[policy.script_type],
        "network": _CARAVAN_NETWORKS[policy.network.name],
        "client": {"type": "public"},
        "quorum": {"requiredSigners": policy.threshold, "totalSigners": policy.n},
        "extendedPublicKeys": keys,
        "startingAddressIndex": 0,
    }
    return json.dumps(doc, indent=2) + "\n"


def specter_file(policy: Policy, name: str) -> str:
    """Specter Desktop's wallet JSON: the receive descriptor; Specter derives change as /1/*."""
    doc = {
        "label": name,
        "blockheight": 0,  # unknown here: rescan from the start
        "descriptor": policy.descriptor(RECEIVE),
        "devices": [{"type": "other", "label": f.name} for f in policy.founders],
    }
    return json.dumps(doc, indent=2) + "\n"


def descriptor_text(policy: Policy) -> str:
    """Three paragraphs, the first read by Sparrow: multipath, receive, change."""
    d = policy.descriptors()
    return (
        "# Receive and change (BIP-389): what Sparrow imports\n"
        f"{policy.multipath_descriptor()}\n"
        "\n"
        "# Receive, deposit addresses (Bitcoin Core)\n"
        f"{d['receive']}\n"
        "\n"
        "# Change (Bitcoin Core)\n"
        f"{d['change']}\n"
    )


def export_policy(policy: Policy, fmt: str, name: str = "custody") -> str:
    """The wallet setup file of ``policy`` in format ``fmt`` (one of :data:`FORMATS`).

    Raises InputError for an unknown format, a name Coldcard cannot take, or a policy the
    format cannot carry (a key without origin for Coldcard, more than 15 keys).
    """
    if fmt == "bsms":
        return bsms_descriptor_record(policy)
    if fmt == "coldcard":
        return coldcard_file(policy, name)
    if fmt == "caravan":
        return caravan_file(policy, _name_ok(name))
    if fmt == "specter":
        return specter_file(policy, _name_ok(name))
    if fmt == "sparrow":
        return descriptor_text(policy)
    if fmt == "descriptor":
        return policy.multipath_descriptor() + "\n"
    raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- reading descriptors

_WRAPPERS = (
    ("sh(wsh(sortedmulti(", ")))", ScriptType.P2SH_P2WSH),
    ("wsh(sortedmulti(", "))", ScriptType.P2WSH),
    ("sh(sortedmulti(", "))", ScriptType.P2SH),
)
_SUFFIXES = {"/<0;1>/*": "multipath", "/0/*": "receive", "/1/*": "change", "/**": "template"}


@dataclass(frozen=True)
class ParsedDescriptor:
    script_type: ScriptType
    threshold: int
    keys: tuple[str, ...]  # "[origin]xpub", without the branch suffix
    branch: str  # multipath, receive, change or template


def parse_descriptor(text: str, *, template: bool = False) -> ParsedDescriptor:
    """A ``sortedmulti`` descriptor over extended keys of the receive/change branches.

    Keys end in ``/<0;1>/*`` (BIP-389), ``/0/*`` or ``/1/*``, all the same (or ``/**``, a
    BIP-129 template, when ``template``). A checksum, when present, must be right.
    Raises InputError for anything else, saying why.
    """
    text = text.strip()
    if "#" in text:
        text = check_checksum(text)
    else:
        descriptor_checksum(text)  # refuses characters outside the descriptor set
    if re.search(r"(?<![a-z_])multi\(", text) and "sortedmulti(" not in text:
        raise InputError(
            "multi() keeps its keys in the order written; custody sorts them per address (BIP-67, "
            "sortedmulti), so its addresses would differ: only sortedmulti descriptors are accepted"
        )
    match = next(((h, t, st) for h, t, st in _WRAPPERS if text.startswith(h) and text.endswith(t)), None)
    if match is None:
        raise InputError(
            "not a multisig descriptor custody uses: wsh(sortedmulti(...)), sh(wsh(sortedmulti(...))) or "
            f"sh(sortedmulti(...)): {text[:60]!r}"
        )
    head, tail, script_type = match
    inner = text[len(head) : -len(tail)]
    if "(" in inner or ")" in inner:
        raise InputError(f"unexpected nesting inside sortedmulti(): {text[:60]!r}")
    threshold_text, *key_texts = inner.split(",")
    if not re.fullmatch(r"[1-9][0-9]?", threshold_text):
        raise InputError(f"bad threshold {threshold_text[:10]!r} in the descriptor")
    if not key_texts:
        raise InputError("the descriptor has no keys")
    keys: list[str] = []
    branches = set()
    for key_text in key_texts:
        for suffix, branch in _SUFFIXES.items():
            if key_text.endswith(suffix):
                if branch == "template" and not template:
                    continue
                keys.append(key_text[: -len(suffix)])
                branches.add(branch)
                break
        else:
            raise InputError(
                f"key {key_text[:40]!r}... must end in /<0;1>/*, /0/* or /1/*: custody derives deposit "
                "addresses at xpub/0/i and change at xpub/1/i"
            )
    if len(branches) != 1:
        raise InputError("the descriptor's keys do not all use the same derivation branches")
    return ParsedDescriptor(script_type, int(threshold_text), tuple(keys), branches.pop())


def _names_for(keys: Sequence[str], labels: Sequence[str | None], network: Network) -> list[tuple[str, str]]:
    """(name, key) pairs: each label when it is a valid founder name, else founder-<fingerprint>."""
    out = []
    for key, label in zip(keys, labels, strict=True):
        name = label.strip() if label else ""
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            origin, _ = split_origin(key)
            fp = origin.fingerprint.hex() if origin else parse_origin_xpub(key, network).xpub.fingerprint.hex()
            name = f"founder-{fp}"
        out.append((name, key))
    return out


# --------------------------------------------------------------------------- BSMS


def bsms_decrypt(data: str, token_hex: str) -> str:
    """Decrypt a BIP-129 ``.dat`` record (hex ``MAC || ciphertext``) with the session's TOKEN.

    ENCRYPTION_KEY = PBKDF2-HMAC-SHA512("No SPOF", TOKEN, 2048, 32 bytes); the MAC is
    HMAC-SHA256(SHA256(key), hex TOKEN || plaintext) and its first 16 bytes are the AES-256-CTR
    IV. Raises InputError for a malformed record or token, or a MAC that does not match (wrong
    token, or a record changed on the way).
    """
    token_hex = token_hex.strip().lower()
    if not _BSMS_TOKEN.fullmatch(token_hex) or token_hex == "00":
        raise InputError("a BSMS token is 16 or 32 hex digits (64 or 128 bits)")
    raw = data.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{66,}", raw) or len(raw) % 2:
        raise InputError("an encrypted BSMS record is hex: MAC (32 bytes) then the ciphertext")
    blob = bytes.fromhex(raw)
    mac, ciphertext = blob[:32], blob[32:]
    key = hashlib.pbkdf2_hmac("sha512", b"No SPOF", bytes.fromhex(token_hex), 2048, 32)
    decryptor = Cipher(algorithms.AES(key), modes.CTR(mac[:16])).decryptor()
    plaintext = decryptor.update(ciphertext) + decryptor.finalize()
    expected = hmac.new(hashlib.sha256(key).digest(), token_hex.encode() + plaintext, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise InputError("the encrypted BSMS record does not decrypt with this token (wrong token, or altered)")
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the decrypted BSMS record is not text") from None


def _decrypt_any(data: str, tokens: Sequence[str]) -> str:
    error: InputError | None = None
    for token in tokens:
        try:
            return bsms_decrypt(data, token)
        except InputError as exc:
            error = exc
    assert error is not None
    raise error


@dataclass(frozen=True)
class KeyRecord:
    """A BIP-129 round 1 key record whose signature was checked."""

    token: str
    key: str  # "[origin]KEY": an xpub or a bare public key
    description: str

    @property
    def is_xpub(self) -> bool:
        return not re.fullmatch(r"0[23][0-9a-fA-F]{64}", split_origin(self.key)[1])


def read_bsms_key_record(text: str, network: Network) -> KeyRecord:
    """Parse a round 1 key record and check its signature: the KEY's own public key must have
    signed the first four lines joined by ``\\n`` (a Bitcoin signed message).

    Raises InputError for a malformed record, a KEY of another network, or a signature that
    is not the KEY's.
    """
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(lines) != 5:
        raise InputError(f"a BSMS key record has 5 lines, this one has {len(lines)}")
    version, token, key, description, signature = lines
    if version != BSMS_VERSION:
        raise InputError(f"unsupported BSMS version {version[:20]!r}: custody reads {BSMS_VERSION}")
    if not _BSMS_TOKEN.fullmatch(token):
        raise InputError("the key record's TOKEN is not 00 or 16/32 hex digits")
    if len(description) > 80:
        raise InputError("the key record's description is longer than 80 characters")
    origin, body = split_origin(key)
    if origin is None:
        raise InputError("the key record's KEY has no key origin [fingerprint/path]")
    if re.fullmatch(r"0[23][0-9a-fA-F]{64}", body):
        pubkey = bytes.fromhex(body)
    else:
        pubkey = parse_origin_xpub(key, network).xpub.public_key
    if not verify_message(pubkey, "\n".join(lines[:4]), signature):
        raise InputError(f"the key record of {key[:24]}... is not signed by that key: refused")
    return KeyRecord(token, key, description)


def _bsms_descriptor_record(text: str, network: Network) -> Draft:
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(lines) != 4:
        raise InputError(f"a BSMS descriptor record has 4 lines, this one has {len(lines)}")
    version, descriptor, paths, first = lines
    if version != BSMS_VERSION:
        raise InputError(f"unsupported BSMS version {version[:20]!r}: custody reads {BSMS_VERSION}")
    parsed = parse_descriptor(descriptor, template=True)
    if parsed.branch == "template":
        if paths.replace(" ", "") != BSMS_PATHS:
            raise InputError(f"BSMS path restrictions must be {BSMS_PATHS} (deposit /0/*, change /1/*), not {paths!r}")
    elif paths != "No path restrictions" or parsed.branch != "multipath":
        raise InputError("a BSMS record without a /** template must use a <0;1>/* descriptor and no path restrictions")
    founders = _names_for(parsed.keys, [None] * len(parsed.keys), network)
    return Draft("bsms", parsed.threshold, parsed.script_type, tuple(founders), first_address=first.strip())


# --------------------------------------------------------------------------- the other formats


def _coldcard(text: str, network: Network) -> Draft:
    threshold = n = None
    script_type = ScriptType.P2SH  # Coldcard's default when no Format line is given
    derivation: str | None = None
    founders: list[tuple[str, str]] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, value = line.partition(":")
        if not sep:
            raise InputError(f"unexpected line in a Coldcard file: {line[:40]!r}")
        label, value = label.strip().lower(), value.strip()
        if label == "name":
            continue
        if label == "policy":
            m = re.fullmatch(r"(\d{1,2})\s*(?:of|/|,|\s)\s*(\d{1,2})", value)
            if not m:
                raise InputError(f"bad Policy line {value[:20]!r}: expected 'M of N'")
            threshold, n = int(m.group(1)), int(m.group(2))
        elif label == "format":
            names = {v.lower(): k for k, v in _COLDCARD_TYPES.items()} | {"p2wsh-p2sh": ScriptType.P2SH_P2WSH}
            if value.lower() not in names:
                raise InputError(f"bad Format line {value[:20]!r}: expected P2WSH, P2SH-P2WSH or P2SH")
            script_type = names[value.lower()]
        elif label == "derivation":
            derivation = value
        elif re.fullmatch(r"[0-9a-f]{8}", label):
            if derivation is None:
                raise InputError("a Coldcard key line comes before any Derivation: line")
            path = derivation.removeprefix("m").lstrip("/")
            key = f"[{label}/{path}]{value}" if path else f"[{label}]{value}"
            founders.append((f"founder-{label}", key))
        else:
            raise InputError(f"unexpected line in a Coldcard file: {line[:40]!r}")
    if not founders:
        raise InputError("the Coldcard file lists no keys")
    if n is not None and n != len(founders):
        raise InputError(f"the Coldcard file says {n} keys and lists {len(founders)}")
    return Draft("coldcard", threshold if threshold is not None else len(founders), script_type, tuple(founders))


def _caravan(doc: dict[str, Any], network: Network) -> Draft:
    try:
        types = {v: k for k, v in _CARAVAN_TYPES.items()} | {"P2SH_P2WSH": ScriptType.P2SH_P2WSH}
        script_type = types.get(str(doc["addressType"]))
        if script_type is None:
            raise InputError(f"unknown Caravan addressType {str(doc['addressType'])[:20]!r}")
        quorum = doc["quorum"]
        threshold, total = quorum["requiredSigners"], quorum["totalSigners"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (threshold, total)):
            raise InputError("Caravan's quorum must be integers")
        founders = []
        for k in doc["extendedPublicKeys"]:
            xfp, path, xpub = str(k["xfp"]).lower(), str(k["bip32Path"]), str(k["xpub"])
            if path == "Unknown" or not re.fullmatch(r"[0-9a-f]{8}", xfp):
                raise InputError(f"Caravan key {xpub[:16]}... has no fingerprint and path: custody needs its origin")
            founders.append((str(k.get("name") or ""), f"[{xfp}/{path.removeprefix('m').lstrip('/')}]{xpub}"))
        file_network = str(doc["network"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"not a Caravan wallet configuration: missing or mangled {exc}") from None
    if total != len(founders):
        raise InputError(f"Caravan's quorum says {total} keys and lists {len(founders)}")
    named = _names_for([k for _, k in founders], [n for n, _ in founders], network)
    return Draft("caravan", threshold, script_type, tuple(named), network=file_network)


def _specter(doc: dict[str, Any], network: Network) -> Draft:
    descriptor = doc.get("descriptor") or doc.get("recv_descriptor")
    if not isinstance(descriptor, str):
        raise InputError("not a Specter wallet file: no descriptor")
    parsed = parse_descriptor(descriptor)
    if parsed.branch == "change":
        raise InputError("Specter's descriptor is the receive one (/0/*), this one is the change branch")
    devices = doc.get("devices")
    labels: list[str | None] = [None] * len(parsed.keys)
    if isinstance(devices, list) and len(devices) == len(parsed.keys):
        labels = [d.get("label") if isinstance(d, dict) and isinstance(d.get("label"), str) else None for d in devices]
    return Draft("specter", parsed.threshold, parsed.script_type, tuple(_names_for(parsed.keys, labels, network)))


def _descriptors(text: str, network: Network) -> Draft:
    """Every descriptor in a text file (comments and blank lines skipped); they must agree."""
    parsed = [parse_descriptor(line) for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
    if not parsed:
        raise InputError("no descriptor in the file")
    first = parsed[0]
    for p in parsed[1:]:
        if (p.script_type, p.threshold, p.keys) != (first.script_type, first.threshold, first.keys):
            raise InputError("the file's descriptors describe different wallets: refused")
    if {p.branch for p in parsed} == {"change"}:
        raise InputError("only a change descriptor (/1/*) was given; give the receive or the <0;1> one")
    names = _names_for(first.keys, [None] * len(first.keys), network)
    return Draft("descriptor", first.threshold, first.script_type, tuple(names))


def detect_format(text: str) -> str:
    """Which format a setup file is in (bsms-key, bsms, bsms-encrypted, caravan, specter,
    coldcard or descriptor). Raises InputError when none fits."""
    stripped = text.strip()
    if stripped.startswith(BSMS_VERSION):
        return "bsms-key" if len(stripped.split("\n")) == 5 else "bsms"
    if re.fullmatch(r"[0-9a-fA-F]{66,}", stripped):
        return "bsms-encrypted"
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except (ValueError, RecursionError):
            raise InputError("the file starts like JSON but is not valid JSON") from None
        if isinstance(doc, dict) and "quorum" in doc:
            return "caravan"
        if isinstance(doc, dict) and ("descriptor" in doc or "recv_descriptor" in doc):
            return "specter"
        raise InputError("a JSON file that is neither a Caravan nor a Specter wallet file")
    if re.search(r"^\s*(policy|derivation)\s*:", stripped, re.I | re.M):
        return "coldcard"
    return "descriptor"


def _text(data: bytes) -> str:
    if len(data) > MAX_SETUP_FILE_BYTES:
        raise InputError(f"a wallet setup file is at most {MAX_SETUP_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("the wallet setup file is not UTF-8 text") from None
    if "\x00" in text:
        raise InputError("the wallet setup file contains NUL bytes")
    return text.replace("\r\n", "\n")


def read_setup_files(files: Sequence[bytes], network: Network, tokens: Sequence[str] = ()) -> Draft:
    """Read one wallet setup file, or one BSMS key record per founder, into a :class:`Draft`.

    ``tokens`` decrypt encrypted BSMS records (each record with whichever token fits). Raises InputError
    for an unreadable or unsupported file, a key record whose signature is not its key's, a
    mix of formats, or several files that are not all key records.
    """
    if not files:
        raise InputError("no wallet setup file given")
    texts = [_text(data) for data in files]
    kinds = []
    for i, text in enumerate(texts):
        kind = detect_format(text)
        if kind == "bsms-encrypted":
            if not tokens:
                raise InputError("an encrypted BSMS record: give the session's token (--token HEX)")
            texts[i] = _decrypt_any(text, tokens)
            kind = detect_format(texts[i])
            if not kind.startswith("bsms"):
                raise InputError("the decrypted BSMS record is not a BSMS record")
        kinds.append(kind)
    if len(texts) > 1 and set(kinds) != {"bsms-key"}:
        raise InputError("several files are read only as BSMS key records, one per founder")
    if kinds[0] == "bsms-key":
        records = [read_bsms_key_record(text, network) for text in texts]
        for r in records:
            if not r.is_xpub:
                raise InputError(
                    f"the key record of {r.key[:24]}... carries a bare public key; custody derives "
                    "addresses from extended keys (xpub): ask the signer for its account xpub"
                )
        wanted = {t.strip().lower() for t in tokens}
        if wanted and any(r.token not in wanted for r in records):
            raise InputError("a key record's TOKEN is not one of this session's tokens")
        names = _names_for([r.key for r in records], [r.description for r in records], network)
        return Draft("bsms-key", None, None, tuple(names))
    text = texts[0]
    if kinds[0] == "bsms":
        return _bsms_descriptor_record(text, network)
    if kinds[0] in ("caravan", "specter"):
        doc = json.loads(text)
        return _caravan(doc, network) if kinds[0] == "caravan" else _specter(doc, network)
    if kinds[0] == "coldcard":
        return _coldcard(text, network)
    return _descriptors(text, network)


def _bip48_script_type(keys: Sequence[str], network: Network) -> ScriptType | None:
    """The script type every key's BIP-48 path names (``m/48'/coin'/account'/script'``), if they agree."""
    found = set()
    for key in keys:
        origin = parse_origin_xpub(key, network).origin
        path = origin.path if origin else ()
        if len(path) != 4 or path[0] != 48 + HARDENED:
            return None
        found.add({1 + HARDENED: ScriptType.P2SH_P2WSH, 2 + HARDENED: ScriptType.P2WSH}.get(path[3]))
    return found.pop() if len(found) == 1 else None


def policy_from_draft(
    draft: Draft, network: Network, threshold: int | None = None, script_type: ScriptType | None = None
) -> Policy:
    """The policy a setup file describes, on ``network``; ``threshold`` and ``script_type`` fill
    in what the file does not say (BSMS key records) and must agree with what it does say.

    Raises InputError for a disagreement, a missing threshold, a file of another network, a
    BSMS first address that is not the policy's first address, or anything make_policy refuses.
    """
    if draft.network is not None and draft.network != network.name:
        raise InputError(f"the file is for {draft.network[:20]!r}, the network given is {network.name}")
    if threshold is not None and draft.threshold is not None and threshold != draft.threshold:
        raise InputError(f"the file says threshold {draft.threshold}, --threshold says {threshold}")
    if script_type is not None and draft.script_type is not None and script_type != draft.script_type:
        raise InputError(f"the file says {draft.script_type.value}, --script says {script_type.value}")
    m = draft.threshold if draft.threshold is not None else threshold
    if m is None:
        raise InputError("the key records do not say how many signatures are needed: give --threshold M")
    st = draft.script_type or script_type or _bip48_script_type([k for _, k in draft.founders], network)
    if st is None:
        raise InputError("the key records do not say the script type: give --script")
    policy = make_policy(network, m, st, draft.founders)
    if draft.first_address is not None:
        ours = AddressDeriver(policy).derive(RECEIVE, 0).address
        if draft.first_address != ours:
            raise InputError(
                f"the BSMS record's first address {draft.first_address[:64]!r} is not the first address of "
                f"its descriptor on {network.name} ({ours}): refused"
            )
    return policy
