"""Shared fixtures. The regtest node is real: when it cannot start, its tests fail."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, text

from custody.chain.regtest import NodeInfo, ensure_wallet, find_node_binary, start_node, stop_node
from custody.chain.rpc import RpcClient
from custody.config import Settings
from custody.errors import CustodyError

if TYPE_CHECKING:
    from custody.chain.types import ChainBackend

COINBASE_MATURITY = 100

# CI runs the property tests with a fixed seed: a run that fails does not land, so it must
# fail the same way every time; elsewhere every run explores new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the regtest node is marked ``regtest`` (``-m "not regtest"``)."""
    for item in items:
        if "regtest_node" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.regtest)


@pytest.fixture(scope="session")
def regtest_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeInfo]:
    """A regtest node on free loopback ports, for the whole session."""
    datadir = tmp_path_factory.mktemp("regtest-node")
    try:
        node = start_node(datadir, binary=find_node_binary(Settings.load().node_binary))
    except CustodyError as e:
        # Never a skip: CI must go red when the node it relies on cannot run.
        pytest.fail(f"the regtest node could not start: {e}", pytrace=False)
    try:
        yield node
    finally:
        stop_node(datadir)


@pytest.fixture
def rpc(regtest_node: NodeInfo) -> RpcClient:
    """A client for the session's regtest node."""
    return regtest_node.client()


def fund_wallet(rpc: RpcClient, name: str, blocks: int = COINBASE_MATURITY + 1) -> RpcClient:
    """Create (or load) wallet ``name`` and mine ``blocks`` blocks to its own descriptor.

    With the default 101 blocks the first coinbase (50 coins) is mature and spendable.
    The wallet's key goes to the node as a descriptor, never as an address string.
    """
    wallet = ensure_wallet(rpc, name)
    address = wallet.call("getnewaddress")  # only handed back to the same node
    descriptor = wallet.call("getaddressinfo", address)["desc"]
    rpc.call("generatetodescriptor", blocks, descriptor)
    return wallet


@pytest.fixture(scope="session")
def funded_wallet(regtest_node: NodeInfo) -> RpcClient:
    """A wallet client on the session's node holding at least one mature coinbase."""
    return fund_wallet(regtest_node.client(), "funded")


PG_URL = os.environ.get("CUSTODY_TEST_POSTGRES_URL")


@pytest.fixture(params=["embedded", pytest.param("node", marks=pytest.mark.regtest)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChainBackend]:
    """Each chain backend in turn: a fresh embedded chain under ``tmp_path``, closed after the
    test; the session's regtest node."""
    if request.param == "embedded":
        from custody.chain.embedded import open_chain  # here: most tests open no chain

        chain = open_chain(tmp_path / "chain")
        yield chain
        chain.close()
    else:
        from custody.chain.node import connect

        yield connect(request.getfixturevalue("regtest_node").client(), "regtest")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the PostgreSQL server for this test, dropped afterwards."""
    if not PG_URL:
        pytest.skip("CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
    schema = f"custody_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
