"""Employee signatures over custody statements (approvals, halts, lifts).

A statement is a domain tag and a list of fields; its digest is SHA-256 of their canonical
JSON, so a signature for one purpose can never be replayed for another. Signatures are
low-S, DER-encoded ECDSA over secp256k1: made by an employee key wherever it lives (a key
file, deterministic RFC 6979 with coincurve, or a PKCS#11 token; see custody.identity.employee_keys)
and always verified with coincurve.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import coincurve

from custody.errors import InputError
from custody.identity.employee_keys import DigestSigner, EmployeeSigner


def statement_digest(domain: str, fields: Sequence[object]) -> bytes:
    body = json.dumps([domain, *fields], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).digest()


def sign_statement(key: EmployeeSigner | DigestSigner, domain: str, fields: Sequence[object]) -> str:
    """Hex DER, low-S signature of the statement.

    ``key`` is an EmployeeSigner (key file or token) or anything with coincurve.PrivateKey's
    ``sign(digest, hasher=None)`` (a coincurve key, or an EmployeeSigner's ``private_key``).
    Raises KeyFileError when a token fails.
    """
    digest = statement_digest(domain, fields)
    if isinstance(key, EmployeeSigner):
        return bytes(key.sign_digest(digest)).hex()
    return bytes(key.sign(digest, hasher=None)).hex()


def verify_statement(pubkey_hex: str, signature_hex: str, domain: str, fields: Sequence[object]) -> bool:
    """True when ``signature_hex`` is the key's valid signature of the statement."""
    try:
        public = coincurve.PublicKey(bytes.fromhex(pubkey_hex))
        return bool(public.verify(bytes.fromhex(signature_hex), statement_digest(domain, fields), hasher=None))
    except (ValueError, TypeError):
        return False


def parse_pubkey(text: str) -> str:
    """Validate a compressed secp256k1 public key in hex; return it lower-case.

    Raises InputError.
    """
    text = text.strip().lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InputError("public key is not hex") from None
    if len(raw) != 33 or raw[0] not in (2, 3):
        raise InputError("public key must be a 33-byte compressed secp256k1 key (02/03...)")
    try:
        coincurve.PublicKey(raw)
    except ValueError:
        raise InputError("public key is not a point on secp256k1") from None
    return text
