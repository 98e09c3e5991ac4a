"""Secrets stay secret: after a full flow on the real node, no private key or passphrase is anywhere.

The flow (reusing tests/withdraw_support.Shop): founders' and employees' keygen, init,
deposit addresses, a withdrawal requested, approved twice, exported, signed offline by two
founders, imported, finalized, broadcast and synced; a halt raised and lifted; error paths
(wrong passphrase, wrong key file). Then every secret, in every form it could leak in, is
searched for in: the SQLite file (and its -wal and -shm files), every CLI command's stdout
and stderr (``--json`` outputs included), the audit-log rows, error messages, ``repr()``
and ``str()`` of the key objects, the halt file, the exported and signed PSBT files, and
the log records emitted during the flow.

Secrets: founders' seeds; their master and account extended private keys (tprv) and
secret exponents; the child secret of every address issued (hex, WIF compressed and
uncompressed); employees' secrets; the passphrase. Each in raw bytes, hex (both cases),
base58/WIF, base64 where it applies.

Also: broken key files are clear errors with exit 7 through the CLI.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from custody.bitcoin.keys import ExtendedPrivateKey, b58check_encode
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.errors import KeyFileError
from custody.identity import keyfile
from custody.identity.keyfile import open_employee_key, open_founder_key
from custody_cli.main import cli
from tests import withdraw_support
from tests.store_support import audit_problems, dump_store
from tests.support import PASSPHRASE, Custody, read_psbt
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest


class RecordingCustody(Custody):
    """The in-process CLI runner, keeping every command's arguments and output."""

    runs: list[tuple[tuple[str, ...], Result]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs = []

    def __call__(self, *args: str, input: str | None = None) -> Result:
        result = super().__call__(*args, input=input)
        self.runs.append((args, result))
        return result


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()} {record.args!r}")
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@dataclass
class Flow:
    shop: Shop
    c: RecordingCustody
    psbts: list[Path]
    errors: list[str] = field(default_factory=list)  # str() and repr() of exceptions of error paths
    logs: list[str] = field(default_factory=list)


def _ok(c: Custody, *args: str) -> Any:
    result = c(*args, "--json")
    assert result.exit_code == 0, (args, result.output)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, regtest_node: NodeInfo, funded_wallet: RpcClient) -> Iterator[Flow]:
    collect = _Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(withdraw_support, "Custody", RecordingCustody)
            shop = Shop(tmp_path_factory.mktemp("secrets"), regtest_node, funded_wallet)
        c = shop.c
        assert isinstance(c, RecordingCustody)
        tmp = shop.tmp
        shop.deposit("acct-1", "0.5", count=2)
        _ok(c, "address", "new", "--account", "acct-2", "--count", "3")
        to, _ = shop.destination()
        requested = shop.request(to, "0.015")
        assert requested.exit_code == 0, requested.output
        wid = json.loads(requested.stdout)["id"]
        assert shop.approve(wid, "alice").exit_code == 0
        assert shop.approve(wid, "bob").exit_code == 0
        exported = tmp / "w.psbt"
        assert c("withdraw", "export", str(wid), str(exported)).exit_code == 0
        signed = []
        for founder in ("founder-a", "founder-b"):
            out = tmp / f"w-{founder}.psbt"
            result = shop.sign(exported, founder, out)
            assert result.exit_code == 0, result.output
            signed.append(out)
            assert c("withdraw", "import", str(wid), str(out), "--json").exit_code == 0
        _ok(c, "withdraw", "finalize", str(wid))
        _ok(c, "withdraw", "broadcast", str(wid))
        shop.mine(1)
        _ok(c, "sync")
        for args in (
            ("withdraw", "show", str(wid)),
            ("withdraw", "list"),
            ("policy", "show"),
            ("policy", "descriptors"),
            ("address", "list"),
            ("employee", "list"),
        ):
            _ok(c, *args)
            assert c(*args).exit_code == 0  # the human-readable form too
        assert c("address", "list", "--csv").exit_code == 0
        assert c("address", "export", str(tmp / "export.jsonl")).exit_code == 0
        assert c("policy", "manifest", "--out", str(tmp / "manifest.json")).exit_code == 0
        assert c("verify", "addresses", "--manifest", str(tmp / "manifest.json"), "--workers", "1").exit_code == 0

        raised = c("halt", "raise", "--reason", "drill", *shop.as_("alice"), "--json")
        assert raised.exit_code == 0, raised.output
        halt_id = json.loads(raised.stdout)["halt_id"]
        assert c("halt", "status").exit_code == 3
        assert c("halt", "status", "--json").exit_code == 3
        assert c("status").exit_code == 3
        assert c("halt", "lift", str(halt_id), *shop.as_("alice"), "--json").exit_code == 0
        assert c("halt", "lift", str(halt_id), *shop.as_("bob"), "--json").exit_code == 0
        assert c("halt", "status").exit_code == 0

        f = Flow(shop, c, [exported, *signed])
        # Error paths, through the CLI (recorded) and the library (messages kept).
        wrong = dict(c.env, CUSTODY_PASSPHRASE="not the passphrase at all")
        for args in (
            ("sign", str(exported), "--key", str(shop.founder_keys["founder-c"]), "--yes"),
            ("halt", "raise", "--reason", "x", *shop.as_("carol")),
            ("withdraw", "approve", str(wid), *shop.as_("carol"), "--yes"),
        ):
            result = c.runner.invoke(cli, list(args), env=wrong)
            c.runs.append((args, result))
            assert result.exit_code == 7, result.output
        assert c("sign", str(exported), "--key", str(shop.employees["alice"])).exit_code == 7
        assert (
            c("halt", "raise", "--reason", "x", "--as", "alice", "--key", str(shop.founder_keys["founder-a"])).exit_code
            == 7
        )
        assert (
            c("withdraw", "approve", str(wid), "--as", "bob", "--key", str(shop.employees["alice"]), "--yes").exit_code
            != 0
        )
        for opener, path in (
            (open_founder_key, shop.founder_keys["founder-a"]),
            (open_employee_key, shop.employees["alice"]),
        ):
            for passphrase in ("wrong passphrase!", PASSPHRASE[:-1], ""):
                with pytest.raises(KeyFileError) as caught:
                    opener(path, passphrase)
                f.errors += [str(caught.value), repr(caught.value)]
        f.logs = collect.lines
        yield f
    finally:
        root.removeHandler(collect)
        root.setLevel(old_level)


# --------------------------------------------------------------------------- the secrets


@dataclass(frozen=True)
class Secret:
    label: str
    forms: tuple[bytes, ...]  # every encoding it could leak in, as bytes


def _forms(raw: bytes) -> tuple[bytes, ...]:
    hex_ = raw.hex()
    return (raw, hex_.encode(), hex_.upper().encode(), base64.b64encode(raw))


def _wifs(secret: bytes) -> tuple[bytes, ...]:
    # Testnet/regtest WIF prefix 0xef; compressed (…01) and uncompressed.
    return (b58check_encode(b"\xef" + secret + b"\x01").encode(), b58check_encode(b"\xef" + secret).encode())


def _xprv_forms(key: ExtendedPrivateKey, label: str) -> list[Secret]:
    return [
        Secret(f"{label} secret", _forms(key.secret) + _wifs(key.secret)),
        Secret(f"{label} xprv", (key.serialize().encode(),)),
        Secret(f"{label} chain code + secret", _forms(key.chain_code + b"\x00" + key.secret)),
    ]


def _issued(flow: Flow) -> list[tuple[int, int]]:
    """(chain, index) of every address the store issued."""
    conn = sqlite3.connect(f"file:{_db(flow.c)}?mode=ro", uri=True)
    try:
        return [(int(chain), int(index)) for chain, index in conn.execute("SELECT chain, idx FROM address")]
    finally:
        conn.close()


def _db(c: Custody) -> Path:
    return Path(c.env["CUSTODY_DB_URL"].removeprefix("sqlite:///"))


@pytest.fixture(scope="module")
def secrets(flow: Flow) -> list[Secret]:
    out = [Secret("passphrase", (PASSPHRASE.encode(), PASSPHRASE.encode("utf-16-le")))]
    issued = _issued(flow)
    assert len(issued) >= 6
    for name, path in flow.shop.founder_keys.items():
        _, secret = keyfile._open(path, PASSPHRASE, keyfile.FOUNDER)
        out.append(Secret(f"{name} seed", _forms(bytes.fromhex(secret["seed"]))))
        founder = open_founder_key(path, PASSPHRASE)
        out += _xprv_forms(founder.master, f"{name} master")
        account = founder.master.derive(founder.account_path)
        out += _xprv_forms(account, f"{name} account")
        for chain in (0, 1):
            out += _xprv_forms(account.derive((chain,)), f"{name} chain {chain}")
        for chain, index in issued:
            child = account.derive((chain, index)).secret
            out.append(Secret(f"{name} child {chain}/{index}", _forms(child) + _wifs(child)))
    for name, path in flow.shop.employees.items():
        _, secret = keyfile._open(path, PASSPHRASE, keyfile.EMPLOYEE)
        out.append(Secret(f"employee {name} secret", _forms(bytes.fromhex(secret["secret"]))))
    return out


def _leaks(haystack: bytes, secrets: list[Secret]) -> list[str]:
    return [s.label for s in secrets for form in s.forms if form and form in haystack]


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- where to look


def test_the_secrets_are_real(flow: Flow, secrets: list[Secret]) -> None:
    """The search is only as good as its needles: they are many, and they do find themselves."""
    assert len(secrets) > 50
    seed = next(s for s in secrets if s.label == "founder-a seed")
    assert _leaks(b"xx" + seed.forms[1] + b"yy", secrets) == ["founder-a seed"]
    # The signatures in the signed PSBTs were made by the child keys searched for.
    signed = read_psbt(flow.psbts[1])
    assert b"\x02" in signed and len(flow.psbts) == 3


def test_store_files(flow: Flow, secrets: list[Secret]) -> None:
    db = _db(flow.c)
    files = [p for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if p.exists()]
    assert db in files
    for path in files:
        assert _leaks(path.read_bytes(), secrets) == [], path.name


def test_every_table_row(flow: Flow, secrets: list[Secret]) -> None:
    dump = dump_store(_db(flow.c))
    assert dump["audit_log"], "the flow left an audit log"
    for table, rows in dump.items():
        assert _leaks(_text(repr(rows)), secrets) == [], table
    assert audit_problems(_db(flow.c)) == []


def test_every_cli_output(flow: Flow, secrets: list[Secret]) -> None:
    assert len(flow.c.runs) > 40
    assert any("--json" in args for args, _ in flow.c.runs)
    for args, result in flow.c.runs:
        output = result.stdout + result.stderr
        assert _leaks(_text(output), secrets) == [], args
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            assert _leaks(_text(repr(result.exception)), secrets) == [], args


def test_error_messages(flow: Flow, secrets: list[Secret]) -> None:
    assert flow.errors and all("wrong passphrase" in e for e in flow.errors[::2])
    for message in flow.errors:
        assert _leaks(_text(message), secrets) == [], message


def test_key_object_reprs(flow: Flow, secrets: list[Secret]) -> None:
    founder = open_founder_key(flow.shop.founder_keys["founder-a"], PASSPHRASE)
    employee = open_employee_key(flow.shop.employees["alice"], PASSPHRASE)
    account = founder.master.derive(founder.account_path)
    child = account.derive((0, 0))
    for obj in (founder, employee, founder.master, account, child):
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            assert _leaks(_text(text), secrets) == [], type(obj).__name__
    # Inside containers and exceptions, too (they use repr).
    assert _leaks(_text(repr([founder, {"k": employee}, (child,)])), secrets) == []
    assert _leaks(_text(repr(ValueError(founder, employee))), secrets) == []


def test_halt_file(flow: Flow, secrets: list[Secret]) -> None:
    halt_file = flow.c.home / "halt.json"
    assert halt_file.exists()
    assert _leaks(halt_file.read_bytes(), secrets) == []


def test_psbt_files(flow: Flow, secrets: list[Secret]) -> None:
    """The exported PSBT and the signed ones carry signatures and public keys, never a secret."""
    for path in flow.psbts:
        text = path.read_bytes()
        assert _leaks(text, secrets) == [], path.name
        assert _leaks(read_psbt(path), secrets) == [], path.name  # binary or base64, decoded


def test_other_files_written(flow: Flow, secrets: list[Secret]) -> None:
    """Every other file the flow wrote (export, manifests); key files hold secrets only encrypted."""
    for path in sorted(flow.shop.tmp.rglob("*")):
        if path.is_file() and path.suffix != ".psbt" and not path.name.startswith("custody.db"):
            assert _leaks(path.read_bytes(), secrets) == [], path


def test_log_records(flow: Flow, secrets: list[Secret]) -> None:
    for line in flow.logs:
        assert _leaks(_text(line), secrets) == [], line


def test_error_paths_captured_by_caplog(
    flow: Flow, secrets: list[Secret], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The error paths again, under pytest's own log capture at DEBUG."""
    caplog.set_level(logging.DEBUG)
    c = flow.c
    bad = dict(c.env, CUSTODY_PASSPHRASE="nope nope nope")
    results = [
        c.runner.invoke(cli, ["sign", str(flow.psbts[0]), "--key", str(flow.shop.founder_keys["founder-c"])], env=bad),
        c.runner.invoke(cli, ["halt", "raise", "--reason", "r", *flow.shop.as_("dave")], env=bad),
        c("sign", str(flow.psbts[0]), "--key", str(flow.shop.founder_keys["founder-c"]), "--out", str(tmp_path / "o")),
    ]
    assert [r.exit_code for r in results][:2] == [7, 7]
    for r in results:
        assert _leaks(_text(r.output), secrets) == []
    assert _leaks(_text(caplog.text), secrets) == []
    assert _leaks(_text(repr(caplog.records)), secrets) == []


# --------------------------------------------------------------------------- broken key files: exit 7


def _broken(tmp: Path, source: Path, kind: str) -> Path:
    raw = source.read_bytes()
    path = tmp / f"{source.stem}-{kind}.key"
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "newer":
        doc = json.loads(raw)
        doc["version"] = keyfile.VERSION + 1
        path.write_text(json.dumps(doc))
    elif kind == "not-a-key":
        path.write_bytes(b"psbt\xff\x01\x00")
    elif kind == "other-json":
        path.write_text(json.dumps({"format": "custody-founders-manifest", "version": 1}))
    elif kind == "edited":
        doc = json.loads(raw)
        doc["name"] = doc["name"] + "x"  # the clear part is bound to the ciphertext
        path.write_text(json.dumps(doc))
    else:
        raise AssertionError(kind)
    return path


KEY_FILE_CASES = {
    "truncated": "not a custody key file",
    "empty": "not a custody key file",
    "newer": "upgrade custody",
    "not-a-key": "not a custody key file",
    "other-json": "not a custody key file",
    "edited": "wrong passphrase for .*, or the file was altered",
}


def _assert_exit_7(result: Result, message: str, c: Custody, before: Any) -> None:
    assert result.exit_code == 7, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.output and PASSPHRASE not in result.output
    assert dump_store(_db(c)) == before


@pytest.mark.parametrize("kind", sorted(KEY_FILE_CASES))
def test_broken_employee_key_file_halt_raise(flow: Flow, tmp_path: Path, kind: str) -> None:
    c = flow.c
    path = _broken(tmp_path, flow.shop.employees["alice"], kind)
    before = dump_store(_db(c))
    result = c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(path))
    _assert_exit_7(result, KEY_FILE_CASES[kind], c, before)
    assert c("halt", "status").exit_code == 0, "a broken key file raised a halt"


@pytest.mark.parametrize("kind", sorted(KEY_FILE_CASES))
def test_broken_founder_key_file_sign(flow: Flow, tmp_path: Path, kind: str) -> None:
    c = flow.c
    path = _broken(tmp_path, flow.shop.founder_keys["founder-c"], kind)
    out = tmp_path / "signed.psbt"
    before = dump_store(_db(c))
    result = c("sign", str(flow.psbts[0]), "--key", str(path), "--out", str(out))
    _assert_exit_7(result, KEY_FILE_CASES[kind], c, before)
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(lambda f, bad: ("halt", "raise", "--reason", "x", "--as", "alice", "--key", str(bad)), id="halt"),
        pytest.param(lambda f, bad: ("sign", str(f.psbts[0]), "--key", str(bad)), id="sign"),
    ],
)
def test_wrong_passphrase_and_wrong_kind(flow: Flow, tmp_path: Path, command: Any) -> None:
    c = flow.c
    before = dump_store(_db(c))
    is_sign = command(flow, Path("x"))[0] == "sign"
    right = flow.shop.founder_keys["founder-c"] if is_sign else flow.shop.employees["alice"]
    wrong_kind = flow.shop.employees["alice"] if is_sign else flow.shop.founder_keys["founder-a"]
    pass_file = tmp_path / "pass"
    pass_file.write_text("a wrong passphrase\n")
    result = c(*command(flow, right), "--passphrase-file", str(pass_file))
    _assert_exit_7(result, "wrong passphrase", c, before)
    result = c(*command(flow, wrong_kind))
    _assert_exit_7(result, "holds an? (employee|founder) key, not an? (founder|employee) key", c, before)
    result = c(*command(flow, tmp_path / "missing.key"))
    _assert_exit_7(result, "does not exist", c, before)


# --------------------------------------------------------------------------- BIP-39 words


def test_words_seed_and_keys_of_a_mnemonic_key_appear_nowhere_but_the_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """keygen --mnemonic on a real pseudo-terminal, then --restore in process under DEBUG log
    capture (plain and --json, and a refused restore): the words, their entropy, the BIP-39
    seed and the master and account keys are in none of the outputs, key files or log records;
    only the terminal showed the words."""
    from mnemonic import Mnemonic

    from tests.test_words import run_on_terminal, shown_words

    caplog.set_level(logging.DEBUG)
    c = Custody(tmp_path / "home")
    made = tmp_path / "made.key"
    run = run_on_terminal(["keygen", "a", "--out", str(made), "--mnemonic"], dict(c.env), b"y\n")
    assert run.code == 0, run.screen
    phrase = shown_words(run.screen)
    words = tmp_path / "words.txt"
    words.write_text(phrase)
    restored = [tmp_path / "r1.key", tmp_path / "r2.key"]
    results = [
        c("keygen", "b", "--out", str(restored[0]), "--restore", "--words-file", str(words)),
        c("keygen", "b", "--out", str(restored[1]), "--restore", "--json", input=phrase + "\n"),
    ]
    swapped = " ".join([phrase.split()[1], phrase.split()[0], *phrase.split()[2:]])
    words.write_text(swapped)
    results.append(c("keygen", "c", "--out", str(tmp_path / "c.key"), "--restore", "--words-file", str(words)))
    words.unlink()
    assert [r.exit_code for r in results] == [0, 0, 2]

    entropy = bytes(Mnemonic("english").to_entropy(phrase))
    founder = open_founder_key(made, PASSPHRASE)
    secrets = [
        Secret("words", tuple(_text(p) for p in (phrase, swapped, phrase.replace(" ", "\n")))),
        Secret("word pairs", tuple(_text(" ".join(phrase.split()[i : i + 2])) for i in range(0, 24, 2))),
        Secret("numbered words", tuple(_text(f"{i + 1:2d}. {w} ") for i, w in enumerate(phrase.split()))),
        Secret("entropy", _forms(entropy)),
        Secret("seed", _forms(Mnemonic.to_seed(phrase))),
        *_xprv_forms(founder.master, "master"),
        *_xprv_forms(founder.master.derive(founder.account_path), "account"),
    ]
    assert set(_leaks(_text(run.screen), secrets)) == {"numbered words"}  # shown there, and found
    assert set(_leaks(_text(f"x{phrase}y"), secrets)) == {"words", "word pairs"}
    assert _leaks(_text(run.stdout), secrets) == []
    for path in (made, *restored):
        assert _leaks(path.read_bytes(), secrets) == [], path.name
    for r in results:
        assert _leaks(_text(r.stdout + r.stderr), secrets) == []
    assert json.loads(results[1].stdout)["xpub"] == str(founder.account)
    assert _leaks(_text(caplog.text + repr(caplog.records)), secrets) == []
