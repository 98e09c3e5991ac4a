"""Employee keys on a PKCS#11 token, against a real SoftHSM2 token (Debian's softhsm2).

The session fixture makes a token of its own in a temporary directory (its own
softhsm2.conf and token directory) with ``softhsm2-util --init-token``. SoftHSM2 comes
from ``scripts/install-softhsm.sh``, which the test command runs; the fixture runs it too
and skips, saying why, only when SoftHSM2 cannot be installed on this machine.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import coincurve
import pkcs11
import pytest
from coincurve.ecdsa import cdata_to_der, der_to_cdata, deserialize_compact, serialize_compact
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from custody.bitcoin.bech32 import encode_segwit
from custody.chain.embedded import open_chain
from custody.chain.kernel import COINBASE_MATURITY
from custody.errors import Conflict, InputError, KeyFileError
from custody.identity.approvals import (
    APPROVAL_DOMAIN,
    Approval,
    RegistryEntry,
    TxSummary,
    check_approvals,
    sign_approval,
)
from custody.identity.employee_keys import (
    SECP256K1_ORDER,
    EmployeeSigner,
    FileSigner,
    Pkcs11Uri,
    der_from_raw,
    parse_pkcs11_uri,
)
from custody.identity.keyfile import EmployeeKey
from custody.identity.pkcs11_keys import SECP256K1_EC_PARAMS, Pkcs11Signer, generate_token_key
from custody.identity.statements import sign_statement, statement_digest, verify_statement
from tests.chain_support import fresh_script
from tests.support import Custody, founders
from tests.withdraw_support import enrol, key_ceremony, sign_and_apply

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "custody"
PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class SoftHsm:
    module: str
    conf: Path

    def uri(self, label: str | None = None) -> str:
        obj = f";object={quote(label, safe='')}" if label is not None else ""
        return f"pkcs11:token={TOKEN}{obj}?module-path={self.module}"

    def session(self, *, rw: bool = False) -> pkcs11.Session:
        return pkcs11.lib(self.module).get_token(token_label=TOKEN).open(user_pin=PIN, rw=rw)


def _softhsm_module() -> str:
    """The module path that scripts/install-softhsm.sh prints, installing SoftHSM2 if needed."""
    script = ROOT / "scripts" / "install-softhsm.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0 or shutil.which("softhsm2-util") is None:
        pytest.skip(f"SoftHSM2 cannot be installed on this machine: {result.stderr.strip()[-500:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A fresh SoftHSM2 token labelled 'custody' (user PIN 1234) in a temporary directory."""
    module = _softhsm_module()
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    with pytest.MonkeyPatch.context() as mp:
        # SoftHSM2 reads its configuration when the module is initialized, which
        # python-pkcs11 does once per process: set it before anything loads the module.
        mp.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            timeout=60,
        )
        hsm = SoftHsm(module, conf)
        pkcs11.lib(module).reinitialize()  # see the new token even if the module was loaded before
        yield hsm


@pytest.fixture
def shop(tmp_path: Path, softhsm: SoftHsm) -> Custody:
    c = Custody(tmp_path / "home")
    c.env["CUSTODY_PKCS11_PIN"] = PIN
    assert c.init(founders()).exit_code == 0
    return c


def _label(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _summary(withdrawal_id: int = 7) -> TxSummary:
    return TxSummary(
        network="regtest",
        withdrawal_id=withdrawal_id,
        txid="11" * 32,
        inputs=((f"{'22' * 32}:0", 150_000), (f"{'33' * 32}:1", 60_000)),
        outputs=(("0014" + "44" * 20, 120_000), ("0020" + "55" * 32, 89_000)),
        fee=1_000,
    )


def _r_s(der: bytes) -> tuple[int, int]:
    """r and s of a DER signature, parsed by libsecp256k1 (strict DER)."""
    compact = serialize_compact(der_to_cdata(der))
    return int.from_bytes(compact[:32], "big"), int.from_bytes(compact[32:], "big")


# ---------------------------------------------------------------- what SoftHSM2 supports


def test_the_token_offers_ec_key_generation_and_raw_ecdsa(softhsm: SoftHsm) -> None:
    mechanisms = pkcs11.lib(softhsm.module).get_token(token_label=TOKEN).slot.get_mechanisms()
    assert Mechanism.EC_KEY_PAIR_GEN in mechanisms
    assert Mechanism.ECDSA in mechanisms


def test_our_curve_parameters_are_the_named_curve_secp256k1() -> None:
    # asn1crypto (through python-pkcs11) encodes the OID 1.3.132.0.10 independently.
    assert SECP256K1_EC_PARAMS == encode_named_curve_parameters("secp256k1")
    assert SECP256K1_EC_PARAMS == encode_named_curve_parameters("1.3.132.0.10")


def test_keygen_makes_a_secp256k1_key_on_the_token_that_never_leaves_it(softhsm: SoftHsm) -> None:
    label = _label("gen")
    signer = generate_token_key(softhsm.module, TOKEN, label, PIN)
    assert isinstance(signer, EmployeeSigner)
    assert signer.name == label and len(signer.public_key) == 33 and signer.public_key[0] in (2, 3)
    with softhsm.session() as s:
        private = s.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label)
        public = s.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=label)
        assert private[Attribute.EC_PARAMS] == public[Attribute.EC_PARAMS] == SECP256K1_EC_PARAMS
        assert private[Attribute.LOCAL] is True  # generated on the token, not imported
        assert private[Attribute.KEY_GEN_MECHANISM] == Mechanism.EC_KEY_PAIR_GEN
        assert private[Attribute.TOKEN] is True and private[Attribute.PRIVATE] is True
        assert private[Attribute.SENSITIVE] is True and private[Attribute.ALWAYS_SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False and private[Attribute.NEVER_EXTRACTABLE] is True
        # The public key the token holds is the one we register.
        point = bytes(public[Attribute.EC_POINT])
        assert coincurve.PublicKey(point[2:]).format(compressed=True) == signer.public_key


def test_the_private_key_cannot_be_read_or_made_extractable(softhsm: SoftHsm) -> None:
    label = _label("leak")
    generate_token_key(softhsm.module, TOKEN, label, PIN)
    with softhsm.session(rw=True) as s:
        private = s.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label)
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            private[Attribute.EXTRACTABLE] = True
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            private[Attribute.SENSITIVE] = False
        assert private[Attribute.EXTRACTABLE] is False and private[Attribute.SENSITIVE] is True


def test_keygen_never_overwrites_a_label(softhsm: SoftHsm) -> None:
    label = _label("twice")
    first = generate_token_key(softhsm.module, TOKEN, label, PIN)
    with pytest.raises(Conflict, match="never overwritten"):
        generate_token_key(softhsm.module, TOKEN, label, PIN)
    assert Pkcs11Signer(softhsm.module, TOKEN, label, PIN).public_key == first.public_key


# ---------------------------------------------------------------- signatures


def test_token_signatures_are_low_s_strict_der_and_verify_with_coincurve(softhsm: SoftHsm) -> None:
    signer = generate_token_key(softhsm.module, TOKEN, _label("sig"), PIN)
    public = coincurve.PublicKey(signer.public_key)
    for i in range(24):
        digest = hashlib.sha256(f"statement {i}".encode()).digest()
        der = signer.sign_digest(digest)
        r, s = _r_s(der)
        assert 0 < r < SECP256K1_ORDER and 0 < s <= SECP256K1_ORDER // 2
        # Canonical: libsecp256k1 re-encodes it to the same bytes.
        assert bytes(cdata_to_der(der_to_cdata(der))) == der
        assert public.verify(der, digest, hasher=None)


def test_the_token_returns_high_s_half_the_time_and_we_normalize_it(softhsm: SoftHsm) -> None:
    signer = generate_token_key(softhsm.module, TOKEN, (label := _label("raw")), PIN)
    public = coincurve.PublicKey(signer.public_key)
    high = 0
    with softhsm.session() as s:
        private: Any = s.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label)
        for i in range(32):
            digest = hashlib.sha256(f"raw {i}".encode()).digest()
            raw = bytes(private.sign(digest, mechanism=Mechanism.ECDSA))
            assert len(raw) == 64
            s_raw = int.from_bytes(raw[32:], "big")
            high += s_raw > SECP256K1_ORDER // 2
            as_is = bytes(cdata_to_der(deserialize_compact(raw)))
            normalized = der_from_raw(raw)
            assert public.verify(normalized, digest, hasher=None)
            if s_raw > SECP256K1_ORDER // 2:
                # libsecp256k1 refuses the high-S form of the very same signature.
                assert not public.verify(as_is, digest, hasher=None)
            else:
                assert normalized == as_is
    assert high > 0, "32 raw signatures without one high S: normalization went untested"


def test_der_from_raw_matches_libsecp256k1_for_low_and_high_s() -> None:
    for i in range(64):
        key = coincurve.PrivateKey(hashlib.sha256(f"k{i}".encode()).digest())
        digest = hashlib.sha256(f"m{i}".encode()).digest()
        reference = bytes(key.sign(digest, hasher=None))  # libsecp256k1: low S, strict DER
        r, s = _r_s(reference)
        low = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        high = r.to_bytes(32, "big") + (SECP256K1_ORDER - s).to_bytes(32, "big")
        assert der_from_raw(low) == reference
        assert der_from_raw(high) == reference


@pytest.mark.parametrize(
    "raw",
    [b"\x01" * 63, b"\x00" * 32 + b"\x01" * 32, b"\x01" * 32 + SECP256K1_ORDER.to_bytes(32, "big")],
)
def test_der_from_raw_refuses_malformed_signatures(raw: bytes) -> None:
    with pytest.raises(InputError):
        der_from_raw(raw)


def test_sign_statement_takes_token_signers_file_signers_and_private_keys(softhsm: SoftHsm) -> None:
    token = generate_token_key(softhsm.module, TOKEN, _label("stmt"), PIN)
    file_key = FileSigner(EmployeeKey("alice", coincurve.PrivateKey(hashlib.sha256(b"alice").digest())))
    for signer in (token, file_key):
        for key in (signer, signer.private_key):  # private_key: the EmployeeKey shape halt/withdrawals use
            sig = sign_statement(key, "custody/test/v1", ["halt", 1])
            assert verify_statement(signer.public_key.hex(), sig, "custody/test/v1", ["halt", 1])
            assert not verify_statement(signer.public_key.hex(), sig, "custody/test/v1", ["halt", 2])
    digest = statement_digest("custody/test/v1", ["x"])
    assert file_key.sign_digest(digest) == bytes(file_key.private_key.sign(digest, hasher=None))
    with pytest.raises(InputError, match="32-byte"):
        token.sign_digest(b"short")
    with pytest.raises(InputError, match="digests only"):
        token.private_key.sign(digest, hasher=hashlib.sha256)  # type: ignore[arg-type]


def test_token_approvals_of_a_withdrawal_verify_and_bind_the_transaction(softhsm: SoftHsm) -> None:
    token = generate_token_key(softhsm.module, TOKEN, _label("approver"), PIN, name="tina")
    file_key = FileSigner(EmployeeKey("alice", coincurve.PrivateKey(hashlib.sha256(b"alice2").digest())))
    summary = _summary()
    approvals = [
        Approval("tina", token.public_key.hex(), sign_approval(token, summary)),
        Approval("alice", file_key.public_key.hex(), sign_approval(file_key, summary)),
    ]
    registry = {
        "tina": RegistryEntry("tina", (token.public_key.hex(),)),
        "alice": RegistryEntry("alice", (file_key.public_key.hex(),)),
    }
    check = check_approvals(summary, approvals, registry, requester="rita")
    assert check.enough and check.valid == ("alice", "tina"), check.explain()
    assert verify_statement(token.public_key.hex(), approvals[0].signature, APPROVAL_DOMAIN, summary.fields())
    # Any change to the transaction voids the token's approval too.
    other = check_approvals(_summary(withdrawal_id=8), approvals, registry, requester="rita")
    assert other.valid == () and {name for name, _ in other.rejected} == {"tina", "alice"}
    # A token key that is not the registered one does not count.
    stranger = generate_token_key(softhsm.module, TOKEN, _label("stranger"), PIN)
    forged = Approval("tina", stranger.public_key.hex(), sign_approval(stranger, summary))
    assert check_approvals(summary, [forged], registry, requester="rita").valid == ()


# ---------------------------------------------------------------- refusals


def test_a_wrong_pin_is_a_key_error(softhsm: SoftHsm) -> None:
    label = _label("pin")
    generate_token_key(softhsm.module, TOKEN, label, PIN)
    with pytest.raises(KeyFileError, match="wrong PIN") as info:
        Pkcs11Signer(softhsm.module, TOKEN, label, "9999")
    assert info.value.exit_code == 7


def test_missing_module_token_or_key_are_key_errors(softhsm: SoftHsm, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot load the PKCS#11 module"):
        Pkcs11Signer(str(tmp_path / "missing.so"), TOKEN, "x", PIN)
    with pytest.raises(KeyFileError, match="no token labelled 'elsewhere'"):
        Pkcs11Signer(softhsm.module, "elsewhere", "x", PIN)
    with pytest.raises(KeyFileError, match="no EC private key labelled 'nobody'"):
        Pkcs11Signer(softhsm.module, TOKEN, "nobody", PIN)


def test_a_key_of_another_curve_is_refused(softhsm: SoftHsm) -> None:
    label = _label("p256")
    with softhsm.session(rw=True) as s:
        s.generate_keypair(
            KeyType.EC,
            store=True,
            label=label,
            public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    with pytest.raises(KeyFileError, match="not a secp256k1 key"):
        Pkcs11Signer(softhsm.module, TOKEN, label, PIN)


def test_an_imported_or_extractable_key_is_refused(softhsm: SoftHsm) -> None:
    """A key whose secret was ever outside the token is not an employee key on a token."""
    label = _label("imported")
    secret = coincurve.PrivateKey()
    point = secret.public_key.format(compressed=False)
    with softhsm.session(rw=True) as s:
        common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.KEY_TYPE: KeyType.EC}
        s.create_object(
            {
                **common,
                Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                Attribute.EC_PARAMS: SECP256K1_EC_PARAMS,
                Attribute.VALUE: secret.secret,
                Attribute.SIGN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            }
        )
        s.create_object(
            {
                **common,
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.EC_PARAMS: SECP256K1_EC_PARAMS,
                Attribute.EC_POINT: bytes([0x04, len(point)]) + point,
                Attribute.VERIFY: True,
            }
        )
    with pytest.raises(KeyFileError, match="CKA_ALWAYS_SENSITIVE=False: refused"):
        Pkcs11Signer(softhsm.module, TOKEN, label, PIN)


def test_a_key_generated_extractable_is_refused(softhsm: SoftHsm) -> None:
    label = _label("extractable")
    with softhsm.session(rw=True) as s:
        s.generate_keypair(
            KeyType.EC,
            store=True,
            label=label,
            public_template={Attribute.EC_PARAMS: SECP256K1_EC_PARAMS},
            private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(KeyFileError, match="CKA_SENSITIVE=False: refused"):
        Pkcs11Signer(softhsm.module, TOKEN, label, PIN)


# ---------------------------------------------------------------- pkcs11: URIs


def test_uri_parsing() -> None:
    module = "/usr/lib/softhsm/libsofthsm2.so"
    assert parse_pkcs11_uri(f"pkcs11:token=custody;object=alice?module-path={module}") == Pkcs11Uri(
        "custody", "alice", module
    )
    assert parse_pkcs11_uri(f"PKCS11:object=a%20b;token=My%3BToken;type=private?module-path={module}") == Pkcs11Uri(
        "My;Token", "a b", module
    )
    assert parse_pkcs11_uri(f"pkcs11:token=custody?module-path={module}").object is None
    uri = Pkcs11Uri("My;Token", "a b", module)
    assert parse_pkcs11_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("pkcs11:object=a?module-path=/m.so", "token=LABEL is required"),
        ("pkcs11:token=t;object=a", "module-path"),
        ("pkcs11:token=t;object=a?module-path=m.so", "absolute"),
        ("pkcs11:token=t;object=a?module-path=/m.so&pin-value=1234", "PIN never goes in the URI"),
        ("pkcs11:token=t;object=a;pin-source=file:/p?module-path=/m.so", "PIN never goes in the URI"),
        ("pkcs11:token=t;id=%01?module-path=/m.so", "unsupported path attribute 'id'"),
        ("pkcs11:token=t;token=u?module-path=/m.so", "given twice"),
        ("pkcs11:token=t;type=public?module-path=/m.so", "type must be 'private'"),
        ("pkcs11:token=t;object=?module-path=/m.so", "object= is empty"),
        ("pkcs11:token?module-path=/m.so", "not name=value"),
    ],
)
def test_bad_uris_are_refused(text: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        parse_pkcs11_uri(text)


# ---------------------------------------------------------------- the CLI, in process


def test_cli_token_employee_raises_and_lifts_a_halt_with_a_file_employee(
    shop: Custody, softhsm: SoftHsm, tmp_path: Path
) -> None:
    c = shop
    label = _label("tina")
    made = c.json("employee", "keygen", "tina", "--pkcs11", softhsm.uri(label))
    assert made["proposed_roster"] == 1 and parse_pkcs11_uri(made["uri"]).object == label
    c.apply_roster()  # the founders sign tina in
    listed = {e["name"]: e["keys"][0] for e in c.json("employee", "list")}
    assert listed["tina"] == made["pubkey"] == Pkcs11Signer(softhsm.module, TOKEN, label, PIN).public_key.hex()
    alice = c.employee("alice")

    raised = c("halt", "raise", "--reason", "token test", "--as", "tina", "--key", softhsm.uri(label), "--json")
    assert raised.exit_code == 0, raised.output
    halt_id = json.loads(raised.stdout)["halt_id"]
    assert c("halt", "status").exit_code == 3

    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n", encoding="utf-8")
    c.env.pop("CUSTODY_PKCS11_PIN")
    first = c.json(
        "halt", "lift", str(halt_id), "--as", "tina", "--key", softhsm.uri(label), "--pin-file", str(pin_file)
    )
    assert first == {"halt_id": halt_id, "signers": ["tina"], "lifted": False, "needed": 2}
    second = c.json("halt", "lift", str(halt_id), "--as", "alice", "--key", str(alice))
    assert second["lifted"] is True and sorted(second["signers"]) == ["alice", "tina"]
    assert c("halt", "status").exit_code == 0


def test_cli_prompts_for_the_pin(shop: Custody, softhsm: SoftHsm) -> None:
    c = shop
    label = _label("prompt")
    c.env.pop("CUSTODY_PKCS11_PIN")
    made = c("employee", "keygen", "pat", "--pkcs11", softhsm.uri(label), input=PIN + "\n")
    assert made.exit_code == 0, made.output
    assert "User PIN of the token custody" in made.stderr
    c.apply_roster()
    raised = c("halt", "raise", "--reason", "r", "--as", "pat", "--key", softhsm.uri(label), input=PIN + "\n")
    assert raised.exit_code == 0, raised.output


def test_cli_wrong_pin_is_exit_7(shop: Custody, softhsm: SoftHsm, tmp_path: Path) -> None:
    c = shop
    label = _label("wrongpin")
    assert c("employee", "keygen", "wes", "--pkcs11", softhsm.uri(label)).exit_code == 0
    c.apply_roster()
    c.env["CUSTODY_PKCS11_PIN"] = "0000"
    refused = c("halt", "raise", "--reason", "r", "--as", "wes", "--key", softhsm.uri(label))
    assert refused.exit_code == 7 and "wrong PIN for token 'custody'" in refused.stderr
    pin_file = tmp_path / "bad-pin"
    pin_file.write_text("4321\n", encoding="utf-8")
    refused = c(
        "halt", "raise", "--reason", "r", "--as", "wes", "--key", softhsm.uri(label), "--pin-file", str(pin_file)
    )
    assert refused.exit_code == 7 and "wrong PIN" in refused.stderr
    assert c("halt", "status").exit_code == 0
    refused = c("employee", "keygen", "wes2", "--pkcs11", softhsm.uri(_label("wrongpin")))
    assert refused.exit_code == 7 and "wrong PIN" in refused.stderr


def test_cli_refusals(shop: Custody, softhsm: SoftHsm, tmp_path: Path) -> None:
    c = shop
    label = _label("ref")
    assert c("employee", "keygen", "rob", "--pkcs11", softhsm.uri(label)).exit_code == 0
    alice = c.employee("alice")
    secret_file = tmp_path / "secret"
    secret_file.write_text("1234\n", encoding="utf-8")
    cases = [
        # another employee's token key: an approval rule (4)
        (["--as", "alice", "--key", softhsm.uri(label)], 4, "not one of alice's keys"),
        # the key label is taken: never overwritten (6)
        (None, 6, "never overwritten"),
        # options of the other kind of key (2)
        (["--as", "rob", "--key", softhsm.uri(label), "--passphrase-file", str(secret_file)], 2, "--pin-file"),
        (["--as", "alice", "--key", str(alice), "--pin-file", str(secret_file)], 2, "--passphrase-file"),
        # URIs that cannot name a key (2)
        (["--as", "rob", "--key", softhsm.uri(None)], 2, "object=LABEL"),
        (["--as", "rob", "--key", f"pkcs11:token={TOKEN};object={label}"], 2, "module-path"),
        (["--as", "rob", "--key", f"{softhsm.uri(label)}&pin-value={PIN}"], 2, "PIN never goes in the URI"),
        # no such key on the token (7)
        (["--as", "rob", "--key", softhsm.uri("nobody")], 7, "no EC private key labelled 'nobody'"),
    ]
    for args, code, text in cases:
        if args is None:
            result = c("employee", "keygen", "rob2", "--pkcs11", softhsm.uri(label))
        else:
            result = c("halt", "raise", "--reason", "r", *args)
        assert result.exit_code == code and text in result.stderr, (args, result.exit_code, result.output)
    both = c("employee", "keygen", "x", "--out", str(tmp_path / "x.key"), "--pkcs11", softhsm.uri("x"))
    assert both.exit_code == 2 and "exactly one of --out" in both.stderr
    assert c("employee", "keygen", "y").exit_code == 2
    assert c("halt", "status").exit_code == 0


def test_cli_token_employees_through_the_whole_withdrawal_flow(tmp_path: Path, softhsm: SoftHsm) -> None:
    """custody/withdrawals.py, unchanged, with token keys: request, approve, the offline
    signer's approval check, cancel and the daily batch (embedded chain, no node)."""
    c = Custody(tmp_path / "home")
    c.env.update(CUSTODY_CHAIN="embedded", CUSTODY_PKCS11_PIN=PIN)
    chain = open_chain(tmp_path / "home" / "chain")  # the one the CLI opens too
    try:
        keys = key_ceremony(c, tmp_path, "p2wsh")
        alice = ["--as", "alice", "--key", str(enrol(c, tmp_path, keys, ["alice"])["alice"])]
        tokens = {name: _label(name) for name in ("tom", "tia")}
        for name, label in tokens.items():
            assert c("employee", "keygen", name, "--pkcs11", softhsm.uri(label)).exit_code == 0
        sign_and_apply(c, tmp_path, keys)
        tom, tia = (["--as", n, "--key", softhsm.uri(tokens[n])] for n in ("tom", "tia"))
        for _ in range(3):
            (issued,) = c.json("address", "new", "--account", "acct")
            chain.mine(1, bytes.fromhex(issued["script_pubkey"]))
        chain.mine(COINBASE_MATURITY, b"\x51")
        c.json("sync")
        spk = fresh_script()
        to = encode_segwit("bcrt", 0, spk[2:])

        def request(amount: str, who: list[str]) -> str:
            return str(c.json("withdraw", "request", "--account", "acct", "--to", to, "--amount", amount, *who)["id"])

        wid = request("0.01", tom)
        c.json("withdraw", "approve", wid, *tia, "--yes")
        assert c.json("withdraw", "approve", wid, *alice, "--yes")["approvals"]["valid"] == ["alice", "tia"]
        psbt = tmp_path / "w.psbt"
        assert c("withdraw", "export", wid, str(psbt)).exit_code == 0
        for founder in ("founder-a", "founder-b"):
            out = tmp_path / f"{founder}.psbt"
            signed = c("sign", str(psbt), "--key", str(keys[founder]), "--out", str(out), "--yes")
            assert signed.exit_code == 0, signed.output  # it re-checks the token approvals offline
            c.json("withdraw", "import", wid, str(out))
        c.json("withdraw", "finalize", wid)
        assert c.json("withdraw", "broadcast", wid)["status"] == "broadcast"

        cancelled = c.json("withdraw", "cancel", request("0.01", alice), "--reason", "typo", *tom)
        assert cancelled["status"] == "failed" and "cancelled by tom" in cancelled["reason"]

        members = [request("0.01", alice), request("0.02", alice)]
        for member in members:
            c.json("withdraw", "approve", member, *tia, "--yes")
            c.json("withdraw", "approve", member, *tom, "--yes")
        batch = c.json("withdraw", "batch", *tom)
        assert batch["withdrawal_kind"] == "batch" and sorted(map(str, batch["members"])) == sorted(members)
        assert batch["approvals"]["valid"] == ["tia", "tom"]
    finally:
        chain.close()
