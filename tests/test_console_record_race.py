"""Console recordings raced by the two workers of one ``custody serve --workers 2`` on PostgreSQL.

The regtest node is the chain (the embedded chain is one process's); alice's security key,
made in software as an authenticator makes it (tests/test_webauthn.py's ``Key``), is in the
founders' roster. One worker stands still inside a recording, her key checked and her unsigned
requests counted, nothing committed (``CUSTODY_PAUSE_AT``), while the other worker is sent a
second recording. Were the count and the insert not serialized across processes, both would
find room under the cap and both would record: the second waits instead, then is refused (409,
exit 6), and she holds exactly the cap. Then her one assertion sent to both workers at once:
recorded once, the other refused as used. Requests without an assertion, sent to both workers
meanwhile, record nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.store.db import normalize_url
from custody.withdraw.records import MAX_UNSIGNED_REQUESTS
from tests.service_support import Server
from tests.test_webauthn import Key
from tests.withdraw_support import Shop, enrol, sign_and_apply

pytestmark = [pytest.mark.postgres, pytest.mark.regtest]


def _workers(server: Server) -> list[int]:
    """The worker processes of ``server`` (its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid:
            pids.append(int(entry.name))
    return pids


def _stopped(server: Server) -> list[int]:
    """Its workers stopped at their pause point (state T)."""
    out = []
    for pid in _workers(server):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                out.append(pid)
        except OSError:
            continue
    return out


def _wait_stopped(server: Server, what: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if stopped := _stopped(server):
            return stopped[0]
        time.sleep(0.02)
    raise AssertionError(f"{what} never reached its pause point")


class Console:
    def __init__(self, shop: Shop, server: Server, key: Key) -> None:
        self.shop, self.server, self.key = shop, server, key
        self.count = 0
        self.pool = ThreadPoolExecutor(4)
        self.engine = create_engine(normalize_url(shop.c.env["CUSTODY_DB_URL"]))

    def signed(self, amount: str) -> dict[str, Any]:
        """A recording of ``amount`` for acct-1 with alice's assertion over its challenge."""
        to, _ = self.shop.destination()
        content = {"employee": "alice", "account": "acct-1", "destination": to, "amount": amount}
        c = requests.post(f"{self.server.url}/console/api/requests/challenge", json=content, timeout=60).json()
        self.count += 1
        made = json.loads(self.key.assert_(bytes.fromhex(c["digest"]), self.count))
        return {**content, **made, "credential_id": self.key.credential.id, "nonce": c["nonce"], "at": c["at"]}

    def send(self, body: dict[str, Any]) -> Future[requests.Response]:
        """The recording posted on a connection of its own (either worker may take it)."""
        return self.pool.submit(requests.post, f"{self.server.url}/console/api/requests", json=body, timeout=300)

    def answered(self, future: Future[requests.Response]) -> requests.Response:
        """The response, resuming any worker that stands at the pause point meanwhile."""
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                for pid in _stopped(self.server):
                    os.kill(pid, signal.SIGCONT)

    def unsigned(self) -> int:
        with self.engine.connect() as conn:
            sql = "SELECT count(*) FROM withdrawal WHERE requester = 'alice' AND request_signature = ''"
            return int(conn.execute(text(sql + " AND status = 'requested'")).scalar_one())


def test_two_workers_racing_to_record_keep_the_cap_and_use_an_assertion_once(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, pg_url: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet, db_url=pg_url)
    shop.employees.update(enrol(shop.c, tmp_path, shop.founder_keys, ["svc"], roles="request"))
    shop.deposit("acct-1", "0.01", count=MAX_UNSIGNED_REQUESTS + 2)  # a coin per recording
    env = dict(shop.c.env, CUSTODY_PAUSE_AT="withdrawal.request_counted")
    server = Server(env, tmp_path, "svc", shop.employees["svc"], "--workers", "2", console=True)
    console = None
    try:
        assert len(_workers(server)) == 2
        key = Key("localhost", server.origin, b"alice")
        path = tmp_path / "alice-webauthn.json"
        path.write_text(json.dumps(key.credential.to_dict()))
        assert shop.c("roster", "propose", "--webauthn", f"alice={path}").exit_code == 0
        sign_and_apply(shop.c, tmp_path, shop.founder_keys)
        console = Console(shop, server, key)

        # Room for one more: alice records up to the cap less one (each pauses, then goes on).
        for _ in range(MAX_UNSIGNED_REQUESTS - 1):
            future = console.send(console.signed("0.001"))
            os.kill(_wait_stopped(server, "a recording"), signal.SIGCONT)
            assert future.result().status_code == 200, future.result().text
        assert console.unsigned() == MAX_UNSIGNED_REQUESTS - 1

        # Two recordings for that one place, each with its own good assertion.
        first, second = console.signed("0.001"), console.signed("0.002")
        held = console.send(first)
        paused = _wait_stopped(server, "the first recording")
        racer = console.send(second)  # the paused worker accepts nothing: the other one takes it
        bare = [console.send({k: v for k, v in first.items() if k != "signature"}) for _ in range(2)]
        deadline = time.monotonic() + 5  # without a lock across workers it stops at the pause point by now
        while time.monotonic() < deadline and not racer.done() and _stopped(server) == [paused]:
            time.sleep(0.05)
        both_inside = sorted(_stopped(server)) != [paused]
        os.kill(paused, signal.SIGCONT)
        won, lost = console.answered(held), console.answered(racer)
        assert not both_inside, "the second worker passed the cap while the first held its place"
        assert won.status_code == 200, won.text
        assert lost.status_code == 409 and "awaiting their security key" in lost.text, lost.text
        assert lost.json()["error"]["exit_code"] == 6
        assert all(console.answered(b).status_code == 422 for b in bare)
        assert console.unsigned() == MAX_UNSIGNED_REQUESTS

        # One place again (bob cancels one with his key file); alice's one assertion sent twice at once.
        cancelled = shop.c("withdraw", "cancel", str(won.json()["id"]), "--reason", "race", *shop.as_("bob"))
        assert cancelled.exit_code == 0, cancelled.output
        once = console.signed("0.003")
        held = console.send(once)
        paused = _wait_stopped(server, "the recording")
        again = console.send(once)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not again.done() and _stopped(server) == [paused]:
            time.sleep(0.05)
        os.kill(paused, signal.SIGCONT)
        answers = sorted((console.answered(f) for f in (held, again)), key=lambda r: r.status_code)
        assert [r.status_code for r in answers] == [200, 403], [r.text for r in answers]
        assert "used already" in answers[1].text, answers[1].text
        assert console.unsigned() == MAX_UNSIGNED_REQUESTS
    finally:
        for pid in _stopped(server):
            os.kill(pid, signal.SIGCONT)
        if console is not None:
            console.pool.shutdown(wait=False, cancel_futures=True)
            console.engine.dispose()
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()
