"""Two ``custody serve`` instances on one PostgreSQL store, as behind a load balancer: 50
concurrent issuance requests spread over both get unique indexes with no gap, each recorded
once in the audit log; a signed write accepted by one is refused by the other (its nonce is in
the store), also when both receive it at once; a replayed read is answered once per instance.
The halt read's cache on PostgreSQL: a halt raised by the CLI is the next read's answer."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.service_support import Client, Server
from tests.support import Custody
from tests.withdraw_support import enrol, key_ceremony

pytestmark = pytest.mark.postgres


def _to(req: requests.PreparedRequest, server: Server) -> requests.PreparedRequest:
    """The same signed request, as a load balancer forwards it to ``server`` (the signature
    covers the path, not the host)."""
    copy = req.copy()
    copy.url = server.url + req.path_url
    return copy


def test_two_instances_issue_disjoint_indexes_without_gaps_and_share_nonces(tmp_path: Path, pg_url: str) -> None:
    c = Custody(tmp_path / "home", db_url=pg_url)
    founders = key_ceremony(c, tmp_path, "p2wsh")
    keys = enrol(c, tmp_path, founders, ["svc"], roles="request")
    keys |= enrol(c, tmp_path, founders, ["alice"])
    servers = [Server(c.env, tmp_path, "svc", keys["svc"]) for _ in range(2)]
    try:
        clients = [Client(s.url) for s in servers]

        def issue(i: int) -> list[int]:
            r = clients[i % 2].call("POST", f"/v1/accounts/acct-{i % 5}/addresses", json={"count": 3})
            assert r.status_code == 201, r.text
            return [a["index"] for a in r.json()]

        with ThreadPoolExecutor(10) as pool:
            indexes = [i for batch in pool.map(issue, range(50)) for i in batch]

        # Replayed at the other instance: refused there, nothing issued.
        first = clients[0].sign(clients[0].prepare("POST", "/v1/accounts/acct-r/addresses", json={"count": 1}))
        assert clients[0].send(first).status_code == 201
        replayed = clients[1].send(_to(first, servers[1]))
        assert replayed.status_code == 401 and "replayed" in replayed.json()["error"]["message"], replayed.text
        # A replayed read changes nothing: its nonce is each process's own (docs/THREAT_MODEL.md), so
        # the other instance answers it once, and neither twice.
        read = clients[1].sign(clients[1].prepare("GET", "/v1/halt"))
        assert clients[1].send(read).status_code == 200
        assert clients[1].send(read).status_code == 401
        assert clients[0].send(_to(read, servers[0])).status_code == 200
        assert clients[0].send(_to(read, servers[0])).status_code == 401

        # The same signed request at both at once: exactly one accepts it.
        def race(n: int) -> list[int]:
            req = clients[0].sign(clients[0].prepare("POST", f"/v1/accounts/acct-race-{n}/addresses", json={}))
            with ThreadPoolExecutor(2) as both:
                answers = list(both.map(lambda i: clients[i].send(_to(req, servers[i])), range(2)))
            return sorted(a.status_code for a in answers)

        assert [race(n) for n in range(8)] == [[201, 401]] * 8

        # Both halt readers warm; the head tampered by SQL: each fails closed, then recovers.
        assert [cl.ok("GET", "/v1/halt")["halted"] for cl in clients * 2] == [False] * 4
        store = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with store.begin() as conn:
            conn.execute(text("UPDATE audit_head SET seq = seq - 1"))
        tampered = [cl.ok("GET", "/v1/halt") for cl in clients * 2]
        assert all(d["halted"] is True and "error" in d for d in tampered), tampered
        with store.begin() as conn:
            conn.execute(text("UPDATE audit_head SET seq = seq + 1"))
        store.dispose()
        assert [cl.ok("GET", "/v1/halt")["halted"] for cl in clients * 2] == [False] * 4
        # A halt raised by the CLI: the next read of each instance says so.
        raised = c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(keys["alice"]))
        assert raised.exit_code == 0, raised.output
        assert [cl.ok("GET", "/v1/halt")["halted"] for cl in clients * 2] == [True] * 4
    finally:
        codes = [s.stop() for s in servers]
    assert all(code in (0, -signal.SIGTERM) for code in codes)
    assert sorted(indexes) == list(range(150))
    stored = c.json("address", "list")
    assert sorted(a["index"] for a in stored) == list(range(150 + 1 + 8))  # and the replay and race tests' own
    log = c.json("audit", "log")
    assert sum(e["payload"]["count"] for e in log if e["event"] == "address.issued") == 150 + 1 + 8
