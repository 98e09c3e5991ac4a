"""Which chain backend to use, from the settings: the embedded regtest chain or a node."""

from __future__ import annotations

import json

from custody.chain.node import BACKEND_TIMEOUT, connect
from custody.chain.regtest import STATE_FILE, NodeInfo
from custody.chain.rpc import RpcClient
from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.errors import InputError, NodeError
from custody.files import NODE_FILE_MAX, read_limited_text

STATUS_NODE_TIMEOUT = 5.0
"""Seconds ``custody status`` waits for the node by default (``CUSTODY_STATUS_NODE_TIMEOUT``)."""


def status_node_timeout(settings: Settings) -> float:
    """``CUSTODY_STATUS_NODE_TIMEOUT`` in seconds: a number in (0, 600]; STATUS_NODE_TIMEOUT
    when unset. Raises InputError."""
    value = settings.status_node_timeout
    if value is None:
        return STATUS_NODE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise InputError(f"CUSTODY_STATUS_NODE_TIMEOUT must be a number of seconds, not {value!r}") from None
    if not 0 < seconds <= BACKEND_TIMEOUT:
        raise InputError(f"CUSTODY_STATUS_NODE_TIMEOUT must be more than 0 and at most {BACKEND_TIMEOUT:g} seconds")
    return seconds


def backend_for(settings: Settings, network_name: str, *, timeout: float | None = None) -> ChainBackend:
    """The backend for ``network_name`` as ``settings`` configure it, connected and checked.

    ``timeout`` bounds each call to a node and its warm-up wait (default: BACKEND_TIMEOUT
    per call, the client's own warm-up bound); a quick check (``custody status``) gives a
    short one so that a node that does not answer is reported soon.

    With ``chain`` "embedded": the embedded regtest chain in ``chain_datadir`` (opened once
    per process, see :func:`custody.chain.embedded.open_chain`); NodeError off regtest.
    With ``node_url``: that node, authenticated by ``node_cookie`` or ``node_auth``.
    Otherwise: the node ``custody node start`` runs in ``node_datadir``.
    Raises InputError for unusable settings, NodeError when no node is configured, it
    cannot be reached, or it runs another chain.
    """
    if settings.chain == "embedded":
        if network_name != "regtest":
            raise NodeError(f"the embedded chain is regtest only, and the policy's network is {network_name}")
        from custody.chain.embedded import open_chain  # the kernel is loaded only when asked for

        return open_chain(settings.chain_datadir)
    if settings.node_url:
        auth: tuple[str, str] | None = None
        if settings.node_auth is not None:
            user, sep, password = settings.node_auth.partition(":")
            if not sep or not user:
                raise InputError("CUSTODY_NODE_AUTH must be user:password")
            auth = (user, password)
        if auth is None and settings.node_cookie is None:
            raise InputError(
                "CUSTODY_NODE_URL is set without credentials: set CUSTODY_NODE_COOKIE "
                "(the node's .cookie file) or CUSTODY_NODE_AUTH (user:password)"
            )
        client = RpcClient(
            settings.node_url, auth=auth, cookie_file=settings.node_cookie, timeout=timeout or BACKEND_TIMEOUT
        )
    else:
        client = _started_node(settings).client(timeout=timeout or BACKEND_TIMEOUT)
    if timeout is not None:
        client.warmup_timeout = min(client.warmup_timeout, timeout)
    return connect(client, network_name)


def _started_node(settings: Settings) -> NodeInfo:
    path = settings.node_datadir / STATE_FILE
    try:
        data = json.loads(read_limited_text(path, NODE_FILE_MAX, "node state file"))
    except FileNotFoundError:
        raise NodeError(
            f"no node configured: run `custody node start` or set CUSTODY_NODE_URL (no node in {settings.node_datadir})"
        ) from None
    except (OSError, ValueError) as e:
        raise NodeError(f"node state {path} is unreadable: {e}") from None
    try:
        return NodeInfo.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise NodeError(f"node state {path} is unreadable: {e}") from None
