"""Encrypted key files for founders and employees (format ``custody-key``, version 1).

A key file is JSON. Its public part (name, kind, network, public key) is in the clear and
bound to the ciphertext as associated data, so editing it breaks decryption. The secret
is encrypted with ChaCha20-Poly1305 under a key derived from the passphrase with scrypt.
See docs/FORMATS.md.

Private keys never leave this module except as objects handed to the signer; they are
never written to the database or to logs.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from custody.bitcoin.keys import (
    ExtendedPrivateKey,
    KeyOrigin,
    OriginKey,
    bip48_path,
    parse_origin_xpub,
)
from custody.bitcoin.network import Network, get_network
from custody.errors import Conflict, InputError, KeyFileError
from custody.files import KEY_FILE_MAX, read_limited

FORMAT = "custody-key"
VERSION = 1
FOUNDER = "founder"
EMPLOYEE = "employee"

# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB of memory and ~0.1 s a try.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_MIN_SCRYPT_N = 2**14
_MAX_SCRYPT_N = 2**20
MIN_PASSPHRASE = 8


@dataclass(frozen=True)
class FounderKey:
    """A founder's decrypted key: the BIP-32 master and the account key it publishes."""

    name: str
    network: Network
    master: ExtendedPrivateKey
    account_path: tuple[int, ...]

    def __repr__(self) -> str:
        return f"FounderKey(name={self.name!r}, network={self.network.name}, <secret>)"

    @property
    def account(self) -> OriginKey:
        xpub = self.master.derive(self.account_path).neuter()
        return OriginKey(KeyOrigin(self.master.fingerprint, self.account_path), xpub)


@dataclass(frozen=True)
class EmployeeKey:
    """An employee's decrypted signing key (secp256k1)."""

    name: str
    private_key: coincurve.PrivateKey

    def __repr__(self) -> str:
        return f"EmployeeKey(name={self.name!r}, <secret>)"

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key.format(compressed=True)


def check_passphrase(passphrase: str) -> None:
    """Raises InputError for a passphrase too short to protect a key."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise InputError(f"passphrase too short: at least {MIN_PASSPHRASE} characters")


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _seal(header: dict[str, Any], secret: dict[str, str], passphrase: str) -> dict[str, Any]:
    check_passphrase(passphrase)
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    header = dict(
        header,
        kdf={"name": "scrypt", "salt": salt.hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        cipher={"name": "chacha20-poly1305", "nonce": nonce.hex()},
    )
    key = _kdf(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    plaintext = json.dumps(secret).encode()
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(header))
    return dict(header, ciphertext=ciphertext.hex())


def _write_new(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to a new file, readable by its owner only; never overwrite."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} exists already; key files are never overwritten") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def create_founder_key(
    path: Path,
    name: str,
    network: Network,
    passphrase: str,
    script_index: int = 2,
    account_path: tuple[int, ...] | None = None,
) -> FounderKey:
    """Create a founder key (BIP-32 master from the OS's randomness) and write it to ``path``.

    The account key is at BIP-48 ``m/48'/coin'/0'/script'`` (2' for p2wsh, 1' for
    p2sh-p2wsh). Raises Conflict when ``path`` exists, InputError for a weak passphrase.
    """
    return write_founder_key(
        path, name, network, passphrase, secrets.token_bytes(32), script_index, account_path=account_path
    )


def write_founder_key(
    path: Path,
    name: str,
    network: Network,
    passphrase: str,
    seed: bytes,
    script_index: int = 2,
    seed_source: str | None = None,
    account_path: tuple[int, ...] | None = None,
) -> FounderKey:
    """Write a founder key file holding the BIP-32 ``seed`` (16 to 64 bytes) to ``path``.

    ``seed_source`` ``"bip39"`` marks a seed made from BIP-39 words (the 64-byte seed, the
    words themselves are not kept); it is recorded in the clear header. Raises Conflict when
    ``path`` exists, InputError for a weak passphrase or a bad seed.
    """
    check_passphrase(passphrase)
    master = ExtendedPrivateKey.from_seed(seed, network)
    path_ = account_path if account_path is not None else bip48_path(network, script_index)
    key = FounderKey(name, network, master, path_)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": FOUNDER,
        "name": name,
        "network": network.name,
        "public": {"xpub": str(key.account)},
    }
    if seed_source is not None:
        header["seed_source"] = seed_source
    _write_new(path, _seal(header, {"seed": seed.hex()}, passphrase))
    return key


def create_employee_key(path: Path, name: str, passphrase: str) -> EmployeeKey:
    """Create an employee signing key and write it to ``path``.

    Raises Conflict when ``path`` exists, InputError for a weak passphrase.
    """
    check_passphrase(passphrase)
    private = coincurve.PrivateKey(secrets.token_bytes(32))
    key = EmployeeKey(name, private)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "kind": EMPLOYEE,
        "name": name,
        "public": {"pubkey": key.public_key.hex()},
    }
    _write_new(path, _seal(header, {"secret": private.secret.hex()}, passphrase))
    return key


def read_header(path: Path) -> dict[str, Any]:
    """The clear part of a key file, checked for format and version.

    Raises KeyFileError for a missing, unreadable, truncated or foreign file, or one of a
    newer format version; InputError for a file above KEY_FILE_MAX or a device (unread).
    """
    try:
        raw = read_limited(path, KEY_FILE_MAX, "key file")
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5000-digit number, nested too deep
        raise KeyFileError(f"{path} is not a custody key file (not JSON: truncated or another file type?)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyFileError(f"{path} is not a custody key file")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise KeyFileError(f"{path}: bad format version {version!r}")
    if version > VERSION:
        raise KeyFileError(
            f"{path} is key file format version {version}; this tool reads up to {VERSION}: upgrade custody"
        )
    return doc


def _open(path: Path, passphrase: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = read_header(path)
    if doc.get("kind") != kind:
        held = str(doc.get("kind"))
        raise KeyFileError(f"{path} holds {_article(held)} {held} key, not {_article(kind)} {kind} key")
    try:
        kdf = doc["kdf"]
        cipher = doc["cipher"]
        if kdf["name"] != "scrypt" or cipher["name"] != "chacha20-poly1305":
            raise KeyFileError(f"{path}: unsupported kdf or cipher")
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        if not (_MIN_SCRYPT_N <= n <= _MAX_SCRYPT_N and 1 <= r <= 32 and 1 <= p <= 16):
            raise KeyFileError(f"{path}: scrypt parameters out of the accepted range")
        salt = bytes.fromhex(kdf["salt"])
        nonce = bytes.fromhex(cipher["nonce"])
        ciphertext = bytes.fromhex(doc["ciphertext"])
        header = {k: v for k, v in doc.items() if k != "ciphertext"}
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        raise KeyFileError(f"{path} is corrupted (missing or malformed fields)") from None
    try:
        key = _kdf(passphrase, salt, n, r, p)
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, _aad(header))
    except InvalidTag:
        raise KeyFileError(f"wrong passphrase for {path}, or the file was altered") from None
    except ValueError:
        raise KeyFileError(f"{path} is corrupted") from None
    try:
        return doc, json.loads(plaintext)
    except (ValueError, RecursionError):
        raise KeyFileError(f"{path} is corrupted (its secret is not readable)") from None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def open_founder_key(path: Path, passphrase: str) -> FounderKey:
    """Decrypt a founder key file.

    Raises KeyFileError for a wrong passphrase, a corrupted or foreign file, a newer version.
    """
    doc, secret = _open(path, passphrase, FOUNDER)
    try:
        network = get_network(str(doc["network"]))
        master = ExtendedPrivateKey.from_seed(bytes.fromhex(secret["seed"]), network)
        published = parse_origin_xpub(str(doc["public"]["xpub"]), network)
    except (KeyError, TypeError, ValueError, InputError):
        raise KeyFileError(f"{path} is corrupted") from None
    if published.origin is None or published.origin.fingerprint != master.fingerprint:
        raise KeyFileError(f"{path} is corrupted: its public key does not belong to its secret")
    key = FounderKey(str(doc["name"]), network, master, published.origin.path)
    if key.account.xpub.identity() != published.xpub.identity():
        raise KeyFileError(f"{path} is corrupted: its public key does not belong to its secret")
    return key


def open_employee_key(path: Path, passphrase: str) -> EmployeeKey:
    """Decrypt an employee key file.

    Raises KeyFileError for a wrong passphrase, a corrupted or foreign file, a newer version.
    """
    doc, secret = _open(path, passphrase, EMPLOYEE)
    try:
        private = coincurve.PrivateKey(bytes.fromhex(secret["secret"]))
        pubkey = bytes.fromhex(doc["public"]["pubkey"])
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"{path} is corrupted") from None
    key = EmployeeKey(str(doc["name"]), private)
    if key.public_key != pubkey:
        raise KeyFileError(f"{path} is corrupted: its public key does not belong to its secret")
    return key
