"""PSBTs through pipes and files: `-` for standard input and output, binary .psbt files
(BIP-174), base64 on request, and the final transaction printed raw; real subprocesses."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bitcoin.core import CTransaction, b2lx, x

from custody.bitcoin import psbt as psbt_lib
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest


@pytest.fixture
def shop(tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient) -> Shop:
    s = Shop(tmp_path, regtest_node, funded_wallet)
    s.deposit("acct-1", "0.3")
    return s


def test_psbt_files_are_binary_for_psbt_names_and_base64_on_request(shop: Shop, tmp_path: Path) -> None:
    wid = shop.approved()
    binary, text, other = tmp_path / "w.psbt", tmp_path / "w64.psbt", tmp_path / "w.txt"
    assert shop.cli("withdraw", "export", str(wid), str(binary)).exit_code == 0
    assert shop.cli("withdraw", "export", str(wid), str(text), "--base64").exit_code == 0
    assert shop.cli("withdraw", "export", str(wid), str(other)).exit_code == 0
    raw = binary.read_bytes()
    assert raw.startswith(b"psbt\xff")  # BIP-174's binary file
    assert base64.b64decode(text.read_text()) == raw == base64.b64decode(other.read_text())
    assert shop.rpc.call("decodepsbt", text.read_text().strip())["tx"]["txid"] == b2lx(
        psbt_lib.Psbt.parse(raw).tx.GetTxid()
    )
    # both forms are read everywhere: sign a binary file, import a base64 one and a binary one
    assert shop.sign(binary, "founder-a", tmp_path / "a.psbt").exit_code == 0
    assert (tmp_path / "a.psbt").read_bytes().startswith(b"psbt\xff")
    assert shop.sign(text, "founder-b", tmp_path / "b.txt").exit_code == 0
    assert shop.ok("withdraw", "import", str(wid), str(tmp_path / "b.txt"))["founders_signed"] == ["founder-b"]
    imported = shop.ok("withdraw", "import", str(wid), str(tmp_path / "a.psbt"))
    assert imported["status"] == "signed"


def _pipe(shop: Shop, cwd: Path, command: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, **shop.c.env)
    custody = f"{sys.executable} -m custody_cli"
    return subprocess.run(
        command.replace("custody ", custody + " "),
        shell=True,
        executable="/bin/bash",
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )


def test_export_sign_import_through_pipes_and_the_raw_final_transaction(shop: Shop, tmp_path: Path) -> None:
    wid = shop.approved()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    keys = shop.founder_keys
    for founder in ("founder-a", "founder-b"):
        run = _pipe(
            shop,
            cwd,
            f"set -o pipefail; custody withdraw export {wid} - | custody sign - --key {keys[founder]} --yes "
            f"| custody withdraw import {wid} - --json",
        )
        assert run.returncode == 0, run.stderr.decode()
        assert b"statement digest" in run.stderr  # the signer's review went to stderr, not into the pipe
    assert shop.ok("withdraw", "show", str(wid))["status"] == "signed"
    assert list(cwd.iterdir()) == []  # no file named `-`, nor any other

    # --out - is standard output, also with a file as input; --json and --out - clash
    path = shop.export(wid)
    run = _pipe(shop, cwd, f"custody sign {path} --key {keys['founder-c']} --yes --out -")
    assert run.returncode == 0, run.stderr.decode()
    signed = psbt_lib.Psbt.from_base64(run.stdout.decode())
    assert any(signed.inputs[0].partial_sigs)
    clash = _pipe(shop, cwd, f"custody sign {path} --key {keys['founder-c']} --yes --out - --json")
    assert clash.returncode == 2 and b"standard output" in clash.stderr
    # reading a PSBT from stdin that is not one
    junk = _pipe(shop, cwd, f"custody withdraw import {wid} -", stdin=b"%% not a psbt\n")
    assert junk.returncode == 2 and b"standard input is neither a binary nor a base64 PSBT" in junk.stderr
    assert list(cwd.iterdir()) == []

    not_yet = shop.cli("withdraw", "show", str(wid), "--raw")
    assert not_yet.exit_code == 6 and "not finalized" in not_yet.stderr
    final = shop.ok("withdraw", "finalize", str(wid))
    raw = shop.cli("withdraw", "show", str(wid), "--raw")
    assert raw.exit_code == 0
    hex_ = raw.stdout.strip()
    assert b2lx(CTransaction.deserialize(x(hex_)).GetTxid()) == final["txid"]
    assert shop.rpc.call("decoderawtransaction", hex_)["txid"] == final["txid"]
    assert shop.rpc.call("testmempoolaccept", [hex_])[0]["allowed"] is True
