"""An insider with PostgreSQL's SQL races the cached halt read of ``custody serve`` (``GET /v1/halt``).

On PostgreSQL the read is keyed on the server's hashes of the derivation's tables, taken in one
snapshot; the derivation ran in a transaction of its own, and the hashes were taken again after
it to decide whether to keep it. Hashes of content cannot tell A from A again: an insider who
sets the store to a state that says "running" for the derivation's snapshot alone (A, then B,
then A again before the second hash) had "running" kept under the key of the halted store, and
every later poll answered "not halted" while ``custody halt status`` said halted, until anything
in those tables changed. Table locks place each step where it must be, every time: the first
hash waits behind a lock on ``founder`` (its snapshot taken), the derivation behind one on ``halt``.
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg

from tests.service_support import Client, Server
from tests.support import Custody, founders


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.01)


def test_a_state_shown_to_the_derivation_alone_is_not_kept(tmp_path: Path, pg_url: str) -> None:
    c = Custody(tmp_path / "home", pg_url)
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    svc = c.employee("svc", roles="request")
    raised = c.json("halt", "raise", "--reason", "the hot wallet drains", "--as", "alice", "--key", str(alice))
    halt_id = raised["halt_id"]
    schema = unquote(parse_qs(urlsplit(pg_url).query)["options"][0]).split("=", 1)[1]

    gc.collect()
    server = Server(c.env, tmp_path, "svc", svc)
    insider = psycopg.connect(pg_url, autocommit=True)
    holds = [psycopg.connect(pg_url) for _ in range(2)]  # each holds a table lock in its transaction
    try:
        client = Client(server.url)
        (seq,) = insider.execute("SELECT seq FROM audit_log WHERE event = 'halt.raised'").fetchone() or (0,)

        def running(on: psycopg.Connection[Any], yes: bool) -> None:
            """B: the halt's entry renamed and its row lifted; A: both as they were, byte for byte."""
            on.execute("UPDATE audit_log SET event = %s WHERE seq = %s", ("halt.raisex" if yes else "halt.raised", seq))
            on.execute("UPDATE halt SET active = %s WHERE id = %s", (not yes, halt_id))

        ours = [insider.info.backend_pid, *(h.info.backend_pid for h in holds)]

        def waits(table: str, *, by: int | None = None) -> bool:
            """Whether the server (``by`` None: any backend but ours) waits for a lock on ``table``."""
            row = insider.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = %s::regclass "
                "AND (pid = %s::int OR (%s::int IS NULL AND NOT (pid = ANY(%s::int[])))))",
                (f'"{schema}".{table}', by, by, ours),
            ).fetchone()
            return bool(row and row[0])

        # The cache holds another key than the halted store's (any change and back does that).
        insider.execute("UPDATE halt SET reason = reason || '.' WHERE id = %s", (halt_id,))
        assert client.ok("GET", "/v1/halt")["halted"] is True
        insider.execute("UPDATE halt SET reason = left(reason, -1) WHERE id = %s", (halt_id,))

        founder_lock, halt_lock = holds
        founder_lock.execute(f'LOCK TABLE "{schema}".founder IN ACCESS EXCLUSIVE MODE')
        answers: list[dict[str, Any]] = []
        poll = threading.Thread(target=lambda: answers.append(client.ok("GET", "/v1/halt")))
        poll.start()
        _until(lambda: waits("founder"), "the read's hashes wait behind the lock on founder")
        running(insider, True)  # B, committed while the first hashes wait with A's snapshot
        locker = threading.Thread(
            target=lambda: halt_lock.execute(f'LOCK TABLE "{schema}".halt IN ACCESS EXCLUSIVE MODE')
        )
        locker.start()
        _until(lambda: waits("halt", by=ours[2]), "the lock on halt queued behind the read's hashes")
        founder_lock.rollback()
        _until(lambda: not poll.is_alive() or waits("halt"), "the derivation waits, or the read answered")
        locker.join()
        running(halt_lock, False)  # A again, before the hashes are taken again
        halt_lock.commit()
        poll.join()

        assert c("halt", "status").exit_code == 3  # the store: halted
        later = [client.ok("GET", "/v1/halt") for _ in range(2)]  # it was kept: "running" from now on
        for served in (*later, *answers):
            assert served["halted"] is True and [h["id"] for h in served["halts"]] == [halt_id], served
    finally:
        for conn in (insider, *holds):
            conn.close()
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
