"""Wallet setup files: BIP-129's own vectors, every export read back by an independent parser
(embit), the way back (``manifest draft --from``), and the files an insider would forge.

The node's descriptor RPCs check the same exports in tests/test_setupfiles_regtest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from embit.descriptor import Descriptor
from embit.networks import NETWORKS as EMBIT_NETWORKS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custody.bitcoin.network import MAINNET, REGTEST
from custody.bitcoin.script import ScriptType
from custody.errors import InputError
from custody.policy.generator import AddressDeriver
from custody.policy.manifest import load_signed_manifest
from custody.policy.model import Policy, make_policy
from custody.policy.setupfiles import (
    FORMATS,
    bsms_decrypt,
    export_policy,
    policy_from_draft,
    read_bsms_key_record,
    read_setup_files,
)
from tests.support import Custody, founders

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BSMS = json.loads((FIXTURES / "bsms.json").read_text())
MODES = {m["mode"]: m for m in BSMS["modes"]}
XPUB_MODE = MODES["NO_ENCRYPTION"]
STANDARD = MODES["STANDARD Encryption"]
EXTENDED = MODES["EXTENDED Encryption"]
PUBKEY_MODE = MODES["NO_ENCRYPTION with Public Keys"]
FIRST = 5  # addresses compared per branch


def _policy(script_type: ScriptType, threshold: int = 2, n: int = 3) -> Policy:
    index = {ScriptType.P2WSH: 2, ScriptType.P2SH_P2WSH: 1, ScriptType.P2SH: 2}[script_type]
    fs = founders(n=n, script_index=index, tag=f"setup{script_type.value}{n}")
    return make_policy(REGTEST, threshold, script_type, [(f.name, str(f.account)) for f in fs])


def _ours(policy: Policy) -> dict[int, list[str]]:
    d = AddressDeriver(policy)
    return {chain: [d.derive(chain, i).address for i in range(FIRST)] for chain in (0, 1)}


def _embit(descriptor: str, branches: dict[int, int] | None = None) -> dict[int, list[str]]:
    """Addresses embit derives: from a <0;1> descriptor (branch index = chain), or from two."""
    net = EMBIT_NETWORKS["regtest"]
    d = Descriptor.from_string(descriptor)
    if d.num_branches == 2:
        return {c: [d.derive(i, branch_index=c).address(net) for i in range(FIRST)] for c in (0, 1)}
    return {0: [d.derive(i).address(net) for i in range(FIRST)]}


def _key_records(mode: dict[str, Any]) -> list[str]:
    return [v for k, v in mode["files"].items() if k.endswith("_key.bsms")]


# --------------------------------------------------------------------------- BIP-129's vectors


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_every_bip129_key_record_signature_checks(mode: str) -> None:
    for text in _key_records(MODES[mode]):
        record = read_bsms_key_record(text, MAINNET)
        assert record.key in text.split("\n")[2]


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_a_key_record_changed_by_one_character_is_refused(mode: str) -> None:
    for text in _key_records(MODES[mode]):
        lines = text.split("\n")
        forged_desc = "\n".join([*lines[:3], lines[3] + "!", lines[4]])
        with pytest.raises(InputError, match="not signed by that key"):
            read_bsms_key_record(forged_desc, MAINNET)
        # another signer's signature under this key
        other = next(t for t in _key_records(MODES[mode]) if t != text)
        with pytest.raises(InputError, match="not signed by that key"):
            read_bsms_key_record("\n".join([*lines[:4], other.split("\n")[4]]), MAINNET)


@pytest.mark.parametrize("mode", [XPUB_MODE, STANDARD], ids=["no-encryption", "standard"])
def test_round_two_gives_the_bip129_first_address(mode: dict[str, Any]) -> None:
    record = mode["files"]["my_multisig_wallet.bsms"]
    draft = read_setup_files([record.encode()], MAINNET)
    policy = policy_from_draft(draft, MAINNET)
    assert AddressDeriver(policy).derive(0, 0).address == record.split("\n")[3]
    assert (policy.threshold, policy.n, policy.script_type) == (mode["threshold"], mode["n"], ScriptType.P2WSH)


@pytest.mark.parametrize("mode", [XPUB_MODE, STANDARD], ids=["no-encryption", "standard"])
def test_round_one_key_records_draft_the_wallet_round_two_describes(mode: dict[str, Any]) -> None:
    draft = read_setup_files([t.encode() for t in _key_records(mode)], MAINNET)
    policy = policy_from_draft(draft, MAINNET, threshold=mode["threshold"])
    assert policy.script_type is ScriptType.P2WSH  # read from the keys' BIP-48 paths (…/2')
    assert AddressDeriver(policy).derive(0, 0).address == mode["files"]["my_multisig_wallet.bsms"].split("\n")[3]
    with pytest.raises(InputError, match="--threshold"):
        policy_from_draft(draft, MAINNET)


def test_encrypted_records_decrypt_with_their_token_only() -> None:
    for mode in (STANDARD, EXTENDED):
        for name, data in mode["files"].items():
            if not name.endswith(".dat"):
                continue
            plain = [t for t in mode["tokens"] if _decrypts(data, t)]
            assert len(plain) == 1, name  # exactly the right token opens it
            expected = mode["files"].get(name.replace(".dat", ".bsms")) or mode["files"]["my_multisig_wallet.bsms"]
            assert bsms_decrypt(data, plain[0]) == expected
            flipped = data[:70] + ("0" if data[70] != "0" else "1") + data[71:]
            with pytest.raises(InputError, match="does not decrypt"):
                bsms_decrypt(flipped, plain[0])
    files = [v.encode() for k, v in STANDARD["files"].items() if k.endswith("_key.dat")]
    draft = read_setup_files(files, MAINNET, tokens=STANDARD["tokens"])
    policy = policy_from_draft(draft, MAINNET, threshold=2)
    assert AddressDeriver(policy).derive(0, 0).address == STANDARD["files"]["my_multisig_wallet.bsms"].split("\n")[3]
    with pytest.raises(InputError, match="token"):
        read_setup_files(files, MAINNET)


def _decrypts(data: str, token: str) -> bool:
    try:
        bsms_decrypt(data, token)
    except InputError:
        return False
    return True


def test_multi_and_bare_public_keys_are_refused_with_the_reason() -> None:
    with pytest.raises(InputError, match="sortedmulti"):
        read_setup_files([EXTENDED["files"]["my_multisig_wallet.bsms"].encode()], MAINNET)
    with pytest.raises(InputError, match="extended keys"):
        read_setup_files([t.encode() for t in _key_records(PUBKEY_MODE)], MAINNET)
    with pytest.raises(InputError, match="must end in"):
        read_setup_files([PUBKEY_MODE["files"]["my_multisig_wallet.bsms"].encode()], MAINNET)


def test_a_bsms_record_whose_first_address_or_key_was_changed_is_refused() -> None:
    lines = XPUB_MODE["files"]["my_multisig_wallet.bsms"].split("\n")
    other = STANDARD["files"]["my_multisig_wallet.bsms"].split("\n")[3]  # a valid address of another wallet
    forged = "\n".join([*lines[:3], other])
    with pytest.raises(InputError, match="first address"):
        policy_from_draft(read_setup_files([forged.encode()], MAINNET), MAINNET)
    # a key replaced by the attacker's, first address left as the founders saw it
    theirs = STANDARD["files"]["signer_1_key.bsms"].split("\n")[2]
    ours = lines[1].split(",")[2].removesuffix("/**))")
    forged = "\n".join([lines[0], lines[1].replace(ours, theirs), *lines[2:]])
    with pytest.raises(InputError, match="first address"):
        policy_from_draft(read_setup_files([forged.encode()], MAINNET), MAINNET)
    # the same record for another network
    with pytest.raises(InputError):
        policy_from_draft(read_setup_files(["\n".join(lines).encode()], REGTEST), REGTEST)


# --------------------------------------------------------------------------- exports, read by embit


@pytest.mark.parametrize("script_type", list(ScriptType))
def test_descriptor_and_sparrow_exports_give_embit_our_addresses(script_type: ScriptType) -> None:
    policy = _policy(script_type)
    ours = _ours(policy)
    one = export_policy(policy, "descriptor")
    assert one.count("\n") == 1
    assert _embit(one.strip()) == ours
    # Sparrow's importer (docs/FORMATS.md): drop # lines, join adjacent lines, split at blank
    # lines, take the first paragraph.
    text = export_policy(policy, "sparrow")
    paragraphs = [
        "".join(line.strip() for line in p.split("\n") if not line.startswith("#")) for p in text.split("\n\n")
    ]
    assert _embit(paragraphs[0]) == ours
    assert _embit(paragraphs[1]) == {0: ours[0]}
    assert _embit(paragraphs[2]) == {0: ours[1]}


@pytest.mark.parametrize("script_type", [ScriptType.P2WSH, ScriptType.P2SH_P2WSH])
def test_bsms_export_expands_for_embit_and_names_the_first_address(script_type: ScriptType) -> None:
    policy = _policy(script_type)
    ours = _ours(policy)
    record = export_policy(policy, "bsms")
    version, template, paths, first = record.split("\n")  # exactly four lines, as the reference splits
    assert version == "BSMS 1.0" and paths == "/0/*,/1/*"
    for chain, restriction in enumerate(paths.split(",")):
        assert _embit(template.replace("/**", restriction)) == {0: ours[chain]}
    assert first == ours[0][0]


@pytest.mark.parametrize("script_type", list(ScriptType))
def test_coldcard_export_parsed_like_coldcard_gives_embit_our_addresses(script_type: ScriptType) -> None:
    policy = _policy(script_type)
    text = export_policy(policy, "coldcard", name="treasury")
    fields: dict[str, str] = {}
    keys = []
    derivation = ""
    for line in text.split("\n"):  # Coldcard's rules: '#' comments, 'label: value'
        if not line.strip() or line.startswith("#"):
            continue
        label, value = (p.strip() for p in line.split(":", 1))
        if label.lower() == "derivation":
            derivation = value
        elif len(label) == 8:
            keys.append(f"[{label.lower()}{derivation[1:]}]{value}")
        else:
            fields[label.lower()] = value
    assert fields["name"] == "treasury" and fields["policy"] == "2 of 3"
    wrap = {"P2WSH": "wsh({})", "P2SH-P2WSH": "sh(wsh({}))", "P2SH": "sh({})"}[fields["format"]]
    desc = wrap.format(f"sortedmulti(2,{','.join(k + '/<0;1>/*' for k in keys)})")
    assert _embit(desc) == _ours(policy)


@pytest.mark.parametrize("script_type", list(ScriptType))
def test_caravan_and_specter_exports_give_embit_our_addresses(script_type: ScriptType) -> None:
    policy = _policy(script_type)
    ours = _ours(policy)
    caravan = json.loads(export_policy(policy, "caravan"))
    assert caravan["network"] == "regtest" and caravan["quorum"] == {"requiredSigners": 2, "totalSigners": 3}
    keys = [f"[{k['xfp']}{k['bip32Path'][1:]}]{k['xpub']}/<0;1>/*" for k in caravan["extendedPublicKeys"]]
    wrap = {"P2WSH": "wsh({})", "P2SH-P2WSH": "sh(wsh({}))", "P2SH": "sh({})"}[caravan["addressType"]]
    assert _embit(wrap.format(f"sortedmulti(2,{','.join(keys)})")) == ours
    specter = json.loads(export_policy(policy, "specter"))
    assert _embit(specter["descriptor"]) == {0: ours[0]}
    assert _embit(specter["descriptor"].split("#")[0].replace("/0/*", "/1/*")) == {0: ours[1]}
    assert [d["label"] for d in specter["devices"]] == [f.name for f in policy.founders]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("script_type", list(ScriptType))
def test_every_export_reads_back_as_the_same_policy(fmt: str, script_type: ScriptType) -> None:
    policy = _policy(script_type, threshold=3, n=5)
    back = policy_from_draft(read_setup_files([export_policy(policy, fmt).encode()], REGTEST), REGTEST)
    assert (back.threshold, back.script_type) == (policy.threshold, policy.script_type)
    assert [str(f.key) for f in back.founders] == [str(f.key) for f in policy.founders]
    assert _ours(back) == _ours(policy)


# --------------------------------------------------------------------------- forged files


def test_forged_setup_files_are_refused() -> None:
    policy = _policy(ScriptType.P2WSH)
    other = _policy(ScriptType.P2WSH, n=4)
    sparrow = export_policy(policy, "sparrow")
    # the change descriptor of another wallet slipped into the file
    lines = sparrow.split("\n")
    lines[-2] = other.descriptor(1)
    with pytest.raises(InputError, match="different wallets"):
        read_setup_files(["\n".join(lines).encode()], REGTEST)
    # a wrong checksum
    one = export_policy(policy, "descriptor").strip()
    with pytest.raises(InputError, match="checksum"):
        read_setup_files([(one[:-1] + ("q" if one[-1] != "q" else "p")).encode()], REGTEST)
    # a hardened or unknown branch, a non-multisig descriptor
    for bad in (one.split("#")[0].replace("<0;1>/*", "0h/*"), "wpkh(" + str(policy.founders[0].key) + "/0/*)"):
        with pytest.raises(InputError):
            read_setup_files([bad.encode()], REGTEST)
    # a Caravan file for another network, and one that disagrees with its quorum
    caravan = json.loads(export_policy(policy, "caravan"))
    draft = read_setup_files([json.dumps(caravan | {"network": "testnet"}).encode()], REGTEST)
    with pytest.raises(InputError, match="testnet"):
        policy_from_draft(draft, REGTEST)
    caravan["quorum"]["totalSigners"] = 4
    with pytest.raises(InputError, match="quorum"):
        read_setup_files([json.dumps(caravan).encode()], REGTEST)
    # a Coldcard file with one key fewer than its Policy line says
    coldcard = export_policy(policy, "coldcard").rstrip("\n").rsplit("\n", 1)[0]
    with pytest.raises(InputError, match="3 keys and lists 2"):
        read_setup_files([coldcard.encode()], REGTEST)
    # what the command line says must agree with the file
    draft = read_setup_files([export_policy(policy, "descriptor").encode()], REGTEST)
    with pytest.raises(InputError, match="threshold"):
        policy_from_draft(draft, REGTEST, threshold=1)
    with pytest.raises(InputError, match="p2sh"):
        policy_from_draft(draft, REGTEST, script_type=ScriptType.P2SH)
    # test-network keys drafted for mainnet
    with pytest.raises(InputError, match="another network"):
        policy_from_draft(read_setup_files([export_policy(policy, "descriptor").encode()], MAINNET), MAINNET)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_byte_changed_in_any_setup_file_is_refused_or_reads_as_a_valid_policy(data: st.DataObject) -> None:
    """Fuzzed files never crash the reader: an InputError, or a policy make_policy accepted."""
    fmt = data.draw(st.sampled_from(FORMATS))
    text = bytearray(export_policy(_policy(ScriptType.P2WSH), fmt).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(0, 255))
    try:
        policy_from_draft(read_setup_files([bytes(text)], REGTEST), REGTEST)
    except InputError:
        pass


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_arbitrary_input_is_an_input_error(blob: bytes) -> None:
    try:
        policy_from_draft(read_setup_files([blob], REGTEST), REGTEST)
    except InputError:
        pass


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def ready(tmp_path: Path) -> Custody:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    return c


def test_export_writes_files_and_stdout_and_never_overwrites(ready: Custody, tmp_path: Path) -> None:
    for fmt in FORMATS:
        out = tmp_path / f"wallet.{fmt}"
        assert ready("policy", "export", "--format", fmt, "--out", str(out)).exit_code == 0
        piped = ready("policy", "export", "--format", fmt, "--out", "-")
        assert piped.exit_code == 0 and piped.stdout == out.read_text()
        again = ready("policy", "export", "--format", fmt, "--out", str(out))
        assert again.exit_code == 6
    assert ready("policy", "export", "--format", "coldcard", "--name", "a name far too long!!").exit_code == 2
    assert not (tmp_path / "-").exists()


def test_export_comes_from_the_signed_manifest_and_refuses_an_edited_one(ready: Custody, tmp_path: Path) -> None:
    pinned = ready.home / "founders-manifest.json"
    doc = json.loads(pinned.read_text())
    attacker = founders(tag="attacker")[0]
    doc["founders"][2]["xpub"] = str(attacker.account)
    pinned.write_text(json.dumps(doc))
    result = ready("policy", "export", "--format", "descriptor", "--out", str(tmp_path / "d.txt"))
    assert result.exit_code == 2 and "not signed by every founder" in result.output
    assert not (tmp_path / "d.txt").exists()


def test_manifest_draft_from_files_and_stdin(ready: Custody, tmp_path: Path) -> None:
    original = json.loads(ready.manifest_file.read_text())
    caravan = ready("policy", "export", "--format", "caravan").stdout
    out = tmp_path / "m.json"
    drafted = ready("manifest", "draft", "--network", "regtest", "--from", "-", "--out", str(out), input=caravan)
    assert drafted.exit_code == 0, drafted.output
    doc = json.loads(out.read_text())
    assert doc["founders"] == original["founders"]  # names kept: Caravan carries them
    assert {k: doc[k] for k in ("threshold", "script_type", "network")} == {
        k: original[k] for k in ("threshold", "script_type", "network")
    }
    # the drafted manifest is the one the founders signed for this store: the same digest
    assert (
        load_signed_manifest(out.read_bytes()).digest == load_signed_manifest(ready.manifest_file.read_bytes()).digest
    )
    # a file without names: founders are named by fingerprint, the keys are the same
    coldcard = tmp_path / "cc.txt"
    assert ready("policy", "export", "--format", "coldcard", "--out", str(coldcard)).exit_code == 0
    view = ready.json(
        "manifest", "draft", "--network", "regtest", "--from", str(coldcard), "--out", str(tmp_path / "n")
    )
    assert [f["xpub"] for f in view["founders"]] == [f["xpub"] for f in original["founders"]]
    assert [f["name"] for f in view["founders"]] == [f"founder-{f.master.fingerprint.hex()}" for f in founders()]
    assert view["first_address"] == ready.json("address", "new", "--account", "a")[0]["address"]


def test_manifest_draft_from_refuses_without_writing(ready: Custody, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    bad = "wsh(multi(2," + ",".join(f"{f.account}/0/*" for f in founders()) + "))"
    result = ready("manifest", "draft", "--network", "regtest", "--from", "-", "--out", str(out), input=bad)
    assert result.exit_code == 2 and "sortedmulti" in result.output and not out.exists()
    both = ready(
        "manifest", "draft", "--network", "regtest", "--from", "-", "--founder", founders()[0].spec, "--out", str(out)
    )
    assert both.exit_code == 2 and not out.exists()
    huge = ready("manifest", "draft", "--network", "regtest", "--from", "-", "--out", str(out), input="#" * 300_000)
    assert huge.exit_code == 2 and not out.exists()


def test_policy_descriptors_survive_sparrows_paragraph_reader(ready: Custody) -> None:
    text = ready("policy", "descriptors").stdout
    paragraphs = []
    current = ""
    for line in (line.strip() for line in text.split("\n")):  # Sparrow's Descriptor.getParagraphs
        if not line:
            if current:
                paragraphs.append(current)
            current = ""
        elif not line.startswith("#"):
            current += line
    if current:
        paragraphs.append(current)
    descs = ready.json("policy", "descriptors")
    assert paragraphs == [descs["multipath"], descs["receive"], descs["change"]]
    assert Descriptor.from_string(paragraphs[0]).num_branches == 2
