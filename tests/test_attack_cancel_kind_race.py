"""The red team against ``custody withdraw cancel``'s two reads of the row, with SQL and row locks only.

``withdraw cancel`` reads the row once to choose the path: a customer's withdrawal (or batch)
not signed yet is cancelled by the queue (its hold released to the customer); a fee bump or a
self-transfer holds nobody's money and is only dropped. The queue's cancel then reads the row
again, locked, and trusted the first read: it released the hold of whatever kind it found.

The insider, on PostgreSQL, labels a requested fee bump ``single`` (committed), then relabels it
``bump`` in a transaction she keeps open, holding the row's lock. The cancel's first read sees
``single`` and takes the queue's path; its locked read waits for her; she commits; it reads
``bump``, whose (empty) hold it does not check, and credited the customer the bump's amount and
fee out of nothing. The queue's cancel now refuses any kind but a customer's withdrawal or batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import postings


def _blocked_by(url: str, pid: int) -> bool:
    """Whether some backend waits for a lock that backend ``pid`` holds."""
    with psycopg.connect(url, autocommit=True) as probe:
        return (
            probe.execute("SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)).fetchone()
            is not None
        )


def test_a_bump_relabelled_while_its_cancel_waits_for_the_row_credits_nobody(tmp_path: Path, pg_url: str) -> None:
    shop = EmbeddedShop(tmp_path, "p2wsh", db_url=pg_url)
    try:
        shop.deposit("acct-1")
        to, _ = destination()
        wid = shop.signed(to, "0.015")
        bid = int(shop.ok("withdraw", "bump", str(wid), "--fee-rate", "6", *shop.as_("carol"))["id"])
        balance = shop.ok("ledger", "balance", "acct-1")["balance_sat"]

        conn = psycopg.connect(pg_url)
        conn.execute("UPDATE withdrawal SET kind = 'single' WHERE id = %s", (bid,))
        conn.commit()
        conn.execute("UPDATE withdrawal SET kind = 'bump' WHERE id = %s", (bid,))  # not committed: she holds the row
        shop.chain.close()  # the cancel runs in a process of its own, which opens the chain
        env = dict(os.environ, **shop.c.env)
        args = ["withdraw", "cancel", str(bid), "--reason", "drill", *shop.as_("alice"), "--json"]
        cancel = subprocess.Popen(
            [sys.executable, "-m", "custody_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 120
            while not _blocked_by(pg_url, conn.info.backend_pid):  # its first read saw "single"; its lock waits
                assert cancel.poll() is None, cancel.communicate()
                assert time.monotonic() < deadline, "the cancel never waited for the row"
                time.sleep(0.05)
            conn.commit()  # the row is a bump again
            out, err = cancel.communicate(timeout=120)
        finally:
            if cancel.poll() is None:
                cancel.kill()
            conn.close()
        assert cancel.returncode == 6, (out, err)  # Conflict: a bump is dropped, never released
        assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == balance  # nobody credited
        assert postings(shop, bid) == []
        assert json.loads(shop.c("withdraw", "show", str(bid), "--json").stdout)["status"] == "requested"
    finally:
        shop.chain.close()  # idempotent
