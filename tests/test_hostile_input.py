"""Hostile input: every parser, and every command that takes input, fed mutated and arbitrary data.

Each parser starts from VALID examples (the fixtures' vectors, or what our own code makes)
and mutates them (bit flips, truncation, insertion, deletion, type changes in JSON, huge
numbers, unicode), plus arbitrary text and bytes. Whatever comes in, a parser either
accepts it or raises one of our documented errors: a ``CustodyError`` (exit codes in the
README) or, from the independent verifier, ``ManifestError`` / ``ExportError`` /
``DecodeError``. Never IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError,
RecursionError, OverflowError, ...

At the CLI, every command that takes user input refuses hostile values with a documented
exit code and a one-line ``error:`` message, and leaves the store exactly as it was (every
table's rows compared, the audit chain verified).

"""

from __future__ import annotations

import base64
import copy
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import coincurve
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custody import verify
from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.amounts import MAX_FEE_RATE, MAX_MONEY, format_btc, parse_btc_amount, parse_fee_rate
from custody.bitcoin.bech32 import decode_segwit, encode_segwit
from custody.bitcoin.descriptors import add_checksum, check_checksum
from custody.bitcoin.destinations import parse_destination
from custody.bitcoin.keys import b58check_decode, b58check_encode, parse_origin_xpub, parse_xprv, parse_xpub
from custody.bitcoin.network import NETWORKS, REGTEST
from custody.bitcoin.psbt.maps import PSBT_MAGIC
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.errors import CustodyError, InputError, KeyFileError
from custody.identity import keyfile
from custody.identity.keyfile import FounderKey, open_employee_key, open_founder_key, read_header
from custody.policy.manifest import parse_signed_manifest
from custody.policy.model import policy_from_manifest
from custody.withdraw import signer as signer_lib
from custody.withdraw.signer import PROP_APPROVALS, PROP_META, PROP_ROSTER, PROP_SUSPENSIONS, PROPRIETARY_ID
from tests.store_support import audit_problems, dump_store
from tests.support import PASSPHRASE, Custody, founders, read_psbt
from tests.withdraw_support import Shop

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def check_and_sign(p: psbt_lib.Psbt, founder: Any, manifest: Any) -> signer_lib.SignResult:
    """The offline signer with ``manifest`` (a document, maybe mutated) pinned and a fresh state."""
    import tempfile

    pinned = parse_signed_manifest(manifest)
    state = signer_lib.SignerState(Path(tempfile.mkdtemp()) / "signer-state.json", pinned.digest)
    return signer_lib.check_and_sign(p, founder, pinned, state)


DOCUMENTED: tuple[type[Exception], ...] = (CustodyError, verify.ManifestError, verify.ExportError, verify.DecodeError)
DOCUMENTED_EXITS = {2, 3, 4, 5, 6, 7, 9}

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ_SLOW = settings(FUZZ, max_examples=150)
FUZZ_CLI = settings(FUZZ, max_examples=25)


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def documented(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the documented error it raised; anything else propagates."""
    try:
        return fn(*args)
    except DOCUMENTED as exc:
        return exc


# --------------------------------------------------------------------------- mutation strategies

# Characters worth trying: the bech32/base58 alphabets' neighbours, separators, unicode
# digits and letters that look like ASCII, controls, an RTL override, a lone surrogate.
ODD_CHARS = list("1qpzry9x8gf2tvdw0s3jn54khce6mua7lIOl0BbCc#[]/'h*(),=.-+ \t\n\r\x00\x7f") + [
    "\u0661",  # ARABIC-INDIC DIGIT ONE
    "\u00e9",
    "\u0430",  # CYRILLIC a
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\ufeff",  # BOM
    "\udcff",  # lone surrogate
    "\U0001f4a5",
]


@st.composite
def mutated_text(draw: st.DrawFn, bases: list[str]) -> str:
    """One of ``bases`` with one to four character-level edits."""
    text = list(draw(st.sampled_from(bases)))
    char = st.one_of(st.sampled_from(ODD_CHARS), st.characters())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swapcase", "duplicate"]))
        pos = draw(st.integers(0, max(len(text) - 1, 0)))
        if op == "replace" and text:
            text[pos] = draw(char)
        elif op == "insert":
            text.insert(pos, draw(char))
        elif op == "delete" and text:
            del text[pos]
        elif op == "truncate":
            text = text[:pos]
        elif op == "swapcase" and text:
            text[pos] = text[pos].swapcase()
        elif op == "duplicate":
            text = text[:pos] + text[pos:] + text[pos:]
    return "".join(text)


@st.composite
def mutated_bytes(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """One of ``bases`` with one to four byte-level edits (bit flips weigh most)."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "flip", "set", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0xFD, 0xFE, 0x80, 0x7F, 0x01]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos] = data[draw(st.integers(0, max(len(data) - 1, 0))) :][:64]
    return bytes(data)


HOSTILE_JSON_VALUES = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2,
            2**31,
            2**32,
            2**63,
            -(2**63),
            10**30,
            float("inf"),
            float("-inf"),
            float("nan"),
            1.5,
            1e308,
            "",
            " ",
            "\u0000",
            "\u0661",
            "\udcff",
            "NaN",
            "x" * 300,
            [],
            {},
            [[[]]],
            {"": None},
        ]
    ),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
).map(copy.deepcopy)  # a fresh copy each draw: an edit must never change the sampled constants


def _slots(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``doc`` (the empty path is the document itself)."""
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _slots(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _slots(v, (*at, i))


@st.composite
def mutated_json(draw: st.DrawFn, base: Any) -> Any:
    """``base`` (a decoded JSON document) with one to three edits at any depth:
    a value replaced (type changes, huge numbers, NaN, unicode), a key or item removed or
    added, a container emptied."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_slots(doc))))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "empty"]))
        if not path:
            if op == "replace":
                doc = draw(HOSTILE_JSON_VALUES)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if op == "replace":
            parent[last] = draw(HOSTILE_JSON_VALUES)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(HOSTILE_JSON_VALUES)
        elif op == "add" and isinstance(parent, list):
            parent.append(draw(HOSTILE_JSON_VALUES))
        elif op == "empty" and isinstance(parent[last], dict | list):
            parent[last] = type(parent[last])()
    return doc


def _json_bytes(doc: Any) -> bytes:
    """JSON as a hostile writer sends it: NaN and Infinity allowed, lone surrogates kept."""
    return json.dumps(doc).encode("utf-8", "surrogatepass")


ARBITRARY_TEXT = st.one_of(st.text(max_size=120), st.text(alphabet=st.sampled_from(ODD_CHARS), max_size=120))

# --------------------------------------------------------------------------- addresses


def _valid_addresses() -> list[str]:
    """Addresses of every supported kind on every network, plus the BIP-173/350 vectors."""
    out = [v["address"] for v in _fixture("bech32.json")["valid_addresses"]]
    for net in NETWORKS.values():
        out.append(b58check_encode(bytes([net.p2pkh_version]) + bytes(range(20))))
        out.append(b58check_encode(bytes([net.p2sh_version]) + bytes(range(20, 40))))
        out.append(encode_segwit(net.bech32_hrp, 0, bytes(range(20))))
        out.append(encode_segwit(net.bech32_hrp, 0, bytes(range(32))))
        out.append(encode_segwit(net.bech32_hrp, 1, bytes(range(32))))
        out.append(encode_segwit(net.bech32_hrp, 2, bytes(range(16))))  # valid, but unsupported
    return out


VALID_ADDRESSES = _valid_addresses()
HRPS = sorted({n.bech32_hrp for n in NETWORKS.values()})


def _check_destination(text: str) -> None:
    for net in NETWORKS.values():
        result = documented(parse_destination, text, net)
        if not isinstance(result, Exception):
            # What is accepted is accepted again in its normalized form, to the same script.
            assert parse_destination(result.address, net) == result
            assert result.kind in {"p2pkh", "p2sh", "p2wpkh", "p2wsh", "p2tr"}


def test_valid_addresses_parse_on_their_network() -> None:
    for v in _fixture("bech32.json")["valid_addresses"]:
        result = documented(parse_destination, v["address"], NETWORKS[v["network"]])
        if not isinstance(result, Exception):
            assert result.script_pubkey.hex() == v["script_pubkey"]


@FUZZ
@given(mutated_text(VALID_ADDRESSES))
def test_mutated_addresses(text: str) -> None:
    _check_destination(text)


@FUZZ
@given(ARBITRARY_TEXT)
def test_arbitrary_text_as_address(text: str) -> None:
    _check_destination(text)


@FUZZ
@given(st.one_of(mutated_text(VALID_ADDRESSES), ARBITRARY_TEXT), st.sampled_from([*HRPS, "", "BC", "x" * 90]))
def test_decode_segwit(text: str, hrp: str) -> None:
    result = documented(decode_segwit, hrp, text)
    if not isinstance(result, Exception):
        version, program = result
        assert encode_segwit(hrp, version, program) == text.lower()


# --------------------------------------------------------------------------- extended keys


def _valid_keys() -> list[str]:
    out = []
    for vector in _fixture("bip32.json")["vectors"]:
        for chain in vector["chains"]:
            out += [chain["xpub"], chain["xprv"]]
    out += [v["key"] for v in _fixture("bip32.json")["invalid"]]
    for net in ("regtest", "mainnet"):
        for f in founders(net, n=2):
            out += [str(f.account), f.account.xpub.serialize(), f.master.serialize()]
    return out


VALID_KEYS = _valid_keys()
KEY_PAYLOADS = [
    payload
    for payload in (documented(b58check_decode, k) for k in VALID_KEYS if not k.startswith("["))
    if isinstance(payload, bytes)
]


def _check_key_text(text: str) -> None:
    for net in NETWORKS.values():
        for parse in (parse_xpub, parse_xprv, parse_origin_xpub):
            result = documented(parse, text, net)
            if parse is parse_xpub and not isinstance(result, Exception):
                assert parse_xpub(result.serialize(), net) == result


@FUZZ
@given(mutated_text(VALID_KEYS))
def test_mutated_extended_key_text(text: str) -> None:
    _check_key_text(text)


@FUZZ
@given(mutated_bytes(KEY_PAYLOADS))
def test_mutated_extended_key_payloads(payload: bytes) -> None:
    """Edits behind a valid checksum: version, depth, fingerprint, chain code, key byte."""
    _check_key_text(b58check_encode(payload))


@FUZZ
@given(
    st.lists(st.one_of(st.integers(-1, 2**33), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1])), max_size=6),
    st.sampled_from(["'", "h", "H", "", "''", "/"]),
    st.one_of(st.just("00000000"), st.text(alphabet="0123456789abcdefABCDEFxg", max_size=10)),
)
def test_key_origins(path: list[int], mark: str, fingerprint: str) -> None:
    key = founders()[0].account.xpub.serialize()
    text = "[" + fingerprint + "".join(f"/{p}{mark}" for p in path) + "]" + key
    for net in NETWORKS.values():
        documented(parse_origin_xpub, text, net)


@FUZZ
@given(ARBITRARY_TEXT)
def test_arbitrary_text_as_extended_key(text: str) -> None:
    _check_key_text(text)


# --------------------------------------------------------------------------- descriptors


def _valid_descriptors() -> list[str]:
    d = _fixture("bip380_checksums.json")
    out = [f"{v['descriptor']}#{v['checksum']}" for v in d["valid"]]
    out += [v["descriptor_with_checksum"] for v in d["invalid"]]
    from custody.bitcoin.script import ScriptType
    from custody.policy.model import make_policy

    for script in ScriptType:
        fs = founders(script_index=1 if script is ScriptType.P2SH_P2WSH else 2)
        policy = make_policy(REGTEST, 2, script, [(f.name, str(f.account)) for f in fs])
        out += list(policy.descriptors().values())
    return out


VALID_DESCRIPTORS = _valid_descriptors()


@FUZZ
@given(st.one_of(mutated_text(VALID_DESCRIPTORS), ARBITRARY_TEXT))
def test_descriptor_checksums(text: str) -> None:
    result = documented(check_checksum, text)
    if not isinstance(result, Exception):
        assert add_checksum(result) == text


# --------------------------------------------------------------------------- amounts and fee rates

AMOUNT_BASES = ["0.015", "1", "21000000", "0.00000001", "20999999.99999999", "1.5", "100000", "12.345"]
HUGE_NUMBERS = st.sampled_from(
    ["1" * 5000, "0" * 5000 + "1", "0." + "0" * 5000 + "1", "9" * 100 + ".5", "1e400", "1" * 4301 + ".0"]
)


@FUZZ
@given(st.one_of(mutated_text(AMOUNT_BASES), ARBITRARY_TEXT, HUGE_NUMBERS))
def test_amounts(text: str) -> None:
    result = documented(parse_btc_amount, text)
    if not isinstance(result, Exception):
        assert 1 <= result <= MAX_MONEY
        assert parse_btc_amount(format_btc(result)) == result


@FUZZ
@given(st.one_of(mutated_text(AMOUNT_BASES), ARBITRARY_TEXT, HUGE_NUMBERS))
def test_fee_rates(text: str) -> None:
    result = documented(parse_fee_rate, text)
    if not isinstance(result, Exception):
        assert 0 < result <= MAX_FEE_RATE and result.is_finite()
        assert -result.as_tuple().exponent <= 3  # type: ignore[operator]


def test_huge_amount_is_an_input_error() -> None:
    """Found by this suite: int() of a 5000-digit amount raised ValueError (digit limit)."""
    for text in ("1" * 5000, "1" * 5000 + ".5", "0" * 5000 + "123456789"):
        with pytest.raises(InputError, match="more than the 21,000,000 BTC"):
            parse_btc_amount(text)
    assert parse_btc_amount("0" * 5000 + "1") == 100_000_000  # leading zeros are only zeros


# --------------------------------------------------------------------------- PSBTs


def _psbt_fixtures() -> list[bytes]:
    d = _fixture("bip174.json")
    out = [base64.b64decode(v["base64"]) for v in d["valid"] + d["invalid"] + d["signer_checks"] if "base64" in v]
    for role in d["roles"].values():
        if isinstance(role, dict):
            out += [base64.b64decode(v) for v in role.values() if isinstance(v, str) and v.startswith("cHNidP8")]
    return out


PSBT_FIXTURES = _psbt_fixtures()


def _check_psbt_bytes(data: bytes) -> None:
    result = documented(psbt_lib.Psbt.parse, data)
    if isinstance(result, Exception):
        return
    again = documented(result.serialize)
    if not isinstance(again, Exception):
        assert psbt_lib.Psbt.parse(again).serialize() == again  # parse/serialize is a fixed point


def test_psbt_fixtures_are_many() -> None:
    assert len(PSBT_FIXTURES) >= 20


@FUZZ
@given(mutated_bytes(PSBT_FIXTURES))
def test_mutated_psbts(data: bytes) -> None:
    _check_psbt_bytes(data)


@FUZZ
@given(st.binary(max_size=400).map(lambda b: PSBT_MAGIC + b))
def test_arbitrary_psbt_bodies(data: bytes) -> None:
    _check_psbt_bytes(data)


@FUZZ
@given(st.one_of(mutated_text([base64.b64encode(p).decode() for p in PSBT_FIXTURES[:12]]), ARBITRARY_TEXT))
def test_psbt_from_base64(text: str) -> None:
    documented(psbt_lib.Psbt.from_base64, text)


@pytest.mark.parametrize(
    "data",
    [
        PSBT_MAGIC + b"\xff" + b"\xff" * 8,  # a key length of 2**64-1
        PSBT_MAGIC + b"\x01\x00\xfe\xff\xff\xff\x7f",  # a 2 GiB value announced
        PSBT_MAGIC + b"\x01\x00\x0a" + b"\x00" * 4 + b"\xff" + b"\xff" * 8,  # 2**64 inputs
        PSBT_MAGIC,
        b"",
    ],
)
def test_psbt_announcing_huge_sizes(data: bytes) -> None:
    with pytest.raises(InputError):
        psbt_lib.Psbt.parse(data)


# --------------------------------------------------------------------------- key files

# scrypt costs ~0.1 s a try: its results are memoized by (passphrase, salt, n, r, p) so
# that hundreds of mutated files stay cheap; new parameters still run the real scrypt.
_real_kdf = keyfile._kdf


@lru_cache(maxsize=64)
def _memo_kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return _real_kdf(passphrase, salt, n, r, p)


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile-keys")
    keyfile.create_founder_key(tmp / "founder.key", "founder-a", REGTEST, PASSPHRASE)
    keyfile.create_employee_key(tmp / "employee.key", "alice", PASSPHRASE)
    return {"founder": tmp / "founder.key", "employee": tmp / "employee.key"}


def _open_all(path: Path, originals: dict[str, Any]) -> None:
    documented(read_header, path)
    employee = documented(open_employee_key, path, PASSPHRASE)
    founder = documented(open_founder_key, path, PASSPHRASE)
    for result in (employee, founder):
        if isinstance(result, Exception):
            # A key file is all or nothing: a broken one is a KeyFileError (exit 7).
            assert isinstance(result, KeyFileError), repr(result)
    # A mutated file that still opens opens to the very same key, never to another one.
    if not isinstance(employee, Exception):
        assert employee.public_key == originals["employee"].public_key
    if not isinstance(founder, Exception):
        assert isinstance(founder, FounderKey)
        assert founder.account.xpub.identity() == originals["founder"].account.xpub.identity()


def _run_keyfile_fuzz(tmp: Path, key_files: dict[str, Path], strategy: st.SearchStrategy[bytes]) -> None:
    originals = {
        "employee": open_employee_key(key_files["employee"], PASSPHRASE),
        "founder": open_founder_key(key_files["founder"], PASSPHRASE),
    }
    target = tmp / "mutated.key"

    @FUZZ_SLOW
    @given(strategy)
    def run(data: bytes) -> None:
        target.write_bytes(data)
        _open_all(target, originals)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keyfile, "_kdf", _memo_kdf)
        run()


def test_mutated_key_file_bytes(tmp_path: Path, key_files: dict[str, Path]) -> None:
    bases = [p.read_bytes() for p in key_files.values()]
    _run_keyfile_fuzz(tmp_path, key_files, mutated_bytes(bases))


def test_mutated_key_file_json(tmp_path: Path, key_files: dict[str, Path]) -> None:
    docs = [json.loads(p.read_bytes()) for p in key_files.values()]
    strategy = st.sampled_from(docs).flatmap(mutated_json).map(_json_bytes)
    _run_keyfile_fuzz(tmp_path, key_files, strategy)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe\x00",
        b"[" * 100_000,  # found by this suite: RecursionError out of json.loads
        b'{"format": "custody-key", "version": ' + b"9" * 5000 + b"}",  # found: int digit limit
        b'{"format": "custody-key", "version": 1, "kind": "employee", "kdf": {"name": "scrypt", "n": Infinity,'
        b' "r": 8, "p": 1, "salt": "00"}, "cipher": {"name": "chacha20-poly1305", "nonce": "00"},'
        b' "ciphertext": "00"}',  # found: int(Infinity) raised OverflowError
        b'{"format": "custody-key", "version": true}',
        b"null",
        PSBT_MAGIC + b"\x00",
    ],
)
def test_hostile_key_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hostile.key"
    path.write_bytes(content)
    for fn in (open_employee_key, open_founder_key):
        with pytest.raises(KeyFileError):
            fn(path, PASSPHRASE)


def test_an_oversize_key_file_is_refused_unread(tmp_path: Path) -> None:
    """Above 1 MiB a key file is bad input (exit 2), refused by its size (tests/test_file_limits.py)."""
    path = tmp_path / "hostile.key"
    path.write_bytes(b"\x00" * 2_000_000)
    for fn in (open_employee_key, open_founder_key):
        with pytest.raises(InputError, match="larger than 1 MiB"):
            fn(path, PASSPHRASE)


# --------------------------------------------------------------------------- manifests


def _manifest(script: str = "p2wsh") -> dict[str, Any]:
    from custody.bitcoin.script import ScriptType
    from custody.policy.model import make_policy

    st_ = ScriptType(script)
    fs = founders(script_index=1 if st_ is ScriptType.P2SH_P2WSH else 2)
    return make_policy(REGTEST, 2, st_, [(f.name, str(f.account)) for f in fs]).to_manifest()


MANIFESTS = [_manifest(s) for s in ("p2wsh", "p2sh-p2wsh", "p2sh")]


def _check_manifest_doc(doc: Any) -> None:
    ours = documented(policy_from_manifest, doc)
    theirs = documented(verify.parse_manifest, doc)
    if not isinstance(ours, Exception) and not isinstance(theirs, Exception):
        # Where both the generator and the independent verifier accept a manifest, they
        # read the same policy from it.
        assert ours.network.name == theirs.network
        assert ours.threshold == theirs.threshold
        assert ours.script_type.value == theirs.script_type
        assert [f.key.xpub.identity() for f in ours.founders] == [
            (f.key.key, f.key.chain_code) for f in theirs.founders
        ]


@FUZZ
@given(st.sampled_from(MANIFESTS).flatmap(mutated_json))
def test_mutated_manifests(doc: Any) -> None:
    _check_manifest_doc(doc)


def test_mutated_manifest_files(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"

    @FUZZ
    @given(st.sampled_from(MANIFESTS).flatmap(mutated_json).map(_json_bytes).flatmap(lambda b: mutated_bytes([b])))
    def run(data: bytes) -> None:
        path.write_bytes(data)
        documented(verify.load_manifest, path)

    run()


def test_deeply_nested_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("[" * 100_000)
    with pytest.raises(verify.ManifestError):
        verify.load_manifest(path)


def test_deeply_nested_manifest_document() -> None:
    doc: Any = []
    for _ in range(5000):
        doc = [doc]
    with pytest.raises(InputError):
        policy_from_manifest({**MANIFESTS[0], "founders": doc})
    with pytest.raises(verify.ManifestError):
        verify.parse_manifest({**MANIFESTS[0], "founders": doc})


# --------------------------------------------------------------------------- address exports


@pytest.fixture(scope="module")
def export_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Custody, Path, verify.Manifest]:
    """A store with a few issued addresses (no node needed), its export and its manifest."""
    tmp = tmp_path_factory.mktemp("hostile-export")
    c = Custody(tmp / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "acct-1", "--count", "3").exit_code == 0
    export = tmp / "export.jsonl"
    assert c("address", "export", str(export)).exit_code == 0
    return c, export, verify.load_manifest(c.home / "founders-manifest.json")


def _read_whole_export(path: Path, manifest: verify.Manifest) -> None:
    opened = documented(verify.read_export, path)
    if isinstance(opened, Exception):
        return
    header, records = opened
    try:
        documented(verify.check_header, manifest, header)
        documented(lambda: list(records))
    finally:
        records.close()


@st.composite
def mutated_export(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    lines = list(lines)
    op = draw(st.sampled_from(["json", "json", "bytes", "drop", "duplicate", "swap", "blank"]))
    n = draw(st.integers(0, len(lines) - 1))
    if op == "json":
        lines[n] = _json_bytes(draw(mutated_json(json.loads(lines[n])))) + b"\n"
    elif op == "bytes":
        lines[n] = draw(mutated_bytes([lines[n]]))
    elif op == "drop":
        del lines[n]
    elif op == "duplicate":
        lines.insert(n, lines[n])
    elif op == "swap":
        m = draw(st.integers(0, len(lines) - 1))
        lines[n], lines[m] = lines[m], lines[n]
    else:
        lines.insert(n, draw(st.sampled_from([b"\n", b" \n", b"\x00\n", b"\r\n"])))
    return b"".join(lines)


def test_mutated_exports(tmp_path: Path, export_store: tuple[Custody, Path, verify.Manifest]) -> None:
    _, export, manifest = export_store
    lines = export.read_bytes().splitlines(keepends=True)
    target = tmp_path / "mutated.jsonl"

    @FUZZ
    @given(mutated_export(lines))
    def run(data: bytes) -> None:
        target.write_bytes(data)
        _read_whole_export(target, manifest)

    run()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"format": "custody-address-export", "version": 1, "network": []}\n', id="unhashable-network"),
        pytest.param(b"[" * 100_000 + b"\n", id="deep-header"),
    ],
)
def test_export_header_crashes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "export.jsonl"
    path.write_bytes(content)
    with pytest.raises(verify.ExportError):
        verify.read_export(path)


def test_deeply_nested_export_record(tmp_path: Path, export_store: tuple[Custody, Path, verify.Manifest]) -> None:
    _, export, _ = export_store
    first = export.read_bytes().splitlines(keepends=True)[0]
    path = tmp_path / "export.jsonl"
    path.write_bytes(first + b"[" * 100_000 + b"\n")
    header, records = verify.read_export(path)
    with pytest.raises(verify.ExportError):
        list(records)


# --------------------------------------------------------------------------- the world on the node


@dataclass
class World:
    """A funded Shop on the node, with exported withdrawal PSBTs and a founder's opened key."""

    shop: Shop
    single: bytes  # an approved withdrawal's PSBT
    batch: bytes  # a batch of two approved withdrawals
    pending: int  # an approved withdrawal, not signed, not batched
    pending_psbt: Path
    founder: FounderKey
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, regtest_node: NodeInfo, funded_wallet: RpcClient) -> World:
    shop = Shop(tmp_path_factory.mktemp("hostile-world"), regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.3", count=6)
    w1 = shop.approved("0.01")
    shop.approved("0.02")  # the second member of the batch
    single = read_psbt(shop.export(w1))
    batch = shop.ok("withdraw", "batch", *shop.as_("dave"))
    batch_psbt = read_psbt(shop.export(batch["id"]))
    w3 = shop.approved("0.03")
    return World(
        shop,
        single,
        batch_psbt,
        w3,
        shop.export(w3),
        open_founder_key(shop.founder_keys["founder-a"], PASSPHRASE),
        json.loads((shop.c.home / "founders-manifest.json").read_text()),
    )


def test_exported_psbts_sign(world: World) -> None:
    """The starting points are valid: unmutated, both PSBTs sign."""
    for data in (world.single, world.batch):
        result = check_and_sign(psbt_lib.Psbt.parse(data), world.founder, world.manifest)
        assert result.signatures_added >= 1


def _prop_key(subtype: int) -> psbt_lib.ProprietaryKey:
    return psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b"")


@st.composite
def psbt_mutation(draw: st.DrawFn, world: World) -> tuple[psbt_lib.Psbt, bool]:  # noqa: C901 - one branch per kind of hostile edit drawn
    """A parseable PSBT derived from an exported one, and whether the edit changes what the
    employees approved (the transaction, or an amount an input spends)."""
    p = psbt_lib.Psbt.parse(draw(st.sampled_from([world.single, world.batch])))
    approved = _approved_content(p)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(
                ["meta", "approvals", "roster", "prop-bytes", "input", "output-map", "tx-output", "tx-input"]
            )
        )
        if what in ("meta", "approvals", "roster"):
            subtype = {"meta": PROP_META, "approvals": PROP_APPROVALS, "roster": PROP_ROSTER}[what]
            try:
                doc = json.loads(p.proprietary.get(_prop_key(subtype), b"{}"))
            except ValueError:  # garbled by an earlier edit
                continue
            p.proprietary[_prop_key(subtype)] = _json_bytes(draw(mutated_json(doc)))
        elif what == "prop-bytes":
            subtype = draw(st.sampled_from([PROP_META, PROP_APPROVALS, PROP_ROSTER, PROP_SUSPENSIONS]))
            old = p.proprietary.get(_prop_key(subtype), b"{}")
            p.proprietary[_prop_key(subtype)] = draw(st.one_of(mutated_bytes([old]), st.binary(max_size=40)))
        elif what == "input":
            inp = p.inputs[draw(st.integers(0, len(p.inputs) - 1))]
            field = draw(st.sampled_from(["witness_script", "redeem_script", "utxo", "derivation", "sig", "sighash"]))
            if field == "witness_script" and inp.witness_script is not None:
                inp.witness_script = draw(mutated_bytes([inp.witness_script]))
            elif field == "redeem_script":
                inp.redeem_script = draw(st.one_of(st.none(), st.binary(max_size=40)))
            elif field == "utxo" and inp.witness_utxo is not None:
                amount = draw(st.one_of(st.integers(0, MAX_MONEY), st.just(inp.witness_utxo.amount + 1)))
                script = draw(
                    st.one_of(st.just(inp.witness_utxo.script_pubkey), mutated_bytes([inp.witness_utxo.script_pubkey]))
                )
                inp.witness_utxo = psbt_lib.WitnessUtxo(amount, script)
            elif field == "derivation" and inp.bip32_derivations:
                pub = draw(st.sampled_from(sorted(inp.bip32_derivations)))
                origin = inp.bip32_derivations[pub]
                path = list(origin.path)
                if path:  # an earlier edit may have emptied it
                    k = draw(st.integers(0, len(path) - 1))
                    path[k] = draw(st.sampled_from([0, 1, 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, path[k] ^ 1]))
                if draw(st.booleans()):
                    path = path[: draw(st.integers(0, len(path)))]
                inp.bip32_derivations[pub] = psbt_lib.KeyOrigin(origin.fingerprint, tuple(path))
            elif field == "sig" and inp.bip32_derivations:
                pub = draw(st.sampled_from(sorted(inp.bip32_derivations)))
                inp.partial_sigs[pub] = draw(st.binary(min_size=1, max_size=80))
            elif field == "sighash":
                inp.sighash_type = draw(st.sampled_from([0, 1, 2, 3, 0x81, 2**32 - 1]))
        elif what == "output-map":
            out = p.outputs[draw(st.integers(0, len(p.outputs) - 1))]
            if out.bip32_derivations and draw(st.booleans()):
                out.bip32_derivations.clear()
            else:
                source = next((o for o in p.outputs if o.bip32_derivations), None)
                if source is not None:
                    out.bip32_derivations = dict(source.bip32_derivations)
            out.witness_script = draw(st.one_of(st.none(), st.binary(max_size=40)))
        elif what == "tx-output":
            n = draw(st.integers(0, len(p.tx.vout) - 1))
            vout = p.tx.vout[n]
            if draw(st.booleans()):
                vout.nValue = draw(st.integers(0, MAX_MONEY))
            else:
                from bitcoin.core import CScript

                vout.scriptPubKey = CScript(draw(mutated_bytes([bytes(vout.scriptPubKey)])))
        elif what == "tx-input":
            vin = p.tx.vin[draw(st.integers(0, len(p.tx.vin) - 1))]
            from bitcoin.core import COutPoint

            vin.prevout = COutPoint(vin.prevout.hash, draw(st.integers(0, 2**32 - 1)))
    return p, _approved_content(p) != approved


def _approved_content(p: psbt_lib.Psbt) -> tuple[bytes, tuple[int | None, ...]]:
    """What the employees' approvals commit to: the unsigned transaction and the amounts spent."""
    amounts = tuple(i.witness_utxo.amount if i.witness_utxo else None for i in p.inputs)
    return p.unsigned_tx_bytes(), amounts


def test_check_and_sign_mutated_psbts(world: World) -> None:
    @FUZZ
    @given(psbt_mutation(world))
    def run(mutation: tuple[psbt_lib.Psbt, bool]) -> None:
        p, touches_approved = mutation
        data = documented(p.serialize)
        if isinstance(data, Exception):
            return  # not parseable any more: the parser's fuzz covers that
        parsed = psbt_lib.Psbt.parse(data)
        result = documented(check_and_sign, parsed, world.founder, world.manifest)
        if touches_approved:
            # An edited transaction is never signed: the approvals covered another one.
            assert isinstance(result, Exception), "signed a transaction the employees did not approve"

    run()


def test_check_and_sign_mutated_manifests(world: World) -> None:
    @FUZZ_SLOW
    @given(mutated_json(world.manifest))
    def run(manifest: Any) -> None:
        documented(check_and_sign, psbt_lib.Psbt.parse(world.single), world.founder, manifest)

    run()


# --------------------------------------------------------------------------- the CLI


def _db(c: Custody) -> Path:
    return Path(c.env["CUSTODY_DB_URL"].removeprefix("sqlite:///"))


def _json_error_code(line: str) -> object:
    """The code of an error line under --json (``{"error": ..., "code": N}``), else None."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc.get("code") if isinstance(doc, dict) and set(doc) == {"error", "code"} else None


def assert_refused(
    result: Any, codes: set[int], c: Custody | None = None, before: Any = None, events: frozenset[str] = frozenset()
) -> None:
    """A documented refusal: its exit code, one error line, no traceback; the store as it was.

    The error line is ours (``error: ...``, or under --json ``{"error": ..., "code": N}`` with N
    the exit code) or, for a value click itself refuses (a
    directory given as a file), click's usage error (exit 2, ``Error: ...``). ``events``
    are audit-log events the refusal may append (a verification run is recorded even when
    it fails); nothing else in the store may change.
    """
    output = result.output
    assert result.exit_code in codes, f"exit {result.exit_code}, expected one of {sorted(codes)}:\n{output}"
    assert result.exit_code in DOCUMENTED_EXITS
    assert "Traceback" not in output and "internal error" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ours = len(lines) == 1 and (lines[0].startswith("error: ") or _json_error_code(lines[0]) == result.exit_code)
    clicks = (
        result.exit_code == 2 and lines[:1] != [] and lines[0].startswith("Usage: ") and lines[-1].startswith("Error: ")
    )
    assert ours or clicks, f"not one error line: {result.stderr!r}"
    if c is not None:
        after = dump_store(_db(c))
        audit = {"audit_log", "audit_head"}
        assert {k: v for k, v in after.items() if k not in audit} == {
            k: v for k, v in before.items() if k not in audit
        }, "the store changed on a refused command"
        added = [row for row in after["audit_log"] if row not in before["audit_log"]]
        assert {row[2] for row in added} <= events, f"a refused command logged {[row[2] for row in added]}"
        if not added:
            assert after == before
        assert audit_problems(_db(c)) == []


VERIFICATION_RUN = frozenset({"verification.run"})
HOSTILE_STRINGS = [
    "",
    " ",
    "\n",
    "\t",
    "\x00",
    "\x1b[31mred",
    "\u202eevil",
    "\ufeff",
    "\u0661\u0662",
    "\U0001f4a5",
    "a" * 10_000,
    "-1",
    "0",
    "1e400",
    "NaN",
    "Infinity",
    "0x10",
    "../../etc/passwd",
    "'; DROP TABLE address; --",
    "[red]markup[/red]",
    "%s%n",
    "{0}",
]
HOSTILE_TEXT = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=60))


@pytest.fixture(scope="module")
def store(export_store: tuple[Custody, Path, verify.Manifest]) -> Custody:
    return export_store[0]


def test_init_hostile_founders(tmp_path: Path, store: Custody) -> None:
    valid = founders()
    specs = [f.spec for f in valid]
    other_net = founders("mainnet")[0]

    @FUZZ_CLI
    @given(
        st.one_of(
            st.sampled_from(HOSTILE_STRINGS),
            mutated_text(specs),
            st.just(f"founder-a={other_net.account}"),
            st.just(f"founder-a={valid[0].master.serialize()}"),  # a private key given
            st.just(specs[0]),  # the same key twice
        )
    )
    def run(spec: str) -> None:
        fresh = Custody(tmp_path / "fresh")
        draft = tmp_path / "fresh-draft.json"
        draft.unlink(missing_ok=True)
        args = [
            "manifest",
            "draft",
            "--network",
            "regtest",
            "--founder",
            spec,
            "--founder",
            specs[0],
            "--founder",
            specs[1],
            "--out",
            str(draft),
        ]
        result = fresh(*args)
        if result.exit_code == 0:  # a mutation that is still valid (whitespace, a name): fine, start over
            shutil.rmtree(fresh.home, ignore_errors=True)
            return
        assert_refused(result, {2})
        assert not draft.exists(), "a refused draft left a manifest behind"
        assert not _db(fresh).exists() or dump_store(_db(fresh)) == {}, "a refused draft left a store behind"
        # And on the existing store: refused, nothing changed.
        before = dump_store(_db(store))
        assert_refused(store(*args), {2, 6}, store, before)

    run()


def test_address_new_hostile_accounts(store: Custody) -> None:
    @FUZZ_CLI
    @given(HOSTILE_TEXT)
    def run(account: str) -> None:
        before = dump_store(_db(store))
        result = store("address", "new", "--account", account, "--json")
        if result.exit_code == 0:
            # Accepted: stored and shown verbatim (no markup, no escapes interpreted).
            issued = json.loads(result.stdout)
            assert [a["account"] for a in issued] == [account]
            assert account.isprintable() and account == account.strip() and 0 < len(account) <= 128
            assert audit_problems(_db(store)) == []
            return
        assert_refused(result, {2}, store, before)

    run()


def test_address_show_hostile(store: Custody) -> None:
    @FUZZ_CLI
    @given(st.one_of(HOSTILE_TEXT, mutated_text(VALID_ADDRESSES)))
    def run(address: str) -> None:
        before = dump_store(_db(store))
        assert_refused(store("address", "show", "--", address), {2, 5}, store, before)

    run()


def test_employee_add_hostile_pubkeys(store: Custody) -> None:
    pub = founders()[0].account.xpub.public_key.hex()

    @FUZZ_CLI
    @given(st.one_of(HOSTILE_TEXT, mutated_text([pub, "02" + "00" * 32, "04" + "11" * 64])))
    def run(pubkey: str) -> None:
        before = dump_store(_db(store))
        result = store("employee", "add", "mallory", "--pubkey", pubkey)
        if result.exit_code == 0:
            # A mutation that is still a valid compressed key: proposed (never enrolled) exactly
            # as given, up to case and surrounding spaces.
            coincurve.PublicKey(bytes.fromhex(pubkey.strip()))
            proposal = store.json("roster", "show")["proposal"]["roster"]
            keys = [e["keys"] for e in proposal["employees"] if e["name"] == "mallory"]
            assert keys == [[pubkey.strip().lower()]], f"proposed a mutated key {pubkey!r} as {keys}"
            assert "mallory" not in [e["name"] for e in store.json("employee", "list")], "enrolled without founders"
            return
        assert_refused(result, {2, 6}, store, before)

    run()


def test_employee_add_hostile_names(store: Custody) -> None:
    @FUZZ_CLI
    @given(HOSTILE_TEXT)
    def run(name: str) -> None:
        before = dump_store(_db(store))
        result = store("employee", "add", "--pubkey", "02" + "00" * 32, "--", name)  # not on the curve: refused
        assert_refused(result, {2}, store, before)

    run()


def test_verify_hostile_manifests(tmp_path: Path, store: Custody) -> None:
    manifest = json.loads((store.home / "founders-manifest.json").read_text())
    path = tmp_path / "manifest.json"

    @FUZZ_CLI
    @given(
        st.one_of(
            mutated_json(manifest).map(_json_bytes),
            mutated_bytes([_json_bytes(manifest)]),
            st.sampled_from([b"", b"\xff\xfe", b"null", b"[]", b"{}", b'"x"', b"1e999"]),
        )
    )
    def run(data: bytes) -> None:
        path.write_bytes(data)
        before = dump_store(_db(store))
        result = store("verify", "addresses", "--manifest", str(path), "--no-halt", "--workers", "1")
        if result.exit_code == 0:
            return  # still the same manifest (a key reordered, whitespace)
        assert_refused(result, {2, 3}, store, before, VERIFICATION_RUN)

    run()


def test_verify_hostile_exports(tmp_path: Path, export_store: tuple[Custody, Path, verify.Manifest]) -> None:
    c, export, _ = export_store
    lines = export.read_bytes().splitlines(keepends=True)
    path = tmp_path / "export.jsonl"

    @FUZZ_CLI
    @given(mutated_export(lines))
    def run(data: bytes) -> None:
        path.write_bytes(data)
        before = dump_store(_db(c))
        result = c(
            "verify", "addresses", "--manifest", str(c.home / "founders-manifest.json"), "--export", str(path),
            "--no-halt", "--workers", "1",
        )  # fmt: skip
        if result.exit_code == 0:
            return
        assert_refused(result, {2, 3}, c, before, VERIFICATION_RUN)

    run()


def test_verify_export_mismatch_halts_and_keeps_the_log(tmp_path: Path) -> None:
    """Without --no-halt, a hostile export raises the halt: exit 3, the audit chain intact."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "acct", "--count", "2").exit_code == 0
    export = tmp_path / "export.jsonl"
    assert c("address", "export", str(export)).exit_code == 0
    lines = export.read_bytes().splitlines(keepends=True)
    export.write_bytes(lines[0] + lines[1] + lines[-1])  # an address line missing: the count disagrees
    result = c("verify", "addresses", "--manifest", str(c.home / "founders-manifest.json"), "--export", str(export))
    assert_refused(result, {3})
    assert audit_problems(_db(c)) == []
    assert c("halt", "status").exit_code == 3


def test_keygen_hostile_passphrase_files(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    cases: dict[str, bytes | None] = {
        "empty": b"",
        "newline only": b"\n",
        "short": b"short\n",
        "not utf-8": b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7",  # found: UnicodeDecodeError was an internal error
        "nul": b"\x00" * 3,
        "missing": None,
    }
    for name, content in cases.items():
        pass_file = tmp_path / f"pass-{len(name)}-{abs(hash(name))}"
        if content is not None:
            pass_file.write_bytes(content)
        out = tmp_path / f"{abs(hash(name))}.key"
        result = c("keygen", "founder-a", "--out", str(out), "--passphrase-file", str(pass_file))
        assert_refused(result, {2})
        assert not out.exists(), name
    result = c("keygen", "founder-a", "--out", str(tmp_path / "d.key"), "--passphrase-file", str(tmp_path))
    assert_refused(result, {2})


# ----------------------------------------------------------- the CLI on the node: request, import, sign


def test_withdraw_request_hostile_values(world: World) -> None:
    shop = world.shop
    to, _ = shop.destination()
    mainnet_to = encode_segwit("bc", 0, bytes(20))
    base = {"to": to, "amount": "0.001", "fee-rate": "2"}
    hostile = {
        "to": [
            *HOSTILE_STRINGS,
            mainnet_to,
            to.upper()[:-1] + "Q",
            to[:-1],
            to + "q",
            encode_segwit("bcrt", 2, bytes(16)),
        ],
        "amount": [*HOSTILE_STRINGS, "0.000000001", "21000001", "1" * 5000, "0.00000001", "+1", "1,5", "0"],
        # An empty --fee-rate is refused too (an unset variable must not mean "the default").
        "fee-rate": [*HOSTILE_STRINGS, "", "0", "0.0001", "100001", "1" * 5000, "-2", "1e3"],
    }

    @FUZZ_CLI
    @given(st.sampled_from(sorted(hostile)).flatmap(lambda opt: st.tuples(st.just(opt), st.sampled_from(hostile[opt]))))
    def run(case: tuple[str, str]) -> None:
        option, value = case
        values = dict(base, **{option: value})
        before = dump_store(_db(shop.c))
        result = shop.c(
            "withdraw", "request", "--account", "acct-1", "--to", values["to"], "--amount", values["amount"],
            "--fee-rate", values["fee-rate"], *shop.as_("carol"),
        )  # fmt: skip
        assert_refused(result, {2}, shop.c, before)

    run()


def test_withdraw_import_hostile_files(world: World) -> None:
    shop = world.shop
    good = read_psbt(world.pending_psbt)
    path = shop.tmp / "hostile-import.psbt"

    @FUZZ_CLI
    @given(
        st.one_of(
            mutated_bytes([good]),
            mutated_bytes([good]).map(lambda b: base64.b64encode(b) + b"\n"),
            mutated_bytes([base64.b64encode(good)]),
            st.sampled_from([b"", b"\n", b"psbt\xff", b"\xff" * 100, b"[" * 10_000, good[: len(good) // 2]]),
        )
    )
    def run(data: bytes) -> None:
        path.write_bytes(data)
        before = dump_store(_db(shop.c))
        result = shop.c("withdraw", "import", str(world.pending), str(path))
        if result.exit_code == 0:
            # Unsigned and still the same transaction (e.g. an unknown record added): nothing
            # was signed, so nothing may count as signed.
            assert shop.ok("withdraw", "show", str(world.pending))["status"] == "approved"
            return
        assert_refused(result, {2, 4, 6}, shop.c, before)

    run()
    for missing in (shop.tmp / "does-not-exist.psbt", shop.tmp):
        before = dump_store(_db(shop.c))
        assert_refused(shop.c("withdraw", "import", str(world.pending), str(missing)), {2}, shop.c, before)


def test_sign_hostile_files(world: World) -> None:
    shop = world.shop
    good = read_psbt(world.pending_psbt)
    path = shop.tmp / "hostile-sign.psbt"
    out = shop.tmp / "hostile-signed.psbt"

    @FUZZ_CLI
    @given(st.one_of(mutated_bytes([good]), st.sampled_from([b"", b"psbt\xff\x00", b"\x00" * 1000])))
    def run(data: bytes) -> None:
        path.write_bytes(data)
        out.unlink(missing_ok=True)
        before = dump_store(_db(shop.c))
        result = shop.sign(path, "founder-a", out)
        if result.exit_code == 0:
            assert out.exists()
            return
        assert_refused(result, {2, 4, 6}, shop.c, before)
        assert not out.exists(), "a refused signing wrote a file"

    run()


def test_store_dump_sees_every_table(world: World) -> None:
    """The comparison above is only as good as the dump: it holds every table, rows included."""
    dump = dump_store(_db(world.shop.c))
    assert {"policy", "founder", "address", "roster", "audit_log", "audit_head", "withdrawal", "approval"} <= set(dump)
    assert dump["address"] and dump["roster"] and dump["audit_log"] and dump["withdrawal"]


def _with_prop(
    data: bytes, subtype: int, edit: Callable[[Any], Any] | None = None, raw: bytes | None = None
) -> psbt_lib.Psbt:
    p = psbt_lib.Psbt.parse(data)
    if raw is None:
        assert edit is not None
        raw = _json_bytes(edit(json.loads(p.proprietary[_prop_key(subtype)])))
    p.proprietary[_prop_key(subtype)] = raw
    return p


def _member_edit(field: str, value: Any) -> Callable[[Any], Any]:
    def edit(meta: Any) -> Any:
        meta["members"][0][field] = value
        return meta

    return edit


def _probe_cases(world: World) -> dict[str, psbt_lib.Psbt]:
    return {
        "deep meta": _with_prop(world.single, PROP_META, raw=b"[" * 100_000),
        "deep approvals": _with_prop(world.single, PROP_APPROVALS, raw=b"[" * 100_000),
        "meta not utf-8": _with_prop(world.single, PROP_META, raw=b"\xff\xfe"),
        "member id Infinity": _with_prop(world.batch, PROP_META, _member_edit("withdrawal_id", float("inf"))),
        "member amount NaN": _with_prop(world.batch, PROP_META, _member_edit("amounts", [float("nan")])),
        "member tx garbage": _with_prop(world.batch, PROP_META, _member_edit("unsigned_tx", "00")),
        "member tx truncated": _with_prop(
            world.batch,
            PROP_META,
            lambda meta: _member_edit("unsigned_tx", meta["members"][0]["unsigned_tx"][:-8])(meta),
        ),
        "member tx not hex": _with_prop(world.batch, PROP_META, _member_edit("unsigned_tx", "zz")),
        "members not a list": _with_prop(world.batch, PROP_META, lambda m: {**m, "members": 5}),
        "members empty": _with_prop(world.batch, PROP_META, lambda m: {**m, "members": []}),
        "withdrawal id huge": _with_prop(world.single, PROP_META, lambda m: {**m, "withdrawal_id": 10**400}),
        "withdrawal id bool": _with_prop(world.single, PROP_META, lambda m: {**m, "withdrawal_id": True}),
        "approvals dicts": _with_prop(world.single, PROP_APPROVALS, lambda a: {"employee": "alice"}),
        "roster enabled str": _with_prop(
            world.single,
            PROP_ROSTER,
            lambda r: {
                **r,
                "roster": {**r["roster"], "employees": [{**e, "enabled": "false"} for e in r["roster"]["employees"]]},
            },
        ),
        "roster deep": _with_prop(world.single, PROP_ROSTER, raw=b"[" * 100_000),
        "suspensions deep": _with_prop(world.single, PROP_SUSPENSIONS, raw=b"[" * 100_000),
        "suspensions not a list": _with_prop(world.single, PROP_SUSPENSIONS, lambda s: {"x": 1}),
        "suspension garbage": _with_prop(world.single, PROP_SUSPENSIONS, lambda s: [{"employee": 5}]),
    }


def test_check_and_sign_hostile_metadata(world: World) -> None:
    """Hand-made hostile records that random edits rarely reach: all refused, none crash."""
    problems = {}
    for name, p in _probe_cases(world).items():
        try:
            check_and_sign(p, world.founder, world.manifest)
        except CustodyError:
            continue
        except Exception as exc:  # collected, to report every one at once
            problems[name] = f"{type(exc).__name__}: {exc}"[:200]
        else:
            problems[name] = "signed"
    assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_error_lines_neutralize_control_characters(store: Custody) -> None:
    """Found by this suite: an address with a newline or \\x1e gave a two-line error, and an
    escape sequence reached the terminal raw. Control characters are shown escaped now."""
    for hostile in ("a\nerror: forged second line", "\x1b[2J\x1b[31mred", "x\ry", "\x1e", "\u202egnp.exe"):
        before = dump_store(_db(store))
        result = store("address", "show", "--", hostile)
        assert_refused(result, {2, 5}, store, before)
        assert "\x1b" not in result.stderr and "\r" not in result.stderr and "\u202e" not in result.stderr


def test_sign_with_a_hostile_pinned_manifest(tmp_path: Path, store: Custody) -> None:
    """Found by this suite: a deeply nested pinned manifest made `custody sign` an internal error."""
    manifest = tmp_path / "manifest.json"
    psbt = tmp_path / "w.psbt"
    psbt.write_bytes(PSBT_FIXTURES[0])
    for content in (b"[" * 100_000, b"\xff\xfe", b"", b"[]", b'{"format": "custody-founders-manifest"}'):
        manifest.write_bytes(content)
        before = dump_store(_db(store))
        result = store("--manifest", str(manifest), "sign", str(psbt), "--key", str(tmp_path / "none.key"))
        assert_refused(result, {2, 7}, store, before)
