"""Where an employee's signing key lives: an encrypted key file or a hardware token.

Every employee key is a secp256k1 key that signs 32-byte statement digests (see
custody.identity.statements). :class:`EmployeeSigner` is what the approval, halt and withdrawal code
needs from it: the employee's name, the 33-byte compressed public key and a DER, low-S
ECDSA signature of a digest. Two implementations:

* :class:`FileSigner` wraps a decrypted key file (:class:`custody.identity.keyfile.EmployeeKey`);
* :class:`custody.identity.pkcs11_keys.Pkcs11Signer` signs on a PKCS#11 token, named by a
  ``pkcs11:`` URI (RFC 7512) that :func:`parse_pkcs11_uri` reads.

Both also expose ``private_key`` with coincurve's ``sign(digest, hasher=None)`` shape, so
code written for an ``EmployeeKey`` (``sign_statement(key.private_key, ...)``) works with
either unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote

from custody.bitcoin.encoding import SECP256K1_ORDER
from custody.errors import InputError

if TYPE_CHECKING:  # a key file's type only: reading the halt state needs no key-file crypto
    from custody.identity.keyfile import EmployeeKey

DIGEST_SIZE = 32


class DigestSigner(Protocol):
    """coincurve.PrivateKey's signing shape: ``sign(digest, hasher=None)`` -> DER signature."""

    def sign(self, message: bytes, hasher: None = None) -> bytes: ...


@runtime_checkable
class EmployeeSigner(Protocol):
    """An employee's signing key, wherever it lives."""

    @property
    def name(self) -> str: ...

    @property
    def public_key(self) -> bytes:
        """The 33-byte compressed secp256k1 public key."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """DER, low-S ECDSA signature of a 32-byte digest. Raises InputError, KeyFileError."""
        ...


def check_digest(digest: bytes) -> None:
    """Raises InputError unless ``digest`` is 32 bytes (a SHA-256 digest)."""
    if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST_SIZE:
        raise InputError(f"employee keys sign {DIGEST_SIZE}-byte digests only")


def _der_integer(x: int) -> bytes:
    # Minimal big-endian two's complement: a leading 0x00 when the top bit is set.
    body = x.to_bytes((x.bit_length() + 8) // 8, "big")
    return b"\x02" + bytes([len(body)]) + body


def der_from_raw(raw: bytes) -> bytes:
    """The DER encoding, normalized to low S, of a raw 64-byte ``r || s`` secp256k1 signature.

    Layout: ``30 len 02 len(r) r 02 len(s) s`` with minimal integers; s is replaced by
    n - s when s > n/2 (BIP-62 / BIP-146 low S), which libsecp256k1 requires to verify.
    Raises InputError for a wrong length or r, s out of [1, n-1].
    """
    if len(raw) != 64:
        raise InputError(f"a raw secp256k1 signature is 64 bytes (r || s), not {len(raw)}")
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:], "big")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        raise InputError("raw signature out of range (r and s must be in [1, n-1])")
    if s > SECP256K1_ORDER // 2:
        s = SECP256K1_ORDER - s
    body = _der_integer(r) + _der_integer(s)
    return b"\x30" + bytes([len(body)]) + body


@dataclass(frozen=True)
class FileSigner:
    """An :class:`EmployeeSigner` over a decrypted key file."""

    key: EmployeeKey

    def __repr__(self) -> str:
        return f"FileSigner(name={self.key.name!r}, <secret>)"

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    @property
    def private_key(self) -> Any:
        """The coincurve private key (for code written against EmployeeKey)."""
        return self.key.private_key

    def sign_digest(self, digest: bytes) -> bytes:
        check_digest(digest)
        # libsecp256k1 signs deterministically (RFC 6979) and always in low-S form.
        return bytes(self.key.private_key.sign(bytes(digest), hasher=None))


# ---------------------------------------------------------------- pkcs11: URIs (RFC 7512)

PKCS11_SCHEME = "pkcs11:"
_PATH_ATTRIBUTES = ("token", "object", "type")
_QUERY_ATTRIBUTES = ("module-path",)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A key on a PKCS#11 token: ``pkcs11:token=T;object=K?module-path=/path/to/module.so``."""

    token: str
    object: str | None
    module_path: str

    def with_object(self, label: str) -> Pkcs11Uri:
        return Pkcs11Uri(self.token, label, self.module_path)

    def __str__(self) -> str:
        path = f"token={quote(self.token, safe='')}"
        if self.object is not None:
            path += f";object={quote(self.object, safe='')}"
        return f"{PKCS11_SCHEME}{path}?module-path={quote(self.module_path, safe='/')}"


def is_pkcs11_uri(text: str) -> bool:
    return text[: len(PKCS11_SCHEME)].lower() == PKCS11_SCHEME


def _attributes(part: str, separator: str, allowed: tuple[str, ...], where: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in part.split(separator) if part else []:
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise InputError(f"pkcs11 URI: {where} attribute {item!r} is not name=value")
        if name in ("pin-value", "pin-source"):
            raise InputError(
                "pkcs11 URI: the PIN never goes in the URI; use --pin-file or CUSTODY_PKCS11_PIN, or the prompt"
            )
        if name not in allowed:
            # Fail closed: an ignored attribute could have narrowed the match to another key.
            raise InputError(f"pkcs11 URI: unsupported {where} attribute {name!r} (supported: {', '.join(allowed)})")
        if name in found:
            raise InputError(f"pkcs11 URI: attribute {name!r} given twice")
        found[name] = unquote(value)
    return found


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Read ``pkcs11:token=T[;object=K][;type=private]?module-path=/abs/module.so``.

    Values are percent-decoded (RFC 7512). The token and module path are required; the
    object (the key's label) is required to sign, optional for key generation. Raises
    InputError for anything else: other attributes, a PIN in the URI, a relative module path.
    """
    if not is_pkcs11_uri(text):
        raise InputError("a pkcs11 URI starts with 'pkcs11:'")
    body = text[len(PKCS11_SCHEME) :]
    path, _, query = body.partition("?")
    attrs = _attributes(path, ";", _PATH_ATTRIBUTES, "path")
    query_attrs = _attributes(query, "&", _QUERY_ATTRIBUTES, "query")
    token = attrs.get("token", "")
    if not token:
        raise InputError("pkcs11 URI: token=LABEL is required (the token's label)")
    kind = attrs.get("type")
    if kind is not None and kind != "private":
        raise InputError("pkcs11 URI: type must be 'private' (the signing key) when given")
    label = attrs.get("object")
    if label is not None and not label:
        raise InputError("pkcs11 URI: object= is empty")
    module = query_attrs.get("module-path", "")
    if not module:
        raise InputError(
            "pkcs11 URI: ?module-path=/path/to/module.so is required "
            "(SoftHSM2 on Debian: /usr/lib/softhsm/libsofthsm2.so)"
        )
    if not module.startswith("/"):
        raise InputError("pkcs11 URI: module-path must be an absolute path")
    return Pkcs11Uri(token, label, module)
