"""The WebAuthn verifier without a browser: every check of an assertion refuses its own
breakage, hostile bytes only ever give InputError, and the roster keeps security keys.

Assertions here are made with ``cryptography``'s P-256 signer the way an authenticator makes
them (authenticator data, client data JSON, a DER signature over both); the browser-made ones
are in tests/test_console.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import coincurve
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from custody.control.roster import Change, _apply_change
from custody.errors import InputError
from custody.identity.roster import Employee, check_employees, parse_roster
from custody.identity.webauthn import (
    FLAG_UP,
    FLAG_UV,
    Assertion,
    Credential,
    assertion_problem,
    b64url,
    cbor_item,
    credential_from_registration,
    decode_assertion,
    parse_credential,
)

ORIGIN = "https://custody.example"
RP_ID = "custody.example"
CHALLENGE = hashlib.sha256(b"a statement").digest()


def _cose(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The COSE_Key of ``key`` in CBOR, written out byte by byte (RFC 9053's EC2 example layout)."""
    n = key.public_key().public_numbers()
    x, y = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
    # map(5): 1:2, 3:-7, -1:1, -2:bstr(32), -3:bstr(32)
    return b"\xa5\x01\x02\x03\x26\x20\x01\x21\x58\x20" + x + b"\x22\x58\x20" + y


class Key:
    """A security key made in software: the assertions an authenticator makes, byte for byte."""

    def __init__(self, rp_id: str = RP_ID, origin: str = ORIGIN, name: bytes = b"credential-1") -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.credential = Credential(b64url(name), _cose(self.private).hex(), rp_id, origin)

    def assert_(self, challenge: bytes = CHALLENGE, count: int = 7, **over: Any) -> str:
        c = self.credential
        client = {"type": "webauthn.get", "challenge": b64url(challenge), "origin": c.origin, "crossOrigin": False}
        client |= over.get("client", {})
        client_json = json.dumps(client).encode()
        rp_hash = hashlib.sha256(over.get("rp_id", c.rp_id).encode()).digest()
        auth = rp_hash + bytes([over.get("flags", FLAG_UP | FLAG_UV)]) + count.to_bytes(4, "big")
        sig = self.private.sign(auth + hashlib.sha256(client_json).digest(), ec.ECDSA(hashes.SHA256()))
        return Assertion(auth, client_json, sig).encode()


def test_a_well_made_assertion_stands_and_each_broken_check_refuses() -> None:
    key = Key()
    assert assertion_problem(key.credential, key.assert_(), CHALLENGE) is None
    assert decode_assertion(key.assert_()).sign_count == 7
    cases = {
        "not verify the user": key.assert_(flags=FLAG_UP),
        "not see the user present": key.assert_(flags=FLAG_UV),
        "another relying party": key.assert_(rp_id="evil.example"),
        "not webauthn.get": key.assert_(client={"type": "webauthn.create"}),
        "not this statement's digest": key.assert_(client={"challenge": b64url(b"x" * 32)}),
        "not the roster's": key.assert_(client={"origin": "https://evil.example"}),
        "cross-origin": key.assert_(client={"crossOrigin": True}),
    }
    for why, text in cases.items():
        problem = assertion_problem(key.credential, text, CHALLENGE)
        assert problem is not None and why in problem, (why, problem)
    other = Key()
    assert "does not verify" in (assertion_problem(other.credential, key.assert_(), CHALLENGE) or "")


def test_a_registration_gives_the_credential_the_roster_lists() -> None:
    key = Key()
    cred_id = b"\x01" * 16
    auth = hashlib.sha256(RP_ID.encode()).digest() + bytes([FLAG_UP | FLAG_UV | 0x40]) + bytes(4)
    auth += bytes(16) + len(cred_id).to_bytes(2, "big") + cred_id + _cose(key.private)
    # {"fmt": "none", "attStmt": {}, "authData": bstr}
    att = b"\xa3\x63fmt\x64none\x67attStmt\xa0\x68authData\x59" + len(auth).to_bytes(2, "big") + auth
    client = json.dumps({"type": "webauthn.create", "challenge": "AAAA", "origin": ORIGIN}).encode()
    made = credential_from_registration(att, client, ORIGIN)
    assert made == Credential(b64url(cred_id), key.credential.public_key, RP_ID, ORIGIN)
    assert parse_credential(made.to_dict(), "x") == made
    with pytest.raises(InputError, match="origin"):
        credential_from_registration(att, client, "https://other.example")


KEY = Key()


@given(st.binary(max_size=200))
def test_hostile_bytes_give_input_errors_only(data: bytes) -> None:
    for parse in (
        lambda: cbor_item(data),
        lambda: credential_from_registration(data, data, ORIGIN),
        lambda: decode_assertion(data.decode("latin-1")),
    ):
        try:
            parse()
        except InputError:
            pass
    assert assertion_problem(KEY.credential, data.decode("latin-1"), CHALLENGE)


def _pubkey() -> str:
    return str(coincurve.PrivateKey().public_key.format().hex())


def test_the_roster_keeps_security_keys_and_refuses_one_shared() -> None:
    cred = Key().credential
    alice = Employee("alice", (_pubkey(),), frozenset({"approve"}), True, (cred,))
    employees = {"alice": alice}
    _apply_change(employees, set(), Change("disable", "alice"))
    _apply_change(employees, set(), Change("roles", "alice", roles=("approve", "lift")))
    assert employees["alice"].webauthn == (cred,) and not employees["alice"].enabled
    with pytest.raises(InputError, match="share a WebAuthn credential"):
        check_employees([alice, Employee("bob", (_pubkey(),), frozenset(), True, (cred,))])
    # A roster's employee without security keys has no "webauthn" field: older rosters keep their digest.
    assert "webauthn" not in Employee("carol", (_pubkey(),), frozenset()).to_dict()
    body = {
        "format": "custody-roster",
        "version": 1,
        "network": "regtest",
        "manifest": "0" * 64,
        "serial": 1,
        "previous": None,
        "employees": [alice.to_dict() | {"webauthn": [cred.to_dict() | {"origin": "http://evil.example"}]}],
        "cleared_suspensions": [],
    }
    with pytest.raises(InputError, match="origin"):
        parse_roster({"roster": body, "signatures": []})
