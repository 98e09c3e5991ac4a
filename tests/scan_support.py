"""A fast path to an address table of realistic size, for the block scanner's test and benchmark.

Deriving and verifying 100,000 addresses takes minutes on a loaded 2-core machine; what the
scanner's cost could grow with is the size of the address table and of its scriptPubKey
index. :func:`fill_addresses` bulk-inserts rows with distinct p2wsh-shaped scriptPubKeys
(SHA-256 of their index) at indexes no issuance reaches (from FILLER_FIRST), under account
``filler``. Nobody pays them, and they are in no audit-log issuance: a store filled this way
is for measuring, not for auditing.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import insert

from custody.store.db import Database
from custody.store.models import AddressRow

FILLER_FIRST = 10_000_000
_BATCH = 50_000


def fill_addresses(db: Database, count: int) -> None:
    """Insert ``count`` filler deposit-address rows (see the module's docstring)."""
    at = datetime.now(UTC)
    for start in range(FILLER_FIRST, FILLER_FIRST + count, _BATCH):
        rows = [
            {
                "chain": 0,
                "idx": i,
                "account": "filler",
                "address": f"filler-{i}",
                "script_pubkey": "0020" + hashlib.sha256(str(i).encode()).hexdigest(),
                "script": "",
                "created_at": at,
            }
            for i in range(start, min(start + _BATCH, FILLER_FIRST + count))
        ]
        with db.transaction() as s:
            s.execute(insert(AddressRow), rows)
