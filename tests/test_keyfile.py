"""Encrypted founder and employee key files: create, open, and every way opening must fail.

Each scrypt run costs about 0.1 s, so the files are made once per module and copied."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.keys import parse_origin_xpub, parse_path
from custody.bitcoin.network import MAINNET, REGTEST
from custody.errors import Conflict, InputError, KeyFileError
from custody.identity import keyfile
from custody.identity.keyfile import (
    EmployeeKey,
    FounderKey,
    create_employee_key,
    create_founder_key,
    open_employee_key,
    open_founder_key,
)

PASSPHRASE = "correct horse battery staple"


@dataclass(frozen=True)
class Made:
    path: Path
    key: Any
    random: tuple[bytes, ...]  # every secrets.token_bytes value drawn while making it


def _make(tmp: Path, name: str, create: Callable[[Path], Any], monkeypatch: pytest.MonkeyPatch) -> Made:
    drawn: list[bytes] = []
    real = keyfile.secrets.token_bytes

    def spy(n: int | None = None) -> bytes:
        value = real(n)
        drawn.append(value)
        return value

    monkeypatch.setattr(keyfile.secrets, "token_bytes", spy)
    try:
        path = tmp / name
        key = create(path)
    finally:
        monkeypatch.undo()
    return Made(path, key, tuple(drawn))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    tmp = tmp_path_factory.mktemp("keyfiles")
    mp = pytest.MonkeyPatch()
    return {
        "founder": _make(
            tmp,
            "founder.json",
            lambda p: create_founder_key(p, "alice", REGTEST, PASSPHRASE),
            mp,
        ),
        "founder-mainnet-p2sh-p2wsh": _make(
            tmp,
            "founder-main.json",
            lambda p: create_founder_key(p, "bob", MAINNET, PASSPHRASE, script_index=1),
            mp,
        ),
        "employee": _make(tmp, "employee.json", lambda p: create_employee_key(p, "carol", PASSPHRASE), mp),
    }


def _copy(made: Made, tmp_path: Path) -> Path:
    path = tmp_path / made.path.name
    shutil.copyfile(made.path, path)
    return path


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------- create and open


def test_founder_file_opens_to_the_same_key(made: dict[str, Made]) -> None:
    m = made["founder"]
    created: FounderKey = m.key
    opened = open_founder_key(m.path, PASSPHRASE)
    assert opened.name == "alice"
    assert opened.network is REGTEST
    assert opened.master.secret == created.master.secret
    assert opened.master.chain_code == created.master.chain_code
    assert opened.account_path == created.account_path
    assert str(opened.account) == str(created.account)


@pytest.mark.parametrize(
    ("which", "path"),
    [("founder", "m/48'/1'/0'/2'"), ("founder-mainnet-p2sh-p2wsh", "m/48'/0'/0'/1'")],
)
def test_founder_account_is_at_the_bip48_path(made: dict[str, Made], which: str, path: str) -> None:
    m = made[which]
    key: FounderKey = m.key
    assert key.account_path == parse_path(path)
    published = json.loads(m.path.read_text())["public"]["xpub"]
    origin_key = parse_origin_xpub(published, key.network)
    assert origin_key.origin is not None
    assert origin_key.origin.path == parse_path(path)
    assert origin_key.origin.fingerprint == key.master.fingerprint
    assert origin_key.xpub.identity() == key.master.derive(parse_path(path)).neuter().identity()


def test_employee_file_opens_to_the_same_key(made: dict[str, Made]) -> None:
    m = made["employee"]
    created: EmployeeKey = m.key
    opened = open_employee_key(m.path, PASSPHRASE)
    assert opened.name == "carol"
    assert opened.private_key.secret == created.private_key.secret
    assert json.loads(m.path.read_text())["public"]["pubkey"] == created.public_key.hex()


@pytest.mark.parametrize("which", ["founder", "employee"])
def test_file_is_readable_by_its_owner_only(made: dict[str, Made], which: str) -> None:
    assert stat.S_IMODE(os.stat(made[which].path).st_mode) == 0o600


@pytest.mark.parametrize("which", ["founder", "founder-mainnet-p2sh-p2wsh", "employee"])
def test_no_secret_and_no_passphrase_in_the_file(made: dict[str, Made], which: str) -> None:
    m = made[which]
    text = m.path.read_text()
    raw = m.path.read_bytes()
    assert PASSPHRASE not in text
    assert PASSPHRASE.encode() not in raw
    seed_or_secret = m.random[0]  # the first draw is the seed / the private key
    assert len(seed_or_secret) == 32
    for form in (seed_or_secret.hex(), seed_or_secret.hex().upper()):
        assert form not in text
    assert seed_or_secret not in raw
    if which == "employee":
        assert m.key.private_key.secret.hex() not in text
    else:
        master = m.key.master
        assert master.secret.hex() not in text
        assert master.serialize() not in text
        account = master.derive(m.key.account_path)
        assert account.secret.hex() not in text
        assert account.serialize() not in text


def test_never_overwrites(made: dict[str, Made], tmp_path: Path) -> None:
    path = _copy(made["employee"], tmp_path)
    before = path.read_bytes()
    with pytest.raises(Conflict, match="never overwritten"):
        create_employee_key(path, "dave", PASSPHRASE)
    with pytest.raises(Conflict, match="never overwritten"):
        create_founder_key(path, "dave", REGTEST, PASSPHRASE)
    assert path.read_bytes() == before
    assert open_employee_key(path, PASSPHRASE).name == "carol"


@pytest.mark.parametrize("create", ["founder", "employee"])
def test_passphrase_too_short(tmp_path: Path, create: str) -> None:
    path = tmp_path / "short.json"
    with pytest.raises(InputError, match="passphrase too short"):
        if create == "founder":
            create_founder_key(path, "eve", REGTEST, "1234567")
        else:
            create_employee_key(path, "eve", "1234567")
    assert not path.exists()


# ---------------------------------------------------------------- opening fails


@pytest.mark.parametrize(
    ("which", "opener"),
    [("founder", open_founder_key), ("employee", open_employee_key)],
)
def test_wrong_passphrase(made: dict[str, Made], which: str, opener: Callable[[Path, str], Any]) -> None:
    with pytest.raises(KeyFileError, match="wrong passphrase for"):
        opener(made[which].path, PASSPHRASE + "!")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        open_founder_key(tmp_path / "nothing.json", PASSPHRASE)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(made: dict[str, Made], tmp_path: Path, keep: float) -> None:
    path = _copy(made["founder"], tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(KeyFileError):
        open_founder_key(path, PASSPHRASE)


@pytest.mark.parametrize("content", [b"", b"hello", b"\xff\xfe\x00", b"[1, 2]", b'{"a": 1}'])
def test_not_a_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.json"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        open_employee_key(path, PASSPHRASE)


def test_employee_file_opened_as_founder(made: dict[str, Made]) -> None:
    with pytest.raises(KeyFileError, match="holds an? employee key, not a founder key"):
        open_founder_key(made["employee"].path, PASSPHRASE)


def test_founder_file_opened_as_employee(made: dict[str, Made]) -> None:
    with pytest.raises(KeyFileError, match="holds a founder key, not an? employee key"):
        open_employee_key(made["founder"].path, PASSPHRASE)


@pytest.mark.parametrize("version", [2, 99])
def test_newer_version(made: dict[str, Made], tmp_path: Path, version: int) -> None:
    path = _copy(made["founder"], tmp_path)
    _edit(path, lambda doc: doc.update(version=version))
    with pytest.raises(KeyFileError, match=rf"format version {version}; this tool reads up to 1"):
        open_founder_key(path, PASSPHRASE)


@pytest.mark.parametrize("version", [0, "1", None])
def test_bad_version(made: dict[str, Made], tmp_path: Path, version: Any) -> None:
    path = _copy(made["employee"], tmp_path)
    _edit(path, lambda doc: doc.update(version=version))
    with pytest.raises(KeyFileError, match="bad format version"):
        open_employee_key(path, PASSPHRASE)


def test_founder_xpub_swapped_for_another(made: dict[str, Made], tmp_path: Path) -> None:
    # a valid regtest key of the same master, at m/48'/1'/0'/3' instead of m/48'/1'/0'/2'
    path = _copy(made["founder"], tmp_path)
    alice: FounderKey = made["founder"].key
    assert alice.account_path == parse_path("m/48'/1'/0'/2'")
    other = alice.master.derive(parse_path("m/48'/1'/0'/3'")).neuter()
    swapped = f"[{alice.master.fingerprint.hex()}/48'/1'/0'/3']{other.serialize()}"
    assert swapped != str(alice.account)
    _edit(path, lambda doc: doc["public"].update(xpub=swapped))
    with pytest.raises(KeyFileError):
        open_founder_key(path, PASSPHRASE)


def test_founder_name_edited(made: dict[str, Made], tmp_path: Path) -> None:
    path = _copy(made["founder"], tmp_path)
    _edit(path, lambda doc: doc.update(name="mallory"))
    with pytest.raises(KeyFileError):
        open_founder_key(path, PASSPHRASE)


def test_employee_pubkey_swapped_for_another(made: dict[str, Made], tmp_path: Path) -> None:
    path = _copy(made["employee"], tmp_path)
    founder_pub: FounderKey = made["founder"].key
    other = founder_pub.master.public_key.hex()  # a valid public key that is not carol's
    _edit(path, lambda doc: doc["public"].update(pubkey=other))
    with pytest.raises(KeyFileError):
        open_employee_key(path, PASSPHRASE)


def test_ciphertext_edited(made: dict[str, Made], tmp_path: Path) -> None:
    path = _copy(made["employee"], tmp_path)

    def flip(doc: dict[str, Any]) -> None:
        ct = doc["ciphertext"]
        doc["ciphertext"] = ct[:-2] + ("00" if ct[-2:] != "00" else "01")

    _edit(path, flip)
    with pytest.raises(KeyFileError):
        open_employee_key(path, PASSPHRASE)


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.pop("kdf"),
        lambda doc: doc.update(ciphertext="zz"),
        lambda doc: doc["kdf"].update(n=2),
        lambda doc: doc["kdf"].update(name="pbkdf2"),
    ],
    ids=["no-kdf", "ciphertext-not-hex", "scrypt-n-too-small", "other-kdf"],
)
def test_corrupted_fields(made: dict[str, Made], tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = _copy(made["employee"], tmp_path)
    _edit(path, change)
    with pytest.raises(KeyFileError):
        open_employee_key(path, PASSPHRASE)


# A file sealed correctly (right passphrase, intact ciphertext) whose clear public part does not
# belong to its secret -- what a faulty writer could produce. The AEAD cannot catch this; the
# check after decryption must.


def test_sealed_founder_file_with_a_foreign_xpub(made: dict[str, Made], tmp_path: Path) -> None:
    alice: FounderKey = made["founder"].key
    seed = made["founder"].random[0]
    # bob's account key (another seed), on alice's network, under alice's origin
    bob: FounderKey = made["founder-mainnet-p2sh-p2wsh"].key
    other = dataclasses.replace(bob.account.xpub, network=REGTEST)
    header = json.loads(made["founder"].path.read_text())
    header = {k: header[k] for k in ("format", "version", "kind", "name", "network")}
    header["public"] = {"xpub": f"{alice.account.origin}{other.serialize()}"}
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(keyfile._seal(header, {"seed": seed.hex()}, PASSPHRASE)))
    with pytest.raises(KeyFileError, match="does not belong to its secret"):
        open_founder_key(path, PASSPHRASE)


def test_sealed_employee_file_with_a_foreign_pubkey(made: dict[str, Made], tmp_path: Path) -> None:
    carol: EmployeeKey = made["employee"].key
    header = json.loads(made["employee"].path.read_text())
    header = {k: header[k] for k in ("format", "version", "kind", "name")}
    header["public"] = {"pubkey": made["founder"].key.master.public_key.hex()}
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(keyfile._seal(header, {"secret": carol.private_key.secret.hex()}, PASSPHRASE)))
    with pytest.raises(KeyFileError, match="does not belong to its secret"):
        open_employee_key(path, PASSPHRASE)
