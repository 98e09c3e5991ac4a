"""Employee keys on a hardware token, through PKCS#11 (``pip install 'custody[pkcs11]'``).

The key is a secp256k1 EC key pair generated on the token (CKM_EC_KEY_PAIR_GEN, EC params
the named curve 1.3.132.0.10) whose private half is sensitive and never extractable: it
never leaves the token. The token signs the 32-byte statement digest with CKM_ECDSA, which
returns the raw ``r || s``; it is DER-encoded, normalized to low S and verified with
coincurve against the token's public key before it is returned.

Each operation opens its own session, logs in, and closes it (which logs out), so no login
lingers between signatures and two signers on one token do not share a login. Errors from
the module or the token (missing module or token, wrong PIN, no such key, a key that could
be extracted) are KeyFileError (exit code 7).

python-pkcs11 is imported on first use: without the extra, custody works with key files.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import coincurve

from custody.errors import Conflict, InputError, KeyFileError
from custody.identity.employee_keys import check_digest, der_from_raw

if TYPE_CHECKING:
    from pkcs11 import Session, Token

# DER of the OBJECT IDENTIFIER 1.3.132.0.10 (secp256k1, SEC 2 section 2.4.1): the EC
# params of a named-curve key (ANSI X9.62 ECParameters, choice namedCurve).
SECP256K1_EC_PARAMS = bytes.fromhex("06052b8104000a")

# What a signing key on the token must say about itself: usable to sign, sensitive from
# its creation on, and never extractable (so never seen outside the token).
_REQUIRED_PRIVATE_FLAGS = {
    "SIGN": True,
    "SENSITIVE": True,
    "ALWAYS_SENSITIVE": True,
    "EXTRACTABLE": False,
    "NEVER_EXTRACTABLE": True,
}


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyFileError("PKCS#11 support is not installed: pip install 'custody[pkcs11]' (python-pkcs11)") from None
    return pkcs11


def _token_error(exc: Exception, token_label: str) -> KeyFileError:
    """A PKCS#11 failure as a KeyFileError that names what went wrong."""
    from pkcs11 import exceptions as e

    if isinstance(exc, e.PinIncorrect):
        return KeyFileError(f"wrong PIN for token {token_label!r}")
    if isinstance(exc, e.PinLocked):
        return KeyFileError(f"the user PIN of token {token_label!r} is locked (too many wrong tries)")
    if isinstance(exc, e.PinExpired | e.PinInvalid | e.PinLenRange):
        return KeyFileError(f"token {token_label!r} refused the PIN ({type(exc).__name__})")
    if isinstance(exc, e.UserPinNotInitialized):
        return KeyFileError(f"token {token_label!r} has no user PIN set yet")
    if isinstance(exc, e.NoSuchToken):
        return KeyFileError(f"no token labelled {token_label!r} in the PKCS#11 module")
    if isinstance(exc, e.MultipleTokensReturned):
        return KeyFileError(f"several tokens are labelled {token_label!r}: give each a distinct label")
    if isinstance(exc, e.TokenNotPresent | e.DeviceRemoved):
        return KeyFileError(f"token {token_label!r} is not present")
    return KeyFileError(f"token {token_label!r}: PKCS#11 error {type(exc).__name__} {exc}".rstrip())


def _load_token(module_path: str, token_label: str) -> Token:
    pkcs11 = _pkcs11()
    try:
        lib = pkcs11.lib(module_path)
    except (OSError, RuntimeError) as exc:  # PKCS11Error is a RuntimeError
        raise KeyFileError(f"cannot load the PKCS#11 module {module_path}: {exc}") from None
    try:
        token: Token = lib.get_token(token_label=token_label)
    except pkcs11.PKCS11Error as exc:
        raise _token_error(exc, token_label) from None
    return token


@contextmanager
def _session(module_path: str, token_label: str, pin: str, *, rw: bool = False) -> Iterator[Session]:
    """A logged-in session, closed (and so logged out) on leaving; failures as KeyFileError."""
    pkcs11 = _pkcs11()
    if not pin:
        raise InputError(f"no PIN given for token {token_label!r}")
    token = _load_token(module_path, token_label)
    try:
        session = token.open(user_pin=pin, rw=rw)
    except pkcs11.PKCS11Error as exc:
        raise _token_error(exc, token_label) from None
    try:
        yield session
    except pkcs11.PKCS11Error as exc:
        raise _token_error(exc, token_label) from None
    finally:
        try:
            session.close()
        except pkcs11.PKCS11Error:
            pass


def _compressed(ec_point: bytes) -> bytes:
    """The compressed public key from CKA_EC_POINT (DER OCTET STRING, or a raw point)."""
    point = bytes(ec_point)
    if len(point) >= 2 and point[0] == 0x04 and point[1] == len(point) - 2:
        point = point[2:]  # DER: 04 len <point>
    return bytes(coincurve.PublicKey(point).format(compressed=True))


class _TokenPrivateKey:
    """coincurve.PrivateKey's ``sign`` shape over the token, for code written for key files."""

    def __init__(self, signer: Pkcs11Signer) -> None:
        self._signer = signer

    def __repr__(self) -> str:
        return f"<private key {self._signer.key_label!r} on token {self._signer.token_label!r}>"

    @property
    def public_key(self) -> Any:
        return coincurve.PublicKey(self._signer.public_key)

    def sign(self, message: bytes, hasher: None = None) -> bytes:
        if hasher is not None:
            raise InputError("a token key signs 32-byte digests only (hasher=None)")
        return self._signer.sign_digest(message)


class Pkcs11Signer:
    """An :class:`custody.identity.employee_keys.EmployeeSigner` whose key stays on a PKCS#11 token.

    Opening it logs in once to check the PIN, find the key by label (exactly one EC
    private key and its public key), and check that it is secp256k1, sensitive and never
    extractable. Raises KeyFileError (wrong PIN, no module/token/key, unsuitable key),
    InputError (empty PIN).
    """

    def __init__(self, module_path: str, token_label: str, key_label: str, pin: str, *, name: str | None = None):
        self.module_path = module_path
        self.token_label = token_label
        self.key_label = key_label
        self._name = name or key_label
        self.__pin = pin
        with self._open() as session:
            self._public_key = self._inspect(session)

    def __repr__(self) -> str:
        return f"Pkcs11Signer(name={self._name!r}, token={self.token_label!r}, key={self.key_label!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def private_key(self) -> _TokenPrivateKey:
        """coincurve.PrivateKey's ``sign(digest, hasher=None)`` on the token (for EmployeeKey code)."""
        return _TokenPrivateKey(self)

    def _open(self, *, rw: bool = False) -> AbstractContextManager[Session]:
        return _session(self.module_path, self.token_label, self.__pin, rw=rw)

    def _keys(self, session: Session) -> tuple[Any, Any]:
        from pkcs11 import KeyType, ObjectClass
        from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey

        where = f"key {self.key_label!r} on token {self.token_label!r}"
        try:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=self.key_label)
        except NoSuchKey:
            raise KeyFileError(f"no EC private key labelled {self.key_label!r} on token {self.token_label!r}") from None
        except MultipleObjectsReturned:
            raise KeyFileError(
                f"several private keys labelled {self.key_label!r} on token {self.token_label!r}"
            ) from None
        try:
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=self.key_label)
        except NoSuchKey:
            raise KeyFileError(f"{where}: its public key object is missing") from None
        except MultipleObjectsReturned:
            raise KeyFileError(f"{where}: several public keys carry that label") from None
        return private, public

    def _inspect(self, session: Session) -> bytes:
        from pkcs11 import Attribute
        from pkcs11.exceptions import PKCS11Error

        where = f"key {self.key_label!r} on token {self.token_label!r}"
        private, public = self._keys(session)
        try:
            if bytes(public[Attribute.EC_PARAMS]) != SECP256K1_EC_PARAMS:
                raise KeyFileError(f"{where} is not a secp256k1 key")
            if private.id and public.id and bytes(private.id) != bytes(public.id):
                raise KeyFileError(f"{where}: its public and private key objects have different ids")
            for attr, wanted in _REQUIRED_PRIVATE_FLAGS.items():
                if bool(private[getattr(Attribute, attr)]) is not wanted:
                    raise KeyFileError(f"{where} has CKA_{attr}={not wanted}: refused (keys must never leave a token)")
            return _compressed(public[Attribute.EC_POINT])
        except PKCS11Error as exc:
            raise KeyFileError(f"{where}: cannot read its attributes ({type(exc).__name__})") from None
        except ValueError:
            raise KeyFileError(f"{where}: its public key is not a secp256k1 point") from None

    def sign_digest(self, digest: bytes) -> bytes:
        """DER, low-S ECDSA (CKM_ECDSA on the token) of a 32-byte digest, checked with coincurve.

        Raises InputError (not 32 bytes), KeyFileError (token failure, or a signature that
        does not verify against the key's public key).
        """
        from pkcs11 import Mechanism

        check_digest(digest)
        with self._open() as session:
            private, _ = self._keys(session)
            raw = bytes(private.sign(bytes(digest), mechanism=Mechanism.ECDSA))
        try:
            der = der_from_raw(raw)
        except InputError as exc:
            raise KeyFileError(f"token {self.token_label!r} returned a malformed signature: {exc}") from None
        if not coincurve.PublicKey(self._public_key).verify(der, bytes(digest), hasher=None):
            raise KeyFileError(f"token {self.token_label!r} returned a signature that does not verify")
        return der


def generate_token_key(
    module_path: str, token_label: str, key_label: str, pin: str, *, name: str | None = None
) -> Pkcs11Signer:
    """Generate a secp256k1 key pair on the token, labelled ``key_label``; return its signer.

    The private key is a token object (CKA_TOKEN), private, sensitive, not extractable and
    for signing only. Raises Conflict when an object with that label exists on the token
    (never overwritten), KeyFileError when the token fails or cannot make secp256k1 keys,
    InputError for an empty label or PIN.
    """
    pkcs11 = _pkcs11()
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag

    if not key_label:
        raise InputError("a token key needs a label")
    key_id = secrets.token_bytes(16)
    with _session(module_path, token_label, pin, rw=True) as session:
        if next(iter(session.get_objects({Attribute.LABEL: key_label})), None) is not None:
            raise Conflict(f"token {token_label!r} holds an object labelled {key_label!r} already; never overwritten")
        common = {Attribute.TOKEN: True, Attribute.LABEL: key_label, Attribute.ID: key_id}
        try:
            session.generate_keypair(
                KeyType.EC,
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                store=True,
                public_template={
                    **common,
                    Attribute.EC_PARAMS: SECP256K1_EC_PARAMS,
                    Attribute.VERIFY: True,
                    Attribute.ENCRYPT: False,
                    Attribute.WRAP: False,
                },
                private_template={
                    **common,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                },
            )
        except (pkcs11.exceptions.MechanismInvalid, pkcs11.exceptions.DomainParamsInvalid) as exc:
            raise KeyFileError(
                f"token {token_label!r} cannot generate secp256k1 EC keys ({type(exc).__name__})"
            ) from None
    return Pkcs11Signer(module_path, token_label, key_label, pin, name=name)
