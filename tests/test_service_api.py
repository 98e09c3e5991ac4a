"""``custody serve`` through a real HTTP client against a real uvicorn on loopback.

One store on the embedded chain (a customer funded first), a service identity in the
founders' roster with the request role only, and the server in a subprocess. The tests
attack the authentication (unsigned, wrongly signed, stale, replayed, tampered requests:
each 401, nothing stored), check every state change goes through the halt guard (423 with
the CLI's exit code 3, nothing issued), and that what the service issues and requests is
what the CLI, the audit log and the independent verifier see.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import schemathesis.openapi
import schemathesis.pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from custody_cli.main import cli
from tests.service_support import Client, Server
from tests.test_halt_file import engine_check
from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import enrol


class Service:
    def __init__(self, shop: EmbeddedShop, server: Server) -> None:
        self.shop = shop
        self.server = server
        self.client = Client(server.url)

    def addresses(self) -> list[dict[str, Any]]:
        return list(self.shop.ok("address", "list"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    shop = EmbeddedShop(tmp, "p2wsh")
    svc_keys = enrol(shop.c, tmp, shop.founder_keys, ["svc"], roles="request")
    shop.employees.update(svc_keys)
    shop.deposit("acct-1")
    # A coin at a custody address that no sync credited yet: reserves exceed liabilities by its value.
    (extra,) = shop.ok("address", "new", "--account", "acct-9")
    shop.chain.mine(1, bytes.fromhex(extra["script_pubkey"]))
    shop.surplus = sum(u.amount for u in shop.chain.unspent([bytes.fromhex(extra["script_pubkey"])]))
    shop.ok("audit", "reserves")
    shop.chain.close()  # the kernel is one process's: the server opens it from here on
    server = Server(shop.c.env, tmp, "svc", svc_keys["svc"])
    try:
        yield Service(shop, server)
    finally:
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal.
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()


def test_issues_and_looks_up_addresses_the_cli_and_the_verifier_agree_with(service: Service) -> None:
    issued = service.client.ok("POST", "/v1/accounts/acct-7/addresses", json={"count": 3})
    assert [a["account"] for a in issued] == ["acct-7"] * 3
    indexes = [a["index"] for a in issued]
    assert indexes == list(range(indexes[0], indexes[0] + 3))
    stored = {a["address"]: a for a in service.addresses()}
    assert all(stored[a["address"]]["index"] == a["index"] for a in issued)
    looked_up = service.client.ok("GET", "/v1/accounts/acct-7/addresses")
    assert [a["address"] for a in looked_up] == [a["address"] for a in issued]
    one = service.client.ok("GET", f"/v1/addresses/{issued[1]['address']}")
    assert one["index"] == indexes[1] and one["account"] == "acct-7"
    # The issuance is in the audit log, in the service identity's name, and verifies.
    log = service.shop.ok("audit", "log", "--last", "3")
    assert any(e["event"] == "address.issued" and e["actor"] == "svc" for e in log), log
    result = service.shop.c("verify", "addresses", "--manifest", str(service.shop.c.home / "founders-manifest.json"))
    assert result.exit_code == 0, result.output
    head = service.client.ok("GET", "/v1/audit/head")
    assert head["seq"] == max(e["seq"] for e in service.shop.ok("audit", "log", "--last", "1"))
    missing = service.client.call("GET", "/v1/addresses/bcrt1qnotours")
    assert missing.status_code == 404 and missing.json()["error"]["exit_code"] == 5


def test_requests_a_withdrawal_that_employees_then_approve(service: Service) -> None:
    to, _ = destination()
    w = service.client.ok("POST", "/v1/withdrawals", json={"account": "acct-1", "destination": to, "amount": "0.01"})
    assert w["status"] == "requested" and w["requester"] == "svc" and w["amount_sat"] == 1_000_000
    wid = w["id"]
    for who in ("alice", "bob"):
        service.shop.ok("withdraw", "approve", str(wid), *service.shop.as_(who), "--yes")
    seen = service.client.ok("GET", f"/v1/withdrawals/{wid}")
    assert seen["status"] == "approved" and sorted(seen["approvals"]["valid"]) == ["alice", "bob"]
    assert [x["id"] for x in service.client.ok("GET", "/v1/withdrawals?status=approved")] == [wid]
    deposits = service.client.ok("GET", "/v1/deposits?account=acct-1")
    assert len(deposits) == 1 and deposits[0]["status"] == "credited"
    assert service.client.ok("GET", f"/v1/deposits/{deposits[0]['outpoint']}")["account"] == "acct-1"
    # Beyond the customer's balance: the CLI's refusal, its exit code in the body.
    big = service.client.call("POST", "/v1/withdrawals", json={"account": "acct-1", "destination": to, "amount": "60"})
    assert big.status_code == 400 and big.json()["error"]["exit_code"] == 2, big.text
    # The service identity cannot approve: it has no route for it, and the roster gives it no such role.
    assert service.client.call("POST", f"/v1/withdrawals/{wid}/approve").status_code in (404, 405)


def scrape(service: Service) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics parsed by prometheus_client's own parser: name -> labels -> value."""
    r = requests.get(service.server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_are_scraped_and_parsed(service: Service) -> None:
    m = scrape(service)
    assert m["custody_halted"][()] == 0 and m["custody_store_up"][()] == 1
    approved = len(service.client.ok("GET", "/v1/withdrawals?status=approved"))
    requested = len(service.client.ok("GET", "/v1/withdrawals?status=requested"))
    assert m["custody_withdrawals"][(("status", "approved"),)] == approved
    assert m["custody_withdrawals"][(("status", "requested"),)] == requested
    assert m["custody_reserves_minus_liabilities_sat"][()] == service.shop.surplus > 0
    assert m["custody_last_synced_height"][()] >= 1
    assert m["custody_notification_backlog"][()] == 0  # no recipients
    # A withdrawal left requested: the oldest pending age counts from its request.
    to, _ = destination()
    service.client.ok("POST", "/v1/withdrawals", json={"account": "acct-1", "destination": to, "amount": "0.002"})
    time.sleep(1.1)
    m = scrape(service)
    assert m["custody_withdrawals"][(("status", "requested"),)] == requested + 1
    assert m["custody_withdrawal_oldest_pending_age_seconds"][()] >= 1


def test_refuses_unsigned_wrongly_signed_stale_and_replayed_requests(service: Service) -> None:
    c = service.client
    before = len(service.addresses())
    path = "/v1/accounts/acct-x/addresses"

    unsigned = c.send(c.prepare("POST", path, json={"count": 1}))
    assert unsigned.status_code == 401
    for header in ("X-Custody-Timestamp", "X-Custody-Nonce", "X-Custody-Signature"):
        req = c.sign(c.prepare("POST", path, json={"count": 1}))
        del req.headers[header]
        assert c.send(req).status_code == 401
    wrong = Client(service.server.url, b"another-secret-of-enough-length!!").call("POST", path, json={"count": 1})
    assert wrong.status_code == 401
    for skew in (-301, 301):
        stale = c.send(c.sign(c.prepare("POST", path, json={"count": 1}), timestamp=int(time.time()) + skew))
        assert stale.status_code == 401 and "stale" in stale.json()["error"]["message"]
    # Tampered after signing: the body, the path, the method, the query.
    req = c.sign(c.prepare("POST", path, json={"count": 1}))
    req.body = json.dumps({"count": 1000}).encode()
    req.headers["Content-Length"] = str(len(req.body))
    assert c.send(req).status_code == 401
    req = c.sign(c.prepare("POST", path, json={"count": 1}))
    req.url = service.server.url + "/v1/accounts/acct-y/addresses"
    assert c.send(req).status_code == 401
    req = c.sign(c.prepare("GET", "/v1/withdrawals?status=requested"))
    req.url = service.server.url + "/v1/withdrawals?status=approved"
    assert c.send(req).status_code == 401
    req = c.sign(c.prepare("GET", path))
    req.method = "POST"
    assert c.send(req).status_code == 401
    assert len(service.addresses()) == before  # nothing issued by any of them

    # Replayed: the first copy issues one address, the second is refused, even with a new timestamp.
    req = c.sign(c.prepare("POST", path, json={"count": 1}), nonce="replay-me-0123456789")
    assert c.send(req).status_code == 201
    again = c.send(req)
    assert again.status_code == 401 and "replayed" in again.json()["error"]["message"]
    fresh_ts = c.sign(c.prepare("POST", path, json={"count": 1}), nonce="replay-me-0123456789")
    assert c.send(fresh_ts).status_code == 401
    assert len(service.addresses()) == before + 1
    # The same signed request sent eight times at once (its nonce claimed in the issuing
    # transaction): one is served, every other copy refused, one address issued.
    req = c.sign(c.prepare("POST", path, json={"count": 1}), nonce="replay-me-at-once-0123456789")
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: Client(service.server.url).send(req), range(8)))
    assert codes == [201] + [401] * 7, codes
    assert len(service.addresses()) == before + 2
    # A malformed nonce or timestamp.
    assert c.send(c.sign(c.prepare("GET", "/v1/halt"), nonce="short")).status_code == 401
    bad_ts = c.sign(c.prepare("GET", "/v1/halt"))
    bad_ts.headers["X-Custody-Timestamp"] = "1.7e9"
    assert c.send(bad_ts).status_code == 401


def test_the_halt_guard_holds_for_the_service_and_the_halt_read_keeps_the_lease_contract(
    service: Service, tmp_path: Path
) -> None:
    allowed = engine_check()
    c = service.client
    doc = c.ok("GET", "/v1/halt")
    (tmp_path / "running.json").write_text(json.dumps(doc))
    assert doc["halted"] is False and allowed(str(tmp_path / "running.json"))

    raised = service.shop.c("halt", "raise", "--reason", "drill", *service.shop.as_("alice"))
    assert raised.exit_code == 0, raised.output
    doc = c.ok("GET", "/v1/halt")
    (tmp_path / "halted.json").write_text(json.dumps(doc))
    assert doc["halted"] is True and not allowed(str(tmp_path / "halted.json"))
    before = len(service.addresses())
    requested = len(c.ok("GET", "/v1/withdrawals"))
    kept = c.sign(c.prepare("POST", "/v1/accounts/acct-7/addresses", json={"count": 1}))
    refused = c.send(kept)
    assert refused.status_code == 423 and refused.json()["error"]["exit_code"] == 3
    to, _ = destination()
    refused = c.call("POST", "/v1/withdrawals", json={"account": "acct-1", "destination": to, "amount": "0.001"})
    assert refused.status_code == 423 and refused.json()["error"]["exit_code"] == 3
    assert len(service.addresses()) == before
    assert len(c.ok("GET", "/v1/withdrawals")) == requested

    halt_id = doc["halts"][0]["id"]
    for who in ("alice", "bob"):
        assert service.shop.c("halt", "lift", str(halt_id), *service.shop.as_(who)).exit_code == 0
    doc = c.ok("GET", "/v1/halt")
    assert doc["halted"] is False
    # The request refused while halted, replayed after the lift (within its window): its nonce was
    # remembered though its issuance rolled back, so it is refused, not served now.
    replayed = c.send(kept)
    assert replayed.status_code == 401 and "replayed" in replayed.json()["error"]["message"]
    assert len(service.addresses()) == before
    assert c.call("POST", "/v1/accounts/acct-7/addresses", json={"count": 1}).status_code == 201


def test_the_halt_read_before_the_framework_answers_as_the_framework_route(service: Service) -> None:
    """A bodiless GET /v1/halt is answered in front of FastAPI (custody.service.halt_route); one
    with a query or a body goes to FastAPI's route. Both check the signature and answer alike."""
    c = service.client
    fast, framework = c.call("GET", "/v1/halt"), c.call("GET", "/v1/halt?via=framework")
    with_body = c.send(c.sign(c.prepare("GET", "/v1/halt", data=b"{}")))
    for r in (fast, framework, with_body):
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    docs = [r.json() for r in (fast, framework, with_body)]
    assert {json.dumps({k: d[k] for k in ("format", "version", "halted", "seq", "halts")}) for d in docs} == {
        json.dumps({k: docs[0][k] for k in ("format", "version", "halted", "seq", "halts")})
    }
    for path in ("/v1/halt", "/v1/halt?via=framework"):
        forged = c.sign(c.prepare("GET", path))
        forged.headers["X-Custody-Signature"] = "00" * 32
        refused = c.send(forged)
        assert refused.status_code == 401 and refused.json()["error"]["exit_code"] == 4, refused.text
        unsigned = requests.get(service.server.url + path, timeout=60)
        assert unsigned.status_code == 401 and "unsigned" in unsigned.json()["error"]["message"]


def test_serve_refuses_an_identity_that_could_approve_or_lift(service: Service) -> None:
    """A service identity with more than the request role never starts (exit 4)."""
    env = dict(service.shop.c.env)
    result = CliRunner().invoke(
        cli,
        ["serve", "--as", "alice", "--key", str(service.shop.employees["alice"])],
        env={**env, "CUSTODY_SERVICE_SECRET_FILE": str(service.server.secret_file)},
    )
    assert result.exit_code == 4 and "request role only" in result.output, result.output
    no_secret = CliRunner().invoke(cli, ["serve", "--as", "svc", "--key", str(service.shop.employees["svc"])], env=env)
    assert no_secret.exit_code == 2, no_secret.output


# ---------------------------------------------------------------- fuzzing every endpoint from the OpenAPI spec


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    return schemathesis.openapi.from_url(service.server.url + "/openapi.json")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(
    max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate]
)
def test_every_endpoint_fuzzed_from_the_spec_answers_without_a_server_error(case: Any, service: Service) -> None:
    """Generated paths, queries and bodies, each signed: never a 5xx, and 401 never (it is signed)."""
    kwargs = case.as_transport_kwargs(base_url=service.server.url)
    fields = {k: kwargs[k] for k in ("method", "url", "headers", "params", "data", "json", "cookies") if k in kwargs}
    response = service.client.send(
        service.client.sign(service.client.session.prepare_request(requests.Request(**fields)))
    )
    case.validate_response(response, checks=(not_a_server_error,))
    assert response.status_code != 401, response.text
