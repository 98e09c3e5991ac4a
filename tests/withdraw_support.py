"""A funded custody store on the session's regtest node, driven through the CLI."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.bech32 import encode_segwit
from custody.bitcoin.txbuild import Coin, build_transaction
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient, RpcError
from custody.identity.keyfile import open_founder_key
from tests.support import PASSPHRASE, Custody


def key_ceremony(c: Custody, tmp: Path, script: str) -> dict[str, Path]:
    """Three founders create key files; a manifest of their xpubs (2-of-3 ``script``) is drafted,
    signed by each founder with their key file, and the store created from it."""
    keys: dict[str, Path] = {}
    specs = []
    for name in ("founder-a", "founder-b", "founder-c"):
        path = tmp / "keys" / f"{name}.key"
        result = c("keygen", name, "--out", str(path), "--script", script, "--json")
        assert result.exit_code == 0, result.output
        keys[name] = path
        specs += ["--founder", f"{name}={json.loads(result.stdout)['xpub']}"]
    manifest = tmp / "founders-manifest.json"
    result = c(
        "manifest",
        "draft",
        "--network",
        "regtest",
        "--threshold",
        "2",
        "--script",
        script,
        *specs,
        "--out",
        str(manifest),
    )
    assert result.exit_code == 0, result.output
    for path in keys.values():
        result = c("manifest", "sign", str(manifest), "--key", str(path), "--yes")
        assert result.exit_code == 0, result.output
    result = c("init", str(manifest))
    assert result.exit_code == 0, result.output
    return keys


def enrol(
    c: Custody,
    tmp: Path,
    founder_keys: dict[str, Path],
    names: list[str],
    roles: str = "request,approve,lift",
    signers: tuple[str, ...] = ("founder-a", "founder-b"),
) -> dict[str, Path]:
    """Employees' key files, enrolled by a roster that founders sign with their key files."""
    keys = {}
    for name in names:
        keys[name] = tmp / "home" / "keys" / f"{name}.key"
        result = c("employee", "keygen", name, "--out", str(keys[name]), "--roles", roles)
        assert result.exit_code == 0, result.output
    sign_and_apply(c, tmp, founder_keys, signers)
    return keys


def sign_and_apply(
    c: Custody, tmp: Path, founder_keys: dict[str, Path], signers: tuple[str, ...] = ("founder-a", "founder-b")
) -> None:
    """The open roster proposal exported, signed by founders with their key files, applied."""
    proposal = tmp / f"roster-{len(list(tmp.glob('roster-*.json')))}.json"
    assert c("roster", "export", "--out", str(proposal)).exit_code == 0
    for founder in signers:
        result = c("roster", "sign", str(proposal), "--key", str(founder_keys[founder]), "--yes")
        assert result.exit_code == 0, result.output
    result = c("roster", "apply", str(proposal))
    assert result.exit_code == 0, result.output


class Shop:
    """Founders' key files, employees, a policy and deposits, on the real node."""

    def __init__(
        self, tmp: Path, node: NodeInfo, wallet: RpcClient, script: str = "p2wsh", db_url: str | None = None
    ) -> None:
        self.tmp = tmp
        self.node = node
        self.rpc = node.client()
        self.wallet = wallet
        self.c = Custody(tmp / "home", db_url=db_url)
        self.c.env["CUSTODY_NODE_URL"] = node.rpc_url
        self.c.env["CUSTODY_NODE_COOKIE"] = str(node.cookie_file)
        self.script = script
        self.founder_keys = key_ceremony(self.c, tmp, script)
        self.employees = enrol(self.c, tmp, self.founder_keys, ["alice", "bob", "carol", "dave"])

    def cli(self, *args: str) -> Any:
        return self.c(*args)

    def ok(self, *args: str) -> Any:
        result = self.c(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def deposit(self, account: str, btc: str, count: int = 1) -> list[dict[str, Any]]:
        """Issue deposit addresses and pay each ``btc`` from the node's wallet; mine a block and
        sync, so that the deposits are credited to ``account`` (withdrawals need a balance)."""
        issued = self.ok("address", "new", "--account", account, "--count", str(count))
        for a in issued:
            # The node names our script in its own address format; we never parse its strings.
            node_address = self.rpc.call("decodescript", a["script_pubkey"])
            target = node_address.get("address") or node_address["addresses"][0]
            self.wallet.call("sendtoaddress", target, Decimal(btc))
        self.mine(1)
        self.ok("sync")
        return issued

    def mine(self, blocks: int = 1) -> None:
        self.rpc.call("generatetodescriptor", blocks, "raw(51)")

    def destination(self) -> tuple[str, str]:
        """A fresh address of the node's wallet: (our bcrt1 form, the node's own string)."""
        node_address = self.wallet.call("getnewaddress", "", "bech32")
        spk = bytes.fromhex(self.wallet.call("getaddressinfo", node_address)["scriptPubKey"])
        assert spk[:2] == b"\x00\x14"
        return encode_segwit("bcrt", 0, spk[2:]), node_address

    def as_(self, who: str) -> list[str]:
        return ["--as", who, "--key", str(self.employees[who])]

    def request(self, to: str, amount: str, who: str = "carol", account: str = "acct-1") -> Any:
        return self.c(
            "withdraw", "request", "--account", account, "--to", to, "--amount", amount, *self.as_(who), "--json"
        )

    def approve(self, wid: int, who: str) -> Any:
        return self.c("withdraw", "approve", str(wid), *self.as_(who), "--yes", "--json")

    def sign(self, psbt: Path, founder: str, out: Path | None = None) -> Any:
        args = ["sign", str(psbt), "--key", str(self.founder_keys[founder]), "--yes"]
        if out:
            args += ["--out", str(out)]
        return self.c(*args, "--json")

    def requested(self, amount: str = "0.01") -> int:
        """A withdrawal requested by carol to a fresh address of the node's wallet."""
        to, _ = self.destination()
        result = self.request(to, amount)
        assert result.exit_code == 0, result.output
        return int(json.loads(result.stdout)["id"])

    def approved(self, amount: str = "0.01") -> int:
        """A requested withdrawal approved by alice and bob."""
        wid = self.requested(amount)
        assert self.approve(wid, "alice").exit_code == 0
        assert self.approve(wid, "bob").exit_code == 0
        return wid

    def export(self, wid: int) -> Path:
        """The withdrawal's PSBT, written to a file."""
        path = self.tmp / f"w{wid}.psbt"
        result = self.cli("withdraw", "export", str(wid), str(path))
        assert result.exit_code == 0, result.output
        return path


def double_spend(shop: Shop, wid: int, rpc: RpcClient) -> str:
    """Spend the withdrawal's first input to the node's wallet (a fee of 20,000 sat), signed
    with two founders' keys opened from their key files (a p2wsh store), and send it to
    ``rpc``'s node: another transaction than any custody recorded."""
    return str(rpc.call("sendrawtransaction", foreign_spend(shop, wid)))


def foreign_spend(shop: Shop, wid: int, to: bytes | None = None) -> str:
    """:func:`double_spend`'s transaction (hex), not sent: a test may mine it in a block of its
    own (``generateblock``) where the node's mempool holds a transaction it conflicts with.
    ``to``: the output's script (default: an address of the node's wallet)."""
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        txid, vout, amount, spk, chain, idx = db.execute(
            "SELECT txid, vout, amount, script_pubkey, chain, idx FROM withdrawal_input "
            "WHERE withdrawal_id = ? ORDER BY position LIMIT 1",
            (wid,),
        ).fetchone()
        (script,) = db.execute("SELECT script FROM address WHERE script_pubkey = ?", (spk,)).fetchone()
    if to is None:
        wallet = shop.wallet.call("getaddressinfo", shop.wallet.call("getnewaddress", "", "bech32"))
        to = bytes.fromhex(wallet["scriptPubKey"])
    tx = build_transaction([Coin(txid, vout, amount, bytes.fromhex(spk), chain, idx)], [(to, amount - 20_000)])
    p = psbt_lib.Psbt.from_unsigned_tx(tx)
    p.inputs[0].witness_utxo = psbt_lib.WitnessUtxo(amount, bytes.fromhex(spk))
    p.inputs[0].witness_script = bytes.fromhex(script)
    for name in ("founder-b", "founder-c"):
        key = open_founder_key(shop.founder_keys[name], PASSPHRASE)
        assert psbt_lib.sign_input(p, 0, key.master.derive((*key.account_path, chain, idx)).private_key())
    return str(psbt_lib.extract(psbt_lib.finalize(p)).serialize().hex())


def balance(shop: Shop, account: str) -> int:
    """A ledger account's balance (0 before its first entry)."""
    result = shop.c("ledger", "balance", account, "--json")
    if result.exit_code == 5:  # no entry yet
        return 0
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["balance_sat"])


def in_mempool(shop: Shop, txid: str) -> bool:
    """Whether the node's mempool holds ``txid``."""
    try:
        shop.rpc.call("getmempoolentry", txid)
    except RpcError:
        return False
    return True


def synced(shop: Shop, ids: set[int]) -> list[tuple[int, str]]:
    """Sync; what changed among ``ids``."""
    return [(c["id"], c["status"]) for c in shop.ok("sync") if c.get("record") == "withdrawal" and c["id"] in ids]


def postings(shop: Shop, wid: int) -> list[str]:
    """The ledger events posted for withdrawal ``wid``, one per ledger transaction."""
    seen: dict[int, str] = {}
    for e in shop.ok("ledger", "entries"):
        if e["ref"] == f"withdrawal:{wid}":
            seen[e["txn"]] = e["event"]
    return list(seen.values())


def reserved(shop: Shop, wid: int) -> list[str]:
    """The outpoints the store holds reserved for withdrawal ``wid`` (a SQLite store)."""
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        rows = db.execute("SELECT outpoint FROM reserved_input WHERE withdrawal_id = ? ORDER BY outpoint", (wid,))
        return [r[0] for r in rows]
