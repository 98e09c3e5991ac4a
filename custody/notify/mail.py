"""The system's PGP key (GnuPG through python-gnupg) and PGP/MIME mail (RFC 3156).

The key lives in a GnuPG home under the custody home (``CUSTODY_GNUPGHOME``, default
``HOME/gnupg``); its private half never leaves that directory. Messages are signed as
``multipart/signed`` (RFC 3156 section 5) over the exact bytes of the signed part, and, for
a recipient who registered a public key, that whole signed entity is then encrypted as
``multipart/encrypted`` (sign, then encrypt: section 6.1).
"""

from __future__ import annotations

import email.charset
import email.policy
import email.utils
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from custody.errors import Conflict, CustodyError, InputError, KeyFileError, NotFound

CRLF = b"\r\n"
# python-gnupg reports the hash of a signature as its OpenPGP number (RFC 4880 9.4).
_MICALG = {"2": "pgp-sha1", "8": "pgp-sha256", "9": "pgp-sha384", "10": "pgp-sha512", "11": "pgp-sha224"}


class GnuPGMissing(CustodyError):
    """GnuPG (the ``gpg`` program) is not installed: run scripts/install-gnupg.sh."""


def _gpg(home: Path) -> Any:
    """A python-gnupg handle on ``home`` (created 0700 when missing)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)  # GnuPG refuses, or warns about, a home others can read
    if shutil.which("gpg") is None:
        raise GnuPGMissing("GnuPG is not installed (the `gpg` program): run scripts/install-gnupg.sh")
    try:
        import gnupg  # here: a command that sends no mail does not load it

        return gnupg.GPG(gnupghome=str(home))
    except (OSError, ValueError) as exc:
        raise GnuPGMissing(f"GnuPG cannot run: {exc}") from None


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent GnuPG started for ``home`` (no error when none runs)."""
    if shutil.which("gpgconf") is None:
        return
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30, check=False)


@dataclass(frozen=True)
class SystemKey:
    """The system's signing key: its fingerprint and user id."""

    fingerprint: str
    uid: str

    @property
    def email(self) -> str | None:
        return email.utils.parseaddr(self.uid)[1] or None


def system_key(home: Path) -> SystemKey:
    """The one secret key in the GnuPG home.

    Raises NotFound when there is none (``custody notify key init``), Conflict when there
    are several, GnuPGMissing.
    """
    if not home.exists():
        raise NotFound(f"no system PGP key: no GnuPG home at {home} (run `custody notify key init`)")
    keys = _gpg(home).list_keys(secret=True)
    if not keys:
        raise NotFound(f"no system PGP key in {home} (run `custody notify key init`)")
    if len(keys) > 1:
        raise Conflict(f"{len(keys)} secret keys in {home}: the system key must be the only one")
    uids = keys[0].get("uids") or [""]
    return SystemKey(str(keys[0]["fingerprint"]), str(uids[0]))


def init_key(home: Path, uid: str, passphrase: str | None) -> SystemKey:
    """Generate the system key (Ed25519 signing, Curve25519 encryption subkey, no expiry).

    ``passphrase`` None means an unprotected key (tests, or a home on an encrypted disk).
    Raises Conflict when a secret key exists already (never replaced), InputError for a
    bad user id, GnuPGMissing, CustodyError when GnuPG fails.
    """
    name, address = email.utils.parseaddr(uid)
    if not address or "@" not in address or any(c in uid for c in "\r\n"):
        raise InputError(f"the key's user id must be 'Name <address@domain>', not {uid!r}")
    gpg = _gpg(home)
    if gpg.list_keys(secret=True):
        raise Conflict(f"a system PGP key exists already in {home}; it is never replaced")
    params: dict[str, Any] = {
        "key_type": "EDDSA",
        "key_curve": "ed25519",
        "key_usage": "sign",
        "subkey_type": "ECDH",
        "subkey_curve": "cv25519",
        "subkey_usage": "encrypt",
        "name_real": name or "custody",
        "name_email": address,
        "expire_date": 0,
    }
    if passphrase is None:
        params["no_protection"] = True
    else:
        params["passphrase"] = passphrase
    result = gpg.gen_key(gpg.gen_key_input(**params))
    if not getattr(result, "fingerprint", None):
        raise CustodyError(f"GnuPG could not generate the key: {_status(result)}")
    return system_key(home)


def export_public_key(home: Path) -> str:
    """The system key's public half, ASCII-armored, for publication.

    Raises NotFound, Conflict, GnuPGMissing.
    """
    key = system_key(home)
    armored = str(_gpg(home).export_keys(key.fingerprint, armor=True))
    if "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        raise CustodyError("GnuPG did not export the public key")
    return armored


@contextmanager
def _scratch_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="custody-gpg-") as tmp:
        home = Path(tmp)
        try:
            yield home
        finally:
            stop_agent(home)


@dataclass(frozen=True)
class PublicKey:
    fingerprint: str
    uids: list[str]
    armored: str
    can_encrypt: bool


def inspect_public_key(armored: str) -> PublicKey:
    """Read exactly one OpenPGP public key (in a scratch GnuPG home, nothing kept).

    Raises InputError for a private key, no key, several keys, or one that cannot encrypt.
    """
    if "PRIVATE KEY BLOCK" in armored:
        raise InputError("this file holds a private key: give the recipient's public key only")
    with _scratch_home() as home:
        gpg = _gpg(home)
        result = gpg.import_keys(armored)
        if gpg.list_keys(secret=True):
            raise InputError("this file holds a private key: give the recipient's public key only")
        keys = gpg.list_keys()
        if len(keys) != 1:
            raise InputError(f"expected exactly one OpenPGP public key, found {len(keys)} ({_status(result)})")
        key = keys[0]
        capabilities = str(key.get("cap", ""))
        fingerprint = str(key["fingerprint"])
        exported = str(gpg.export_keys(fingerprint, armor=True))
    pub = PublicKey(fingerprint, [str(u) for u in key.get("uids", [])], exported, "E" in capabilities)
    if not pub.can_encrypt:
        raise InputError(f"key {fingerprint} cannot encrypt (no usable encryption subkey, or expired or revoked)")
    return pub


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Mail:
    """One notification mail to one recipient."""

    sender: str
    to: str
    subject: str
    body: str
    message_id: str
    encrypt_to: str | None = None  # the recipient's key fingerprint
    encrypt_key: str | None = field(default=None, repr=False)  # its armored public key
    hidden_subject: str = "custody notification"


def _text_part(body: str) -> bytes:
    """The signed part: text/plain in UTF-8, quoted-printable (7 bit, as RFC 3156 asks)."""
    charset = email.charset.Charset("utf-8")
    charset.body_encoding = email.charset.QP
    part = MIMEText(body, "plain", charset)  # type: ignore[arg-type]  # typeshed wants str; Charset works
    del part["MIME-Version"]
    data: bytes = part.as_bytes(policy=email.policy.SMTP)
    return data.rstrip(CRLF) + CRLF


def _boundary() -> str:
    return "=_custody_" + secrets.token_hex(12)


def _header(name: str, value: str) -> bytes:
    """One header line, folded, non-ASCII as RFC 2047 encoded words, CRLF-terminated."""
    policy = email.policy.SMTP
    folded: str = policy.header_factory(name, value).fold(policy=policy)
    return folded.encode("ascii")


def sign_entity(home: Path, key: SystemKey, passphrase: str | None, entity: bytes) -> bytes:
    """``multipart/signed`` over ``entity`` (a MIME part with CRLF line ends), as a MIME part.

    Raises KeyFileError when GnuPG cannot sign (wrong or missing passphrase), GnuPGMissing.
    """
    gpg = _gpg(home)
    # Always loopback pinentry: unattended delivery must fail at once on a protected key
    # without its passphrase, never wait on a pinentry dialog. No passphrase means None, not
    # "": python-gnupg would still pass --passphrase-fd 0 and gpg would read the data's first
    # line as the passphrase.
    extra = ["--digest-algo", "SHA256", "--pinentry-mode", "loopback"]
    sig = gpg.sign(entity, keyid=key.fingerprint, detach=True, passphrase=passphrase or None, extra_args=extra)
    armored = str(sig)
    if not armored.startswith("-----BEGIN PGP SIGNATURE-----"):
        raise KeyFileError(
            f"GnuPG could not sign with the system key ({_status(sig)}): check CUSTODY_NOTIFY_PASSPHRASE"
            " or CUSTODY_NOTIFY_PASSPHRASE_FILE"
        )
    micalg = _MICALG.get(str(getattr(sig, "hash_algo", "8")), "pgp-sha256")
    boundary = _boundary()
    sig_lines = armored.replace("\r\n", "\n").strip("\n").split("\n")
    return b"".join(
        [
            _header(
                "Content-Type",
                f'multipart/signed; micalg="{micalg}"; protocol="application/pgp-signature"; boundary="{boundary}"',
            ),
            CRLF,
            b"This is an OpenPGP/MIME signed message (RFC 3156).",
            CRLF,
            f"--{boundary}".encode(),
            CRLF,
            entity,
            CRLF,
            f"--{boundary}".encode(),
            CRLF,
            _header("Content-Type", 'application/pgp-signature; name="signature.asc"'),
            _header("Content-Description", "OpenPGP digital signature"),
            _header("Content-Disposition", 'attachment; filename="signature.asc"'),
            CRLF,
            CRLF.join(line.encode("ascii") for line in sig_lines),
            CRLF,
            f"--{boundary}--".encode(),
            CRLF,
        ]
    )


def encrypt_entity(home: Path, fingerprint: str, public_key: str, entity: bytes) -> bytes:
    """``multipart/encrypted`` of ``entity`` to the recipient's pinned key, as a MIME part.

    The key is trusted because its fingerprint was pinned when the recipient was added.
    Raises CustodyError when GnuPG cannot encrypt.
    """
    gpg = _gpg(home)
    gpg.import_keys(public_key)
    result = gpg.encrypt(entity, [fingerprint], armor=True, always_trust=True)
    armored = str(result)
    if not getattr(result, "ok", False) or "BEGIN PGP MESSAGE" not in armored:
        raise CustodyError(f"GnuPG could not encrypt to {fingerprint}: {_status(result)}")
    boundary = _boundary()
    lines = armored.replace("\r\n", "\n").strip("\n").split("\n")
    return b"".join(
        [
            _header(
                "Content-Type",
                f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"',
            ),
            CRLF,
            b"This is an OpenPGP/MIME encrypted message (RFC 3156).",
            CRLF,
            f"--{boundary}".encode(),
            CRLF,
            _header("Content-Type", "application/pgp-encrypted"),
            _header("Content-Description", "PGP/MIME version identification"),
            CRLF,
            b"Version: 1",
            CRLF,
            CRLF,
            f"--{boundary}".encode(),
            CRLF,
            _header("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
            _header("Content-Description", "OpenPGP encrypted message"),
            _header("Content-Disposition", 'inline; filename="encrypted.asc"'),
            CRLF,
            CRLF.join(line.encode("ascii") for line in lines),
            CRLF,
            f"--{boundary}--".encode(),
            CRLF,
        ]
    )


def build_mail(home: Path, key: SystemKey, passphrase: str | None, mail: Mail) -> bytes:
    """The whole message (headers and body, CRLF line ends), signed and maybe encrypted.

    An encrypted mail's visible Subject is ``hidden_subject``; the real one is inside.
    Raises KeyFileError, GnuPGMissing, CustodyError.
    """
    signed = sign_entity(home, key, passphrase, _text_part(mail.body))
    subject = mail.subject
    if mail.encrypt_to and mail.encrypt_key:
        signed = encrypt_entity(home, mail.encrypt_to, mail.encrypt_key, signed)
        subject = mail.hidden_subject
    headers = b"".join(
        [
            _header("From", mail.sender),
            _header("To", mail.to),
            _header("Subject", subject),
            _header("Date", email.utils.formatdate(usegmt=True)),
            _header("Message-ID", mail.message_id),
            _header("MIME-Version", "1.0"),
            _header("Auto-Submitted", "auto-generated"),
        ]
    )
    return headers + signed


def _status(result: Any) -> str:
    text = str(getattr(result, "status", "") or "").strip()
    stderr = str(getattr(result, "stderr", "") or "")
    said = [line.strip() for line in stderr.splitlines() if line.strip() and "[GNUPG:]" not in line]
    if said:  # gpg's last word is its reason
        text = f"{text}; {said[-1]}" if text else said[-1]
    return text or "no details"
