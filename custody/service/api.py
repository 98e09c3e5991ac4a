"""``custody serve``: the HTTP API for the exchange's backend (FastAPI; OpenAPI at /openapi.json).

Every route under ``/v1`` needs a signed request (:mod:`custody.service.auth`). State changes
(issuing addresses, requesting a withdrawal) call the same library functions as the CLI,
so the same halt guard, audit log entries and verification apply; the service requests
withdrawals as one roster employee that holds the ``request`` role and no other, with its
own key. Errors keep the CLI's exit code in the body and map to an HTTP status.
"""

# size(create_app): FastAPI's routes are closures over the app's settings and database, registered
#   in the factory that builds them

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custody import __version__
from custody.books.deposits import deposit, list_deposits
from custody.chain.backend import backend_for
from custody.clock import iso, now
from custody.config import Settings
from custody.control import halt as halt_lib
from custody.control import witness
from custody.control.halt_state import with_waiting
from custody.control.roster import authenticate, check_pinned, load_trust
from custody.control.wallet import load_policy
from custody.errors import (
    ApprovalError,
    Conflict,
    CustodyError,
    HaltedError,
    InputError,
    KeyFileError,
    NodeError,
    NotFound,
    StorageError,
    VerificationFailed,
)
from custody.identity.employee_keys import EmployeeSigner
from custody.issuance.issuer import get_address, issue_addresses, list_addresses
from custody.service import auth, status_page
from custody.service.coalesce import Coalesced
from custody.service.console import console_router
from custody.service.console_halt import halt_router
from custody.service.console_request import request_router
from custody.service.halt_read import HaltReader
from custody.service.halt_route import HaltRoute
from custody.service.metrics import CustodyCollector
from custody.service.nonces import StoreNonces
from custody.store.db import Database
from custody.store.models import AuditHead
from custody.withdraw import limits as wd_limits
from custody.withdraw import queue as wd

MAX_ISSUE = 1000
"""Addresses one request may issue."""
MAX_ID = 2**31 - 1
T = TypeVar("T")
_TEXT = r"^[\x20-\x7e]{1,128}$"
"""Printable ASCII: what an account, an address or an outpoint is made of."""


@dataclass
class ServiceConfig:
    """What one ``custody serve`` process runs with."""

    settings: Settings
    db: Database
    secret: bytes = field(repr=False)
    identity: str
    """The roster employee the service requests withdrawals as (``request`` role only)."""
    key: EmployeeSigner = field(repr=False)
    window: float = auth.WINDOW
    console_origin: str | None = None
    """The approval console's origin as browsers see it (``http://localhost:8080``); None: no console."""


def check_identity(db: Database, settings: Settings, name: str, key: EmployeeSigner) -> tuple[str, ...]:
    """The service identity must be a roster employee whose key ``key`` is, holding the
    ``request`` role and no other (a service that could approve or lift would be one insider
    short of the two-person rules). Returns its roles. Raises NotFound, ApprovalError,
    VerificationFailed, StorageError."""
    db.check_schema()
    with db.transaction() as s:
        employee = authenticate(s, check_pinned(s, load_trust(settings)), name, key, "request")
    if set(employee.roles) != {"request"}:
        raise ApprovalError(
            f"the service identity {name} must hold the request role only, not {', '.join(employee.roles)}: "
            "give the service an employee of its own in the founders' roster"
        )
    return tuple(sorted(employee.roles))


# ---------------------------------------------------------------- errors


_STATUS: list[tuple[type[CustodyError], int]] = [
    (auth.TooManyNonces, 429),
    (auth.Unauthorized, 401),
    (InputError, 400),
    (HaltedError, 423),
    (VerificationFailed, 423),
    (ApprovalError, 403),
    (NotFound, 404),
    (Conflict, 409),
    (KeyFileError, 500),
    (NodeError, 502),
    (StorageError, 503),
]


def http_status(exc: CustodyError) -> int:
    """The HTTP status of a library error (its exit code travels in the body)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: CustodyError) -> dict[str, Any]:
    return {"error": {"kind": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}}


# ---------------------------------------------------------------- bodies


class IssueBody(BaseModel):
    count: int = Field(default=1, ge=1, le=MAX_ISSUE, description="How many addresses to issue.")


class WithdrawalBody(BaseModel):
    account: str = Field(min_length=1, max_length=128, pattern=_TEXT, description="The customer account to debit.")
    destination: str = Field(min_length=1, max_length=128, pattern=_TEXT, description="Where to send the coins.")
    amount: str = Field(
        min_length=1, max_length=32, pattern=r"^[0-9.]+$", description="Amount in BTC as a decimal string."
    )
    fee_rate: str | None = Field(
        default=None, max_length=32, pattern=r"^[0-9.]+$", description="sat/vB (default: CUSTODY_FEE_RATE)."
    )


Account = Annotated[str, Path(min_length=1, max_length=128, pattern=_TEXT, description="Customer account.")]
WithdrawalId = Annotated[int, Path(ge=1, le=MAX_ID)]
StatusQuery = Annotated[str | None, Query(max_length=32, pattern=r"^[a-z_]+$")]


# ---------------------------------------------------------------- the app


def halt_document(state: halt_lib.HaltState, lease: float) -> dict[str, Any]:
    """The halt state under the halt file's contract: trade only while it parses, says
    ``"halted": false`` and ``valid_until`` is in the future (the lease counted from now)."""
    stamp = now()
    # An unreadable state is a halt, and it holds only for this answer.
    until = iso(stamp + timedelta(seconds=lease)) if state.error is None else iso(stamp)
    return state.document(state.halted, iso(stamp), until)


def audit_head(db: Database) -> dict[str, Any]:
    """The audit log's head: its last entry's sequence number and hash (0 and "" when empty)."""
    db.check_schema()
    with db.transaction() as s:
        head = s.exec(select(AuditHead).where(AuditHead.id == 1)).first()
        return {"seq": head.seq if head else 0, "hash": head.hash if head else ""}


_OBJECT: dict[int | str, dict[str, Any]] = {
    200: {"description": "A JSON object", "content": {"application/json": {"schema": {"type": "object"}}}}
}

_OBJECTS: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "A JSON array of objects",
        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
    }
}

_TIMESTAMP = APIKeyHeader(
    name=auth.TIMESTAMP,
    scheme_name="CustodyTimestamp",
    auto_error=False,
    description="Unix seconds when it was signed.",
)
_NONCE = APIKeyHeader(
    name=auth.NONCE, scheme_name="CustodyNonce", auto_error=False, description="16-64 of A-Za-z0-9_-, never reused."
)
_SIGNATURE = APIKeyHeader(
    name=auth.SIGNATURE,
    scheme_name="CustodySignature",
    auto_error=False,
    description="hex HMAC-SHA256 of METHOD\\nTARGET\\nTIMESTAMP\\nNONCE\\nhex(SHA-256(BODY)).",
)


async def _signed_target(request: Request) -> tuple[str, bytes]:
    """The request's target as signed (path and query, undecoded) and its body."""
    body = await request.body()
    target = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
    query = request.scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    return target, body


async def signed(
    request: Request,
    timestamp: Annotated[str | None, Depends(_TIMESTAMP)],
    nonce: Annotated[str | None, Depends(_NONCE)],
    signature: Annotated[str | None, Depends(_SIGNATURE)],
) -> None:
    """The dependency of every /v1 route: a signed, fresh, unreplayed request, else 401."""
    target, body = await _signed_target(request)
    verifier: auth.Verifier = request.app.state.verifier
    if request.method in auth.READS:  # its nonce in memory: never waits
        verifier.check(request.method, target, timestamp, nonce, signature, body)
    else:  # its nonce written to the store, which may wait for a writer: never on the event loop
        await run_in_threadpool(verifier.check, request.method, target, timestamp, nonce, signature, body)


async def signed_change(
    request: Request,
    timestamp: Annotated[str | None, Depends(_TIMESTAMP)],
    nonce: Annotated[str | None, Depends(_NONCE)],
    signature: Annotated[str | None, Depends(_SIGNATURE)],
) -> auth.Accepted:
    """:func:`signed` for a state change that records the nonce in its own transaction (one
    commit a request, not two): signature and timestamp checked here, the nonce claimed by the
    route (:func:`_claiming`)."""
    target, body = await _signed_target(request)
    verifier: auth.Verifier = request.app.state.verifier
    return verifier.accept(request.method, target, timestamp, nonce, signature, body)


def _claiming(nonces: StoreNonces, accepted: auth.Accepted, change: Callable[[Callable[[Session], None]], T]) -> T:
    """``change(within)``, which runs ``within`` in its transaction: the nonce claimed there. When
    the change fails, its transaction took the nonce with it: claimed then on its own, so that
    a refused request (halted, say) cannot be replayed to succeed later; a replay is refused."""
    try:
        return change(lambda s: nonces.claim_in(s, accepted.nonce, accepted.now, accepted.until))
    except BaseException:
        nonces.claim(accepted.nonce, accepted.now, accepted.until)  # Unauthorized for a replay
        raise


def _install_error_handlers(app: FastAPI) -> None:
    """Custody's errors answer with their exit code; anything else is a 500 with no traceback."""

    @app.exception_handler(CustodyError)
    async def custody_error(_request: Request, exc: CustodyError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=http_status(exc))

    app.add_middleware(LastDefence)


class LastDefence:
    """An answer, never a traceback on the wire: any other exception is a 500 with its kind only.

    Plain ASGI rather than ``@app.middleware("http")``, whose task group and streams cost
    every request more than the halt read itself.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - an answer, never a traceback on the wire
            if started or scope["type"] != "http":
                raise  # too late for another answer: the server closes the connection
            body = {"error": {"kind": "InternalError", "exit_code": 1, "message": type(exc).__name__}}
            await JSONResponse(body, status_code=500)(scope, receive, send)


def create_app(config: ServiceConfig) -> FastAPI:
    """The ASGI application of ``custody serve``."""
    # A write's nonce in the store, refused by every instance; a read's in this process (auth's docstring).
    nonces = StoreNonces(config.db)
    verifier = auth.Verifier(config.secret, window=config.window, nonces=nonces, read_nonces=auth.MemoryNonces())
    db, settings = config.db, config.settings
    halt_reader = HaltReader(db)
    state_lock = threading.Lock()  # one state change at a time in this process (the chain backend is one object)
    app = FastAPI(
        title="custody",
        version=__version__,
        description=(
            "The custody service for the exchange's backend. Every /v1 request is signed: see the "
            "README's 'The HTTP service' section."
        ),
    )
    app.state.verifier = verifier
    app.add_middleware(  # inside LastDefence (added next): GET /v1/halt before the framework's work
        HaltRoute,
        reader=halt_reader,
        verifier=verifier,
        # a halt the store could not record (waiting in the halt file's pending) holds
        document=lambda state: halt_document(with_waiting(state, settings.halt_file), settings.halt_lease),
        failure=lambda exc: (http_status(exc), error_body(exc)),
    )
    _install_error_handlers(app)

    # After a state change, as after every CLI command: the log checked against the local witness
    # and its head appended. Concurrent requests share a check that began after each one's commit.
    local = witness.LocalWitness(db, settings.witness_file)
    witnessed = Coalesced(lambda: witness.after_command(db, settings, known=True, local=local)).call

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(signed)])
    changes = APIRouter(prefix="/v1")  # signed too (signed_change), the nonce claimed with the change

    @changes.post(
        "/accounts/{account}/addresses",
        status_code=201,
        summary="Issue deposit addresses",
        response_model=None,
        responses=_OBJECTS,
    )
    def issue(
        account: Account, body: IssueBody, accepted: Annotated[auth.Accepted, Depends(signed_change)]
    ) -> JSONResponse:
        """Issue the next deposit address(es) for the account, each verified independently first."""
        with state_lock:
            issued = _claiming(
                nonces,
                accepted,
                lambda within: issue_addresses(db, settings, account, body.count, actor=config.identity, within=within),
            )
        witnessed()
        # A response, not a list: FastAPI would validate a list in another worker-thread hop.
        return JSONResponse([a.to_dict() for a in issued], status_code=201)

    @v1.get("/accounts/{account}/addresses", summary="An account's deposit addresses")
    def account_addresses(account: Account) -> list[dict[str, Any]]:
        return [a.to_dict() for a in list_addresses(db, account)]

    @v1.get("/addresses/{address}", summary="One issued address")
    def address(address: Annotated[str, Path(min_length=1, max_length=128, pattern=_TEXT)]) -> dict[str, Any]:
        return get_address(db, address).to_dict()

    @v1.post("/withdrawals", status_code=201, summary="Request a withdrawal")
    def request_withdrawal(body: WithdrawalBody) -> dict[str, Any]:
        """Request a withdrawal as the service identity (employees then approve it, as many as the
        rulebook's tier asks; a request the rulebook forbids is refused, 403, naming the rule)."""
        with state_lock:
            backend = backend_for(settings, load_policy(db).network.name)
            result = wd.request_withdrawal(
                db,
                settings,
                backend,
                account=body.account,
                destination=body.destination,
                amount=body.amount,
                fee_rate=body.fee_rate,
                requester=config.identity,
                key=config.key,
                limits=wd_limits.limits_from_settings(settings),
            )
        witnessed()
        return result

    @v1.get("/withdrawals", summary="Withdrawals, optionally of one status")
    def withdrawals(status: StatusQuery = None) -> list[dict[str, Any]]:
        return wd.list_withdrawals(db, status)

    @v1.get("/withdrawals/{withdrawal_id}", summary="One withdrawal")
    def withdrawal(withdrawal_id: WithdrawalId) -> dict[str, Any]:
        return wd.show_withdrawal(db, withdrawal_id)

    @v1.get("/deposits", summary="Deposits seen on the chain")
    def deposits(
        account: Annotated[str | None, Query(min_length=1, max_length=128, pattern=_TEXT)] = None,
        status: StatusQuery = None,
    ) -> list[dict[str, Any]]:
        return list_deposits(db, account, status)

    @v1.get("/deposits/{outpoint}", summary="One deposit by outpoint (TXID:VOUT)")
    def one_deposit(outpoint: Annotated[str, Path(min_length=1, max_length=128, pattern=_TEXT)]) -> dict[str, Any]:
        return deposit(db, outpoint)

    @v1.get("/halt", summary="The halt state (the halt file's contract)", response_model=None, responses=_OBJECT)
    async def halt() -> JSONResponse:
        """Trade only while this answers 200, ``"halted": false`` and ``valid_until`` is in the future."""
        # On the event loop: the reads of concurrent requests share one worker-thread hop (aread).
        # A response, not a dict: FastAPI would validate a dict. A halt the store could not record holds.
        state = with_waiting(await halt_reader.aread(), settings.halt_file)
        return JSONResponse(halt_document(state, settings.halt_lease))

    @v1.get("/audit/head", summary="The audit log's head")
    def head() -> dict[str, Any]:
        return audit_head(db)

    app.include_router(changes)
    app.include_router(v1)
    if config.console_origin is not None:
        app.include_router(console_router(db, settings, config.console_origin))
        app.include_router(halt_router(db, settings, config.console_origin))
        chain = lambda: backend_for(settings, load_policy(db).network.name)  # noqa: E731
        app.include_router(request_router(db, settings, config.console_origin, chain, state_lock, witnessed))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CustodyCollector(db, settings, halt_reader.read))  # the halt as GET /v1/halt reads it

    app.include_router(status_page.status_router(db))

    @app.get("/metrics", summary="Prometheus metrics (not signed: keep the listener private)")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
