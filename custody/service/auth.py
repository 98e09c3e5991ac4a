"""Signed requests: how the exchange's backend authenticates to ``custody serve``.

Every request to ``/v1/...`` carries three headers:

* ``X-Custody-Timestamp``: Unix seconds when the client signed it;
* ``X-Custody-Nonce``: 16 to 64 characters of ``A-Z a-z 0-9 _ -``, never used twice;
* ``X-Custody-Signature``: hex HMAC-SHA256, with the shared secret, of the canonical request::

      METHOD \\n TARGET \\n TIMESTAMP \\n NONCE \\n hex(SHA-256(BODY))

  where TARGET is the path and query exactly as on the request line (``/v1/withdrawals?status=requested``)
  and BODY the raw body bytes (empty for a GET).

The server refuses (401) a request without them, with a timestamp more than ``window``
seconds from its clock, with another signature, or with a nonce it has accepted within the
window. Nonces are remembered only after the signature checked, so unsigned traffic cannot
fill the memory; a full memory refuses (429) rather than forgetting a nonce early.

``custody serve`` remembers the nonce of every state-changing request (any method but GET and
HEAD) in the store (:mod:`custody.service.nonces`), so that a request accepted by one instance
behind a load balancer is refused by every other. A read's nonce it remembers in the
process's memory only: a replayed read changes nothing and answers only what the captured
request asked, so it may be answered once more by each other process within the window
(docs/THREAT_MODEL.md), and no read waits for a write to the store.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from custody.errors import ApprovalError, InputError

TIMESTAMP = "X-Custody-Timestamp"
NONCE = "X-Custody-Nonce"
SIGNATURE = "X-Custody-Signature"
WINDOW = 300.0
"""Seconds a signed request stays acceptable either side of the server's clock."""
MAX_NONCES = 1_000_000
MIN_SECRET = 16
READS = frozenset({"GET", "HEAD"})
"""The methods that change nothing (every route answering them is a read)."""
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


class Unauthorized(ApprovalError):
    """A request that is not signed, or not signed right, or replayed (HTTP 401)."""


class TooManyNonces(ApprovalError):
    """The nonce memory is full: the request is refused, never a nonce forgotten early (HTTP 429)."""


def read_secret(path: Path) -> bytes:
    """The shared secret: the first line of ``path``, at least 16 bytes. Raises InputError."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the service secret file {path}: {exc.strerror}") from None
    secret = lines[0].strip() if lines else b""
    if len(secret) < MIN_SECRET:
        raise InputError(f"the service secret in {path} is shorter than {MIN_SECRET} bytes")
    return secret


def canonical(method: str, target: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes a request's signature covers."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join([method.upper(), target, timestamp, nonce, digest]).encode("utf-8")


def sign(secret: bytes, method: str, target: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The ``X-Custody-Signature`` of a request (what a client computes)."""
    return hmac.new(secret, canonical(method, target, timestamp, nonce, body), hashlib.sha256).hexdigest()


class NonceStore(Protocol):
    """Where accepted nonces are remembered until they can no longer be replayed."""

    def claim(self, nonce: str, now: float, until: float) -> None:
        """Remember ``nonce`` until ``until``; raise Unauthorized when it is remembered already
        (TooManyNonces when there is no room)."""


class MemoryNonces:
    """Nonces in this process's memory: right for one process only (tests, a single instance)."""

    def __init__(self, max_nonces: int = MAX_NONCES) -> None:
        self._max = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, nonce: str, now: float, until: float) -> None:
        with self._lock:
            self._expire(now)
            if nonce in self._seen:
                raise Unauthorized("replayed request: this nonce was used already")
            if len(self._seen) >= self._max:
                raise TooManyNonces("too many requests within the replay window; try again later")
            self._seen[nonce] = until

    def _expire(self, now: float) -> None:
        # Insertion order is expiry order (the clock only moves forward, mostly); stop at the first live one.
        while self._seen:
            nonce, until = next(iter(self._seen.items()))
            if until > now:
                return
            del self._seen[nonce]


class Verifier:
    """Checks signed requests and remembers their nonces for twice the window (thread-safe):
    a read's (GET, HEAD) in ``read_nonces`` (default: ``nonces``), any other's in ``nonces``."""

    def __init__(
        self,
        secret: bytes,
        *,
        window: float = WINDOW,
        nonces: NonceStore | None = None,
        read_nonces: NonceStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self.window = window
        self._nonces = nonces if nonces is not None else MemoryNonces()
        self._read_nonces = read_nonces if read_nonces is not None else self._nonces
        self._clock = clock

    def check(
        self, method: str, target: str, timestamp: str | None, nonce: str | None, signature: str | None, body: bytes
    ) -> None:
        """Accept the request once, or raise Unauthorized (TooManyNonces when the memory is full)."""
        accepted = self.accept(method, target, timestamp, nonce, signature, body)
        store = self._read_nonces if method.upper() in READS else self._nonces
        store.claim(accepted.nonce, accepted.now, accepted.until)

    def accept(
        self, method: str, target: str, timestamp: str | None, nonce: str | None, signature: str | None, body: bytes
    ) -> Accepted:
        """:meth:`check` but for remembering the nonce, which the caller must claim (a state
        change claims it in its own transaction: custody.service.nonces); raises Unauthorized."""
        if not timestamp or not nonce or not signature:
            raise Unauthorized(f"unsigned request: {TIMESTAMP}, {NONCE} and {SIGNATURE} are required")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise Unauthorized(f"{TIMESTAMP} must be Unix seconds")
        if not _NONCE.fullmatch(nonce):
            raise Unauthorized(f"{NONCE} must be 16 to 64 characters of A-Z a-z 0-9 _ -")
        now = self._clock()
        if abs(now - int(timestamp)) > self.window:
            raise Unauthorized(f"stale request: its timestamp is more than {self.window:g} s from the server's clock")
        expected = sign(self._secret, method, target, timestamp, nonce, body)
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise Unauthorized("bad signature")
        return Accepted(nonce, now, now + 2 * self.window)


@dataclass(frozen=True)
class Accepted:
    """A request whose signature and timestamp were checked: its nonce, to be remembered from
    ``now`` until ``until``."""

    nonce: str
    now: float
    until: float
