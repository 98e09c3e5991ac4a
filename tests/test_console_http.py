"""The console's pages and calls over HTTP, as an insider or a page elsewhere reaches them (no browser).

Nothing is recorded without an assertion. A page on another origin makes a staff browser post
to the console (CSRF): refused before the store, for the request (even with a good assertion),
halt and approval calls alike, while the console's own origin records.
Strings an insider controls (an account name set by SQL) are shown escaped, under a policy that
runs no inline script.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import text

from custody.config import Settings
from custody.store.db import Database
from tests.service_support import Server
from tests.test_webauthn import Key
from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import enrol, sign_and_apply


@dataclass
class Site:
    shop: EmbeddedShop
    server: Server
    db: Database
    key: Key
    count: int = 0

    def post(self, path: str, body: dict[str, str], **headers: str) -> requests.Response:
        return requests.post(f"{self.server.url}/console{path}", json=body, headers=headers, timeout=60)

    def signed_record(self, content: dict[str, str]) -> dict[str, str]:
        """``content`` with its record challenge's nonce and moment and alice's assertion over it."""
        c = self.post("/api/requests/challenge", content).json()
        self.count += 1
        made = json.loads(self.key.assert_(bytes.fromhex(c["digest"]), self.count))
        return {**content, **made, "credential_id": self.key.credential.id, "nonce": c["nonce"], "at": c["at"]}

    def rows(self, sql: str) -> int:
        with self.db.transaction() as s:
            return int(s.execute(text(sql)).scalar_one())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console-http")
    shop = EmbeddedShop(tmp, "p2wsh")
    shop.employees.update(enrol(shop.c, tmp, shop.founder_keys, ["svc"], roles="request"))
    shop.deposit("acct-1", 2)
    shop.chain.close()  # the server opens the kernel from here on
    server = Server(shop.c.env, tmp, "svc", shop.employees["svc"], console=True)
    try:
        key = Key("localhost", server.origin, b"alice")
        path = tmp / "alice-webauthn.json"
        path.write_text(json.dumps(key.credential.to_dict()))
        assert shop.c("roster", "propose", "--webauthn", f"alice={path}").exit_code == 0
        sign_and_apply(shop.c, tmp, shop.founder_keys)
        yield Site(shop, server, Database(Settings.load(env=shop.c.env).db_url), key)
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()


def test_nothing_is_recorded_without_an_assertion(site: Site) -> None:
    to, _ = destination()
    content = {"employee": "alice", "account": "acct-1", "destination": to, "amount": "0.001"}
    before = site.rows("SELECT count(*) FROM withdrawal")
    # What recording took before: the content alone, from the console's own origin.
    bare = site.post("/api/requests", content, Origin=site.server.origin)
    assert bare.status_code == 422 and "credential_id" in bare.text, bare.text
    # The challenge, and no assertion over it; or every field but the signature.
    signed = site.signed_record(content)
    for missing in ("signature", "authenticator_data", "nonce", "at"):
        partial = {k: v for k, v in signed.items() if k != missing}
        refused = site.post("/api/requests", partial)
        assert refused.status_code == 422 and missing in refused.text, (missing, refused.text)
    assert site.rows("SELECT count(*) FROM withdrawal") == before


def test_a_page_on_another_origin_cannot_make_a_staff_browser_record_a_request(site: Site) -> None:
    to, _ = destination()
    content = {"employee": "alice", "account": "acct-1", "destination": to, "amount": "0.001"}
    body = site.signed_record(content)  # a good assertion of alice's, posted from elsewhere
    before = site.rows("SELECT count(*) FROM withdrawal")
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a data: page
        {"Origin": site.server.origin, "Sec-Fetch-Site": "cross-site"},
    ):
        for path, sent in (("/api/requests/challenge", content), ("/api/requests", body)):
            refused = site.post(path, sent, **headers)
            assert refused.status_code == 403, (headers, path, refused.text)
            error = refused.json()["error"]
            assert error["exit_code"] == 4 and "another origin" in error["message"], error
    assert site.rows("SELECT count(*) FROM withdrawal") == before
    # The halt and approval calls alike, before any assertion is read.
    assertion = {"credential_id": "AA", "authenticator_data": "AA", "client_data_json": "AA", "signature": "AA"}
    elsewhere = {"Origin": "http://evil.example"}
    for path, extra in (
        ("/api/halt/challenge", {"reason": "x"}),
        ("/api/halt", {**assertion, "reason": "x", "at": "2026-01-01T00:00:00.000Z"}),
        ("/api/withdrawals/1/approve", assertion),
        ("/api/withdrawals/1/request", assertion),
    ):
        refused = site.post(path, {"employee": "alice", **extra}, **elsewhere)
        assert refused.status_code == 403 and "another origin" in refused.text, (path, refused.text)
    # From the console's own origin, as its page posts, it is recorded (and awaits alice's key
    # over its exact transaction).
    made = site.post("/api/requests", body, Origin=site.server.origin, **{"Sec-Fetch-Site": "same-origin"})
    assert made.status_code == 200, made.text
    assert site.rows("SELECT count(*) FROM withdrawal") == before + 1


def test_strings_an_insider_controls_are_shown_escaped(site: Site) -> None:
    to, _ = destination()
    body = {"employee": "alice", "account": "acct-1", "destination": to, "amount": "0.002"}
    wid = site.post("/api/requests", site.signed_record(body)).json()["id"]
    markup = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    with site.db.transaction() as s:
        s.execute(text("UPDATE withdrawal SET account = :a WHERE id = :id"), {"a": markup, "id": wid})
    for path in ("/console/", f"/console/withdrawals/{wid}"):
        page = requests.get(f"{site.server.url}{path}", timeout=60)
        assert page.status_code == 200, (path, page.text)
        assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;" in page.text, path
        assert "<img src=x" not in page.text and "<script>alert" not in page.text, path
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
