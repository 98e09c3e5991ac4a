"""Signed webhooks: a JSON POST with an HMAC-SHA256 signature over ``timestamp.body``.

Headers: ``X-Custody-Timestamp`` (Unix seconds) and ``X-Custody-Signature`` (hex
HMAC-SHA256 with the shared secret over ``<timestamp>.<raw body>``). A receiver recomputes
the HMAC over the raw body bytes, compares in constant time, and rejects timestamps more
than a few minutes from its own clock (:func:`check_signature` does both).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from custody.errors import InputError

TOLERANCE_SECONDS = 300
MIN_SECRET_BYTES = 16


def check_url(url: str) -> str:
    """The URL, when it is http(s) with a host and no credentials in it.

    Raises InputError otherwise.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InputError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InputError(f"a webhook URL must be http:// or https://, not {parts.scheme or 'schemeless'!r}")
    if not parts.hostname:
        raise InputError("the webhook URL has no host")
    if parts.username or parts.password:
        raise InputError("no credentials in the webhook URL: the request is authenticated by its HMAC signature")
    if any(ord(c) < 33 for c in url):
        raise InputError("the webhook URL contains spaces or control characters")
    return url


def redact(url: str) -> str:
    """``scheme://host[:port]/…``: paths and queries may carry tokens (as Slack's do)."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.hostname}{port}{rest}"


def check_secret(secret: bytes) -> bytes:
    """Raises InputError for a secret shorter than 16 bytes."""
    if len(secret) < MIN_SECRET_BYTES:
        raise InputError(f"the webhook secret must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return secret


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``b"<timestamp>." + body`` under ``secret``."""
    return hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def check_signature(
    secret: bytes,
    timestamp: str,
    body: bytes,
    received: str,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does: the timestamp is recent and the signature matches."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, ts, body), received.strip().lower())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: the signed body goes only to the registered URL."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookFailed(Exception):
    """The receiver did not answer 2xx (or could not be reached)."""


def post(url: str, secret: bytes, body: bytes, headers: dict[str, str], *, timeout: float) -> int:
    """POST ``body`` signed now; return the HTTP status.

    Raises WebhookFailed for anything but a 2xx answer, or when the receiver is unreachable.
    """
    ts = int(time.time())
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", "custody-webhook/1")
    request.add_header("X-Custody-Timestamp", str(ts))
    request.add_header("X-Custody-Signature", signature(secret, ts, body))
    for name, value in headers.items():
        request.add_header(name, value)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=max(timeout, 0.1)) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise WebhookFailed(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WebhookFailed(f"unreachable: {reason}") from None
    if not 200 <= status < 300:
        raise WebhookFailed(f"HTTP {status}")
    return status
