"""The JSON-RPC backend: a Bitcoin Core compatible node.

Everything is said in scriptPubKeys, ``raw(HEX)`` descriptors and raw transactions, never
in address strings: the node may be Litecoin Core (regtest in the tests), whose address
prefixes differ from Bitcoin's, while its script and transaction rules are the same.
Amounts are integer satoshis; the node's Decimal amounts are converted exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from bitcoin.core.script import CScript, CScriptInvalidError

from custody.bitcoin.amounts import sats_from_btc
from custody.bitcoin.encoding import hash160, sha256
from custody.bitcoin.network import NETWORKS
from custody.chain.rpc import RpcClient, RpcError, expect_chain
from custody.chain.types import (
    MAX_MINE,
    AcceptResult,
    ChainBackend,
    ChainBlock,
    ChainTx,
    OutputSpend,
    Refusal,
    Snapshot,
    SpendState,
    TransactionRefused,
    TxStatus,
    Utxo,
    classify,
    lookup_scripts,
)
from custody.errors import InputError, NodeError, NotFound

SCAN_CHUNK = 1000
"""Descriptors per ``scantxoutset`` call: each call walks the whole UTXO set once."""

SCAN_BUSY_TIMEOUT = 120.0
"""How long ``unspent`` waits while another client's ``scantxoutset`` runs (one at a time)."""

BACKEND_TIMEOUT = 600.0
"""Seconds each RPC call may take: a mainnet ``scantxoutset`` runs for minutes."""

# custody's network names and Bitcoin Core's names for the same chains.
CORE_CHAIN = {"regtest": "regtest", "testnet": "test", "mainnet": "main", "signet": "signet"}

# Bitcoin Core's RPC error codes used below (src/rpc/protocol.h).
RPC_INVALID_PARAMETER = -8
RPC_INVALID_ADDRESS_OR_KEY = -5  # also: "No such mempool or blockchain transaction"
RPC_DESERIALIZATION_ERROR = -22
RPC_VERIFY_ERROR = -25  # sendrawtransaction: missing inputs, fee above maxfeerate, ...
RPC_VERIFY_REJECTED = -26  # sendrawtransaction: refused by the mempool (the reason follows)
RPC_VERIFY_ALREADY_IN_CHAIN = -27

SNAPSHOT_ATTEMPTS = 3
"""How often ``unspent_at`` starts again when a block arrives while it reads."""

_TXID_RE = re.compile(r"[0-9a-f]{64}")

SPENDER_SCAN_LIMIT = 10_000
"""The most blocks one ``spends`` call reads to find which transaction spent an output."""


class RpcBackend(ChainBackend):
    """A ChainBackend over a node's JSON-RPC (Bitcoin Core 0.21 or later, or Litecoin Core).

    ``tx_status`` of a confirmed transaction needs the node to run with ``txindex=1``
    (``custody node start`` does); without it, a confirmed transaction reads as unknown.
    The constructor does not contact the node; :func:`connect` also checks its chain.
    """

    def __init__(self, client: RpcClient, network_name: str) -> None:
        if network_name not in CORE_CHAIN:
            raise InputError(f"unknown network {network_name!r}: expected one of {', '.join(CORE_CHAIN)}")
        self.client = client
        self.network_name = network_name

    def tip_height(self) -> int:
        return _int(self.client.call("getblockcount"), "getblockcount")

    def unspent(self, script_pubkeys: Sequence[bytes]) -> list[Utxo]:
        """Confirmed unspent outputs paying any of ``script_pubkeys``, by height, txid, vout.

        One ``scantxoutset`` per chunk of up to SCAN_CHUNK scripts; duplicates are asked once.
        Raises InputError for an empty script, NodeError when the scan fails or is aborted.
        """
        scripts = [spk.hex() for spk in lookup_scripts(script_pubkeys)]
        wanted = set(scripts)
        found: dict[tuple[str, int], Utxo] = {}
        for start in range(0, len(scripts), SCAN_CHUNK):
            chunk = scripts[start : start + SCAN_CHUNK]
            result = self._scan([{"desc": f"raw({h})"} for h in chunk])
            for entry in _list(result.get("unspents"), "scantxoutset unspents"):
                utxo = _utxo(entry)
                if utxo.script_pubkey.hex() in wanted:
                    found[(utxo.txid, utxo.vout)] = utxo
        return sorted(found.values(), key=lambda u: (u.height or 0, u.txid, u.vout))

    def unspent_at(self, script_pubkeys: Sequence[bytes], height: int | None = None) -> Snapshot:
        """The outputs paying any of ``script_pubkeys`` unspent just after block ``height``.

        The node's ``scantxoutset`` reads the unspent set at its tip ``T`` only. Below the tip,
        the outputs of ours made at or below ``height`` and spent in blocks ``height+1..T`` are
        added back: those blocks are read (``getblock``), each input that spends one of our
        scripts is known by the script it reveals (a witness script hashing to a p2wsh
        program, a redeem script hashing to a p2sh one), and its output is fetched
        (``getrawtransaction``, which needs the node's ``txindex=1``). When a block arrives or
        the chain reorganises meanwhile, it starts again (SNAPSHOT_ATTEMPTS times).
        Raises InputError for an empty script or a height outside 0..tip, NodeError.
        """
        scripts = [spk.hex() for spk in lookup_scripts(script_pubkeys)]
        for _ in range(SNAPSHOT_ATTEMPTS):
            tip, best, utxos = self._scan_all(scripts)
            at = tip if height is None else height
            if not 0 <= at <= tip:
                raise InputError(f"height {at} is not on the chain (its tip is at {tip})")
            if at == tip:
                return Snapshot(tip, best, utxos)
            back = self._spent_after(set(scripts), at, tip, best)
            if back is None:
                continue  # the chain moved under us
            block_hash, spent = back
            kept = [u for u in utxos if u.height is not None and u.height <= at]
            found = sorted(kept + spent, key=lambda u: (u.height or 0, u.txid, u.vout))
            return Snapshot(at, block_hash, found)
        raise NodeError(
            f"node at {self.client.address}: the chain moved {SNAPSHOT_ATTEMPTS} times while its unspent outputs "
            "were read; try again"
        )

    def _scan_all(self, scripts: list[str]) -> tuple[int, str, list[Utxo]]:
        """(tip height, tip hash, unspent outputs) with every chunk scanned at the same tip."""
        if not scripts:
            tip = _int(self.client.call("getblockcount"), "getblockcount")
            return tip, _check_txid(str(self.client.call("getblockhash", tip)), node=True), []
        for _ in range(SNAPSHOT_ATTEMPTS):
            found: dict[tuple[str, int], Utxo] = {}
            tips: set[tuple[int, str]] = set()
            wanted = set(scripts)
            for start in range(0, len(scripts), SCAN_CHUNK):
                result = self._scan([{"desc": f"raw({h})"} for h in scripts[start : start + SCAN_CHUNK]])
                tips.add(
                    (
                        _int(result.get("height"), "scantxoutset height"),
                        _check_txid(str(result.get("bestblock")), node=True),
                    )
                )
                for entry in _list(result.get("unspents"), "scantxoutset unspents"):
                    utxo = _utxo(entry)
                    if utxo.script_pubkey.hex() in wanted:
                        found[(utxo.txid, utxo.vout)] = utxo
            if len(tips) == 1:
                tip, best = tips.pop()
                return tip, best, list(found.values())
        raise NodeError(f"node at {self.client.address}: the tip moved during every scan; try again")

    def _spent_after(self, wanted: set[str], height: int, tip: int, best: str) -> tuple[str, list[Utxo]] | None:
        """(hash of block ``height``, our outputs made at or below it and spent in ``height+1..tip``),
        or None when the blocks read do not chain up to ``best``."""
        block_hash = _check_txid(str(self.client.call("getblockhash", height)), node=True)
        previous = block_hash
        made_after: set[tuple[str, int]] = set()
        spent: list[tuple[str, int]] = []
        for h in range(height + 1, tip + 1):
            this = _check_txid(str(self.client.call("getblockhash", h)), node=True)
            block = self.client.call("getblock", this, 2)
            if not isinstance(block, dict) or block.get("previousblockhash") != previous:
                return None
            previous = this
            for tx in _list(block.get("tx"), "getblock tx"):
                txid = _check_txid(str(tx.get("txid")), node=True)
                for vin in _list(tx.get("vin"), "getblock vin"):
                    if "coinbase" in vin or not _spends_one_of(vin, wanted):
                        continue
                    outpoint = (_check_txid(str(vin.get("txid")), node=True), _int(vin.get("vout"), "vin vout"))
                    if outpoint in made_after:
                        made_after.discard(outpoint)
                    else:
                        spent.append(outpoint)
                for out in _list(tx.get("vout"), "getblock vout"):
                    if out.get("scriptPubKey", {}).get("hex") in wanted:
                        made_after.add((txid, _int(out.get("n"), "vout n")))
        if previous != best:
            return None
        return block_hash, [self._spent_output(txid, vout, wanted, height) for txid, vout in spent]

    def _spent_output(self, txid: str, vout: int, wanted: set[str], height: int) -> Utxo:
        try:
            tx = self.client.call("getrawtransaction", txid, True)
        except RpcError as e:
            if e.code == RPC_INVALID_ADDRESS_OR_KEY:
                raise NodeError(
                    f"node at {self.client.address} cannot give transaction {txid}: reading unspent outputs below "
                    "the tip needs the node's transaction index (txindex=1)"
                ) from None
            raise
        outs = _list(tx.get("vout") if isinstance(tx, dict) else None, "getrawtransaction vout")
        out = next((o for o in outs if isinstance(o, dict) and o.get("n") == vout), None)
        spk = out.get("scriptPubKey", {}).get("hex") if out else None
        if out is None or spk not in wanted:
            raise NodeError(f"node at {self.client.address}: {txid}:{vout} is not an output to one of our scripts")
        header = self.client.call("getblockheader", tx.get("blockhash"), True)
        made = _int(header.get("height") if isinstance(header, dict) else None, "getblockheader height")
        if made > height:
            raise NodeError(f"node at {self.client.address}: {txid}:{vout} is from block {made}, above {height}")
        return Utxo(txid, vout, sats_from_btc(out["value"]), bytes.fromhex(spk), made)

    def _scan(self, objects: list[dict[str, str]]) -> dict[str, Any]:
        deadline = time.monotonic() + SCAN_BUSY_TIMEOUT
        delay = 0.2
        while True:
            try:
                result = self.client.call("scantxoutset", "start", objects)
                break
            except RpcError as e:
                # Only one scan runs at a time on a node; wait for another client's to end.
                busy = e.code == RPC_INVALID_PARAMETER and "in progress" in e.rpc_message
                if not busy or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if not isinstance(result, dict) or result.get("success") is not True:
            raise NodeError(f"node at {self.client.address}: scantxoutset did not complete (aborted?)")
        return result

    def raw_transaction(self, txid: str) -> bytes:
        """The serialized transaction ``txid``.

        Raises InputError for a malformed txid, NotFound when the node does not know it.
        """
        txid = _check_txid(txid)
        try:
            answer = self.client.call("getrawtransaction", txid, False)
        except RpcError as e:
            if e.code == RPC_INVALID_ADDRESS_OR_KEY:
                raise NotFound(f"transaction {txid} is not known to the node") from None
            raise
        return _hex(answer, "getrawtransaction")

    def test_accept(self, raw_tx: bytes) -> AcceptResult:
        """Ask the node's ``testmempoolaccept``; a transaction it cannot decode is refused."""
        try:
            answer = self.client.call("testmempoolaccept", [bytes(raw_tx).hex()])
        except RpcError as e:
            if e.code == RPC_DESERIALIZATION_ERROR:
                return AcceptResult(False, f"not a transaction: {e.rpc_message}", "", Refusal.UNDECODABLE)
            raise
        results = _list(answer, "testmempoolaccept")
        if len(results) != 1 or not isinstance(results[0], dict):
            raise NodeError(f"node at {self.client.address} answered testmempoolaccept with {len(results)} results")
        result = results[0]
        txid = _check_txid(str(result.get("txid", "")), node=True)
        if result.get("allowed") is True:
            return AcceptResult(True, None, txid)
        reason = str(result.get("reject-reason") or "rejected without a reason")
        return AcceptResult(False, reason, txid, classify(reason))

    def broadcast(self, raw_tx: bytes) -> str:
        """Send ``raw_tx`` to the node and return its txid.

        Idempotent: a transaction the node already has (in its mempool or in a block) is
        reported as broadcast. Raises TransactionRefused with the refusal's class when the
        node refuses it (RpcError for any other error of the node).
        """
        hex_tx = bytes(raw_tx).hex()
        try:
            return _check_txid(str(self.client.call("sendrawtransaction", hex_tx)), node=True)
        except RpcError as e:
            if e.code == RPC_DESERIALIZATION_ERROR:
                raise TransactionRefused(str(e), Refusal.UNDECODABLE, e.rpc_message) from None
            if e.code not in (RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED, RPC_VERIFY_ALREADY_IN_CHAIN):
                raise
            error = e
        refusal = Refusal.ALREADY_KNOWN if error.code == RPC_VERIFY_ALREADY_IN_CHAIN else classify(error.rpc_message)
        txid = _check_txid(str(self.client.call("decoderawtransaction", hex_tx).get("txid")), node=True)
        # Confirmed and all outputs spent since, the node answers "missing inputs": ask.
        if refusal is Refusal.ALREADY_KNOWN or self.tx_status(txid).known:
            return txid
        raise TransactionRefused(
            f"node at {self.client.address} refused transaction {txid} ({refusal.value}): {error.rpc_message}",
            refusal,
            error.rpc_message,
        )

    def tx_status(self, txid: str) -> TxStatus:
        """The transaction's place: unknown, in the mempool, or in a block of the best chain."""
        txid = _check_txid(txid)
        try:
            tx = self.client.call("getrawtransaction", txid, True)
        except RpcError as e:
            if e.code == RPC_INVALID_ADDRESS_OR_KEY:
                return TxStatus(txid, known=False, in_mempool=False, confirmations=0, block_height=None)
            raise
        if not isinstance(tx, dict):
            raise NodeError(f"node at {self.client.address} answered getrawtransaction with no object")
        blockhash = tx.get("blockhash")
        confirmations = _int(tx.get("confirmations", 0), "getrawtransaction confirmations")
        if not blockhash or confirmations <= 0:
            # In the mempool (no block), or in a block that is no longer in the best chain.
            return TxStatus(txid, known=True, in_mempool=not blockhash, confirmations=0, block_height=None)
        header = self.client.call("getblockheader", blockhash, True)
        height = _int(header.get("height") if isinstance(header, dict) else None, "getblockheader height")
        return TxStatus(txid, known=True, in_mempool=False, confirmations=confirmations, block_height=height)

    def spends(self, outpoints: Sequence[tuple[str, int]]) -> list[OutputSpend]:
        """What spends each output, from the node's unspent set and its blocks.

        ``gettxout`` says unspent, spent in the mempool, or gone from the unspent set. Gone
        is SPENT only when the output's own transaction is in a block of the best chain
        (``getrawtransaction``, so the node needs ``txindex=1``); otherwise the node does not
        know the output (UNKNOWN), which proves nothing. The spender of a SPENT output is
        found by reading the blocks from the tip down to the output's own block (at most
        SPENDER_SCAN_LIMIT blocks; one pass for all outpoints). Raises InputError for a
        malformed txid, NodeError when the node's answers disagree (gone, yet no block spends it).
        """
        tip = self.tip_height()
        found: dict[tuple[str, int], OutputSpend] = {}
        gone: dict[tuple[str, int], int] = {}  # outpoint -> height of its own block
        for txid, vout in outpoints:
            key = (_check_txid(txid), int(vout))
            if key in found or key in gone:
                continue
            if self.client.call("gettxout", txid, vout, True) is not None:
                found[key] = OutputSpend(txid, vout, SpendState.UNSPENT)
            elif self.client.call("gettxout", txid, vout, False) is not None:
                found[key] = OutputSpend(txid, vout, SpendState.IN_MEMPOOL)
            else:
                status = self.tx_status(txid)
                if status.block_height is None or status.confirmations <= 0 or not self._has_output(txid, vout):
                    found[key] = OutputSpend(txid, vout, SpendState.UNKNOWN)
                else:
                    gone[key] = status.block_height
        if gone:
            found.update(self._spenders(gone, tip))
        return [found[(t, int(v))] for t, v in outpoints]

    def _spenders(self, gone: dict[tuple[str, int], int], tip: int) -> dict[tuple[str, int], OutputSpend]:
        """Which block transactions spent the outputs ``gone`` (outpoint -> its own block's
        height): the blocks are read from the tip down to the lowest of those heights."""
        wanted = dict(gone)
        lowest = min(wanted.values())
        if tip - lowest + 1 > SPENDER_SCAN_LIMIT:
            raise NodeError(
                f"finding what spent {len(wanted)} output(s) means reading {tip - lowest + 1} blocks "
                f"(more than {SPENDER_SCAN_LIMIT})"
            )
        found: dict[tuple[str, int], OutputSpend] = {}
        for height in range(tip, lowest - 1, -1):
            block = self.client.call("getblock", self.client.call("getblockhash", height), 2)
            for tx in _list(block.get("tx") if isinstance(block, dict) else None, "getblock tx"):
                inputs = tx.get("vin") if isinstance(tx, dict) else None
                for vin in inputs if isinstance(inputs, list) else []:
                    key = (str(vin.get("txid", "")), vin.get("vout")) if isinstance(vin, dict) else ("", None)
                    if key in wanted:
                        del wanted[key]
                        spender = _check_txid(str(tx.get("txid")), node=True)
                        found[key] = OutputSpend(key[0], key[1], SpendState.SPENT, spender, tip - height + 1, height)
            if not wanted:
                return found
        missing = ", ".join(f"{t}:{v}" for t, v in wanted)
        raise NodeError(
            f"node at {self.client.address} has {missing} neither unspent nor spent in a block: its answers disagree"
        )

    def _has_output(self, txid: str, vout: int) -> bool:
        tx = self.client.call("getrawtransaction", txid, True)
        outputs = tx.get("vout") if isinstance(tx, dict) else None
        return isinstance(outputs, list) and 0 <= vout < len(outputs)

    def mine(self, blocks: int, script_pubkey: bytes) -> list[str]:
        """Mine ``blocks`` blocks with coinbases paying ``script_pubkey``; their hashes.

        Raises NodeError off regtest, InputError for a count outside 1..10000 or an empty script.
        """
        if self.network_name != "regtest":
            raise NodeError(f"mining is for regtest only, and this backend is on {self.network_name}")
        if not 1 <= blocks <= MAX_MINE:
            raise InputError(f"number of blocks to mine must be 1..{MAX_MINE}, not {blocks}")
        if not script_pubkey:
            raise InputError("cannot mine to an empty scriptPubKey")
        hashes = _list(
            self.client.call("generatetodescriptor", blocks, f"raw({bytes(script_pubkey).hex()})"),
            "generatetodescriptor",
        )
        return [str(h) for h in hashes]

    def block_hash(self, height: int) -> str:
        """The best chain's block hash at ``height`` (``getblockhash``); InputError off the chain."""
        try:
            answer = self.client.call("getblockhash", height)
        except RpcError as e:
            if e.code == RPC_INVALID_PARAMETER:
                raise InputError(f"height {height} is not on the chain") from None
            raise
        return _check_txid(str(answer), node=True)

    def block_at(self, height: int) -> ChainBlock:
        """The best chain's block at ``height``: ``getblockhash``, then ``getblock`` (verbosity 2)
        once. Raises InputError off the chain, NodeError for an answer that is not a block."""
        block_hash = self.block_hash(height)
        block = self.client.call("getblock", block_hash, 2)
        if not isinstance(block, dict) or block.get("hash") != block_hash:
            raise NodeError(f"node at {self.client.address} answered getblock {block_hash} with another block")
        prev = str(block.get("previousblockhash") or "00" * 32)
        txs = tuple(_chain_tx(tx) for tx in _list(block.get("tx"), "getblock tx"))
        return ChainBlock(height, block_hash, prev, txs)

    def mempool_txids(self) -> list[str]:
        """The node's mempool (``getrawmempool``)."""
        return [_check_txid(str(t), node=True) for t in _list(self.client.call("getrawmempool"), "getrawmempool")]

    def mempool_tx(self, txid: str) -> ChainTx | None:
        """Mempool transaction ``txid`` (``getrawtransaction``); None once it left the mempool
        (mined, replaced or evicted: the blocks tell the rest)."""
        try:
            tx = self.client.call("getrawtransaction", _check_txid(txid), True)
        except RpcError as e:
            if e.code == RPC_INVALID_ADDRESS_OR_KEY:
                return None
            raise
        if not isinstance(tx, dict) or tx.get("blockhash"):
            return None
        return _chain_tx(tx)


def _chain_tx(tx: Any) -> ChainTx:
    """A decoded transaction of ``getblock`` (verbosity 2) or ``getrawtransaction`` (verbose)."""
    if not isinstance(tx, dict):
        raise NodeError("node answered with a transaction that is not an object")
    spends = []
    for vin in _list(tx.get("vin"), "transaction vin"):
        if isinstance(vin, dict) and "coinbase" not in vin:
            spends.append((_check_txid(str(vin.get("txid")), node=True), _int(vin.get("vout"), "vin vout")))
    outputs = []
    for out in _list(tx.get("vout"), "transaction vout"):
        spk = out.get("scriptPubKey") if isinstance(out, dict) else None
        try:
            amount = sats_from_btc(out["value"])
        except (KeyError, TypeError, ValueError) as e:
            raise NodeError(f"node answered with an output of unusable value: {e}") from None
        script = _hex(spk.get("hex") if isinstance(spk, dict) else None, "vout scriptPubKey")
        outputs.append((_int(out.get("n"), "vout n"), amount, script))
    return ChainTx(_check_txid(str(tx.get("txid")), node=True), tuple(spends), tuple(outputs))


def connect(client: RpcClient, network_name: str) -> RpcBackend:
    """An RpcBackend for ``network_name`` after checking that the node runs that chain and
    is synced with it.

    A node still in initial block download, or one that has headers it has not the blocks
    of, does not know what the chain says: what it answers (an input missing, a
    transaction unknown) is refused before anyone acts on it.
    Raises InputError for an unknown network, NodeError when the node cannot be reached,
    runs another chain (the message names both) or is not synced.
    """
    if network_name not in CORE_CHAIN:
        raise InputError(f"unknown network {network_name!r}: expected one of {', '.join(NETWORKS)}")
    try:
        info = expect_chain(client, CORE_CHAIN[network_name])
    except RpcError:
        raise
    except NodeError as e:
        if "is on chain" in str(e):
            raise NodeError(f"{e} (the policy's network is {network_name})") from None
        raise
    check_synced(client.address, info)
    return RpcBackend(client, network_name)


def check_synced(address: str, info: dict[str, Any]) -> None:
    """Refuse a node whose ``getblockchaininfo`` says it is still syncing (NodeError).

    Still syncing: ``initialblockdownload`` is not false (a fresh regtest node is in it
    until it has a block less than a day old), or ``headers`` is ahead of ``blocks``.
    """
    blocks, headers = info.get("blocks"), info.get("headers")
    if info.get("initialblockdownload") is not False:
        raise NodeError(
            f"node at {address} is still in initial block download (at block {blocks!r} of {headers!r} headers): "
            "what it says of the chain cannot be trusted yet; wait until it is synced"
        )
    blocks, headers = _int(blocks, "getblockchaininfo blocks"), _int(headers, "getblockchaininfo headers")
    if headers > blocks:
        raise NodeError(
            f"node at {address} has {headers} headers but only {blocks} blocks: it is still syncing; "
            "wait until it has them all"
        )


def _check_txid(txid: str, *, node: bool = False) -> str:
    if not isinstance(txid, str) or not _TXID_RE.fullmatch(txid):
        if node:
            raise NodeError(f"node answered with a malformed txid {txid!r}")
        raise InputError(f"{txid!r} is not a txid (64 lower-case hex digits)")
    return txid


def _utxo(entry: Any) -> Utxo:
    if not isinstance(entry, dict):
        raise NodeError("node answered scantxoutset with a malformed unspent entry")
    try:
        amount = sats_from_btc(entry["amount"])
    except (KeyError, ValueError) as e:
        raise NodeError(f"node answered scantxoutset with an unusable amount: {e}") from None
    height = entry.get("height")
    return Utxo(
        txid=_check_txid(str(entry.get("txid")), node=True),
        vout=_int(entry.get("vout"), "scantxoutset vout"),
        amount=amount,
        script_pubkey=_hex(entry.get("scriptPubKey"), "scantxoutset scriptPubKey"),
        height=None if height is None else _int(height, "scantxoutset height"),
    )


def _spends_one_of(vin: dict[str, Any], wanted: set[str]) -> bool:
    """Whether an input spends one of ``wanted``, judged by the script it reveals.

    A p2wsh spend's last witness item is the witness script (program: its SHA-256); a p2sh
    spend's last scriptSig push is the redeem script (its HASH160), which for p2sh-p2wsh is
    the witness program itself. Consensus makes the revealed script hash to the spent
    output's, so no output needs fetching to tell.
    """
    try:
        witness = [bytes.fromhex(str(item)) for item in vin.get("txinwitness") or []]
        script_sig = bytes.fromhex(str(vin.get("scriptSig", {}).get("hex", "")))
    except ValueError:
        raise NodeError("node answered getblock with an input that is not hex") from None
    if witness and "0020" + sha256(witness[-1]).hex() in wanted:
        return True
    if not script_sig:
        return False
    try:
        pushes = [op for op in CScript(script_sig) if isinstance(op, bytes)]
    except CScriptInvalidError:
        return False
    return bool(pushes) and "a914" + hash160(pushes[-1]).hex() + "87" in wanted


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeError(f"node answered {what} with {value!r}, not an integer")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise NodeError(f"node answered {what} with {type(value).__name__}, not a list")
    return value


def _hex(value: Any, what: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise NodeError(f"node answered {what} with no hex string") from None
