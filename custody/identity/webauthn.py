"""WebAuthn (FIDO2 security key) approvals: the credential a roster lists and the assertions it makes.

An employee may approve by signing the approval statement with a security key through a
browser. The founders' roster lists the key's credential (its id, its COSE public key, the
relying party id and the console's origin); the statement's digest is the WebAuthn
challenge. An assertion stands when, checked here exactly as the W3C WebAuthn Level 2
"verifying an authentication assertion" steps say:

* the client data (JSON) is of type ``webauthn.get``, its challenge is the statement's digest,
  its origin the credential's origin, and it is not cross-origin;
* the authenticator data's first 32 bytes are SHA-256 of the credential's relying party id;
  its flags say user present (UP) and user verified (UV: the key's PIN or biometrics, so a
  stolen key alone approves nothing);
* the signature (ES256: ECDSA P-256 with SHA-256, DER) verifies over
  ``authenticatorData || SHA-256(clientDataJSON)`` with the roster's public key.

P-256 is verified with ``cryptography`` (already a dependency) and the few CBOR items a COSE
key and a ``none`` attestation need are read by the small strict reader below: the offline
signer imports this module, and a hundred lines read at the trust boundary are easier to
audit than a general WebAuthn server library and its dependencies.

An approval made this way is stored like any other: its ``pubkey`` is the credential's
fingerprint (``webauthn:`` and base64url SHA-256 of the credential id) and its ``signature``
the assertion as canonical JSON of the three base64url fields.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from custody.errors import InputError
from custody.identity.statements import statement_digest

if TYPE_CHECKING:  # imported where a key is read: reading the halt state loads no cryptography
    from cryptography.hazmat.primitives.asymmetric import ec

PREFIX = "webauthn:"
ES256 = -7
MAX_CREDENTIAL_ID = 1023  # bytes (WebAuthn's own bound)
MAX_ASSERTION = 16 * 1024  # characters of the stored JSON
FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_AT = 0x40
FLAG_ED = 0x80
_RP_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, what: str) -> bytes:
    """Decode unpadded base64url. Raises InputError naming ``what``."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InputError(f"{what} is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---------------------------------------------------------------- CBOR, as little as a COSE key needs


def cbor_item(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Any, int]:
    """One CBOR item (RFC 8949) at ``pos``: unsigned and negative integers, byte and text strings,
    arrays, maps, false/true/null, definite lengths only. Returns (item, next position).
    Raises InputError for anything else or truncated input."""
    if depth > 8 or pos >= len(data):
        raise InputError("CBOR: truncated or too deeply nested")
    major, info = data[pos] >> 5, data[pos] & 0x1F
    pos += 1
    if major == 7:
        simple = {20: False, 21: True, 22: None}
        if info not in simple:
            raise InputError("CBOR: floats and other simple values are not expected here")
        return simple[info], pos
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise InputError("CBOR: truncated")
        arg, pos = int.from_bytes(data[pos : pos + size], "big"), pos + size
    else:
        raise InputError("CBOR: indefinite lengths are not expected here")
    return _cbor_body(data, pos, depth, major, arg)


def _cbor_body(data: bytes, pos: int, depth: int, major: int, arg: int) -> tuple[Any, int]:
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        if pos + arg > len(data):
            raise InputError("CBOR: truncated string")
        raw = data[pos : pos + arg]
        try:
            return (raw if major == 2 else raw.decode("utf-8")), pos + arg
        except UnicodeDecodeError:
            raise InputError("CBOR: text is not UTF-8") from None
    if major == 4:
        items = []
        for _ in range(arg):
            item, pos = cbor_item(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        out: dict[Any, Any] = {}
        for _ in range(arg):
            key, pos = cbor_item(data, pos, depth + 1)
            if not isinstance(key, int | str) or key in out:
                raise InputError("CBOR: a map key is repeated or not an integer or text")
            out[key], pos = cbor_item(data, pos, depth + 1)
        return out, pos
    raise InputError("CBOR: tags are not expected here")


def cose_es256_key(cose: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a COSE_Key (RFC 9053: kty 2 EC2, alg -7 ES256, crv 1 P-256).
    Raises InputError for any other key."""
    key, end = cbor_item(cose)
    if end != len(cose) or not isinstance(key, dict):
        raise InputError("the credential's public key is not one COSE key")
    if key.get(1) != 2 or key.get(3) != ES256 or key.get(-1) != 1:
        raise InputError("the credential's public key is not an ES256 (P-256) COSE key")
    x, y = key.get(-2), key.get(-3)
    if not isinstance(x, bytes) or not isinstance(y, bytes) or len(x) != 32 or len(y) != 32:
        raise InputError("the credential's COSE key has no 32-byte x and y")
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise InputError("the credential's public key is not a point on P-256") from None


# ---------------------------------------------------------------- the roster's credential


@dataclass(frozen=True)
class Credential:
    """A security key's credential as the founders' roster lists it."""

    id: str  # base64url credential id
    public_key: str  # hex COSE_Key
    rp_id: str  # the relying party id (the console's host name)
    origin: str  # the console's origin, exactly as the browser reports it

    @property
    def fingerprint(self) -> str:
        """What an approval names as its key: ``webauthn:`` + base64url SHA-256 of the credential id."""
        return PREFIX + b64url(hashlib.sha256(unb64url(self.id, "credential id")).digest())

    @property
    def point(self) -> bytes:
        """The public key's x and y (64 bytes): the security key itself, whatever credential id or
        CBOR encoding of its key a roster gives it. Raises InputError for a key that is not ES256."""
        key, _ = cbor_item(bytes.fromhex(self.public_key))
        x, y = key.get(-2) if isinstance(key, dict) else None, key.get(-3) if isinstance(key, dict) else None
        if not isinstance(x, bytes) or not isinstance(y, bytes):
            raise InputError("the credential's COSE key has no x and y")
        return x + y

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "public_key": self.public_key, "rp_id": self.rp_id, "origin": self.origin}


def check_origin(origin: object, rp_id: str) -> str:
    """An origin (``scheme://host[:port]``) whose host is ``rp_id`` or under it. Raises InputError."""
    if not isinstance(origin, str) or len(origin) > 256:
        raise InputError("a WebAuthn origin is scheme://host[:port]")
    parts = urlsplit(origin)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise InputError(f"bad WebAuthn origin {origin[:80]!r}: scheme://host[:port], nothing after")
    if parts.scheme == "http" and parts.hostname != "localhost":
        raise InputError("a WebAuthn origin is https (plain http only for localhost, as browsers allow)")
    host = parts.hostname
    if host != rp_id and not host.endswith("." + rp_id):
        raise InputError(f"the origin {origin} is not under the relying party id {rp_id}")
    return origin


def parse_credential(entry: object, where: str) -> Credential:
    """A roster's ``{id, public_key, rp_id, origin}``. Raises InputError naming ``where``."""
    if not isinstance(entry, dict) or set(entry) != {"id", "public_key", "rp_id", "origin"}:
        raise InputError(f"{where}: a WebAuthn credential is {{id, public_key, rp_id, origin}}")
    raw_id = unb64url(entry["id"], f"{where}: the credential id")
    if not 1 <= len(raw_id) <= MAX_CREDENTIAL_ID or b64url(raw_id) != entry["id"]:
        raise InputError(f"{where}: the credential id is 1 to {MAX_CREDENTIAL_ID} bytes, unpadded base64url")
    public_key = entry["public_key"]
    try:
        cose = bytes.fromhex(public_key) if isinstance(public_key, str) else b""
    except ValueError:
        cose = b""
    if not cose or cose.hex() != public_key:
        raise InputError(f"{where}: the credential's public_key is lower-case hex of a COSE key")
    cose_es256_key(cose)
    rp_id = entry["rp_id"]
    if not isinstance(rp_id, str) or not _RP_ID.fullmatch(rp_id):
        raise InputError(f"{where}: rp_id is a lower-case host name")
    return Credential(entry["id"], public_key, rp_id, check_origin(entry["origin"], rp_id))


# ---------------------------------------------------------------- assertions


@dataclass(frozen=True)
class Assertion:
    """What ``navigator.credentials.get`` returned, as stored with an approval."""

    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes

    def encode(self) -> str:
        return json.dumps(
            {
                "authenticator_data": b64url(self.authenticator_data),
                "client_data_json": b64url(self.client_data_json),
                "signature": b64url(self.signature),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def sign_count(self) -> int:
        return int.from_bytes(self.authenticator_data[33:37], "big")


def decode_assertion(text: str) -> Assertion:
    """The stored form back (see :meth:`Assertion.encode`). Raises InputError."""
    if not isinstance(text, str) or len(text) > MAX_ASSERTION:
        raise InputError("a WebAuthn assertion is a JSON object of at most 16 KiB")
    try:
        doc = json.loads(text)
    except ValueError:
        raise InputError("a WebAuthn assertion is JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"authenticator_data", "client_data_json", "signature"}:
        raise InputError("a WebAuthn assertion is {authenticator_data, client_data_json, signature}")
    return Assertion(
        unb64url(doc["authenticator_data"], "authenticator_data"),
        unb64url(doc["client_data_json"], "client_data_json"),
        unb64url(doc["signature"], "signature"),
    )


def _client_data(raw: bytes, kind: str, challenge: bytes | None, origin: str) -> str | None:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "its client data is not JSON"
    if not isinstance(data, dict):
        return "its client data is not a JSON object"
    if data.get("type") != kind:
        return f"its client data is of type {str(data.get('type'))[:40]!r}, not {kind}"
    if challenge is not None and data.get("challenge") != b64url(challenge):
        return "its challenge is not this statement's digest"
    if data.get("origin") != origin:
        return f"it was made at the origin {str(data.get('origin'))[:80]!r}, not the roster's {origin}"
    if data.get("crossOrigin") is True:
        return "it was made in a cross-origin frame"
    return None


def _authenticator_data(auth_data: bytes, rp_id: str) -> str | None:
    if len(auth_data) < 37:
        return "its authenticator data is shorter than 37 bytes"
    if auth_data[:32] != hashlib.sha256(rp_id.encode("ascii")).digest():
        return f"its authenticator data is for another relying party than {rp_id}"
    flags = auth_data[32]
    if not flags & FLAG_UP:
        return "the security key did not see the user present (UP flag)"
    if not flags & FLAG_UV:
        return "the security key did not verify the user (UV flag: PIN or biometrics)"
    return None


def assertion_problem(credential: Credential, text: str, challenge: bytes | None) -> str | None:
    """Why the stored assertion ``text`` is not ``credential``'s over ``challenge`` (None: it is;
    ``challenge`` None: over any challenge, as when reading the counters it already used)."""
    try:
        a = decode_assertion(text)
        key = cose_es256_key(bytes.fromhex(credential.public_key))
    except (InputError, ValueError) as exc:
        return f"the WebAuthn assertion is malformed: {exc}"
    problem = _client_data(a.client_data_json, "webauthn.get", challenge, credential.origin)
    problem = problem or _authenticator_data(a.authenticator_data, credential.rp_id)
    if problem:
        return f"the WebAuthn assertion does not stand: {problem}"
    signed = a.authenticator_data + hashlib.sha256(a.client_data_json).digest()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key.verify(a.signature, signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return "the WebAuthn assertion's signature does not verify with the roster's public key"
    return None


def signs_statement(credential: Credential, text: str, domain: str, fields: Sequence[object]) -> bool:
    """Whether ``text`` is ``credential``'s assertion over a custody statement (a halt, a lift):
    the statement's digest is the challenge, as for approvals."""
    return assertion_problem(credential, text, statement_digest(domain, fields)) is None


# ---------------------------------------------------------------- registration


def credential_from_registration(attestation_object: bytes, client_data_json: bytes, origin: str) -> Credential:
    """The credential a ``navigator.credentials.create`` made at ``origin`` (any attestation
    format: the founders' signature on the roster, not the key's maker, is what makes it
    trusted). Raises InputError."""
    rp_id = urlsplit(origin).hostname or ""
    problem = _client_data(client_data_json, "webauthn.create", None, origin)
    if problem:
        raise InputError(f"the registration is refused: {problem}")
    att, end = cbor_item(attestation_object)
    if end != len(attestation_object) or not isinstance(att, dict) or not isinstance(att.get("authData"), bytes):
        raise InputError("the attestation object is not a CBOR map with authData")
    auth_data: bytes = att["authData"]
    problem = _authenticator_data(auth_data, rp_id)
    if problem:
        raise InputError(f"the registration is refused: {problem}")
    if not auth_data[32] & FLAG_AT or len(auth_data) < 55:
        raise InputError("the registration carries no attested credential data")
    size = int.from_bytes(auth_data[53:55], "big")
    cred_id = auth_data[55 : 55 + size]
    if len(cred_id) != size or not 1 <= size <= MAX_CREDENTIAL_ID:
        raise InputError("the registration's credential id is truncated or too long")
    _, key_end = cbor_item(auth_data, 55 + size)
    cose = auth_data[55 + size : key_end]
    if key_end != len(auth_data) and not auth_data[32] & FLAG_ED:
        raise InputError("the registration's authenticator data has bytes after the public key")
    cose_es256_key(cose)
    return Credential(b64url(cred_id), cose.hex(), rp_id, origin)
