"""Extended keys (BIP-32): parsing, validation, serialization and derivation.

All elliptic-curve work goes through coincurve (libsecp256k1). Hashing uses hashlib,
never python-bitcoinlib's pure-Python RIPEMD160.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

import coincurve
from bitcoin.base58 import Base58Error
from bitcoin.base58 import decode as b58decode
from bitcoin.base58 import encode as b58encode
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT

from custody.bitcoin.encoding import SECP256K1_ORDER, hash160, sha256d
from custody.bitcoin.network import NETWORKS, Network
from custody.errors import InputError

_CTX = GLOBAL_CONTEXT.ctx
_COMPRESSED = _lib.SECP256K1_EC_COMPRESSED

HARDENED = 0x80000000


def b58check_encode(payload: bytes) -> str:
    checksum = sha256d(payload)[:4]
    return str(b58encode(payload + checksum))


def b58check_decode(text: str) -> bytes:
    try:
        raw = bytes(b58decode(text))
    except (Base58Error, ValueError) as exc:
        raise InputError(f"not a base58 string: {exc}") from None
    if len(raw) < 5:
        raise InputError("base58 string too short")
    payload, checksum = raw[:-4], raw[-4:]
    if sha256d(payload)[:4] != checksum:
        raise InputError("bad base58 checksum (mistyped key?)")
    return payload


# ---------------------------------------------------------------- key origin / paths


@dataclass(frozen=True)
class KeyOrigin:
    """Where an extended key sits below its master: ``[fingerprint/path]``."""

    fingerprint: bytes  # 4 bytes: hash160 of the master public key, first four bytes
    path: tuple[int, ...]

    def __str__(self) -> str:
        return "[" + "/".join([self.fingerprint.hex(), *map(format_step, self.path)]) + "]"


def format_step(step: int) -> str:
    """One path step as written in descriptors: ``48'`` for hardened, ``0`` otherwise."""
    return f"{step - HARDENED}'" if step >= HARDENED else str(step)


def format_path(path: tuple[int, ...]) -> str:
    """``m/48'/1'/0'/2'`` for a path tuple."""
    return "/".join(["m", *map(format_step, path)])


def parse_path(text: str) -> tuple[int, ...]:
    """Parse ``m/48'/1'/0h/2H`` (the ``m/`` is optional) into a path tuple.

    Raises InputError on a malformed step or one out of range.
    """
    parts = text.strip().split("/")
    if parts and parts[0] in ("m", ""):
        parts = parts[1:]
    path: list[int] = []
    for part in parts:
        m = re.fullmatch(r"(\d{1,10})(['hH]?)", part)
        if not m:
            raise InputError(f"bad derivation step {part!r} in path {text!r}")
        value = int(m.group(1))
        if value >= HARDENED:
            raise InputError(f"derivation step {part!r} out of range")
        path.append(value + HARDENED if m.group(2) else value)
    return tuple(path)


# BIP-380: a key origin marks hardened steps with ' or h only ("0H" is invalid there).
_ORIGIN_RE = re.compile(r"^\[([0-9a-fA-F]{8})((?:/[0-9]+['h]?)*)\](.+)$")


def split_origin(text: str) -> tuple[KeyOrigin | None, str]:
    """Split ``[fp/path]key`` into its origin (or None) and the key text.

    Raises InputError on a malformed origin.
    """
    text = text.strip()
    if not text.startswith("["):
        return None, text
    m = _ORIGIN_RE.match(text)
    if not m:
        raise InputError(f"malformed key origin in {text[:40]!r}: expected [fingerprint/path]key")
    return KeyOrigin(bytes.fromhex(m.group(1)), parse_path(m.group(2) or "")), m.group(3)


# ---------------------------------------------------------------- extended keys


@dataclass(frozen=True)
class ExtendedPublicKey:
    """A BIP-32 extended public key on one network."""

    network: Network
    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    public_key: bytes  # 33 bytes, compressed

    @property
    def fingerprint(self) -> bytes:
        return hash160(self.public_key)[:4]

    def serialize(self) -> str:
        """The base58check ``xpub``/``tpub`` string."""
        return b58check_encode(
            self.network.xpub_version
            + bytes([self.depth])
            + self.parent_fingerprint
            + self.child_number.to_bytes(4, "big")
            + self.chain_code
            + self.public_key
        )

    def __str__(self) -> str:
        return self.serialize()

    def child(self, index: int) -> ExtendedPublicKey:
        """CKDpub: the non-hardened child ``index``.

        Raises InputError for a hardened index or the (astronomically rare) invalid child.
        """
        if not 0 <= index < HARDENED:
            raise InputError(f"cannot derive hardened or out-of-range index {index} from a public key")
        child_pub, chain_code = _ckd_pub(self.public_key, self.chain_code, index)
        return ExtendedPublicKey(self.network, self.depth + 1, self.fingerprint, index, chain_code, child_pub)

    def derive(self, path: tuple[int, ...]) -> ExtendedPublicKey:
        key = self
        for step in path:
            key = key.child(step)
        return key

    def identity(self) -> tuple[bytes, bytes]:
        """What makes two extended keys the same key: public key and chain code."""
        return (self.public_key, self.chain_code)


def _ckd_pub(parent_pub: bytes, chain_code: bytes, index: int) -> tuple[bytes, bytes]:
    digest = hmac.digest(chain_code, parent_pub + index.to_bytes(4, "big"), "sha512")
    il, ir = digest[:32], digest[32:]
    if int.from_bytes(il, "big") >= SECP256K1_ORDER:
        raise InputError(f"invalid child at index {index}; use the next index")
    try:
        child = coincurve.PublicKey(parent_pub).add(il)
    except ValueError:
        raise InputError(f"invalid child at index {index}; use the next index") from None
    return child.format(compressed=True), ir


class ParentKey:
    """A parent public key parsed once, for deriving many non-hardened children.

    The hot path of address issuance: per child one HMAC-SHA512, one fixed-base
    multiplication and one point addition in libsecp256k1 (through coincurve's bindings,
    skipping its per-call object overhead; parsing a compressed key costs a square root,
    so the parent is parsed only here).
    """

    def __init__(self, public_key: bytes, chain_code: bytes) -> None:
        self.public_key = public_key
        self.chain_code = chain_code
        self._point = _ffi.new("secp256k1_pubkey *")
        if not _lib.secp256k1_ec_pubkey_parse(_CTX, self._point, public_key, len(public_key)):
            raise InputError("invalid public key")

    def child(self, index: int) -> bytes:
        """The compressed public key of non-hardened child ``index``.

        Raises InputError for the (astronomically rare) invalid child.
        """
        digest = hmac.digest(self.chain_code, self.public_key + index.to_bytes(4, "big"), "sha512")
        # child = parent + I_L*G. I_L*G uses libsecp256k1's precomputed generator table, which
        # with one point addition is faster than the variable-base ecmult of tweak_add.
        # pubkey_create refuses I_L = 0 or >= n, combine refuses the point at infinity.
        tweak = _ffi.new("secp256k1_pubkey *")
        point = _ffi.new("secp256k1_pubkey *")
        if not (
            _lib.secp256k1_ec_pubkey_create(_CTX, tweak, digest[:32])
            and _lib.secp256k1_ec_pubkey_combine(
                _CTX, point, _ffi.new("secp256k1_pubkey *[2]", [self._point, tweak]), 2
            )
        ):
            raise InputError(f"invalid child at index {index}; use the next index")
        out = _ffi.new("unsigned char[33]")
        size = _ffi.new("size_t *", 33)
        _lib.secp256k1_ec_pubkey_serialize(_CTX, out, size, point, _COMPRESSED)
        return bytes(out)


@dataclass(frozen=True)
class ExtendedPrivateKey:
    """A BIP-32 extended private key. Never stored in the database or logged."""

    network: Network
    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    secret: bytes  # 32 bytes

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"ExtendedPrivateKey(network={self.network.name}, depth={self.depth}, <secret>)"

    __str__ = __repr__

    @classmethod
    def from_seed(cls, seed: bytes, network: Network) -> ExtendedPrivateKey:
        """The BIP-32 master key of ``seed`` (16 to 64 bytes).

        Raises InputError for a seed of the wrong length or an invalid master key.
        """
        if not 16 <= len(seed) <= 64:
            raise InputError("a BIP-32 seed is 16 to 64 bytes")
        digest = hmac.digest(b"Bitcoin seed", seed, "sha512")
        secret = digest[:32]
        if not 0 < int.from_bytes(secret, "big") < SECP256K1_ORDER:
            raise InputError("seed gives an invalid master key; use another seed")
        return cls(network, 0, b"\x00" * 4, 0, digest[32:], secret)

    @property
    def public_key(self) -> bytes:
        return coincurve.PrivateKey(self.secret).public_key.format(compressed=True)

    @property
    def fingerprint(self) -> bytes:
        return hash160(self.public_key)[:4]

    def private_key(self) -> coincurve.PrivateKey:
        return coincurve.PrivateKey(self.secret)

    def neuter(self) -> ExtendedPublicKey:
        return ExtendedPublicKey(
            self.network,
            self.depth,
            self.parent_fingerprint,
            self.child_number,
            self.chain_code,
            self.public_key,
        )

    def child(self, index: int) -> ExtendedPrivateKey:
        """CKDpriv: child ``index`` (hardened when index >= 2**31)."""
        if not 0 <= index <= 0xFFFFFFFF:
            raise InputError(f"index {index} out of range")
        if index >= HARDENED:
            data = b"\x00" + self.secret + index.to_bytes(4, "big")
        else:
            data = self.public_key + index.to_bytes(4, "big")
        digest = hmac.digest(self.chain_code, data, "sha512")
        il = int.from_bytes(digest[:32], "big")
        secret = (il + int.from_bytes(self.secret, "big")) % SECP256K1_ORDER
        if il >= SECP256K1_ORDER or secret == 0:
            raise InputError(f"invalid child at index {index}; use the next index")
        return ExtendedPrivateKey(
            self.network,
            self.depth + 1,
            self.fingerprint,
            index,
            digest[32:],
            secret.to_bytes(32, "big"),
        )

    def derive(self, path: tuple[int, ...]) -> ExtendedPrivateKey:
        key = self
        for step in path:
            key = key.child(step)
        return key

    def serialize(self) -> str:
        """The base58check ``xprv``/``tprv`` string (for tests against BIP-32 vectors)."""
        return b58check_encode(
            self.network.xprv_version
            + bytes([self.depth])
            + self.parent_fingerprint
            + self.child_number.to_bytes(4, "big")
            + self.chain_code
            + b"\x00"
            + self.secret
        )


def _network_of_version(version: bytes, private: bool) -> list[Network]:
    return [n for n in NETWORKS.values() if (n.xprv_version if private else n.xpub_version) == version]


def _check_header(payload: bytes) -> tuple[int, bytes, int]:
    depth = payload[4]
    parent = payload[5:9]
    child_number = int.from_bytes(payload[9:13], "big")
    if depth == 0 and (parent != b"\x00" * 4 or child_number != 0):
        raise InputError("invalid extended key: depth 0 with a parent fingerprint or index")
    return depth, parent, child_number


def parse_xpub(text: str, network: Network) -> ExtendedPublicKey:
    """Parse an extended public key of ``network`` (no key origin).

    Raises InputError for a bad checksum, a private key, a key of another network, an
    invalid point or a malformed header.
    """
    payload = b58check_decode(text.strip())
    if len(payload) != 78:
        raise InputError(f"an extended key is 78 bytes, this one is {len(payload)}")
    version = payload[:4]
    if _network_of_version(version, private=True):
        raise InputError("this is a private extended key (xprv/tprv); give the public one (xpub/tpub)")
    owners = _network_of_version(version, private=False)
    if not owners:
        raise InputError(f"unknown extended key version {version.hex()}")
    if network not in owners:
        kind = "mainnet" if owners[0].name == "mainnet" else "test-network"
        raise InputError(f"xpub of another network: this is a {kind} key, the network is {network.name}")
    depth, parent, child_number = _check_header(payload)
    key = payload[45:78]
    if key[0] not in (2, 3):
        raise InputError("invalid public key in extended key: not a compressed point")
    try:
        coincurve.PublicKey(key)
    except ValueError:
        raise InputError("invalid public key in extended key: not on the curve") from None
    return ExtendedPublicKey(network, depth, parent, child_number, payload[13:45], key)


def parse_xprv(text: str, network: Network) -> ExtendedPrivateKey:
    """Parse an extended private key of ``network``.

    Raises InputError as :func:`parse_xpub` does, and for a public key given instead.
    """
    payload = b58check_decode(text.strip())
    if len(payload) != 78:
        raise InputError(f"an extended key is 78 bytes, this one is {len(payload)}")
    version = payload[:4]
    owners = _network_of_version(version, private=True)
    if not owners:
        if _network_of_version(version, private=False):
            raise InputError("this is a public extended key; a private one is needed")
        raise InputError(f"unknown extended key version {version.hex()}")
    if network not in owners:
        raise InputError(f"extended private key of another network than {network.name}")
    depth, parent, child_number = _check_header(payload)
    if payload[45] != 0:
        raise InputError("invalid private key in extended key: missing 0x00 prefix")
    secret = payload[46:78]
    if not 0 < int.from_bytes(secret, "big") < SECP256K1_ORDER:
        raise InputError("invalid private key in extended key: out of range")
    return ExtendedPrivateKey(network, depth, parent, child_number, payload[13:45], secret)


@dataclass(frozen=True)
class OriginKey:
    """An extended public key with its optional key origin, as written in descriptors."""

    origin: KeyOrigin | None
    xpub: ExtendedPublicKey

    def __str__(self) -> str:
        return (str(self.origin) if self.origin else "") + self.xpub.serialize()


def parse_origin_xpub(text: str, network: Network) -> OriginKey:
    """Parse ``[fingerprint/path]xpub`` (origin optional).

    Raises InputError on a malformed origin or key, or when the origin's path length
    disagrees with the key's depth.
    """
    origin, key_text = split_origin(text)
    xpub = parse_xpub(key_text, network)
    if origin is not None and len(origin.path) != xpub.depth:
        raise InputError(f"key origin has {len(origin.path)} steps but the key's depth is {xpub.depth}")
    return OriginKey(origin, xpub)


def bip48_path(network: Network, script_type_index: int, account: int = 0) -> tuple[int, ...]:
    """``m/48'/coin'/account'/script'`` (BIP-48): script 1' is p2sh-p2wsh, 2' is p2wsh."""
    return (
        48 + HARDENED,
        network.coin_type + HARDENED,
        account + HARDENED,
        script_type_index + HARDENED,
    )
