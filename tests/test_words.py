"""BIP-39 words for founder keys: BIP-39's English vectors through our derivation, restores that
give embit's account xpub, words shown on a real terminal only (a pseudo-terminal), refusals.

Secrets of this path (words, entropy, seed) are searched for everywhere else in
tests/test_secrets.py.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from embit import bip32 as embit_bip32
from embit import bip39 as embit_bip39
from embit.networks import NETWORKS as EMBIT_NETWORKS
from mnemonic import Mnemonic

from custody.bitcoin.keys import ExtendedPrivateKey
from custody.bitcoin.network import MAINNET, REGTEST
from custody.errors import InputError
from custody.identity.keyfile import open_founder_key, read_header, write_founder_key
from custody.identity.words import normalize_words, seed_from_words
from tests.support import PASSPHRASE, Custody
from tests.terminal_support import read_screen

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "bip39.json").read_text())
ENGLISH = VECTORS["english"]
TWENTY_FOUR = [v for v in ENGLISH if len(v["mnemonic"].split()) == 24]


def _embit_account(phrase: str, network: str, path: str) -> str:
    """The account xpub with its origin, as embit derives it from the words (no passphrase)."""
    root = embit_bip32.HDKey.from_seed(embit_bip39.mnemonic_to_seed(phrase, ""))
    version = EMBIT_NETWORKS[network]["xpub"]
    account = root.derive(path).to_public().to_base58(version=version)
    return f"[{root.my_fingerprint.hex()}/{path[2:].replace('h', chr(39))}]{account}"


@pytest.mark.parametrize("vector", ENGLISH, ids=[v["entropy"][:12] for v in ENGLISH])
def test_bip39_vectors_through_our_derivation(vector: dict[str, str], tmp_path: Path) -> None:
    phrase = vector["mnemonic"]
    assert normalize_words(phrase.upper().replace(" ", "   ")) == phrase
    assert Mnemonic.to_seed(normalize_words(phrase), VECTORS["passphrase"]).hex() == vector["seed"]
    assert ExtendedPrivateKey.from_seed(bytes.fromhex(vector["seed"]), MAINNET).serialize() == vector["xprv"]
    # our key file from the words (no passphrase), opened again: embit's BIP-48 account
    path = tmp_path / "k.key"
    made = write_founder_key(path, "a", MAINNET, PASSPHRASE, seed_from_words(phrase), 2, seed_source="bip39")
    assert str(open_founder_key(path, PASSPHRASE).account) == str(made.account)
    assert str(made.account) == _embit_account(phrase, "main", "m/48h/0h/0h/2h")
    assert read_header(path)["seed_source"] == "bip39"


@pytest.fixture
def custody(tmp_path: Path) -> Custody:
    return Custody(tmp_path / "home")


@pytest.mark.parametrize("vector", TWENTY_FOUR[:3], ids=[v["entropy"][:12] for v in TWENTY_FOUR[:3]])
def test_restore_from_a_words_file_gives_embits_xpub(custody: Custody, tmp_path: Path, vector: dict[str, str]) -> None:
    words = tmp_path / "words.txt"
    words.write_text(vector["mnemonic"] + "\n")
    out = tmp_path / "a.key"
    got = custody.json(
        "keygen", "a", "--out", str(out), "--network", "regtest", "--restore", "--words-file", str(words)
    )
    assert got["xpub"] == _embit_account(vector["mnemonic"], "regtest", "m/48h/1h/0h/2h")
    assert got["seed"] == "bip39" and "mnemonic" not in json.dumps(got)
    # the first four letters of each word, as devices take them, give the same key
    words.write_text(" ".join(w[:4] for w in vector["mnemonic"].split()))
    again = custody.json(
        "keygen", "b", "--out", str(tmp_path / "b.key"), "--network", "regtest", "--restore", "--words-file", str(words)
    )
    assert again["xpub"] == got["xpub"]
    # p2sh-p2wsh account (BIP-48 script 1')
    third = custody.json(
        "keygen",
        "c",
        "--out",
        str(tmp_path / "c.key"),
        "--script",
        "p2sh-p2wsh",
        "--restore",
        "--words-file",
        str(words),
    )
    assert third["xpub"] == _embit_account(vector["mnemonic"], "regtest", "m/48h/1h/0h/1h")


def test_restore_from_the_prompt(custody: Custody, tmp_path: Path) -> None:
    phrase = TWENTY_FOUR[0]["mnemonic"]
    result = custody("keygen", "a", "--out", str(tmp_path / "a.key"), "--restore", "--json", input=phrase + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["xpub"] == _embit_account(phrase, "regtest", "m/48h/1h/0h/2h")
    assert phrase not in result.output and phrase.split()[0] + " " not in result.stdout


def test_bad_words_are_refused_by_position_and_write_nothing(custody: Custody, tmp_path: Path) -> None:
    words = TWENTY_FOUR[1]["mnemonic"].split()
    cases = {
        "checksum": " ".join([words[1], words[0], *words[2:]]),
        "not in the BIP-39": " ".join([*words[:5], "bitcoin", *words[6:]]),
        "come in 12": " ".join(words[:23]),
    }
    for expected, text in cases.items():
        f = tmp_path / "w.txt"
        f.write_text(text)
        out = tmp_path / "a.key"
        result = custody("keygen", "a", "--out", str(out), "--restore", "--words-file", str(f))
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not out.exists()
        leaked = [w for w in set(text.split()) if re.search(rf"\b{w}\b", result.output)]
        assert not leaked, leaked
    with pytest.raises(InputError, match="word 6"):
        normalize_words(cases["not in the BIP-39"])
    assert custody("keygen", "a", "--out", str(tmp_path / "x.key"), "--mnemonic", "--restore").exit_code == 2
    assert (
        custody("keygen", "a", "--out", str(tmp_path / "x.key"), "--words-file", str(tmp_path / "w.txt")).exit_code == 2
    )


# --------------------------------------------------------------------------- a real terminal


@dataclass
class TerminalRun:
    code: int
    stdout: str  # the pipe
    screen: str  # what the terminal (stdin and stderr) showed


def run_on_terminal(args: list[str], env: dict[str, str], answer: bytes, timeout: float = 60) -> TerminalRun:
    """``custody ARGS`` in a subprocess whose stdin and stderr are a pseudo-terminal and whose
    stdout is a pipe; ``answer`` is typed at the confirmation prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "custody_cli", *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=dict(os.environ, **env),
    )
    os.close(slave)
    try:
        screen = read_screen(master, proc, timeout, b"written the 24 words down", answer)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        proc.wait(timeout=10)
    finally:
        os.close(master)
    return TerminalRun(proc.returncode, stdout, screen.decode(errors="replace"))


def shown_words(screen: str) -> str:
    pairs = re.findall(r"(\d+)\. ([a-z]+)", screen)
    assert [int(n) for n, _ in pairs] == list(range(1, 25)), screen
    return " ".join(w for _, w in pairs)


def test_mnemonic_shows_words_on_the_terminal_only_and_they_restore_the_key(custody: Custody, tmp_path: Path) -> None:
    env = dict(custody.env)
    out = tmp_path / "a.key"
    run = run_on_terminal(["keygen", "a", "--out", str(out), "--network", "regtest", "--mnemonic"], env, b"y\n")
    assert run.code == 0, run.screen
    phrase = shown_words(run.screen)
    normalize_words(phrase)  # 24 valid words with their checksum
    xpub = run.stdout.strip()
    assert re.fullmatch(r"\[[0-9a-f]{8}/48'/1'/0'/2'\]tpub\w+", xpub), run.stdout
    assert not any(re.search(rf"\b{w}\b", run.stdout) for w in phrase.split()[:3])
    assert xpub == _embit_account(phrase, "regtest", "m/48h/1h/0h/2h")
    assert read_header(out)["seed_source"] == "bip39"
    words = tmp_path / "words.txt"
    words.write_text(phrase)
    restored = custody.json("keygen", "b", "--out", str(tmp_path / "b.key"), "--restore", "--words-file", str(words))
    assert restored["xpub"] == xpub


def test_mnemonic_not_confirmed_or_off_a_terminal_writes_no_key(custody: Custody, tmp_path: Path) -> None:
    out = tmp_path / "a.key"
    run = run_on_terminal(["keygen", "a", "--out", str(out), "--mnemonic"], dict(custody.env), b"n\n")
    assert run.code == 2 and "no key file was written" in run.screen and not out.exists()
    # stderr not a terminal (a pipe, a log file): refused before any word exists
    piped = subprocess.run(
        [sys.executable, "-m", "custody_cli", "keygen", "a", "--out", str(out), "--mnemonic"],
        env=dict(os.environ, **custody.env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 2 and "terminal" in piped.stderr and not out.exists()
    assert not re.search(r"\d+\. [a-z]+", piped.stderr + piped.stdout)
    assert custody("keygen", "a", "--out", str(out), "--mnemonic").exit_code == 2  # CliRunner: no terminal either


def test_restored_key_is_the_same_key_file_content_but_for_salt_and_nonce(tmp_path: Path) -> None:
    phrase = TWENTY_FOUR[2]["mnemonic"]
    a = write_founder_key(tmp_path / "a", "a", REGTEST, PASSPHRASE, seed_from_words(phrase), 2, seed_source="bip39")
    b = write_founder_key(tmp_path / "b", "a", REGTEST, PASSPHRASE, seed_from_words(phrase), 2, seed_source="bip39")
    assert a.master.serialize() == b.master.serialize()
    ha, hb = read_header(tmp_path / "a"), read_header(tmp_path / "b")
    assert ha["public"] == hb["public"] and ha["kdf"]["salt"] != hb["kdf"]["salt"]
