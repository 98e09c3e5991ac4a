"""A JSON-RPC client for Bitcoin Core compatible nodes (standard library only).

Amounts travel as :class:`decimal.Decimal` both ways: numbers in answers are parsed as
Decimal, and Decimal parameters are written as exact JSON numbers, never through float.

Every failure is a :class:`~custody.errors.NodeError` whose message says what to do;
an error answered by the node itself is the subclass :class:`RpcError`, which keeps the
node's error code.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from custody.errors import InputError, NodeError
from custody.files import NODE_FILE_MAX, read_limited_text

RPC_IN_WARMUP = -28
"""Bitcoin Core's error code while it loads its block index, wallets, ..."""

# Core's names for its chains, and the names custody's Network type uses for them.
_CHAIN_ALIASES = {"mainnet": "main", "testnet": "test"}


class RpcError(NodeError):
    """The node answered a call with an error (exit code 8, like every NodeError).

    ``code`` is the node's error code (e.g. -5 not found, -8 invalid parameter,
    -26 transaction rejected, -32601 unknown method); ``rpc_message`` its own words.
    """

    def __init__(self, method: str, code: int, rpc_message: str) -> None:
        super().__init__(f"node refused {method}: {rpc_message} (RPC error {code})")
        self.method = method
        self.code = code
        self.rpc_message = rpc_message


class RpcClient:
    """A client for one node (or one of its wallets), speaking JSON-RPC over HTTP.

    ``url`` is ``http://HOST:PORT`` with an optional path (``/wallet/NAME``). Give either
    ``auth`` (user, password) or ``cookie_file`` (the node's ``.cookie``, read at the
    first call and read again whenever the node answers 401, as it does after a
    restart). Each call opens its own connection, so one client may serve several
    threads. ``timeout`` bounds each request; ``warmup_timeout`` bounds how long a call
    keeps retrying while the node answers that it is still warming up (-28).

    Raises InputError for a URL that is not plain http or carries credentials.
    """

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        cookie_file: Path | None = None,
        timeout: float = 30.0,
        warmup_timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise InputError(f"node URL must look like http://127.0.0.1:PORT, not {url!r}")
        if parts.username is not None or parts.password is not None:
            raise InputError("node URL must not carry credentials: pass auth= or cookie_file= instead")
        if auth is not None and cookie_file is not None:
            raise InputError("give the node's credentials or its cookie file, not both")
        try:
            port = parts.port or 80
        except ValueError:
            raise InputError(f"node URL has an invalid port: {url!r}") from None
        self.url = url
        self.host = parts.hostname
        self.port = port
        self.path = parts.path or "/"
        self.timeout = timeout
        self.warmup_timeout = warmup_timeout
        self._auth = auth
        self._cookie_file = cookie_file
        self._cookie: tuple[str, str] | None = None
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        """``host:port`` of the node, as error messages show it."""
        return f"{self.host}:{self.port}"

    def wallet(self, name: str) -> RpcClient:
        """A client with the same credentials for the node's wallet ``name``."""
        return RpcClient(
            f"http://{self.address}/wallet/{quote(name, safe='')}",
            auth=self._auth,
            cookie_file=self._cookie_file,
            timeout=self.timeout,
            warmup_timeout=self.warmup_timeout,
        )

    def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with positional ``params`` and return the node's result.

        Raises RpcError when the node answers with an error, and NodeError when the node
        cannot be reached, does not answer in time, refuses the credentials, or stays in
        warm-up longer than ``warmup_timeout``.
        """
        deadline = time.monotonic() + self.warmup_timeout
        delay = 0.1
        while True:
            try:
                return self._call_once(method, params)
            except RpcError as e:
                if e.code != RPC_IN_WARMUP:
                    raise
                if time.monotonic() + delay > deadline:
                    raise NodeError(
                        f"node at {self.address} is still warming up after {self.warmup_timeout:g}s: {e.rpc_message}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _call_once(self, method: str, params: Sequence[Any]) -> Any:
        request_id = next(self._ids)
        body = _dumps({"jsonrpc": "1.0", "id": request_id, "method": method, "params": params})
        status, reason, data = self._post(body, method, fresh_cookie=False)
        if status == 401 and self._cookie_file is not None:
            # The node rewrites its cookie at every start: read it again, once.
            status, reason, data = self._post(body, method, fresh_cookie=True)
        if status == 401:
            raise NodeError(
                f"node at {self.address} refused the credentials (HTTP 401): "
                + (
                    f"is {self._cookie_file} the cookie of the node on this port?"
                    if self._cookie_file is not None
                    else "check the RPC user and password"
                )
            )
        if status == 403:
            raise NodeError(f"node at {self.address} forbids this client (HTTP 403): check its rpcallowip")
        try:
            answer = json.loads(data, parse_float=Decimal)
        except ValueError:
            raise NodeError(
                f"node at {self.address} answered {method} with HTTP {status} {reason} "
                "and no JSON: is this port a node's RPC port?"
            ) from None
        if not isinstance(answer, dict) or "result" not in answer or "error" not in answer:
            raise NodeError(f"node at {self.address} answered {method} with malformed JSON-RPC")
        error = answer["error"]
        if error is not None:
            if isinstance(error, dict):
                code = error.get("code")
                message = error.get("message")
                raise RpcError(
                    method,
                    code if isinstance(code, int) else 0,
                    str(message) if message is not None else "no message",
                )
            raise RpcError(method, 0, str(error))
        if status != 200:
            raise NodeError(f"node at {self.address} answered {method} with HTTP {status} {reason}")
        if answer.get("id") != request_id:
            raise NodeError(f"node at {self.address} answered {method} with another request's id")
        return answer["result"]

    def _post(self, body: bytes, method: str, *, fresh_cookie: bool) -> tuple[int, str, bytes]:
        headers = {"Content-Type": "application/json", "Host": self.address}
        credentials = self._credentials(fresh=fresh_cookie)
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, response.read()
        except ConnectionRefusedError:
            raise NodeError(f"node not reachable at {self.address}: is it running? (custody node start)") from None
        except TimeoutError:
            raise NodeError(f"node at {self.address} did not answer {method} within {self.timeout:g}s") from None
        except (http.client.HTTPException, OSError) as e:
            raise NodeError(f"connection to node at {self.address} failed during {method}: {e}") from None
        finally:
            conn.close()

    def _credentials(self, *, fresh: bool) -> tuple[str, str] | None:
        if self._auth is not None:
            return self._auth
        if self._cookie_file is None:
            return None
        if self._cookie is None or fresh:
            self._cookie = _read_cookie(self._cookie_file)
        return self._cookie


def _read_cookie(path: Path) -> tuple[str, str]:
    """``user:password`` from a node's cookie file. Raises NodeError when it is missing or
    malformed, InputError when it is larger than NODE_FILE_MAX or no file (unread)."""
    try:
        text = read_limited_text(path, NODE_FILE_MAX, "node cookie file").strip()
    except FileNotFoundError:
        raise NodeError(
            f"node cookie file {path} does not exist: is the node running with this data directory?"
        ) from None
    except OSError as e:
        raise NodeError(f"cannot read node cookie file {path}: {e.strerror}") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise NodeError(f"node cookie file {path} is not of the form user:password")
    return user, password


def expect_chain(client: RpcClient, chain: str) -> dict[str, Any]:
    """Check that the node runs ``chain`` and return its ``getblockchaininfo``.

    ``chain`` is Core's name (``main``, ``test``, ``signet``, ``regtest``); custody's
    network names ``mainnet`` and ``testnet`` are accepted too.
    Raises NodeError when the node is on another chain or cannot be asked.
    """
    wanted = _CHAIN_ALIASES.get(chain, chain)
    info = client.call("getblockchaininfo")
    if not isinstance(info, dict):
        raise NodeError(f"node at {client.address} answered getblockchaininfo with no object")
    actual = info.get("chain")
    if actual != wanted:
        raise NodeError(f"node at {client.address} is on chain {actual!r}, expected {wanted!r}: refusing to use it")
    return info


def _dumps(value: Any) -> bytes:
    """JSON-encode ``value``, writing Decimals as exact numbers (json cannot)."""
    return _encode(value).encode("utf-8")


def _encode(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InputError(f"cannot send {value} to the node")
        return format(value, "f")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"cannot send {value} to the node")
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"JSON object keys must be strings, not {key!r}")
            items.append(f"{json.dumps(key)}: {_encode(item)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_encode(item) for item in value) + "]"
    raise InputError(f"cannot send a {type(value).__name__} to the node")
