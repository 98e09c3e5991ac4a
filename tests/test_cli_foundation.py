"""The foundation through the CLI, in process: init, policy, keys, employees, addresses."""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import pytest

from custody.bitcoin.descriptors import check_checksum
from tests.support import PASSPHRASE, Custody, founders


@pytest.fixture
def custody(tmp_path: Path) -> Custody:
    return Custody(tmp_path / "home")


@pytest.fixture
def ready(custody: Custody) -> Custody:
    assert custody.init(founders()).exit_code == 0
    return custody


def test_keygen_writes_encrypted_key_and_prints_bip48_origin(custody: Custody, tmp_path: Path) -> None:
    out = tmp_path / "a.key"
    result = custody("keygen", "founder-a", "--out", str(out), "--network", "regtest")
    assert result.exit_code == 0, result.output
    xpub = result.stdout.strip()
    assert xpub.startswith("[") and "/48'/1'/0'/2']tpub" in xpub
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc["format"] == "custody-key" and doc["version"] == 1 and doc["kind"] == "founder"
    assert PASSPHRASE not in out.read_text()
    # never overwritten
    again = custody("keygen", "founder-a", "--out", str(out))
    assert again.exit_code == 6


def test_keygen_on_mainnet_prints_xpub_with_coin_type_0(custody: Custody, tmp_path: Path) -> None:
    result = custody("keygen", "f", "--out", str(tmp_path / "m.key"), "--network", "mainnet", "--json")
    assert result.exit_code == 0, result.output
    assert "/48'/0'/0'/2']xpub" in json.loads(result.stdout)["xpub"]


def test_keygen_reads_passphrase_from_file_and_refuses_short_ones(custody: Custody, tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_text("short\n")
    result = custody("keygen", "f", "--out", str(tmp_path / "x.key"), "--passphrase-file", str(pf))
    assert result.exit_code == 2
    assert "too short" in result.stderr
    assert not (tmp_path / "x.key").exists()


def test_init_then_policy_show_descriptors_manifest(ready: Custody, tmp_path: Path) -> None:
    shown = ready.json("policy", "show")
    assert shown["threshold"] == 2 and shown["script_type"] == "p2wsh" and shown["network"] == "regtest"
    assert len(shown["founders"]) == 3
    descs = ready.json("policy", "descriptors")
    for chain, desc in (("0", descs["receive"]), ("1", descs["change"])):
        body = check_checksum(desc)  # a valid BIP-380 checksum
        assert body.startswith("wsh(sortedmulti(2,[") and body.count(f"/{chain}/*") == 3
    out = tmp_path / "founders.json"
    assert ready("policy", "manifest", "--out", str(out)).exit_code == 0
    manifest = json.loads(out.read_text())
    assert manifest["format"] == "custody-founders-manifest" and manifest["threshold"] == 2
    assert [f["xpub"] for f in manifest["founders"]] == [str(f.account) for f in founders()]
    assert ready("policy", "manifest", "--out", str(out)).exit_code == 6  # not overwritten


@pytest.mark.parametrize("script,wrapper", [("p2sh-p2wsh", "sh(wsh(sortedmulti("), ("p2sh", "sh(sortedmulti(")])
def test_init_script_types(custody: Custody, script: str, wrapper: str) -> None:
    assert custody.init(founders(script=script), script=script).exit_code == 0
    assert custody.json("policy", "descriptors")["receive"].startswith(wrapper)


def _refusal(custody: Custody, args: list[str]) -> tuple[int, str]:
    """Drafting the manifest is where a policy's keys are checked (init takes a signed manifest)."""
    out = custody.home.parent / "draft.json"
    result = custody("manifest", "draft", "--network", "regtest", *args, "--out", str(out))
    assert result.exit_code == 0 or not out.exists(), "a refused draft left a file behind"
    return result.exit_code, result.stderr


def test_init_refusals_have_clear_errors_and_exit_2(custody: Custody) -> None:
    fs = founders()
    a, b, c = (f.spec for f in fs)
    mainnet = founders("mainnet", tag="main")[0]
    cases = {
        "same key twice": (["--founder", a, "--founder", f"other={fs[0].account.xpub}", "--founder", c], "same key"),
        "another network": (["--founder", a, "--founder", b, "--founder", mainnet.spec], "another network"),
        "bad checksum": (
            ["--founder", a, "--founder", b, "--founder", c[:-1] + ("A" if c[-1] != "A" else "B")],
            "checksum",
        ),
        "private key": (
            ["--founder", a, "--founder", b, "--founder", f"x={fs[2].master.derive(fs[2].path).serialize()}"],
            "private",
        ),
        "threshold 0": (["--threshold", "0", "--founder", a, "--founder", b, "--founder", c], "threshold"),
        "threshold > n": (["--threshold", "4", "--founder", a, "--founder", b, "--founder", c], "threshold"),
        "bad founder syntax": (["--founder", "no-equals-sign"], "NAME=XPUB"),
    }
    for label, (args, needle) in cases.items():
        code, err = _refusal(custody, args)
        assert code == 2, (label, code, err)
        assert needle in err, (label, err)
    assert not (custody.home / "founders-manifest.json").exists()


def test_init_refuses_n_above_the_script_limit(custody: Custody) -> None:
    many = founders(n=16, tag="many")
    args = ["--script", "p2sh", "--threshold", "2"] + [x for f in many for x in ("--founder", f.spec)]
    code, err = _refusal(custody, args)
    assert code == 2 and "limit of 15" in err


def test_init_never_overwrites_a_policy(ready: Custody) -> None:
    before = ready.json("policy", "show")
    other = founders(tag="other")
    result = ready.init(other)
    assert result.exit_code == 6
    assert "never overwritten" in result.stderr or "not overwritten" in result.stderr
    assert ready.json("policy", "show") == before


def test_commands_before_init_say_so(custody: Custody) -> None:
    result = custody("policy", "show")
    assert result.exit_code == 9 and "custody init" in result.stderr


def test_employees(ready: Custody, tmp_path: Path) -> None:
    key = ready.employee("alice")
    assert json.loads(key.read_text())["kind"] == "employee"
    listed = ready.json("employee", "list")
    assert [e["name"] for e in listed] == ["alice"] and listed[0]["enabled"] is True
    pub = listed[0]["keys"][0]
    assert ready("employee", "add", "bob", "--pubkey", pub).exit_code == 2  # two employees never share a key
    assert ready("employee", "add", "alice", "--pubkey", "02" + "11" * 32).exit_code in (2, 6)
    assert ready("employee", "add", "bob", "--pubkey", "zz").exit_code == 2
    assert ready("employee", "add", "bob", "--pubkey", "04" + "11" * 64).exit_code == 2
    assert ready("employee", "disable", "alice").exit_code == 0  # proposed only
    assert ready.json("employee", "list")[0]["enabled"] is True
    ready.apply_roster()  # the founders sign it
    assert ready.json("employee", "list")[0]["enabled"] is False
    assert ready("employee", "disable", "nobody").exit_code == 5


def test_address_new_list_show_export(ready: Custody, tmp_path: Path) -> None:
    first = ready.json("address", "new", "--account", "alice", "--count", "3")
    assert [a["index"] for a in first] == [0, 1, 2]
    assert all(a["address"].startswith("bcrt1q") for a in first)
    second = ready.json("address", "new", "--account", "bob")
    assert second[0]["index"] == 3
    listed = ready.json("address", "list")
    assert [a["index"] for a in listed] == [0, 1, 2, 3]
    assert ready.json("address", "list", "--account", "bob")[0]["address"] == second[0]["address"]
    rows = list(csv.DictReader(io.StringIO(ready("address", "list", "--csv").stdout)))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    shown = ready.json("address", "show", first[1]["address"])
    assert shown["index"] == 1 and shown["account"] == "alice"
    assert ready("address", "show", "bcrt1qnotours").exit_code == 5
    export = tmp_path / "export.jsonl"
    assert ready("address", "export", str(export)).exit_code == 0
    lines = [json.loads(x) for x in export.read_text().splitlines()]
    assert lines[0]["format"] == "custody-address-export" and lines[0]["network"] == "regtest"
    assert lines[0]["descriptors"]["receive"].startswith("wsh(sortedmulti(2,")
    assert lines[-1] == {"end": True, "count": 4}
    assert [x["index"] for x in lines[1:-1]] == [0, 1, 2, 3]


def test_address_new_refuses_bad_input(ready: Custody) -> None:
    assert ready("address", "new", "--account", "").exit_code == 2
    assert ready("address", "new", "--account", "a", "--count", "0").exit_code == 2
    assert ready.json("address", "list") == []


def test_every_command_has_help_with_an_example(custody: Custody) -> None:
    from custody_cli.main import cli

    def walk(group, prefix):  # type: ignore[no-untyped-def]
        for name, cmd in group.commands.items():
            path = [*prefix, name]
            if hasattr(cmd, "commands"):
                yield from walk(cmd, path)
            else:
                yield path, cmd

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for path, cmd in walk(cli, []):
        result = custody(*path, "--help")
        assert result.exit_code == 0
        assert cmd.help and cmd.help.strip(), path
        assert "Example:" in result.stdout, path
        assert f"custody {' '.join(path)}" in readme, f"README lacks `custody {' '.join(path)}`"
