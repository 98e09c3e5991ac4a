"""Withdrawal destinations: a customer's address string to the scriptPubKey we pay.

Supported kinds (each with its scriptPubKey layout)::

    p2pkh   OP_DUP OP_HASH160 <20-byte hash> OP_EQUALVERIFY OP_CHECKSIG   base58, p2pkh_version
    p2sh    OP_HASH160 <20-byte hash> OP_EQUAL                            base58, p2sh_version
    p2wpkh  OP_0 <20-byte program>                                        bech32  (BIP-173)
    p2wsh   OP_0 <32-byte program>                                        bech32  (BIP-173)
    p2tr    OP_1 <32-byte program>                                        bech32m (BIP-350)

Anything else that is a valid address (future witness versions or lengths) is refused as
unsupported: a withdrawal must go to a script we know how to value and spend to.
"""

from __future__ import annotations

from dataclasses import dataclass

from custody.bitcoin.bech32 import decode_segwit, encode_segwit
from custody.bitcoin.encoding import compact_size_len
from custody.bitcoin.keys import b58check_decode, b58check_encode
from custody.bitcoin.network import NETWORKS, Network
from custody.errors import InputError

OP_0 = 0x00
OP_1 = 0x51
OP_16 = 0x60
OP_DUP = 0x76
OP_EQUAL = 0x87
OP_EQUALVERIFY = 0x88
OP_HASH160 = 0xA9
OP_CHECKSIG = 0xAC
OP_RETURN = 0x6A

MAX_SCRIPT_SIZE = 10_000
DUST_RELAY_FEE = 3_000
"""Bitcoin Core's default -dustrelayfee, in sat/kvB (3 sat/vB)."""


@dataclass(frozen=True)
class Destination:
    """A parsed withdrawal destination.

    ``address`` is the normalized form (whitespace stripped, segwit lower case);
    ``kind`` is one of p2pkh, p2sh, p2wpkh, p2wsh, p2tr.
    """

    address: str
    script_pubkey: bytes
    kind: str


def parse_destination(address: str, network: Network) -> Destination:
    """Parse ``address`` as a destination on ``network``.

    Raises InputError naming what is wrong: empty, mixed case, mistyped (bad checksum),
    another network's address, or a valid address of an unsupported kind.
    """
    text = address.strip()
    if not text:
        raise InputError("destination address is empty")
    if not text.isascii() or not text.isprintable():
        raise InputError(f"destination {text!r} has characters no address contains")
    hrp = _segwit_hrp(text)
    if hrp is not None:
        return _parse_segwit(text, hrp, network)
    return _parse_base58(text, network)


def _segwit_hrp(text: str) -> str | None:
    """The known human-readable part ``text`` starts with, if it looks like a segwit address."""
    lowered = text.lower()
    pos = lowered.rfind("1")
    if pos < 1:
        return None
    hrp = lowered[:pos]
    # A known prefix: a segwit address, or a mistyped one the decoder will name the fault of.
    # (No base58 address starts with one: their first characters are 1, 3, m, n or 2.)
    return hrp if hrp in {n.bech32_hrp for n in NETWORKS.values()} else None


def _parse_segwit(text: str, hrp: str, network: Network) -> Destination:
    # Decode with the prefix the address carries, so that a mistyped address (checksum)
    # is told apart from a correct one of another network.
    version, program = decode_segwit(hrp, text)
    if hrp != network.bech32_hrp:
        raise InputError(f"address {text} is for another network ({_networks_with_hrp(hrp)}), not {network.name}")
    if version == 0 and len(program) == 20:
        kind = "p2wpkh"
    elif version == 0 and len(program) == 32:
        kind = "p2wsh"
    elif version == 1 and len(program) == 32:
        kind = "p2tr"
    else:
        raise InputError(
            f"unsupported destination {text}: witness version {version} with a {len(program)}-byte program "
            "(supported: p2pkh, p2sh, p2wpkh, p2wsh, p2tr)"
        )
    # OP_n <program>: witness version as OP_0 or OP_1..OP_16, then a direct push.
    script = bytes([OP_0 if version == 0 else OP_1 + version - 1, len(program)]) + program
    return Destination(text.lower(), script, kind)


def _parse_base58(text: str, network: Network) -> Destination:
    try:
        payload = b58check_decode(text)
    except InputError as e:
        if "checksum" in str(e):
            raise InputError(f"address {text} has a bad checksum (mistyped address?)") from None
        raise InputError(f"{text!r} is not a bitcoin address") from None
    if len(payload) != 21:
        raise InputError(f"{text!r} is not an address: a base58 address holds 21 bytes, not {len(payload)}")
    version, digest = payload[0], payload[1:]
    if version == network.p2pkh_version:
        # OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG
        script = bytes([OP_DUP, OP_HASH160, 20]) + digest + bytes([OP_EQUALVERIFY, OP_CHECKSIG])
        return Destination(text, script, "p2pkh")
    if version == network.p2sh_version:
        # OP_HASH160 <20> OP_EQUAL
        return Destination(text, bytes([OP_HASH160, 20]) + digest + bytes([OP_EQUAL]), "p2sh")
    others = [n.name for n in NETWORKS.values() if version in (n.p2pkh_version, n.p2sh_version)]
    if others:
        raise InputError(f"address {text} is for another network ({' or '.join(others)}), not {network.name}")
    raise InputError(f"unsupported destination {text}: unknown base58 version byte 0x{version:02x}")


def _networks_with_hrp(hrp: str) -> str:
    return " or ".join(n.name for n in NETWORKS.values() if n.bech32_hrp == hrp)


def _witness_program(script: bytes) -> bool:
    """Core's CScript::IsWitnessProgram: OP_0 or OP_1..OP_16, then one push of 2..40 bytes."""
    if not 4 <= len(script) <= 42:
        return False
    if script[0] != OP_0 and not OP_1 <= script[0] <= OP_16:
        return False
    return script[1] + 2 == len(script)


def dust_limit(script_pubkey: bytes) -> int:
    """The smallest output value to ``script_pubkey`` that nodes relay, in satoshis.

    Bitcoin Core's GetDustThreshold (src/policy/policy.cpp) at the default dust relay fee
    of 3,000 sat/kvB::

        size  = serialized output: 8 (value) + compact size + len(scriptPubKey)
        size += 32 + 4 + 1 + 107 / 4 + 4     for a witness program (input, 75% discount)
        size += 32 + 4 + 1 + 107 + 4         otherwise (the spending input, 148 bytes)
        dust  = 3000 * size / 1000           (CFeeRate::GetFee)

    which gives 546 (p2pkh), 540 (p2sh), 294 (p2wpkh), 330 (p2wsh, p2tr). An unspendable
    script (OP_RETURN, or above 10,000 bytes) has no dust limit: 0.
    """
    if (script_pubkey and script_pubkey[0] == OP_RETURN) or len(script_pubkey) > MAX_SCRIPT_SIZE:
        return 0
    size = 8 + compact_size_len(len(script_pubkey)) + len(script_pubkey)
    if _witness_program(script_pubkey):
        size += 32 + 4 + 1 + 107 // 4 + 4
    else:
        size += 32 + 4 + 1 + 107 + 4
    return DUST_RELAY_FEE * size // 1000


def address_of(script_pubkey: bytes, network: Network) -> str | None:
    """The address a person reads for ``script_pubkey`` on ``network``, or None when it has none
    (an OP_RETURN, a bare script). Layouts:

    * p2pkh ``OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG``, p2sh ``OP_HASH160 <20> OP_EQUAL``: base58check
    * witness ``OP_n <2..40 bytes>``: bech32 (v0) or bech32m (v1+)
    """
    spk = bytes(script_pubkey)
    if len(spk) == 25 and spk[:3] == b"\x76\xa9\x14" and spk[23:] == b"\x88\xac":
        return b58check_encode(bytes([network.p2pkh_version]) + spk[3:23])
    if len(spk) == 23 and spk[:2] == b"\xa9\x14" and spk[22] == 0x87:
        return b58check_encode(bytes([network.p2sh_version]) + spk[2:22])
    if _witness_program(spk):
        version = 0 if spk[0] == OP_0 else spk[0] - OP_1 + 1
        if version == 0 and len(spk) not in (22, 34):
            return None
        return encode_segwit(network.bech32_hrp, version, spk[2:])
    return None
