"""A request recorded in the console (on its requester's security key) but never signed:
marked in the pending list, and cancelled from the console by its requester's security key
alone, over HTTP (no browser).

A real ``custody serve`` with the console; alice and bob have security keys in the founders'
roster, made in software the way an authenticator makes them (tests/test_webauthn.py's ``Key``).
Alice records a request and never signs it. What an insider tries: bob cancels it (his key,
or his key claiming to be alice), an assertion of alice's made at another origin, one over
another reason, and one for a request she did sign: each refused, the balance still held.
Then alice's own cancel releases the hold, and the audit log names her with her assertion.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from custody.identity.statements import statement_digest
from custody.withdraw import webauthn_request as wr
from tests.service_support import Client, Server
from tests.test_console import serving_console
from tests.test_webauthn import Key
from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import sign_and_apply


@dataclass
class Console:
    shop: EmbeddedShop
    server: Server
    client: Client
    keys: dict[str, Key]
    count: int = 0

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.server.url}/console/api{path}", json=body, timeout=60)

    def signed(self, who: str, digest: str, key: str | None = None, **over: Any) -> dict[str, str]:
        """``key``'s (default ``who``'s) security key over ``digest``, as the console's script posts it."""
        self.count += 1
        k = self.keys[key or who]
        made: dict[str, str] = json.loads(k.assert_(bytes.fromhex(digest), self.count, **over))
        return {"employee": who, "credential_id": k.credential.id, **made}

    def draft(self, amount: str) -> dict[str, Any]:
        """A request alice records with her security key (over its record challenge) and never signs."""
        to, _ = destination()
        content = {"employee": "alice", "account": "acct-1", "destination": to, "amount": amount}
        c = self.post("/requests/challenge", content).json()
        r = self.post("/requests", {**content, **self.signed("alice", c["digest"]), "nonce": c["nonce"], "at": c["at"]})
        assert r.status_code == 200, r.text
        drafted: dict[str, Any] = r.json()
        return drafted

    def challenge(self, wid: int, who: str, reason: str) -> requests.Response:
        return self.post(f"/withdrawals/{wid}/cancel/challenge", {"employee": who, "reason": reason})

    def cancel(self, wid: int, signed: dict[str, str], reason: str) -> requests.Response:
        return self.post(f"/withdrawals/{wid}/cancel", {**signed, "reason": reason})

    def held(self, wid: int) -> int:
        held: int = self.shop.ok("ledger", "balance", f"held:withdrawal-{wid}")["balance_sat"]
        return held


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console-cancel")
    with serving_console(tmp, 4) as (shop, server):  # a coin per request
        keys = {name: Key("localhost", server.origin, name.encode()) for name in ("alice", "bob")}
        specs = []
        for name, key in keys.items():
            path = tmp / f"{name}-webauthn.json"
            path.write_text(json.dumps(key.credential.to_dict()))
            specs += ["--webauthn", f"{name}={path}"]
        proposed = shop.c("roster", "propose", *specs)
        assert proposed.exit_code == 0, proposed.output
        sign_and_apply(shop.c, tmp, shop.founder_keys)
        yield Console(shop, server, Client(server.url), keys)


def test_an_unsigned_request_is_marked_and_only_its_requester_cancels_it(console: Console) -> None:
    w = console.draft("0.002")
    wid, reason = int(w["id"]), "customer changed her mind"
    pending = requests.get(f"{console.server.url}/console/", timeout=60).text
    assert "requested: not signed by alice yet" in pending, pending
    assert console.client.ok("GET", f"/v1/withdrawals/{wid}")["awaiting_request_signature"] is True
    page = requests.get(f"{console.server.url}/console/withdrawals/{wid}", timeout=60).text
    assert "id=cancel" in page
    held, before = console.held(wid), console.shop.ok("ledger", "balance", "acct-1")["balance_sat"]
    assert held > 0

    def refused(resp: requests.Response, status: int, why: str) -> None:
        assert resp.status_code == status and why in resp.text, (resp.status_code, resp.text)
        assert console.held(wid) == held

    # Bob, with his own key, over the statement he asked for: not his request.
    bobs = console.challenge(wid, "bob", reason).json()["digest"]
    refused(console.cancel(wid, console.signed("bob", bobs), reason), 403, "did not request")
    # Bob in alice's name: with his own credential, or his key claiming hers.
    digest = console.challenge(wid, "alice", reason).json()["digest"]
    refused(console.cancel(wid, console.signed("alice", digest, key="bob"), reason), 403, "not alice's")
    forged = {**console.signed("alice", digest, key="bob"), "credential_id": console.keys["alice"].credential.id}
    refused(console.cancel(wid, forged, reason), 403, "signature does not verify")
    # Alice's key, made at another origin (a page elsewhere posting cross-origin): refused like an approval.
    elsewhere = console.signed("alice", digest, client={"origin": "http://localhost:9"})
    refused(console.cancel(wid, elsewhere, reason), 403, "not the roster's")
    # Her assertion over one reason, posted with another.
    refused(console.cancel(wid, console.signed("alice", digest), "a reason she never signed"), 403, "digest")

    done = console.cancel(wid, console.signed("alice", digest), reason)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "failed" and done.json()["awaiting_request_signature"] is False
    assert console.held(wid) == 0
    assert console.shop.ok("ledger", "balance", "acct-1")["balance_sat"] == before + held
    (entry,) = console.shop.ok("audit", "log", "--last", "1")
    assert entry["event"] == "withdrawal.failed" and entry["actor"] == "alice", entry
    assert entry["payload"] == {"withdrawal_id": wid, "reason": reason} and entry["signature"], entry
    assert f"/console/withdrawals/{wid}" not in requests.get(f"{console.server.url}/console/", timeout=60).text
    # Played again: nothing is left to cancel.
    assert console.cancel(wid, console.signed("alice", digest), reason).status_code == 409


def test_a_request_its_requester_signed_is_not_cancelled_from_the_console(console: Console) -> None:
    w = console.draft("0.003")
    wid = int(w["id"])
    signed = console.post(f"/withdrawals/{wid}/request", console.signed("alice", w["request_digest"]))
    assert signed.status_code == 200, signed.text
    assert console.client.ok("GET", f"/v1/withdrawals/{wid}")["awaiting_request_signature"] is False
    pending = requests.get(f"{console.server.url}/console/", timeout=60).text
    assert f"/console/withdrawals/{wid}>" in pending and "not signed by" not in pending
    assert "id=cancel" not in requests.get(f"{console.server.url}/console/withdrawals/{wid}", timeout=60).text
    refused = console.challenge(wid, "alice", "too late")
    assert refused.status_code == 409 and "does not await" in refused.text, refused.text
    # Her key over the statement an unsigned request would have had: still refused, nothing released.
    held = console.held(wid)
    digest = statement_digest(wr.CANCEL_DOMAIN, [wid, w["request_digest"], "alice", "too late"]).hex()
    late = console.cancel(wid, console.signed("alice", digest), "too late")
    assert late.status_code == 409 and "does not await" in late.text, late.text
    assert console.held(wid) == held > 0
    assert console.client.ok("GET", f"/v1/withdrawals/{wid}")["status"] == "requested"


def test_a_cancel_replayed_from_the_audit_log_onto_its_request_reset_by_sql_releases_nothing(console: Console) -> None:
    """Alice cancels her unsigned request; the insider sets its row back to requested by SQL
    and posts her assertion again, read from the audit log's withdrawal.failed entry (no key
    of anyone's): without a check the customer was credited the amount and fee a second time,
    the hold driven below zero, by a cancel signed with alice's key and logged as hers."""
    w = console.draft("0.001")
    wid, reason = int(w["id"]), "duplicate"
    held, before = console.held(wid), console.shop.ok("ledger", "balance", "acct-1")["balance_sat"]
    digest = console.challenge(wid, "alice", reason).json()["digest"]
    assert console.cancel(wid, console.signed("alice", digest), reason).status_code == 200
    assert console.shop.ok("ledger", "balance", "acct-1")["balance_sat"] == before + held
    (entry,) = console.shop.ok("audit", "log", "--last", "1")
    replay = {
        "employee": "alice",
        "credential_id": console.keys["alice"].credential.id,
        **json.loads(entry["signature"]),
    }
    con = sqlite3.connect(console.shop.c.home / "custody.db")
    with con:
        con.execute("UPDATE withdrawal SET status = 'requested' WHERE id = ?", (wid,))
    con.close()
    again = console.cancel(wid, replay, reason)
    assert again.status_code in (403, 409), again.text
    assert console.held(wid) == 0
    assert console.shop.ok("ledger", "balance", "acct-1")["balance_sat"] == before + held
