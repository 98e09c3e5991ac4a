"""The RPC client's error paths, against a real HTTP server on loopback that plays the node."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from custody.chain.rpc import RpcClient, RpcError, expect_chain
from custody.errors import InputError, NodeError


@dataclass
class Request:
    path: str
    authorization: str | None
    body: bytes
    method: str = ""
    params: list[Any] = field(default_factory=list)
    id: Any = None


Answer = tuple[int, bytes]


def result(value: Any, request: Request) -> Answer:
    return 200, json.dumps({"result": value, "error": None, "id": request.id}).encode()


def error(code: int, message: str, request: Request, status: int = 500) -> Answer:
    body = {"result": None, "error": {"code": code, "message": message}, "id": request.id}
    return status, json.dumps(body).encode()


class FakeNode:
    """An HTTP server on 127.0.0.1 whose answers each test scripts with ``respond``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.respond: Callable[[Request], Answer] = lambda r: result(None, r)
        self.release = threading.Event()  # lets a handler that hangs go at teardown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Request(self.path, self.headers.get("Authorization"), body)
                try:
                    payload = json.loads(body)
                    request.method = payload["method"]
                    request.params = payload["params"]
                    request.id = payload["id"]
                except (ValueError, KeyError):
                    pass
                fake.requests.append(request)
                status, answer = fake.respond(request)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode()
    try:
        yield node
    finally:
        node.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_connection_refused_says_where_and_what_to_do() -> None:
    port = closed_port()
    client = RpcClient(f"http://127.0.0.1:{port}", auth=("u", "p"))
    with pytest.raises(NodeError) as caught:
        client.call("getblockchaininfo")
    assert str(caught.value) == (f"node not reachable at 127.0.0.1:{port}: is it running? (custody node start)")
    assert caught.value.exit_code == 8


def test_a_node_that_hangs_times_out(fake: FakeNode) -> None:
    def hang(request: Request) -> Answer:
        fake.release.wait(10)
        return result(None, request)

    fake.respond = hang
    client = RpcClient(fake.url, auth=("u", "p"), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(NodeError, match=r"did not answer getblockcount within 0\.3s"):
        client.call("getblockcount")
    assert time.monotonic() - started < 5


def test_wrong_password_is_a_clear_401_that_hides_the_password(fake: FakeNode) -> None:
    fake.respond = lambda r: (401, b"")
    client = RpcClient(fake.url, auth=("alice", "s3cret-pw"))
    with pytest.raises(NodeError) as caught:
        client.call("getblockcount")
    assert not isinstance(caught.value, RpcError)
    assert "HTTP 401" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert fake.requests[0].authorization == basic("alice", "s3cret-pw")


def test_cookie_is_read_again_after_401(fake: FakeNode, tmp_path: Path) -> None:
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:first")
    fake.respond = lambda r: (
        result(7, r) if r.authorization == basic("__cookie__", cookie.read_text()[11:]) else (401, b"")
    )
    client = RpcClient(fake.url, cookie_file=cookie)
    assert client.call("getblockcount") == 7
    cookie.write_text("__cookie__:second")  # the node restarted and wrote a new cookie
    assert client.call("getblockcount") == 7
    assert [r.authorization for r in fake.requests] == [
        basic("__cookie__", "first"),
        basic("__cookie__", "first"),
        basic("__cookie__", "second"),
    ]


def test_a_stale_cookie_that_stays_wrong_is_a_401(fake: FakeNode, tmp_path: Path) -> None:
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:stale")
    fake.respond = lambda r: (401, b"")
    with pytest.raises(NodeError, match=r"HTTP 401.*\.cookie"):
        RpcClient(fake.url, cookie_file=cookie).call("getblockcount")
    assert len(fake.requests) == 2  # tried once more with the cookie read again


def test_missing_cookie_names_the_file(tmp_path: Path) -> None:
    cookie = tmp_path / "regtest" / ".cookie"
    client = RpcClient(f"http://127.0.0.1:{closed_port()}", cookie_file=cookie)
    with pytest.raises(NodeError, match="cookie file .* does not exist"):
        client.call("getblockcount")


def test_rpc_error_keeps_code_and_message(fake: FakeNode) -> None:
    fake.respond = lambda r: error(-8, "Invalid parameter, missing vout", r)
    with pytest.raises(RpcError) as caught:
        RpcClient(fake.url, auth=("u", "p")).call("createrawtransaction", [], [])
    assert caught.value.code == -8
    assert caught.value.rpc_message == "Invalid parameter, missing vout"
    assert caught.value.method == "createrawtransaction"
    assert str(caught.value) == ("node refused createrawtransaction: Invalid parameter, missing vout (RPC error -8)")
    assert isinstance(caught.value, NodeError) and caught.value.exit_code == 8


def test_unknown_method_answered_with_404(fake: FakeNode) -> None:
    fake.respond = lambda r: error(-32601, "Method not found", r, status=404)
    with pytest.raises(RpcError) as caught:
        RpcClient(fake.url, auth=("u", "p")).call("nosuchmethod")
    assert caught.value.code == -32601


def test_warming_up_is_retried_until_the_node_answers(fake: FakeNode) -> None:
    def warm_up(request: Request) -> Answer:
        if len(fake.requests) < 3:
            return error(-28, "Loading block index...", request)
        return result(42, request)

    fake.respond = warm_up
    assert RpcClient(fake.url, auth=("u", "p"), warmup_timeout=10).call("getblockcount") == 42
    assert len(fake.requests) == 3


def test_warming_up_is_retried_for_a_bounded_time(fake: FakeNode) -> None:
    fake.respond = lambda r: error(-28, "Verifying blocks...", r)
    client = RpcClient(fake.url, auth=("u", "p"), warmup_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(NodeError, match=r"still warming up after 0\.5s: Verifying blocks"):
        client.call("getblockcount")
    assert time.monotonic() - started < 3


def test_amounts_are_decimal_both_ways(fake: FakeNode) -> None:
    fake.respond = lambda r: (
        200,
        b'{"result": {"amount": 0.1, "fee": 0.00000001, "n": 3}, "error": null, "id": %d}' % r.id,
    )
    answer = RpcClient(fake.url, auth=("u", "p")).call(
        "send", {"x": Decimal("0.00000001")}, [Decimal("20999999.99999999")]
    )
    assert answer == {"amount": Decimal("0.1"), "fee": Decimal("0.00000001"), "n": 3}
    assert isinstance(answer["amount"], Decimal)
    body = fake.requests[0].body.decode()
    assert '{"x": 0.00000001}' in body
    assert "[20999999.99999999]" in body


def test_values_json_cannot_carry_are_refused(fake: FakeNode) -> None:
    client = RpcClient(fake.url, auth=("u", "p"))
    for value in (Decimal("NaN"), float("inf"), object()):
        with pytest.raises(InputError):
            client.call("echo", value)
    assert fake.requests == []


def test_an_answer_that_is_not_json_rpc(fake: FakeNode) -> None:
    fake.respond = lambda r: (200, b"<html>hello</html>")
    with pytest.raises(NodeError, match="HTTP 200 OK and no JSON"):
        RpcClient(fake.url, auth=("u", "p")).call("getblockcount")


def test_forbidden_names_rpcallowip(fake: FakeNode) -> None:
    fake.respond = lambda r: (403, b"")
    with pytest.raises(NodeError, match="HTTP 403.*rpcallowip"):
        RpcClient(fake.url, auth=("u", "p")).call("getblockcount")


def test_wallet_client_calls_the_wallet_path(fake: FakeNode) -> None:
    client = RpcClient(fake.url, auth=("u", "p")).wallet("cold store/1")
    client.call("getwalletinfo")
    assert fake.requests[0].path == "/wallet/cold%20store%2F1"
    assert fake.requests[0].authorization == basic("u", "p")


@pytest.mark.parametrize(("chain", "expected"), [("regtest", "regtest"), ("main", "main"), ("mainnet", "main")])
def test_expect_chain_accepts_the_same_chain(fake: FakeNode, chain: str, expected: str) -> None:
    fake.respond = lambda r: result({"chain": expected, "blocks": 5}, r)
    info = expect_chain(RpcClient(fake.url, auth=("u", "p")), chain)
    assert info["blocks"] == 5


def test_expect_chain_refuses_another_chain(fake: FakeNode) -> None:
    fake.respond = lambda r: result({"chain": "main", "blocks": 900000}, r)
    with pytest.raises(NodeError, match="is on chain 'main', expected 'regtest'"):
        expect_chain(RpcClient(fake.url, auth=("u", "p")), "regtest")


@pytest.mark.parametrize("url", ["https://127.0.0.1:8332", "127.0.0.1:8332", "http://u:p@127.0.0.1:8332", "http://h:x"])
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(InputError):
        RpcClient(url)


def test_password_and_cookie_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        RpcClient("http://127.0.0.1:8332", auth=("u", "p"), cookie_file=tmp_path / ".cookie")
