"""An insider with the store's SQL (a database administrator: no founder key, no employee key,
no file of the online machine) lifts a halt by giving the store founders of her own.

Who may lift a halt is read from the founders-signed rosters, whose signatures are checked
against the founders of the store's manifest. The insider made a custody of her own on her own
machine: founders whose keys she holds, a manifest every one of them signed, a roster of them
listing "alice" and "bob" with keys she holds. She copies that manifest, policy, founders and
rosters over the store's, appends (well chained) the roster's ``roster.applied`` entry and a
``halt.lifted`` entry signed by her two employees, and marks the halt's row lifted. Every step
that compares the store with the manifest pinned on this machine refuses that store (issuance,
requests, approvals, lifts); what the trading engine obeys (``custody halt status`` and the halt
file it writes, ``GET /v1/halt``, ``/metrics``) must refuse her lift too: the lifters' founders
are this machine's pinned founders, not whoever the store names.
"""

from __future__ import annotations

import gc
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from custody.control import audit_log
from custody.control.halt_log import LIFT_DOMAIN
from custody.identity.employee_keys import FileSigner
from custody.identity.keyfile import open_employee_key
from custody.identity.statements import sign_statement
from custody.store.db import Database, normalize_url
from tests.service_support import Client, Server, halted_metric
from tests.support import PASSPHRASE, Custody, founders
from tests.test_halt_file import engine_check

TABLES = ("signed_manifest", "policy", "founder", "roster")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    yield None if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _swap_founders(store: str, theirs: str) -> None:
    """The insider's SQL: the store's manifest, policy, founders and rosters replaced by hers."""
    src_engine, dst_engine = create_engine(normalize_url(theirs)), create_engine(normalize_url(store))
    try:
        with src_engine.begin() as src, dst_engine.begin() as dst:
            for table in TABLES:
                rows = src.execute(text(f"SELECT * FROM {table}")).mappings().all()
                dst.execute(text(f"DELETE FROM {table}"))
                for row in rows:
                    names = ", ".join(row.keys())
                    values = ", ".join(f":{k}" for k in row.keys())
                    dst.execute(text(f"INSERT INTO {table} ({names}) VALUES ({values})"), dict(row))
    finally:
        src_engine.dispose()
        dst_engine.dispose()


def _append_her_lift(store: str, theirs: str, keys: dict[str, Path], halt_id: int) -> None:
    """Her roster's ``roster.applied`` entry and a ``halt.lifted`` her two employees signed,
    appended well chained (the tool's own library computes the hashes), the row marked lifted."""
    mine = Database(theirs)
    with mine.transaction() as s:
        (applied,) = s.execute(
            text("SELECT payload FROM audit_log WHERE event = 'roster.applied' ORDER BY seq DESC LIMIT 1")
        ).one()
    mine.dispose()
    db = Database(store)
    try:
        with db.transaction() as s:
            actor, payload = s.execute(text("SELECT actor, payload FROM audit_log WHERE event = 'halt.raised'")).one()
            raised = json.loads(payload)
            statement = [halt_id, raised["raised_at"], actor, raised["reason"]]
            lifts = []
            for who in ("alice", "bob"):
                signer = FileSigner(open_employee_key(keys[who], PASSPHRASE))
                signature = sign_statement(signer, LIFT_DOMAIN, statement)
                lifts.append({"employee": who, "pubkey": signer.public_key.hex(), "signature": signature})
            audit_log.append(s, "roster.applied", "operator", json.loads(applied))
            audit_log.append(
                s, "halt.lifted", "alice,bob", {"halt_id": halt_id, "signers": ["alice", "bob"], "lifts": lifts}
            )
            s.execute(
                text("UPDATE halt SET active = :no, lifted_at = CURRENT_TIMESTAMP WHERE id = :id"),
                {"no": False, "id": halt_id},
            )
        with db.transaction() as s:
            assert audit_log.verify_chain(s) == []  # the chain itself is intact
    finally:
        db.dispose()


def test_a_store_given_other_founders_by_sql_lifts_no_halt(tmp_path: Path, store_url: str | None) -> None:
    c = Custody(tmp_path / "home", store_url)
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    c.employee("bob")
    svc = c.employee("svc", roles="request")
    raised = c("halt", "raise", "--reason", "the hot wallet drains", "--as", "alice", "--key", str(alice), "--json")
    assert raised.exit_code == 0, raised.output
    halt_id = int(json.loads(raised.stdout)["halt_id"])

    her = Custody(tmp_path / "mallory")  # on her own machine: her founders, her "alice" and "bob"
    assert her.init(founders(tag="mallory ")).exit_code == 0
    keys = {who: her.employee(who) for who in ("alice", "bob")}

    gc.collect()
    server = Server(c.env, tmp_path, "svc", svc)
    try:
        client = Client(server.url)
        assert client.ok("GET", "/v1/halt")["halted"] is True

        _swap_founders(c.env["CUSTODY_DB_URL"], her.env["CUSTODY_DB_URL"])
        _append_her_lift(c.env["CUSTODY_DB_URL"], her.env["CUSTODY_DB_URL"], keys, halt_id)

        for light in ("1", "0"):  # the light read and the full one
            c.env["CUSTODY_HALT_LIGHT"] = light
            status = c("halt", "status", "--json")
            assert status.exit_code == 3, status.output
            (halt,) = json.loads(status.stdout)["halts"]
            assert halt["id"] == halt_id, halt
        assert not engine_check()(str(c.home / "halt.json"))  # the engine's lease says halted
        served = client.ok("GET", "/v1/halt")
        assert served["halted"] is True and [h["id"] for h in served["halts"]] == [halt_id], served
        assert halted_metric(server) == 1.0
        assert c("address", "new", "--account", "acct-1").exit_code == 3
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
