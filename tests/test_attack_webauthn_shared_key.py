"""The red team against "no key shared by two" in the founders' roster, for security keys.

The roster refused one WebAuthn credential listed under two employees, by its id. But the id
is not in what a security key signs (authenticator data and the client data's hash): the
same key under another id, or with its COSE key written in another order, verified every
assertion of the first. An insider who drafts the roster proposal on the online machine hands
in her own security key's public key, under a fresh id, as a colleague's registration; once
the founders sign it, every approval her key makes counts as two employees' (the store's and
the offline signer's check count names), and she approves alone. The roster now refuses one
public key under two employees, however its credential is written; the store and the offline
signer read every roster through that check.
"""

from __future__ import annotations

import coincurve
import pytest

from custody.errors import InputError
from custody.identity.approvals import Approval, RegistryEntry, TxSummary, check_approvals
from custody.identity.roster import Employee, check_employees, parse_roster
from custody.identity.webauthn import Credential, assertion_problem, b64url
from tests.test_webauthn import ORIGIN, RP_ID, Key


def _pubkey() -> str:
    return str(coincurve.PrivateKey().public_key.format().hex())


def _reordered(cose_hex: str) -> str:
    """The same COSE_Key with its map's entries in another order (3, 1, -1, -2, -3)."""
    cose = bytes.fromhex(cose_hex)
    assert cose[:5] == b"\xa5\x01\x02\x03\x26"
    return (b"\xa5\x03\x26\x01\x02" + cose[5:]).hex()


def test_one_security_key_under_two_credential_ids_is_refused_as_two_employees() -> None:
    key = Key(name=b"alice-key")
    twins = {
        "another id": Credential(b64url(b"bob-key"), key.credential.public_key, RP_ID, ORIGIN),
        "another id and encoding": Credential(b64url(b"bob-key"), _reordered(key.credential.public_key), RP_ID, ORIGIN),
    }
    summary = TxSummary("regtest", 1, "00" * 32, (("00" * 32 + ":0", 10_000),), (("0014" + "11" * 20, 9_000),), 1_000)
    digest = bytes.fromhex(summary.digest())
    for why, twin in twins.items():
        # Why it matters: the credential id is not signed, so one assertion stands for both.
        assert assertion_problem(twin, key.assert_(digest), digest) is None, why
        entries = {
            "alice": RegistryEntry("alice", (_pubkey(),), None, (key.credential,)),
            "bob": RegistryEntry("bob", (_pubkey(),), None, (twin,)),
        }
        one = key.assert_(digest)
        approvals = [Approval("alice", key.credential.fingerprint, one), Approval("bob", twin.fingerprint, one)]
        assert check_approvals(summary, approvals, entries, "carol").enough, why  # one key, "two employees"

        alice = Employee("alice", (_pubkey(),), frozenset({"approve"}), True, (key.credential,))
        bob = Employee("bob", (_pubkey(),), frozenset({"approve"}), True, (twin,))
        with pytest.raises(InputError, match="share a security key"):
            check_employees([alice, bob])
        body = {
            "format": "custody-roster",
            "version": 1,
            "network": "regtest",
            "manifest": "0" * 64,
            "serial": 1,
            "previous": None,
            "employees": [alice.to_dict(), bob.to_dict()],
            "cleared_suspensions": [],
        }
        with pytest.raises(InputError, match="share a security key"):  # the store's and the signer's reading
            parse_roster({"roster": body, "signatures": []})
    # One employee may list several keys of their own, and two employees two keys.
    check_employees([Employee("alice", (_pubkey(),), frozenset(), True, (key.credential, Key(name=b"b").credential))])
