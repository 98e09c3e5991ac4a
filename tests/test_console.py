"""The approval console in a real Chromium with a virtual FIDO2 security key (CDP WebAuthn).

An employee registers a security key on the console, the founders add it to the roster,
the employee approves a withdrawal with it in the browser, the approval is counted, and the
offline signer accepts the PSBT that carries it; she requests a withdrawal in the console,
recorded on her key's assertion over its content and then signed over its exact transaction
with the same key, and sees it listed (and cannot approve it). Then an insider's attempts: a
tampered assertion, one made at another origin, one made for another withdrawal, one from a
key not in the roster, one played again, and the approval bundle of a PSBT rewritten: each
refused; and a recording from a key not in the roster, from another origin, over other
content or played again: nothing recorded.
"""

from __future__ import annotations

import http.server
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from custody.bitcoin import psbt as psbt_lib
from custody.identity.webauthn import Credential, b64url, unb64url
from custody.withdraw.signer import PROP_APPROVALS, PROPRIETARY_ID
from tests.browser_support import artifacts, assertion, browser, security_key
from tests.service_support import Client, Server
from tests.support import read_psbt
from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import enrol, sign_and_apply


class Console:
    def __init__(self, shop: EmbeddedShop, server: Server, page: Any, shots: Path) -> None:
        self.shop = shop
        self.server = server
        self.client = Client(server.url)
        self.page = page
        self.shots = shots
        self.credential: dict[str, str] = {}
        self.enrolled = False

    def request(self, amount: str = "0.01") -> dict[str, Any]:
        to, _ = destination()
        w: dict[str, Any] = self.client.ok(
            "POST", "/v1/withdrawals", json={"account": "acct-1", "destination": to, "amount": amount}
        )
        return w

    def post(self, wid: int, employee: str, body: dict[str, str]) -> requests.Response:
        url = f"{self.server.url}/console/api/withdrawals/{wid}/approve"
        return requests.post(url, json={"employee": employee, **body}, timeout=60)

    def record(self, body: dict[str, str]) -> requests.Response:
        return requests.post(f"{self.server.url}/console/api/requests", json=body, timeout=60)

    def recorded(self) -> int:
        """How many withdrawals the store holds."""
        return len(self.shop.ok("withdraw", "list"))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


def _register(page: Any, origin: str, name: str) -> dict[str, str]:
    """The console's registration page, as an employee uses it."""
    page.goto(f"{origin}/console/register")
    page.fill("#employee", name)
    page.click("button[type=submit]")
    page.wait_for_selector("#result.ok")
    made: dict[str, str] = json.loads(page.text_content("#credential"))
    return made


@contextmanager
def serving_console(tmp: Path, coins: int) -> Iterator[tuple[EmbeddedShop, Server]]:
    """A shop with ``coins`` coins of acct-1 and ``custody serve`` with the console (as svc,
    request role only); the server stopped cleanly at the end."""
    shop = EmbeddedShop(tmp, "p2wsh")
    shop.employees.update(enrol(shop.c, tmp, shop.founder_keys, ["svc"], roles="request"))
    shop.deposit("acct-1", coins)
    shop.chain.close()  # the kernel is one process's: the server opens it from here on
    server = Server(shop.c.env, tmp, "svc", shop.employees["svc"], console=True)
    try:
        yield shop, server
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with serving_console(tmp_path_factory.mktemp("console"), 5) as (shop, server):  # a coin per withdrawal
        with browser() as b:
            page = b.new_page(viewport={"width": 1200, "height": 900})
            security_key(page)
            c = Console(shop, server, page, artifacts("console"))
            c.credential = _register(page, server.origin, "alice")
            c.shot("register")
            yield c


def _enrol_key(console: Console) -> None:
    """The founders add alice's security key to the roster (signed offline, applied), once."""
    if console.enrolled:
        return
    console.enrolled = True
    path = console.shop.tmp / "alice-webauthn.json"
    path.write_text(json.dumps(console.credential))
    proposed = console.shop.c("roster", "propose", "--webauthn", f"alice={path}")
    assert proposed.exit_code == 0, proposed.output
    sign_and_apply(console.shop.c, console.shop.tmp, console.shop.founder_keys)


def test_a_security_key_approves_in_the_browser_and_the_offline_signer_accepts_it(console: Console) -> None:
    assert console.credential["rp_id"] == "localhost" and console.credential["origin"] == console.server.origin
    w = console.request()
    wid = w["id"]
    page = console.page
    # Before the founders list the key, the console knows no key of alice's: nothing is approved.
    page.goto(f"{console.server.origin}/console/withdrawals/{wid}")
    page.fill("#employee", "alice")
    page.click("#approve button")
    page.wait_for_selector("#result.refused")
    assert "no security key" in page.text_content("#result")
    _enrol_key(console)

    page.goto(f"{console.server.origin}/console/")
    assert page.locator(f"#pending a[href='/console/withdrawals/{wid}']").count() == 1
    console.shot("pending")
    page.click(f"#pending a[href='/console/withdrawals/{wid}']")
    # What is approved, shown before anything is signed: every output, the fee, the digest.
    assert page.text_content("#digest") == w["statement_digest"]
    outputs = page.text_content("table.outputs")
    assert w["destination"] in outputs and str(w["amount_sat"]) in outputs and "change (ours)" in outputs
    assert str(w["fee_sat"]) in page.text_content("table.facts")
    assert "approvals needed" in page.text_content("table.rules")
    page.fill("#employee", "alice")
    page.click("#approve button")
    page.wait_for_selector("#result.ok")
    assert page.text_content("#approved-by") == "alice"
    console.shot("approved")

    # Counted by the store and the API, named in the audit log as a security key's approval.
    seen = console.client.ok("GET", f"/v1/withdrawals/{wid}")
    assert seen["approvals"]["valid"] == ["alice"] and seen["status"] == "requested"
    log = console.shop.ok("audit", "log", "--last", "1")
    assert log[0]["event"] == "withdrawal.approved" and log[0]["payload"]["webauthn"].startswith("webauthn:")
    console.shop.ok("withdraw", "approve", str(wid), *console.shop.as_("bob"), "--yes")
    assert console.client.ok("GET", f"/v1/withdrawals/{wid}")["status"] == "approved"

    # The offline signer checks alice's assertion against the roster pinned on its machine.
    psbt = console.shop.tmp / f"w{wid}.psbt"
    assert console.shop.c("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    signed = console.shop.c(
        "sign", str(psbt), "--key", str(console.shop.founder_keys["founder-a"]), "--out", str(psbt) + ".a", "--yes"
    )
    assert signed.exit_code == 0, signed.output

    # The same PSBT with one byte of alice's assertion changed: the signer counts only bob.
    p = psbt_lib.Psbt.parse(read_psbt(psbt))
    key = psbt_lib.ProprietaryKey(PROPRIETARY_ID, PROP_APPROVALS, b"")
    bundle = json.loads(p.proprietary[key])
    (mine,) = [a for a in bundle if a["employee"] == "alice"]
    stored = json.loads(mine["signature"])
    sig = bytearray(unb64url(stored["signature"], "signature"))
    sig[-1] ^= 1
    mine["signature"] = json.dumps({**stored, "signature": b64url(bytes(sig))}, sort_keys=True, separators=(",", ":"))
    p.proprietary[key] = json.dumps(bundle).encode()
    psbt.write_text(p.to_base64() + "\n")
    refused = console.shop.c(
        "sign", str(psbt), "--key", str(console.shop.founder_keys["founder-a"]), "--out", str(psbt) + ".b", "--yes"
    )
    assert refused.exit_code == 4 and "signature does not verify" in refused.stderr, refused.output


def test_a_withdrawal_requested_in_the_console_with_a_security_key_is_listed(console: Console) -> None:
    _enrol_key(console)
    page, origin = console.page, console.server.origin
    to, _ = destination()
    page.goto(f"{origin}/console/")
    page.click("a[href='/console/request']")
    for field, value in (("employee", "alice"), ("account", "acct-1"), ("destination", to), ("amount", "0.003")):
        page.fill(f"#{field}", value)
    page.click("#request button")
    page.wait_for_selector("#result.ok")
    wid = int(page.text_content("#result").split("#")[1].split()[0])
    console.shot("requested")
    page.goto(f"{origin}/console/")
    assert page.locator(f"#pending a[href='/console/withdrawals/{wid}']").count() == 1
    assert to in page.text_content("#pending")
    # Recorded on her key's assertion over the request's content, made in this browser at the
    # console's origin; then signed over its exact transaction: each checked against her key in
    # the roster.
    recorded, signed = console.shop.ok("audit", "log", "--last", "2")
    assert recorded["event"] == "withdrawal.requested" and recorded["actor"] == "alice", recorded
    assert recorded["payload"]["withdrawal_id"] == wid
    assert recorded["payload"]["webauthn"] == Credential(**console.credential).fingerprint, recorded
    client = json.loads(unb64url(json.loads(recorded["signature"])["client_data_json"], "client data"))
    assert client["type"] == "webauthn.get" and client["origin"] == origin, client
    assert client["challenge"] == b64url(bytes.fromhex(recorded["payload"]["record_digest"]))
    assert signed["event"] == "withdrawal.request_signed" and signed["actor"] == "alice", signed
    assert console.client.ok("GET", f"/v1/withdrawals/{wid}")["requester"] == "alice"
    # And her security key cannot approve what she requested.
    page.click(f"#pending a[href='/console/withdrawals/{wid}']")
    page.fill("#employee", "alice")
    page.click("#approve button")
    page.wait_for_selector("#result.refused")
    assert "cannot approve" in page.text_content("#result")


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[str]:
    """Another origin on this machine (same host name, another port): an insider's page."""

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>not the console</title>")

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://localhost:{srv.server_address[1]}"
    srv.shutdown()


def test_assertions_that_must_not_count_are_refused(console: Console, elsewhere: str) -> None:
    _enrol_key(console)  # when run alone
    first, second = console.request("0.001"), console.request("0.002")
    page, origin, ids = console.page, console.server.origin, [console.credential["id"]]
    page.goto(f"{origin}/console/")

    def refused(body: dict[str, str], why: str, employee: str = "alice") -> None:
        r = console.post(second["id"], employee, body)
        assert r.status_code == 403 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["exit_code"] == 4

    # A challenge from another withdrawal: the first one's statement, sent for the second.
    refused(assertion(page, first["statement_digest"], "localhost", ids), "challenge is not this statement's digest")
    # A tampered assertion: one byte of the authenticator data (its counter), or of the signature.
    good = assertion(page, second["statement_digest"], "localhost", ids)
    data = bytearray(unb64url(good["authenticator_data"], "a"))
    data[-1] ^= 1
    refused({**good, "authenticator_data": b64url(bytes(data))}, "signature does not verify")
    sig = bytearray(unb64url(good["signature"], "s"))
    sig[10] ^= 0x40
    refused({**good, "signature": b64url(bytes(sig))}, "does not")
    # Made at another origin (a page of the same host name, another port).
    page.goto(elsewhere)
    refused(assertion(page, second["statement_digest"], "localhost", ids), "not the roster's")
    # A key that is not in the roster: registered, never added by the founders.
    page.goto(f"{origin}/console/")
    other = _register(page, origin, "alice")
    unlisted = assertion(page, second["statement_digest"], "localhost", [other["id"]])
    refused(unlisted, "not alice's in the founders' roster")
    refused({**unlisted, "credential_id": console.credential["id"]}, "signature does not verify")
    # Alice's own key cannot be used in bob's name.
    refused(good, "not bob's in the founders' roster", employee="bob")
    # None of those counted; the good one does, once: played again, its counter is not above.
    assert console.client.ok("GET", f"/v1/withdrawals/{second['id']}")["approvals"]["valid"] == []
    assert console.post(second["id"], "alice", good).status_code == 200
    assert console.client.ok("GET", f"/v1/withdrawals/{second['id']}")["approvals"]["valid"] == ["alice"]
    refused(good, "signature counter")

    # Recording alike: nothing without an assertion of alice's listed key over exactly this request.
    to, _ = destination()
    content = {"employee": "alice", "account": "acct-1", "destination": to, "amount": "0.0005"}
    c = requests.post(f"{console.server.url}/console/api/requests/challenge", json=content, timeout=60).json()
    fresh = {**content, "nonce": c["nonce"], "at": c["at"]}
    before = console.recorded()

    def not_recorded(body: dict[str, str], why: str) -> None:
        r = console.record(body)
        assert r.status_code == 403 and why in r.json()["error"]["message"], r.text
        assert console.recorded() == before

    not_recorded({**fresh, **assertion(page, c["digest"], "localhost", [other["id"]])}, "not alice's")
    page.goto(elsewhere)
    not_recorded({**fresh, **assertion(page, c["digest"], "localhost", ids)}, "not the roster's")
    page.goto(f"{origin}/console/")
    made = assertion(page, c["digest"], "localhost", ids)
    not_recorded({**fresh, **made, "amount": "0.05"}, "challenge is not this statement's digest")
    not_recorded({**fresh, **made, "employee": "bob"}, "not bob's")
    assert console.record({**fresh, **made}).status_code == 200
    assert console.recorded() == before + 1
    before += 1
    not_recorded({**fresh, **made}, "used already")


def test_a_halt_raised_and_lifted_from_the_console_takes_two_employees(console: Console) -> None:
    _enrol_key(console)
    page, origin = console.page, console.server.origin
    page.goto(f"{origin}/console/halt")
    page.fill("#employee", "alice")
    page.fill("#reason", "console drill: a withdrawal looks wrong")
    page.click("#raise button")
    page.wait_for_selector("#result.ok")
    assert console.client.ok("GET", "/v1/halt")["halted"] is True
    status = console.shop.c("halt", "status", "--json")
    assert status.exit_code == 3  # halted
    (halt,) = json.loads(status.stdout)["halts"]
    # Checked against alice's security key in the roster: her halt, not an unverified request.
    assert halt["raised_by"] == "alice" and halt["source"] == "employee", halt
    hid = halt["id"]

    # An assertion over another statement (a raise's, not this lift's) does not count.
    stale = assertion(page, console.client.ok("GET", "/v1/audit/head")["hash"], "localhost", [console.credential["id"]])
    r = requests.post(f"{console.server.url}/console/api/halts/{hid}/lift", json={"employee": "alice", **stale})
    assert r.status_code == 403 and "did not sign it" in r.json()["error"]["message"], r.text

    page.goto(f"{origin}/console/halt")
    for _ in range(2):  # alice twice is still one employee
        page.fill(f"#halt-{hid} .employee", "alice")
        page.click(f"#halt-{hid} button")
        page.wait_for_selector("#result.ok")
        assert "1 of 2" in page.text_content("#result")
        assert console.client.ok("GET", "/v1/halt")["halted"] is True
    console.shot("halt")
    lifted = console.shop.c("halt", "lift", str(hid), *console.shop.as_("bob"), "--json")
    assert lifted.exit_code == 0, lifted.output
    # The lift holds when the state is derived again from the audit log (alice's assertion in it).
    assert console.client.ok("GET", "/v1/halt")["halted"] is False
    log = console.shop.ok("audit", "log", "--last", "1")
    assert log[0]["event"] == "halt.lifted" and sorted(log[0]["payload"]["signers"]) == ["alice", "bob"]
