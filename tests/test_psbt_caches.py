"""The PSBT hot paths' shortcuts, attacked: each remembers only what depends on the bytes alone
(a public key is a point or not, a script is an m-of-n multisig or not), within one call, and
every check still fires for the one entry that differs from the entries before it.

Digests are recomputed here from BIP-143's text (not with custody's code); signatures are
checked with coincurve directly.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import struct

import coincurve
import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, CTransaction
from bitcoin.core.script import OP_0, OP_CHECKMULTISIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custody.bitcoin.keys import HARDENED
from custody.bitcoin.network import REGTEST
from custody.bitcoin.psbt import (
    KeyOrigin,
    Psbt,
    PsbtOutput,
    SignatureChecks,
    WitnessUtxo,
    combine,
    finalize,
    maps,
    sign,
    valid_signers,
)
from custody.bitcoin.script import ScriptType, parse_multisig
from custody.errors import InputError
from custody.identity.keyfile import FounderKey
from custody.policy.generator import AddressDeriver
from custody.policy.model import make_policy
from custody.withdraw import signer as signer_lib
from tests.support import founders

KEYS = [coincurve.PrivateKey(hashlib.sha256(f"cache test founder {n}".encode()).digest()) for n in range(3)]
PUBS = [k.public_key.format() for k in KEYS]
SCRIPT = bytes(CScript([2, *sorted(PUBS), 3, OP_CHECKMULTISIG]))
SPK = bytes(CScript([OP_0, hashlib.sha256(SCRIPT).digest()]))


def _sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def _psbt(amounts: list[int], script: bytes = SCRIPT) -> Psbt:
    """Inputs of one p2wsh script (``script``), one per amount, each at its own outpoint."""
    spk = bytes(CScript([OP_0, hashlib.sha256(script).digest()]))
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(bytes([n + 1]) * 32, n), nSequence=0xFFFFFFFD) for n in range(len(amounts))],
        [CMutableTxOut(sum(amounts) - 5_000, CScript(b"\x00\x14" + b"\x33" * 20)), CMutableTxOut(1_000, CScript(spk))],
        0,
        2,
    )
    psbt = Psbt.from_unsigned_tx(tx)
    for n, inp in enumerate(psbt.inputs):
        inp.witness_utxo = WitnessUtxo(amounts[n], spk)
        inp.witness_script = script
        for k, pub in enumerate(PUBS):
            inp.bip32_derivations[pub] = KeyOrigin(bytes([k + 1]) * 4, (48 | HARDENED, 1 | HARDENED, 0, 2, 0, n))
    return psbt


def _bip143(psbt: Psbt, i: int, amount: int) -> bytes:
    """BIP-143's SIGHASH_ALL digest of input ``i``, spending ``amount``, written from the BIP."""
    tx = psbt.tx
    prevouts = b"".join(bytes(t.prevout.hash) + struct.pack("<I", t.prevout.n) for t in tx.vin)
    sequences = b"".join(struct.pack("<I", t.nSequence) for t in tx.vin)
    outputs = b"".join(o.serialize() for o in tx.vout)
    txin = tx.vin[i]
    preimage = (
        struct.pack("<i", tx.nVersion)
        + _sha256d(prevouts)
        + _sha256d(sequences)
        + bytes(txin.prevout.hash)
        + struct.pack("<I", txin.prevout.n)
        + bytes([len(SCRIPT)])
        + SCRIPT
        + struct.pack("<qI", amount, txin.nSequence)
        + _sha256d(outputs)
        + struct.pack("<II", tx.nLockTime, 1)
    )
    return _sha256d(preimage)


def _not_a_point(pub: bytes) -> bytes:
    """``pub`` with its last byte changed until it is no point of the curve (same length and prefix)."""
    for n in range(1, 256):
        candidate = pub[:-1] + bytes([(pub[-1] + n) % 256])
        try:
            coincurve.PublicKey(candidate)
        except ValueError:
            return candidate
    raise AssertionError("no invalid key found")


def _replace_nth(data: bytes, old: bytes, new: bytes, nth: int) -> bytes:
    at = -1
    for _ in range(nth + 1):
        at = data.index(old, at + 1)
    return data[:at] + new + data[at + len(old) :]


# ---------------------------------------------------------------- parse: keys found on the curve once


def test_a_derivation_key_that_differs_on_the_second_input_is_refused() -> None:
    raw = _psbt([50_000, 70_000]).serialize()
    record = b"\x22\x06" + PUBS[0]  # key length 34, type BIP-32 derivation, the key
    assert raw.count(record) == 2
    forged = _replace_nth(raw, record, b"\x22\x06" + _not_a_point(PUBS[0]), 1)
    with pytest.raises(InputError, match=r"^input 1: BIP-32 derivation key holds an invalid public key"):
        Psbt.parse(forged)
    Psbt.parse(raw)  # the untouched PSBT parses


def test_a_partial_signature_key_that_differs_on_the_second_input_is_refused() -> None:
    psbt = _psbt([50_000, 70_000])
    sign(psbt, {PUBS[0]: KEYS[0]})
    raw = psbt.serialize()
    record = b"\x22\x02" + PUBS[0]
    assert raw.count(record) == 2
    forged = _replace_nth(raw, record, b"\x22\x02" + _not_a_point(PUBS[0]), 1)
    with pytest.raises(InputError, match=r"^input 1: partial signature key holds an invalid public key"):
        Psbt.parse(forged)


def test_a_valid_key_of_one_psbt_does_not_vouch_for_the_next_parse() -> None:
    raw = _psbt([50_000]).serialize()
    Psbt.parse(raw)
    forged = _replace_nth(raw, b"\x22\x06" + PUBS[1], b"\x22\x06" + _not_a_point(PUBS[1]), 0)
    with pytest.raises(InputError, match=r"^input 0: BIP-32 derivation key holds an invalid public key"):
        Psbt.parse(forged)


# ---------------------------------------------------------------- sighash and signature checks


def test_two_inputs_of_one_script_and_different_amounts_sign_their_own_amounts() -> None:
    psbt = _psbt([50_000, 70_000])
    sign(psbt, {PUBS[0]: KEYS[0], PUBS[2]: KEYS[2]})
    for i, (own, other) in enumerate([(50_000, 70_000), (70_000, 50_000)]):
        sig = psbt.inputs[i].partial_sigs[PUBS[0]]
        assert KEYS[0].public_key.verify(sig[:-1], _bip143(psbt, i, own), hasher=None)
        assert not KEYS[0].public_key.verify(sig[:-1], _bip143(psbt, i, other), hasher=None)
    finalize(psbt)

    # The online machine rewrites input 1's amount to input 0's (same script, so one byte string
    # differs): input 1's signatures no longer verify, input 0's still do.
    raw = psbt.serialize()
    utxo_70k = b"\x01\x01\x2b" + struct.pack("<q", 70_000)  # key length, type, value length, amount
    assert raw.count(utxo_70k) == 1
    forged = Psbt.parse(raw.replace(utxo_70k, b"\x01\x01\x2b" + struct.pack("<q", 50_000)))
    assert valid_signers(forged) == [{PUBS[0], PUBS[2]}, set()]
    with pytest.raises(InputError, match=r"^input 1: 0 valid signature\(s\).*signature does not verify"):
        finalize(forged)


def test_a_signature_copied_to_another_input_is_not_counted_there() -> None:
    psbt = _psbt([50_000, 50_000])  # the same script and amount: only the outpoint differs
    sign(psbt, {PUBS[0]: KEYS[0], PUBS[2]: KEYS[2]})
    psbt.inputs[1].partial_sigs[PUBS[0]] = psbt.inputs[0].partial_sigs[PUBS[0]]
    assert valid_signers(psbt) == [{PUBS[0], PUBS[2]}, {PUBS[2]}]
    with pytest.raises(InputError, match=r"^input 1: 1 valid signature\(s\)"):
        finalize(psbt)


def test_a_script_key_that_is_no_point_never_verifies_on_any_input() -> None:
    bad = _not_a_point(PUBS[1])
    script = bytes(CScript([2, PUBS[0], bad, PUBS[2], 3, OP_CHECKMULTISIG]))
    psbt = _psbt([50_000, 60_000], script)
    sign(psbt, {PUBS[0]: KEYS[0]})
    for inp in psbt.inputs:  # a signature filed under the bad key: whatever it holds, it cannot count
        inp.partial_sigs[bad] = inp.partial_sigs[PUBS[0]]
    assert valid_signers(psbt) == [{PUBS[0]}, {PUBS[0]}]
    with pytest.raises(InputError, match=r"^input 0: 1 valid signature\(s\).*signature does not verify"):
        finalize(psbt)


# ---------------------------------------------------------------- multisig scripts parsed once


def test_parse_multisig_remembers_valid_scripts_only_and_by_their_whole_bytes() -> None:
    ms = parse_multisig(SCRIPT)
    assert ms.threshold == 2 and ms.pubkeys == tuple(sorted(PUBS))
    assert (
        parse_multisig(CScript(SCRIPT)) == parse_multisig(bytearray(SCRIPT)) == parse_multisig(memoryview(SCRIPT)) == ms
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        ms.threshold = 1  # type: ignore[misc]
    # One byte changed, after the valid script was parsed: refused, every time it is asked.
    four_of_three = bytes([0x54]) + SCRIPT[1:]
    repeated = SCRIPT[:35] + SCRIPT[1:35] + SCRIPT[69:]
    for script, message in [(four_of_three, "threshold 4"), (repeated, "repeats a public key")]:
        for _ in range(2):
            with pytest.raises(InputError, match=message):
                parse_multisig(script)
    assert parse_multisig(SCRIPT) == ms


# ---------------------------------------------------------------- the unsigned transaction's fast reader


def _unsigned(n_in: int, n_out: int, spk_len: int) -> bytes:
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(bytes([n % 256]) * 32, n), nSequence=n) for n in range(n_in)],
        [CMutableTxOut(n, CScript(bytes([n % 256]) * spk_len)) for n in range(n_out)],
        7,
        2,
    )
    return maps._serialize_unsigned_tx(tx)


BASES = [_unsigned(1, 1, 22), _unsigned(2, 300, 34), _unsigned(260, 2, 300), _unsigned(0, 0, 0)]


@st.composite
def _mutated_tx(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] = draw(st.sampled_from([0x00, 0x01, 0xFC, 0xFD, 0xFE, 0xFF, raw[at] ^ 0x80]))
        elif kind == "cut":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif raw:
            del raw[at]
    return bytes(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_tx())
def test_the_fast_reader_accepts_exactly_what_the_checked_reader_accepts(raw: bytes) -> None:
    fast = maps._parse_legacy_tx_fast(raw)
    try:
        checked = maps._parse_legacy_tx_checked(raw)
    except InputError:
        assert fast is None
        return
    if fast is not None:
        assert maps._serialize_unsigned_tx(fast) == maps._serialize_unsigned_tx(checked) == raw
        assert (fast.nVersion, fast.nLockTime) == (checked.nVersion, checked.nLockTime)


def test_the_fast_reader_reads_the_common_sizes_and_leaves_the_rest() -> None:
    for raw in BASES:
        fast, checked = maps._parse_legacy_tx_fast(raw), maps._parse_legacy_tx_checked(raw)
        assert maps._serialize_unsigned_tx(fast) == raw
        # The same objects as python-bitcoinlib's constructors make, attribute by attribute.
        for mine, theirs in [*zip(fast.vin, checked.vin, strict=True), *zip(fast.vout, checked.vout, strict=True)]:
            assert type(mine) is type(theirs) and mine == theirs
            for name in type(theirs).__slots__ or type(theirs).__mro__[1].__slots__:
                assert type(getattr(mine, name)) is type(getattr(theirs, name))
                assert getattr(mine, name) == getattr(theirs, name)
        for mine, theirs in zip(fast.vin, checked.vin, strict=True):
            assert type(mine.prevout) is type(theirs.prevout) and mine.prevout == theirs.prevout
            with pytest.raises(AttributeError):
                mine.prevout.n = 1  # an immutable outpoint, as COutPoint(...) makes it
    non_minimal = BASES[0][:4] + b"\xfd\x01\x00" + BASES[0][5:]  # one input, counted in 3 bytes
    assert maps._parse_legacy_tx_fast(non_minimal) is None
    with pytest.raises(InputError, match="not minimally encoded"):
        maps._parse_unsigned_tx(non_minimal)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (struct.pack("<q", 5) + b"\x01\x51\x51", "witness UTXO has 1 trailing bytes"),  # a 1-byte script, then 1
        (struct.pack("<q", 5) + b"\x03\x51\x51", "truncated PSBT: input 0 witness UTXO script"),
        (struct.pack("<q", -1) + b"\x01\x51", "witness UTXO amount -1 is out of range"),
        (struct.pack("<q", 21_000_000 * 10**8 + 1) + b"\x01\x51", "is out of range"),
        (struct.pack("<q", 5), "truncated PSBT: input 0 witness UTXO"),
    ],
)
def test_a_malformed_witness_utxo_is_refused_as_before(value: bytes, message: str) -> None:
    psbt = _psbt([50_000])
    raw = psbt.serialize()
    good = b"\x01\x01" + bytes([9 + len(SPK)]) + struct.pack("<q", 50_000) + bytes([len(SPK)]) + SPK
    assert raw.count(good) == 1
    with pytest.raises(InputError, match=message):
        Psbt.parse(raw.replace(good, b"\x01\x01" + bytes([len(value)]) + value))


# ---------------------------------------------------------------- combine and serialize: empty outputs


def test_empty_outputs_merge_nothing_and_conflicts_after_them_are_refused() -> None:
    a = _psbt([50_000])
    b = Psbt.parse(a.serialize())
    c = Psbt.parse(a.serialize())
    b.outputs[1].bip32_derivations[PUBS[0]] = KeyOrigin(b"\x01" * 4, (1, 0))
    merged = combine([a, b])
    assert merged.outputs[0] == PsbtOutput() and merged.outputs[1].bip32_derivations == b.outputs[1].bip32_derivations
    assert Psbt.parse(merged.serialize()).outputs == merged.outputs
    c.outputs[1].bip32_derivations[PUBS[0]] = KeyOrigin(b"\x01" * 4, (1, 1))
    with pytest.raises(InputError, match=r"PSBT 2 output 1: conflicting values for BIP-32 derivation"):
        combine([a, b, c])
    c.outputs[1] = PsbtOutput(unknown={b"\x0a": b"\x00"})
    assert combine([a, c]).outputs[1].unknown == {b"\x0a": b"\x00"}


# ---------------------------------------------------------------- combine: every field of an input merged


_CONFLICTS = {
    "witness_utxo": (WitnessUtxo(1, b"\x00\x20" + b"\x01" * 32), WitnessUtxo(2, b"\x00\x20" + b"\x01" * 32)),
    "sighash_type": (1, 3),
    "redeem_script": (b"\x51", b"\x52"),
    "witness_script": (b"\x51", b"\x52"),
    "final_script_sig": (b"\x00", b"\x51"),
    "final_script_witness": ((b"",), (b"\x01",)),
    "partial_sigs": ({PUBS[0]: b"\x30\x01"}, {PUBS[0]: b"\x30\x02"}),
    "bip32_derivations": ({PUBS[0]: KeyOrigin(b"\x01" * 4, (0,))}, {PUBS[0]: KeyOrigin(b"\x01" * 4, (1,))}),
    "proprietary": ({maps.ProprietaryKey(b"x", 0, b""): b"a"}, {maps.ProprietaryKey(b"x", 0, b""): b"b"}),
    "unknown": ({b"\x0a": b"a"}, {b"\x0a": b"b"}),
}


@pytest.mark.parametrize("attr", sorted(_CONFLICTS))
def test_combine_merges_every_input_field_and_refuses_every_conflict(attr: str) -> None:
    """The merge looks only at the fields the other PSBT has: a field left out of it would let a
    second PSBT's differing record pass silently (or its record be dropped)."""
    mine, theirs = _CONFLICTS[attr]
    a, b = Psbt.parse(_psbt([50_000]).serialize()), Psbt.parse(_psbt([50_000]).serialize())
    for p in (a, b):
        for field_name in ("witness_utxo", "witness_script", "bip32_derivations"):
            setattr(p.inputs[0], field_name, None if field_name != "bip32_derivations" else {})
    setattr(b.inputs[0], attr, theirs)
    assert getattr(combine([a, b]).inputs[0], attr) == theirs  # taken from the second when the first lacks it
    setattr(a.inputs[0], attr, mine)
    with pytest.raises(InputError, match=r"PSBT 1 input 0: conflicting values for"):
        combine([a, b])


# ---------------------------------------------------------------- finalize: a new PSBT, the argument untouched


def test_finalize_leaves_its_argument_as_it_was_and_shares_no_map_with_it() -> None:
    psbt = _psbt([50_000, 60_000])
    sign(psbt, {PUBS[0]: KEYS[0], PUBS[1]: KEYS[1]})
    psbt.inputs[1].unknown[b"\x0a"] = b"kept"
    psbt.inputs[1].proprietary[maps.ProprietaryKey(b"custody", 9, b"")] = b"kept too"
    before = psbt.serialize()
    final = finalize(psbt)
    assert psbt.serialize() == before  # the signatures, scripts and derivations are all still there
    assert final.inputs[1].unknown == {b"\x0a": b"kept"}
    assert final.inputs[1].proprietary == {maps.ProprietaryKey(b"custody", 9, b""): b"kept too"}
    assert all(
        not inp.partial_sigs and not inp.bip32_derivations and inp.witness_script is None and inp.final_script_witness
        for inp in final.inputs
    )
    final.inputs[1].unknown[b"\x0b"] = b"added later"
    final.inputs[1].proprietary.clear()
    final.tx.vout[0].nValue = 1
    assert psbt.serialize() == before


# ---------------------------------------------------------------- signature checks shared by valid_signers and finalize


def test_finalize_answers_from_valid_signers_checks_only_for_the_same_bytes() -> None:
    """The withdrawal's finalize asks valid_signers, then finalize, with one SignatureChecks: each
    signature verified once. A PSBT rewritten between the two (an output's amount, a signature's
    byte) must be a new question: answered from the first PSBT's checks, it would finalize a
    transaction nobody signed."""
    psbt = _psbt([50_000, 60_000])
    sign(psbt, {PUBS[0]: KEYS[0], PUBS[1]: KEYS[1]})
    checks = SignatureChecks()
    assert valid_signers(psbt, checks) == [{PUBS[0], PUBS[1]}] * 2
    assert checks.answers is not None
    asked = dict(checks.answers)
    assert len(asked) == 4 and all(problem is None for problem in asked.values())
    good = finalize(psbt, checks)
    assert checks.answers == asked  # every answer came from valid_signers' checks
    assert good.serialize() == finalize(psbt).serialize()

    rewritten = Psbt.parse(psbt.serialize())
    rewritten.tx.vout[0].nValue -= 1  # the insider's byte: every digest changes, the signatures stay
    with pytest.raises(InputError, match="input 0: 0 valid signature"):
        finalize(rewritten, checks)
    assert valid_signers(rewritten, checks) == [set(), set()]

    tampered = Psbt.parse(psbt.serialize())
    sig = tampered.inputs[1].partial_sigs[PUBS[1]]
    tampered.inputs[1].partial_sigs[PUBS[1]] = sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]
    with pytest.raises(InputError, match="input 1: 1 valid signature"):
        finalize(tampered, checks)


# ---------------------------------------------------------------- the cycle collector, paused for bulk work


def _refused_calls() -> list[tuple[str, object]]:
    psbt = _psbt([50_000, 60_000])
    raw = psbt.serialize()
    sign(psbt, {PUBS[0]: KEYS[0]})
    other = Psbt.parse(raw)
    other.inputs[0].witness_script = b"\x51"
    return [
        ("parse of a rewritten byte", lambda: Psbt.parse(raw[:-1] + b"\x01")),
        ("finalize with one signature", lambda: finalize(psbt)),
        ("combine of a conflict", lambda: combine([psbt, other])),
    ]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cycle_collector_is_as_the_caller_left_it_after_a_refusal(enabled: bool) -> None:
    """Parse, copy, combine and finalize switch the collector off while they build maps: one that
    raised and left it off would leak every reference cycle of a long-running process from then on;
    one that switched it on would override a caller that had it off."""
    was = gc.isenabled()
    try:
        for what, call in _refused_calls():
            gc.enable() if enabled else gc.disable()
            with pytest.raises(InputError):
                call()  # type: ignore[operator]
            assert gc.isenabled() is enabled, what
        gc.enable() if enabled else gc.disable()
        Psbt.parse(_psbt([10_000]).serialize()).copy()
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


# ---------------------------------------------------------------- the offline signer's derivations


def _founder_key(network: str = "regtest", tag: str = "") -> tuple[FounderKey, list[tuple[str, str]]]:
    fs = founders(network, tag=tag)
    key = FounderKey(fs[0].name, fs[0].master.network, fs[0].master, fs[0].path)
    return key, [(f.name, str(f.account)) for f in fs]


def test_one_reviews_derivations_are_the_ones_derived_from_the_master_each_time() -> None:
    founder, specs = _founder_key()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, specs)
    derivations = signer_lib._Derivations(founder, AddressDeriver(policy))
    fresh = AddressDeriver(policy)
    for chain, index in [(0, 0), (1, 5), (0, 0), (1, 5), (0, 2**31 - 1), (1, 0)]:
        key = derivations.private_key(chain, index)
        assert key.secret == founder.master.derive((*founder.account_path, chain, index)).private_key().secret
        assert derivations.script(chain, index) == fresh.derive(chain, index)
    with pytest.raises(InputError, match="out of range"):
        derivations.script(0, HARDENED)  # a hardened position claimed by the PSBT: refused as before


def test_derivations_for_another_policy_or_founder_are_never_shared() -> None:
    founder, specs = _founder_key()
    p2wsh = make_policy(REGTEST, 2, ScriptType.P2WSH, specs)
    p2sh = make_policy(REGTEST, 2, ScriptType.P2SH, specs)
    other_founder, other_specs = _founder_key(tag="other ")
    others = make_policy(REGTEST, 2, ScriptType.P2WSH, other_specs)
    a = signer_lib._Derivations(founder, AddressDeriver(p2wsh))
    b = signer_lib._Derivations(founder, AddressDeriver(p2sh))
    c = signer_lib._Derivations(other_founder, AddressDeriver(others))
    scripts = {d.script(0, 3).script_pubkey for d in (a, b, c)}
    assert len(scripts) == 3
    assert a.private_key(0, 3).secret != c.private_key(0, 3).secret
    assert a.position(dict.fromkeys([b"k"], KeyOrigin(founder.master.fingerprint, (*founder.account_path, 0, 3)))) == (
        0,
        3,
    )
    assert (
        c.position(dict.fromkeys([b"k"], KeyOrigin(founder.master.fingerprint, (*founder.account_path, 0, 3)))) is None
    )


# ---------------------------------------------------------------- the input maps' fast reader


def _input_maps() -> list[tuple[bytes, set[bytes]]]:
    """Input maps as our signers write them (unsigned, signed once and twice), and the keys a parse
    would have found valid before reaching them."""
    psbt = _psbt([50_000, 70_000])
    unsigned = maps._serialize_input(psbt.inputs[1], "input 1")
    sign(psbt, {PUBS[0]: KEYS[0]})
    once = maps._serialize_input(psbt.inputs[1], "input 1")
    sign(psbt, {PUBS[2]: KEYS[2]})
    twice = maps._serialize_input(psbt.inputs[1], "input 1")
    return [(m + b"\xee", set(PUBS)) for m in (unsigned, once, twice)] + [(twice, {PUBS[0]})]


INPUT_MAPS = _input_maps()


@st.composite
def _mutated_map(draw: st.DrawFn) -> tuple[bytes, set[bytes]]:
    raw, valid = draw(st.sampled_from(INPUT_MAPS))
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x06, 0x1C, 0x22, 0xFD, data[at] ^ 0x01]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif kind == "delete" and data:
            del data[at]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data), set(valid)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_map())
def test_the_fast_input_reader_accepts_a_map_only_as_the_checked_reader_does(case: tuple[bytes, set[bytes]]) -> None:
    data, valid = case
    fast = maps._parse_input_fast(data, 0, set(valid))
    r = maps._Reader(data)
    try:
        checked = maps._parse_input(maps._read_map(r, "input 1"), "input 1", set(valid))
    except InputError:
        assert fast is None
        return
    if fast is not None:
        assert fast == (checked, r.pos)


def test_the_fast_input_reader_reads_what_our_signers_write() -> None:
    for data, valid in INPUT_MAPS[:3]:
        fast = maps._parse_input_fast(data, 0, valid)
        assert fast is not None and fast[1] == len(data) - 1
    data, valid = INPUT_MAPS[3]
    assert maps._parse_input_fast(data, 0, valid) is None  # a key not yet checked: the checked reader reads it


def test_six_step_derivations_are_written_as_the_generic_writer_writes_them() -> None:
    psbt = _psbt([50_000])
    inp = psbt.inputs[0]
    written = maps._serialize_input(inp, "input 0")
    for pub, origin in inp.bip32_derivations.items():
        generic = maps._record(b"\x06" + pub, maps._ser_origin(origin))
        assert generic == b"\x22\x06" + pub + b"\x1c" + origin.fingerprint + struct.pack("<6I", *origin.path)
        assert written.count(generic) == 1
    inp.bip32_derivations[PUBS[0]] = KeyOrigin(b"\x01" * 4, (48 | HARDENED, 1, 0, 2, 0, 2**32))
    with pytest.raises(InputError, match="has an element out of range"):
        psbt.serialize()
    inp.bip32_derivations[PUBS[0]] = KeyOrigin(b"\x01" * 3, (48 | HARDENED, 1, 0, 2, 0, 1))
    with pytest.raises(InputError, match="fingerprint must be 4 bytes"):
        psbt.serialize()


# ---------------------------------------------------------------- previous transactions read once per PSBT


def _p2sh_spend(n_inputs: int) -> tuple[Psbt, CTransaction]:
    """A PSBT spending ``n_inputs`` p2sh 2-of-3 outputs of one funding transaction."""
    spk = bytes(CScript(SCRIPT).to_p2sh_scriptPubKey())
    funding = CTransaction(
        [CMutableTxIn(COutPoint(b"\x11" * 32, 0), CScript([b"\x01"]))],
        [CMutableTxOut(40_000 + n, CScript(spk)) for n in range(n_inputs)],
        0,
        2,
    )
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(funding.GetTxid(), n)) for n in range(n_inputs)],
        [CMutableTxOut(30_000, CScript(b"\x00\x14" + b"\x44" * 20))],
        0,
        2,
    )
    psbt = Psbt.from_unsigned_tx(tx)
    for inp in psbt.inputs:
        inp.non_witness_utxo = funding
        inp.redeem_script = SCRIPT
    return psbt, funding


def test_one_previous_transaction_is_read_once_and_a_differing_copy_on_its_own() -> None:
    psbt, funding = _p2sh_spend(3)
    raw = psbt.serialize()
    parsed = Psbt.parse(raw)
    assert parsed.inputs[0].non_witness_utxo is parsed.inputs[2].non_witness_utxo
    assert parsed.inputs[0].non_witness_utxo.serialize() == funding.serialize()
    sign(parsed, {PUBS[0]: KEYS[0], PUBS[1]: KEYS[1]})
    finalize(parsed)

    # Input 2's copy of the previous transaction pays itself more (one byte changed): it is read
    # on its own, and is not the transaction input 2 spends.
    amount = struct.pack("<q", 40_002)
    assert raw.count(amount) == 3  # once in each input's copy
    forged = Psbt.parse(_replace_nth(raw, amount, struct.pack("<q", 90_002), 2))
    assert forged.inputs[0].non_witness_utxo is forged.inputs[1].non_witness_utxo
    assert forged.inputs[2].non_witness_utxo is not forged.inputs[0].non_witness_utxo
    assert forged.inputs[2].non_witness_utxo.vout[2].nValue == 90_002
    assert forged.inputs[0].non_witness_utxo.vout[2].nValue == 40_002
    with pytest.raises(InputError, match=r"^input 2: non-witness UTXO is transaction"):
        sign(forged, {PUBS[0]: KEYS[0]})
