"""The public status page: HTML, JSON and Atom, served by ``custody serve`` and published as files.

A store on the embedded chain with two reserve audits at two heights and one incident taken
through its timeline (a halt raised by an employee: investigating; identified; monitoring;
lifted by two employees: resolved). The Atom feed is read by the standard library's XML
parser in the Atom namespace, the JSON is validated against the published schema, the HTML
is fetched from the server and looked at in Chromium (a screenshot kept).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import jsonschema
import pytest
import requests

from custody.service.status_page import SCHEMA
from tests.browser_support import artifacts, browser
from tests.service_support import Server
from tests.test_withdraw_embedded import COINBASE_MATURITY, OP_TRUE, EmbeddedShop
from tests.withdraw_support import enrol

A = "{http://www.w3.org/2005/Atom}"


class Site:
    def __init__(self, shop: EmbeddedShop, server: Server, published: Path, incident: int) -> None:
        self.shop, self.server, self.published, self.incident = shop, server, published, incident


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("status")
    shop = EmbeddedShop(tmp, "p2wsh")
    shop.employees.update(enrol(shop.c, tmp, shop.founder_keys, ["svc"], roles="request"))
    shop.deposit("acct-1")
    shop.ok("audit", "reserves")
    (extra,) = shop.ok("address", "new", "--account", "acct-2")  # a coin nobody synced: reserves grow
    shop.chain.mine(1, bytes.fromhex(extra["script_pubkey"]))
    shop.chain.mine(COINBASE_MATURITY, OP_TRUE)
    shop.ok("audit", "reserves")
    raised = shop.c("halt", "raise", "--reason", "a <script> in the withdrawal queue", *shop.as_("alice"))
    assert raised.exit_code == 0, raised.output
    view = json.loads(shop.c("status", "--json").stdout)
    incident = view["incidents"][0]["id"]
    halt_id = view["incidents"][0]["halt_id"]
    for status, message in (("identified", "a tampered row"), ("monitoring", "row restored; watching")):
        assert shop.c("incident", "update", str(incident), "--status", status, "--message", message).exit_code == 0
    for who in ("alice", "bob"):
        lifted = shop.c("halt", "lift", str(halt_id), *shop.as_(who))
        assert lifted.exit_code == 0, lifted.output
    shop.chain.close()
    published = tmp / "public"
    result = shop.c("status", "publish", str(published))
    assert result.exit_code == 0, result.output
    server = Server(shop.c.env, tmp, "svc", shop.employees["svc"])
    try:
        yield Site(shop, server, published, incident)
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()


def _atom(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{A}feed"
    return root


def test_the_atom_feed_carries_the_incident_timeline(site: Site) -> None:
    for text in ((site.published / "status.atom").read_text(), requests.get(site.server.url + "/status.atom").text):
        feed = _atom(text)
        assert feed.findtext(f"{A}id") and feed.findtext(f"{A}updated") and feed.findtext(f"{A}title")
        entries = feed.findall(f"{A}entry")
        titles = [e.findtext(f"{A}title") or "" for e in entries]
        # Newest first: resolved, monitoring, identified, investigating.
        states = [t.split("]")[0].lstrip("[") for t in titles]
        assert states == ["resolved", "monitoring", "identified", "investigating"], titles
        assert len({e.findtext(f"{A}id") for e in entries}) == 4
        assert all(e.findtext(f"{A}updated") for e in entries)
        assert "lifted by alice and bob" in (entries[0].findtext(f"{A}summary") or "")


def test_the_json_fits_its_schema_and_says_what_happened(site: Site) -> None:
    served = requests.get(site.server.url + "/status.json").json()
    published = json.loads((site.published / "status.json").read_text())
    for doc in (served, published):
        jsonschema.validate(doc, SCHEMA)
        assert doc["halted"] is False
        assert {c["id"]: c["status"] for c in doc["components"]} == {
            "address-issuance": "operational",
            "address-verification": "operational",
            "deposits": "operational",
            "withdrawals": "operational",
            "trading": "operational",
        }
        (incident,) = doc["incidents"]
        assert [u["status"] for u in incident["updates"]] == ["investigating", "identified", "monitoring", "resolved"]
        heights = [p["height"] for p in doc["reserves"]]
        assert len(heights) == 2 and heights[0] < heights[1]
        assert doc["reserves"][1]["reserves_sat"] > doc["reserves"][0]["reserves_sat"]
    # The schema refuses what it should: a component in a state it does not know.
    broken: dict[str, Any] = {**served, "components": [{"id": "x", "name": "x", "status": "fine"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_the_html_page_is_served_escaped_with_its_chart(site: Site) -> None:
    r = requests.get(site.server.url + "/status")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "a &lt;script&gt; in the withdrawal queue" in r.text and "<script>" not in r.text
    assert (site.published / "index.html").read_text().count("<polyline") == 2
    shots = artifacts("status")
    with browser() as b:
        page = b.new_page(viewport={"width": 1000, "height": 900})
        page.goto(site.server.url + "/status")
        assert page.text_content("#overall") == "All systems operational"
        assert page.locator("#reserves-chart polyline").count() == 2
        assert page.locator(f"#incident-{site.incident} .timeline li").count() == 4
        page.screenshot(path=str(shots / "status.png"), full_page=True)
