"""Two ``custody serve`` instances on one PostgreSQL store, as behind a load balancer: 50
concurrent issuance requests spread over both get unique indexes with no gap, each recorded
once in the audit log."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.service_support import Client, Server
from tests.support import Custody
from tests.withdraw_support import enrol, key_ceremony

pytestmark = pytest.mark.postgres


def test_two_instances_issue_disjoint_indexes_without_gaps(tmp_path: Path, pg_url: str) -> None:
    c = Custody(tmp_path / "home", db_url=pg_url)
    founders = key_ceremony(c, tmp_path, "p2wsh")
    keys = enrol(c, tmp_path, founders, ["svc"], roles="request")
    servers = [Server(c.env, tmp_path, "svc", keys["svc"]) for _ in range(2)]
    try:
        clients = [Client(s.url) for s in servers]

        def issue(i: int) -> list[int]:
            r = clients[i % 2].call("POST", f"/v1/accounts/acct-{i % 5}/addresses", json={"count": 3})
            assert r.status_code == 201, r.text
            return [a["index"] for a in r.json()]

        with ThreadPoolExecutor(10) as pool:
            indexes = [i for batch in pool.map(issue, range(50)) for i in batch]
    finally:
        codes = [s.stop() for s in servers]
    assert all(code in (0, -signal.SIGTERM) for code in codes)
    assert sorted(indexes) == list(range(150))
    stored = c.json("address", "list")
    assert sorted(a["index"] for a in stored) == list(range(150))
    log = c.json("audit", "log")
    assert sum(e["payload"]["count"] for e in log if e["event"] == "address.issued") == 150
