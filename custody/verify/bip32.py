"""BIP-32 extended public keys and public child derivation (CKDpub) with libsecp256k1.

Two implementations of CKDpub: ``ckd_pub`` over coincurve's public API, used for the few
account-to-chain steps and as the reference, and ``ChildDeriver`` over coincurve's cffi
binding of libsecp256k1 (no Python object per point), the per-address fast path that
derives all founders' children at one index in one call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey

from .base58 import b58check_decode
from .errors import DecodeError
from .networks import PRIVATE_VERSIONS, PUBLIC_VERSIONS

HARDENED = 0x80000000


def hash160(data: bytes) -> bytes:
    """RIPEMD160(SHA256(data))."""
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


@dataclass(frozen=True)
class ExtendedPublicKey:
    """A decoded BIP-32 extended public key (78 bytes serialized)."""

    version: bytes
    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    key: bytes

    @property
    def fingerprint(self) -> bytes:
        """The first four bytes of HASH160 of the public key."""
        return hash160(self.key)[:4]


def parse_extended_public_key(text: str) -> ExtendedPublicKey:
    """Decode and validate a base58check extended public key (xpub or tpub).

    Raises DecodeError with the reason: bad checksum or character, wrong length, a private
    key (xprv/tprv; the key itself is never repeated in the message), unknown version,
    invalid public key (prefix, not on the curve), zero depth with a parent or index.
    """
    payload = b58check_decode(text)
    if len(payload) != 78:
        raise DecodeError(f"extended key is {len(payload)} bytes, expected 78")
    version = payload[0:4]
    depth = payload[4]
    parent = payload[5:9]
    child = int.from_bytes(payload[9:13], "big")
    chain_code = payload[13:45]
    key = payload[45:78]
    if version in PRIVATE_VERSIONS:
        raise DecodeError(
            f"this is a private extended key ({PRIVATE_VERSIONS[version]}); only public keys (xpub/tpub) may be given"
        )
    if version not in PUBLIC_VERSIONS:
        raise DecodeError(f"unknown extended key version {version.hex()}")
    if key[0] == 0:
        raise DecodeError("public key version with private key data (pubkey version / prvkey)")
    if key[0] not in (2, 3):
        raise DecodeError(f"invalid public key prefix {key[0]:02x}")
    try:
        PublicKey(key)
    except ValueError:
        raise DecodeError(f"invalid public key {key.hex()} (not on the curve)") from None
    if depth == 0 and parent != bytes(4):
        raise DecodeError("zero depth with non-zero parent fingerprint")
    if depth == 0 and child != 0:
        raise DecodeError("zero depth with non-zero index")
    return ExtendedPublicKey(version, depth, parent, child, chain_code, key)


class InvalidChild(ValueError):
    """BIP-32 has no child at this index (I_L >= n or the point at infinity): skip it."""


def ckd_pub(key: bytes, chain_code: bytes, index: int) -> tuple[bytes, bytes]:
    """CKDpub: the non-hardened child ``index`` as (compressed key, chain code).

    Raises ValueError for a hardened or negative index, InvalidChild when BIP-32 says the
    index yields no key.
    """
    if not 0 <= index < HARDENED:
        raise ValueError(f"index {index} is not a non-hardened index")
    digest = hmac.digest(chain_code, key + index.to_bytes(4, "big"), "sha512")
    try:
        child = PublicKey(key).add(digest[:32])
    except ValueError:
        raise InvalidChild(f"no child key at index {index}") from None
    return child.format(compressed=True), digest[32:]


try:  # coincurve's cffi binding; fall back to the public API if a release moves it.
    from coincurve._libsecp256k1 import ffi as _ffi
    from coincurve._libsecp256k1 import lib as _lib
    from coincurve.context import GLOBAL_CONTEXT as _GLOBAL_CONTEXT

    _FAST = True
    _COMPRESSED = _lib.SECP256K1_EC_COMPRESSED
except ImportError:  # pragma: no cover - depends on the coincurve release
    _FAST = False


class ChildDeriver:
    """Derives, for one index at a time, the non-hardened children of several parent keys.

    Holds libsecp256k1's parsed form of each parent. A child costs one HMAC-SHA512, one
    generator multiplication (``pubkey_create`` of I_L: the BIP-32 check I_L < n comes
    with it), one point addition (``pubkey_combine``) and one serialization; this is about
    a quarter faster than ``pubkey_tweak_add``, whose double-scalar multiplication also
    walks the parent's (trivial) scalar. Not thread-safe: it reuses its buffers.
    """

    def __init__(self, parents: Sequence[tuple[bytes, bytes]]) -> None:
        """``parents``: (compressed key, chain code) pairs. Raises ValueError on a bad key."""
        for key, chain_code in parents:
            if len(key) != 33 or len(chain_code) != 32:
                raise ValueError("a parent is a 33-byte compressed key and a 32-byte chain code")
            PublicKey(key)
        self._parents = [(bytes(k), bytes(c)) for k, c in parents]
        if _FAST:
            self._ctx: Any = _GLOBAL_CONTEXT.ctx
            self._pairs: list[Any] = []
            self._tweak_point: Any = _ffi.new("secp256k1_pubkey *")
            for key, _ in self._parents:
                parsed = _ffi.new("secp256k1_pubkey *")
                if not _lib.secp256k1_ec_pubkey_parse(self._ctx, parsed, key, 33):
                    raise ValueError("invalid parent key")  # pragma: no cover - checked above
                pair = _ffi.new("secp256k1_pubkey *[2]")
                pair[0] = self._tweak_point
                pair[1] = parsed
                self._pairs.append((pair, parsed))
            self._sum: Any = _ffi.new("secp256k1_pubkey *")
            self._out: Any = _ffi.new("unsigned char[33]")
            self._outlen: Any = _ffi.new("size_t *")
            self._buffer: Any = _ffi.buffer(self._out)
            self._jobs = [
                (key, chain_code, pair) for (key, chain_code), (pair, _) in zip(self._parents, self._pairs, strict=True)
            ]

    def children(self, index: int) -> list[bytes] | None:
        """The compressed child keys at non-hardened ``index`` (0 <= index < 2**31, not
        checked), one per parent in order; None if BIP-32 says one of them has no key there."""
        if not _FAST:  # pragma: no cover
            return self._children_slow(index)
        ser = index.to_bytes(4, "big")
        ctx = self._ctx
        create = _lib.secp256k1_ec_pubkey_create
        combine = _lib.secp256k1_ec_pubkey_combine
        serialize = _lib.secp256k1_ec_pubkey_serialize
        tweak_point, total, out, outlen, buffer = (
            self._tweak_point,
            self._sum,
            self._out,
            self._outlen,
            self._buffer,
        )
        keys: list[bytes] = []
        for key, chain_code, pair in self._jobs:
            digest = hmac.digest(chain_code, key + ser, "sha512")
            # I_L * G (fails if I_L is 0 or >= n), then + K_par (fails at infinity).
            if not create(ctx, tweak_point, digest[:32]) or not combine(ctx, total, pair, 2):
                return self._children_slow(index)
            outlen[0] = 33
            serialize(ctx, out, outlen, total, _COMPRESSED)
            keys.append(buffer[:])
        return keys

    def _children_slow(self, index: int) -> list[bytes] | None:
        # coincurve's API: also the path for I_L == 0, which BIP-32 allows (child = parent).
        keys = []
        for key, chain_code in self._parents:
            try:
                keys.append(ckd_pub(key, chain_code, index)[0])
            except InvalidChild:
                return None
        return keys

    def child_key(self, index: int) -> bytes | None:
        """The child of the first parent at ``index``, or None (see ``children``)."""
        keys = self.children(index)
        return keys[0] if keys is not None else None
