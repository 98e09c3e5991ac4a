"""``GET /v1/halt`` answered in front of the framework: the route every trading process polls.

FastAPI's route (custody.service.api) stays, for the OpenAPI spec and for whatever this path
declines; this plain ASGI layer answers the common request itself, with the same checks and
the same document: the request's signature, timestamp and nonce (:meth:`auth.Verifier.check`,
the nonce kept in this process's memory as for every read), then the halt state read from the
store after the request came (:meth:`HaltReader.aread`), under the halt file's contract. What
it saves is the framework's work around that (dependency solving, request objects, routing),
which cost more than the read itself under fifty clients.

It takes only a bodiless ``GET /v1/halt`` without a query; anything else (a body, whose size
FastAPI limits; a query; HEAD) goes to the framework's route, which answers the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from custody.control.halt_state import HaltState
from custody.errors import CustodyError
from custody.service import auth
from custody.service.halt_read import HaltReader

PATH = "/v1/halt"
_HEADERS = {name.lower().encode("latin-1"): name for name in (auth.TIMESTAMP, auth.NONCE, auth.SIGNATURE)}


class HaltRoute:
    """The ASGI layer: ``document(state)`` makes the answer (custody.service.api.halt_document
    with the lease), ``failure(exc)`` the body and status of a refusal."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        reader: HaltReader,
        verifier: auth.Verifier,
        document: Callable[[HaltState], dict[str, Any]],
        failure: Callable[[CustodyError], tuple[int, dict[str, Any]]],
    ) -> None:
        self.app = app
        self._reader = reader
        self._verifier = verifier
        self._document = document
        self._failure = failure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        signed = _bodiless_halt_read(scope)
        if signed is None:
            await self.app(scope, receive, send)
            return
        try:
            self._verifier.check("GET", PATH, *signed, b"")  # a read's nonce: in memory, never waits
            status, body = 200, self._document(await self._reader.aread())
        except CustodyError as exc:
            status, body = self._failure(exc)
        payload = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _bodiless_halt_read(scope: Scope) -> tuple[str | None, str | None, str | None] | None:
    """The signature headers of a request this layer answers (the first of each, as the
    framework reads them); None for any other request."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != PATH or scope.get("query_string"):
        return None
    if scope.get("raw_path", PATH.encode()) != PATH.encode() or scope.get("root_path"):
        return None
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return None  # a body: the framework reads it (and limits its size)
        wanted = _HEADERS.get(name)
        if wanted is not None and wanted not in found:
            found[wanted] = value.decode("latin-1")
    return found.get(auth.TIMESTAMP), found.get(auth.NONCE), found.get(auth.SIGNATURE)
