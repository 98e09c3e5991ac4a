"""Accepted request nonces in the store, shared by every ``custody serve`` instance on it.

Behind a load balancer a replayed request may reach another instance than the first; a
nonce remembered in one process's memory would not stop it there. Each accepted nonce is
inserted into ``service_nonce`` (its primary key), in the transaction of the state change it
came with (an issuance: one commit for both, neither without the other) or in one of its own:
the same nonce inserted by this instance or any other finds its row and the request is refused
as replayed. Rows are deleted once expired (twice the window after acceptance), every
:data:`SWEEP_EVERY` claims of a process.
"""

from __future__ import annotations

import itertools
import threading

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete

from custody.errors import StorageError
from custody.service.auth import Unauthorized
from custody.store.db import Database
from custody.store.models import ServiceNonce

SWEEP_EVERY = 256


class StoreNonces:
    """The :class:`custody.service.auth.NonceStore` of ``custody serve``."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._count = itertools.count()
        self._lock = threading.Lock()

    def claim(self, nonce: str, now: float, until: float) -> None:
        """Insert ``nonce``; raise Unauthorized when any instance inserted it before and it has
        not expired. Raises StorageError when the store cannot be written."""
        try:
            with self._db.transaction() as s:
                self.claim_in(s, nonce, now, until)
        except StorageError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # another instance inserted it meanwhile
                raise Unauthorized("replayed request: this nonce was used already") from None
            raise

    def claim_in(self, s: Session, nonce: str, now: float, until: float) -> None:
        """:meth:`claim` inside the caller's transaction (a state change's: one commit for both;
        a second insert of the nonce fails that commit on the key, and the change with it)."""
        with self._lock:
            sweep = next(self._count) % SWEEP_EVERY == 0
        if sweep:
            s.exec(delete(ServiceNonce).where(col(ServiceNonce.expires_at) <= now))
        # One statement: inserted, or an expired row of the same nonce taken over; a live one
        # stays and nothing comes back (the timestamp check refuses an expired one's request).
        taken = s.execute(_CLAIM, {"nonce": nonce, "until": until, "now": now}).first()
        if taken is None:
            raise Unauthorized("replayed request: this nonce was used already")


_CLAIM = text(
    "INSERT INTO service_nonce (nonce, expires_at) VALUES (:nonce, :until) "
    "ON CONFLICT (nonce) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE service_nonce.expires_at <= :now RETURNING nonce"
)
