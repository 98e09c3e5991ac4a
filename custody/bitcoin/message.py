"""Bitcoin signed messages (BIP-137's "Bitcoin Signed Message" format, compressed keys).

Founders sign custody's documents (the founders' manifest, the employee roster) with the key
behind the xpub they published, in the format hardware signers and wallets already offer as
"sign message": a 65-byte recoverable signature, base64-encoded, over

    SHA256d( compact_size(24) "Bitcoin Signed Message:\\n" compact_size(len(m)) m )

The first byte is 31 + the recovery id (a compressed key, P2PKH header of BIP-137). Anyone
checks a signature with the public key alone: recover the key and compare.
"""

from __future__ import annotations

import base64
import binascii

import coincurve

from custody.bitcoin.encoding import ser_compact_size, sha256d

_MAGIC = b"Bitcoin Signed Message:\n"
_HEADER_COMPRESSED = 31  # 27 + 4: recovered key is compressed
MAX_MESSAGE = 4096


def message_hash(message: str) -> bytes:
    """The 32-byte digest a signed message commits to."""
    data = message.encode("utf-8")
    return sha256d(ser_compact_size(len(_MAGIC)) + _MAGIC + ser_compact_size(len(data)) + data)


def sign_message(private_key: coincurve.PrivateKey, message: str) -> str:
    """Base64 of the 65-byte recoverable signature (RFC 6979 nonce) of ``message``."""
    sig = private_key.sign_recoverable(message_hash(message), hasher=None)  # r || s || recid
    return base64.b64encode(bytes([_HEADER_COMPRESSED + sig[64]]) + sig[:64]).decode("ascii")


def recover_pubkey(message: str, signature: str) -> bytes | None:
    """The compressed public key that made ``signature`` over ``message``, or None when the
    signature is malformed (not base64, not 65 bytes, not a compressed-key header, no key)."""
    if not isinstance(signature, str) or len(signature) > 100 or len(message) > MAX_MESSAGE:
        return None
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if len(raw) != 65 or not _HEADER_COMPRESSED <= raw[0] <= _HEADER_COMPRESSED + 3:
        return None
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            raw[1:] + bytes([raw[0] - _HEADER_COMPRESSED]), message_hash(message), hasher=None
        )
    except (ValueError, TypeError):
        return None
    return bytes(key.format(compressed=True))


def verify_message(pubkey: bytes, message: str, signature: str) -> bool:
    """True when ``signature`` is ``pubkey``'s (compressed, 33 bytes) signature of ``message``."""
    return recover_pubkey(message, signature) == bytes(pubkey)
