"""Root of trust, attacked as an insider with the online machine would: by the CLI, by SQL on the
store, and byte by byte on the PSBT. Every rule rests on the founders' signatures and on what the
offline signer has pinned; each attack is refused with its own reason and documented exit code.

The offline signer runs as a real subprocess in its own home: only the PSBT, a founder's key file,
the founders-signed manifest pinned there and its ``signer-state.json``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import coincurve
import pytest

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.bech32 import encode_segwit
from custody.bitcoin.message import sign_message
from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.chain.kernel import COINBASE_MATURITY
from custody.identity.approvals import sign_approval, sign_request, summarize
from custody.identity.keyfile import open_employee_key, open_founder_key
from custody.identity.roster import Employee, Roster, parse_roster
from custody.policy.manifest import load_signed_manifest, sign_manifest, unsigned
from custody.policy.model import make_policy
from custody.withdraw.signer import PROP_APPROVALS, PROP_META, PROP_ROSTER, PROP_SUSPENSIONS, PROPRIETARY_ID
from tests.chain_support import fresh_script
from tests.support import PASSPHRASE, Custody, founders, read_psbt, run_cli
from tests.test_withdraw_embedded import EmbeddedShop
from tests.withdraw_support import enrol, sign_and_apply


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path_factory.mktemp("trust"), "p2wsh")
    for issued in s.ok("address", "new", "--account", "acct-1", "--count", "24"):
        s.chain.mine(1, bytes.fromhex(issued["script_pubkey"]))  # a coin per withdrawal
    s.chain.mine(COINBASE_MATURITY, b"\x51")
    s.ok("sync")
    yield s
    s.chain.close()


def _to() -> str:
    return encode_segwit("bcrt", 0, fresh_script()[2:])


def _approved(shop: EmbeddedShop, requester: str = "carol", approvers: tuple[str, ...] = ("alice", "bob")) -> int:
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", _to(), "--amount", "0.01", *shop.as_(requester))
    for who in approvers:
        shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
    return int(w["id"])


def _export(shop: EmbeddedShop, wid: int) -> Path:
    path = shop.tmp / f"export-{wid}.psbt"
    path.unlink(missing_ok=True)
    result = shop.c("withdraw", "export", str(wid), str(path))
    assert result.exit_code == 0, result.output
    return path


class Offline:
    """A founder's offline machine: the pinned manifest and the signer's state, nothing else."""

    def __init__(self, shop: EmbeddedShop, home: Path, founder: str = "founder-a") -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.manifest = home / "founders-manifest.json"
        if not self.manifest.exists():
            self.manifest.write_text((shop.c.home / "founders-manifest.json").read_text())
        self.key = shop.founder_keys[founder]
        self.env = {
            "CUSTODY_HOME": str(home),
            "CUSTODY_DB_URL": f"sqlite:///{home / 'none.db'}",
            "CUSTODY_MANIFEST": str(self.manifest),
            "CUSTODY_PASSPHRASE": PASSPHRASE,
        }
        self.n = 0

    def sign(self, psbt: Path) -> Any:
        self.n += 1
        out = self.home / f"signed-{self.n}.psbt"
        return run_cli(self.env, "sign", str(psbt), "--key", str(self.key), "--yes", "--out", str(out), "--json")


def _edit(path: Path, change: Callable[[psbt_lib.Psbt], None]) -> Path:
    p = psbt_lib.Psbt.parse(read_psbt(path))
    change(p)
    out = path.with_name(path.stem + "-edited.psbt")
    out.write_text(p.to_base64() + "\n")
    return out


def _prop(subtype: int) -> psbt_lib.ProprietaryKey:
    return psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b"")


def _get(p: psbt_lib.Psbt, subtype: int) -> Any:
    return json.loads(p.proprietary[_prop(subtype)])


def _put(p: psbt_lib.Psbt, subtype: int, doc: Any) -> None:
    p.proprietary[_prop(subtype)] = json.dumps(doc).encode()


def _summary(p: psbt_lib.Psbt) -> Any:
    meta = _get(p, PROP_META)
    return summarize("regtest", meta["withdrawal_id"], p.tx, [i.witness_utxo.amount for i in p.inputs])


def _refused(result: Any, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for n in needles:
        assert n in result.stderr, (n, result.stderr)


def _sql(shop: EmbeddedShop, statement: str, *args: object) -> None:
    db = sqlite3.connect(shop.c.home / "custody.db")
    db.execute(statement, args)
    db.commit()
    db.close()


def _founder_key(shop: EmbeddedShop, name: str) -> coincurve.PrivateKey:
    k = open_founder_key(shop.founder_keys[name], PASSPHRASE)
    return k.master.derive(k.account_path).private_key()


# ---------------------------------------------------------------- enrolment needs the founders


def test_enrolment_without_founders_gives_no_rights(shop: EmbeddedShop) -> None:
    """`employee keygen` on the online machine only proposes: the made-up employees of today's
    attack (one person enrolling three) can request, approve, raise or lift nothing."""
    made = {}
    for name in ("mal1", "mal2"):
        made[name] = shop.tmp / f"{name}.key"
        assert shop.c("employee", "keygen", name, "--out", str(made[name])).exit_code == 0
    as_mal1 = ["--as", "mal1", "--key", str(made["mal1"])]
    req = shop.c("withdraw", "request", "--account", "acct-1", "--to", _to(), "--amount", "0.01", *as_mal1)
    assert req.exit_code == 5 and "founders' roster" in req.stderr
    assert shop.c("halt", "raise", "--reason", "x", *as_mal1).exit_code == 5
    wid = _approved(shop)
    assert shop.c("withdraw", "approve", str(wid), *as_mal1, "--yes").exit_code == 5
    assert "mal1" not in [e["name"] for e in shop.ok("employee", "list")]
    # A roster one founder signed (of a 2-of-3) is refused at apply: exit 4, nothing applied.
    one = shop.tmp / "roster-one-founder.json"
    assert shop.c("roster", "export", "--out", str(one)).exit_code == 0
    assert shop.c("roster", "sign", str(one), "--key", str(shop.founder_keys["founder-a"]), "--yes").exit_code == 0
    applied = shop.c("roster", "apply", str(one))
    assert applied.exit_code == 4 and "1 valid founder signature(s)" in applied.stderr
    assert "mal1" not in [e["name"] for e in shop.ok("employee", "list")]
    assert shop.c("roster", "discard").exit_code == 0  # the proposal is dropped, visibly
    assert shop.ok("roster", "show")["proposal"] is None


def test_a_roster_signed_by_outside_keys_is_refused(shop: EmbeddedShop) -> None:
    """The insider signs the proposal with keys of their own, named as the founders."""
    path = shop.tmp / "roster-outsiders.json"
    path.unlink(missing_ok=True)
    assert (
        shop.c("employee", "add", "oscar", "--pubkey", coincurve.PrivateKey().public_key.format().hex()).exit_code == 0
    )
    assert shop.c("roster", "export", "--out", str(path)).exit_code == 0
    r = parse_roster(json.loads(path.read_text()))
    for f in founders(tag="outsider")[:2]:  # named founder-a and founder-b, like the real ones
        r = r.with_signature(f.name, sign_message(f.master.derive(f.path).private_key(), r.message))
    path.write_text(json.dumps(r.to_document()))
    applied = shop.c("roster", "apply", str(path))
    assert applied.exit_code == 4 and "founder-a's signature does not verify" in applied.stderr
    assert "oscar" not in [e["name"] for e in shop.ok("employee", "list")]
    assert shop.c("roster", "discard").exit_code == 0


def test_a_roster_row_inserted_or_edited_by_sql_is_caught(shop: EmbeddedShop, tmp_path: Path) -> None:
    """Adding one's own key to an employee by editing the roster row: the founders' signatures
    no longer cover it, so the store's roster does not stand (exit 3) and nobody is enrolled by it."""
    db = sqlite3.connect(shop.c.home / "custody.db")
    serial, document = db.execute("SELECT serial, document FROM roster ORDER BY serial DESC LIMIT 1").fetchone()
    doc = json.loads(document)
    mine = coincurve.PrivateKey()
    for e in doc["roster"]["employees"]:
        if e["name"] == "alice":
            e["keys"].append(mine.public_key.format().hex())
    db.execute("UPDATE roster SET document = ? WHERE serial = ?", (json.dumps(doc), serial))
    db.commit()
    try:
        listed = shop.c("employee", "list")
        assert listed.exit_code == 3 and "does not stand" in listed.stderr
        req = shop.c(
            "withdraw", "request", "--account", "acct-1", "--to", _to(), "--amount", "0.01", *shop.as_("carol")
        )
        assert req.exit_code == 3
        assert shop.c("audit", "log", "--verify").exit_code == 3  # the audit finds it and halts
    finally:
        db.execute("UPDATE roster SET document = ? WHERE serial = ?", (document, serial))
        db.commit()
        db.close()
    _lift_all(shop)


def _lift_all(shop: EmbeddedShop) -> None:
    for h in json.loads(shop.c("halt", "status", "--json").stdout)["halts"]:
        for who in ("alice", "bob"):
            shop.c("halt", "lift", str(h["id"]), *shop.as_(who))
    assert shop.c("halt", "status").exit_code == 0


def test_confusable_and_mixed_script_names_are_refused(shop: EmbeddedShop) -> None:
    pub = coincurve.PrivateKey().public_key.format().hex()
    for name in ("\u0430lice", "a1ice", "Alice", "al ice", "alice\u200b", "bob\u202e", "carо1"):
        result = shop.c("employee", "add", name, "--pubkey", pub)
        assert result.exit_code == 2, (name, result.output)


# ---------------------------------------------------------------- the offline signer trusts its pins


def test_the_legitimate_psbt_signs_offline(shop: EmbeddedShop) -> None:
    offline = Offline(shop, shop.tmp / "offline-legit")
    signed = offline.sign(_export(shop, _approved(shop)))
    assert signed.returncode == 0, signed.stderr
    review = json.loads(signed.stdout)
    assert review["requester"] == "carol" and review["approvals"] == ["alice", "bob"]
    assert [o["change"] for o in review["outputs"]].count(True) == 1
    state = json.loads((offline.home / "signer-state.json").read_text())
    assert state["roster"]["serial"] == review["roster_serial"]


def test_a_psbt_without_a_roster_is_refused(shop: EmbeddedShop) -> None:
    path = _edit(_export(shop, _approved(shop)), lambda p: p.proprietary.pop(_prop(PROP_ROSTER)))
    _refused(Offline(shop, shop.tmp / "offline-noroster").sign(path), 4, "carries no founders-signed employee roster")


def test_a_replaced_roster_and_approvals_are_refused(shop: EmbeddedShop) -> None:
    """Today's attack: the PSBT's registry and approvals replaced by keys the insider holds, and
    the payment redirected. The roster is the founders': the replacement has no founder signature."""
    wid = _approved(shop)
    path = _export(shop, wid)
    mine = {n: coincurve.PrivateKey() for n in ("x1", "x2", "x3")}

    def attack(p: psbt_lib.Psbt) -> None:
        p.tx.vout[0].scriptPubKey = psbt_lib.Psbt.parse(read_psbt(path)).tx.vout[0].scriptPubKey
        roster = parse_roster(_get(p, PROP_ROSTER))
        fake = Roster(
            roster.network,
            roster.manifest,
            roster.serial,
            roster.previous,
            tuple(
                Employee(n, (k.public_key.format().hex(),), frozenset({"request", "approve", "lift"}))
                for n, k in mine.items()
            ),
            (),
            roster.signatures,
        )
        _put(p, PROP_ROSTER, fake.to_document())
        summary = _summary(p)
        meta = _get(p, PROP_META)
        meta["requester"] = "x1"
        meta["request_signature"] = sign_request(mine["x1"], summary, meta["account"])
        _put(p, PROP_META, meta)
        _put(
            p,
            PROP_APPROVALS,
            [
                {
                    "employee": n,
                    "pubkey": mine[n].public_key.format().hex(),
                    "signature": sign_approval(mine[n], summary),
                }
                for n in ("x2", "x3")
            ],
        )

    result = Offline(shop, shop.tmp / "offline-replaced").sign(_edit(path, attack))
    _refused(result, 4, "is not the founders' roster", "signature does not verify")


def test_a_roster_signed_by_one_founder_or_by_outside_keys_is_refused_by_the_signer(shop: EmbeddedShop) -> None:
    path = _export(shop, _approved(shop))

    def one_founder(p: psbt_lib.Psbt) -> None:
        doc = _get(p, PROP_ROSTER)
        doc["signatures"] = doc["signatures"][:1]
        _put(p, PROP_ROSTER, doc)

    _refused(Offline(shop, shop.tmp / "offline-one").sign(_edit(path, one_founder)), 4, "a roster needs 2")

    def outsiders(p: psbt_lib.Psbt) -> None:
        r = parse_roster(_get(p, PROP_ROSTER)).unsigned()
        for f in founders(tag="outsider")[:2]:
            r = r.with_signature(f.name, sign_message(f.master.derive(f.path).private_key(), r.message))
        _put(p, PROP_ROSTER, r.to_document())

    _refused(Offline(shop, shop.tmp / "offline-out").sign(_edit(path, outsiders)), 4, "does not verify")

    def unsigned_roster(p: psbt_lib.Psbt) -> None:
        _put(p, PROP_ROSTER, parse_roster(_get(p, PROP_ROSTER)).unsigned().to_document())

    _refused(Offline(shop, shop.tmp / "offline-uns").sign(_edit(path, unsigned_roster)), 4, "0 valid founder")


def test_approvals_by_employees_not_on_the_roster_are_refused(shop: EmbeddedShop) -> None:
    path = _export(shop, _approved(shop))
    outsider = open_employee_key(shop.tmp / "mal2.key", PASSPHRASE) if (shop.tmp / "mal2.key").exists() else None
    stranger = outsider.private_key if outsider else coincurve.PrivateKey()

    def attack(p: psbt_lib.Psbt) -> None:
        bundle = _get(p, PROP_APPROVALS)
        bundle[1] = {
            "employee": "mal2",
            "pubkey": stranger.public_key.format().hex(),
            "signature": sign_approval(stranger, _summary(p)),
        }
        _put(p, PROP_APPROVALS, bundle)

    _refused(
        Offline(shop, shop.tmp / "offline-stranger").sign(_edit(path, attack)),
        4,
        "1 of 2 valid approvals",
        "mal2: not an employee of the founders' roster",
    )


def test_a_relabelled_requester_is_refused(shop: EmbeddedShop) -> None:
    """The requester named in the PSBT is authenticated by their signature, not believed."""
    path = _export(shop, _approved(shop, requester="carol"))

    def relabel(p: psbt_lib.Psbt) -> None:
        meta = _get(p, PROP_META)
        meta["requester"] = "dave" if "dave" in json.dumps(_get(p, PROP_ROSTER)) else "alice"
        _put(p, PROP_META, meta)

    _refused(
        Offline(shop, shop.tmp / "offline-relabel").sign(_edit(path, relabel)), 4, "request signature does not cover"
    )


def test_self_approval_by_relabelling_is_refused(shop: EmbeddedShop) -> None:
    """alice requests, then approves her own withdrawal by naming carol as the requester in the
    PSBT (the store refused alice's approval): carol never signed that request."""
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", _to(), "--amount", "0.01", *shop.as_("alice"))
    wid = int(w["id"])
    assert shop.c("withdraw", "approve", str(wid), *shop.as_("alice"), "--yes").exit_code == 4
    shop.ok("withdraw", "approve", str(wid), *shop.as_("bob"), "--yes")
    shop.ok("withdraw", "approve", str(wid), *shop.as_("carol"), "--yes")
    path = _export(shop, wid)
    alice = open_employee_key(shop.employees["alice"], PASSPHRASE).private_key

    def relabel(p: psbt_lib.Psbt) -> None:
        meta = _get(p, PROP_META)
        meta["requester"] = "carol"
        _put(p, PROP_META, meta)
        bundle = [a for a in _get(p, PROP_APPROVALS) if a["employee"] != "carol"]
        bundle.append(
            {
                "employee": "alice",
                "pubkey": alice.public_key.format().hex(),
                "signature": sign_approval(alice, _summary(p)),
            }
        )
        _put(p, PROP_APPROVALS, bundle)

    _refused(
        Offline(shop, shop.tmp / "offline-self").sign(_edit(path, relabel)),
        4,
        "carol's request signature does not cover",
    )
    # Unedited, the same PSBT signs: alice requested, bob and carol approved.
    assert Offline(shop, shop.tmp / "offline-self-ok").sign(path).returncode == 0


def test_a_rolled_back_roster_is_refused(shop: EmbeddedShop) -> None:
    """A signer that has seen roster #N refuses #N-1, and a different #N."""
    offline = Offline(shop, shop.tmp / "offline-rollback")
    old = _export(shop, _approved(shop))  # under the roster in force now
    assert offline.sign(_export(shop, _approved(shop))).returncode == 0
    # The founders sign a newer roster (dave added); the signer sees it in a PSBT.
    shop.employees.update(enrol(shop.c, shop.tmp, shop.founder_keys, ["dave"]))
    assert offline.sign(_export(shop, _approved(shop))).returncode == 0
    _refused(offline.sign(old), 4, "older than roster", "never rolled back")
    # The same serial with other content, even signed by two founders, is a fork: refused.
    path = _export(shop, _approved(shop))

    def fork(p: psbt_lib.Psbt) -> None:
        r = parse_roster(_get(p, PROP_ROSTER))
        forked = Roster(r.network, r.manifest, r.serial, r.previous, r.employees, ("00" * 32,))
        for name in ("founder-a", "founder-c"):
            forked = forked.with_signature(name, sign_message(_founder_key(shop, name), forked.message))
        _put(p, PROP_ROSTER, forked.to_document())

    _refused(offline.sign(_edit(path, fork)), 4, "two rosters with one serial")


def test_suspension_holds_online_and_at_the_signer_even_when_omitted_later(shop: EmbeddedShop) -> None:
    shop.employees.update(enrol(shop.c, shop.tmp, shop.founder_keys, ["erin"]))
    wid = _approved(shop, approvers=("alice", "erin"))
    before = _export(shop, wid)
    one = shop.c("employee", "suspend", "erin", "--reason", "laptop stolen", *shop.as_("alice"), "--json")
    assert one.exit_code == 0 and json.loads(one.stdout)["in_force"] is False
    assert shop.c("employee", "suspend", "erin", "--reason", "laptop stolen", *shop.as_("erin")).exit_code == 4
    two = shop.c("employee", "suspend", "erin", "--reason", "laptop stolen", *shop.as_("bob"), "--json")
    assert two.exit_code == 0 and json.loads(two.stdout)["in_force"] is True
    # Online: erin's approval no longer counts, and she cannot approve again.
    export = shop.c("withdraw", "export", str(wid), str(shop.tmp / "sus.psbt"))
    assert export.exit_code == 4 and "erin: suspended" in export.stderr
    assert shop.c("withdraw", "approve", str(_approved(shop)), *shop.as_("erin"), "--yes").exit_code == 4
    # Offline: the signer learns of the suspension from any PSBT that carries it ...
    offline = Offline(shop, shop.tmp / "offline-suspend")
    assert offline.sign(_export(shop, _approved(shop))).returncode == 0
    # ... and remembers it: the PSBT exported before (approved by erin) is refused, and so is
    # one where the insider removed the suspension list.
    _refused(offline.sign(before), 4, "erin: suspended")
    _refused(offline.sign(_edit(before, lambda p: _put(p, PROP_SUSPENSIONS, []))), 4, "erin: suspended")


# ---------------------------------------------------------------- the manifest


def test_a_swapped_manifest_in_the_store_is_refused_and_halts(shop: EmbeddedShop, tmp_path: Path) -> None:
    """The insider replaces the store's founders AND its signed manifest with a manifest of keys
    they hold, each signature valid for those keys. The machine's pinned manifest says otherwise:
    issuance halts, requests are refused, and a PSBT of that store is refused offline. The store's
    rosters no longer stand against its founders, so the log's earlier lifts stop counting too."""
    db = sqlite3.connect(shop.c.home / "custody.db")
    rows = db.execute("SELECT position, xpub FROM founder").fetchall()
    saved = db.execute("SELECT digest, document FROM signed_manifest").fetchone()
    forged = _forged_manifest()
    for position, f in enumerate(forged.policy.founders):
        db.execute("UPDATE founder SET xpub = ? WHERE position = ?", (str(f.key), position))
    db.execute("UPDATE signed_manifest SET digest = ?, document = ?", (forged.digest, json.dumps(forged.to_document())))
    db.commit()
    try:
        req = shop.c(
            "withdraw", "request", "--account", "acct-1", "--to", _to(), "--amount", "0.01", *shop.as_("carol")
        )
        # Refused, and halted before it gets that far: no roster of the store stands against the
        # swapped founders, so the audit log's earlier lifts no longer count either.
        assert req.exit_code == 3, req.output
        assert "not the one pinned on this machine" in req.stderr or "0 valid employee signature(s)" in req.stderr
        issued = shop.c("address", "new", "--account", "acct-1")
        assert issued.exit_code == 3 and "halted" in issued.stderr
        assert shop.c("halt", "status").exit_code == 3
    finally:
        for position, xpub in rows:
            db.execute("UPDATE founder SET xpub = ? WHERE position = ?", (xpub, position))
        db.execute("UPDATE signed_manifest SET digest = ?, document = ?", saved)
        db.commit()
        db.close()
    _lift_all(shop)


def _forged_manifest() -> Any:
    """A manifest of founders' keys the insider holds, each signature valid for those keys."""
    fs = founders(tag="insider")
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    forged = unsigned(policy)
    for f in fs:
        forged = sign_manifest(forged, f.name, f.master.derive(f.path).private_key())
    return forged


@pytest.mark.parametrize("edit", ["digest", "document"])
def test_an_edited_manifest_row_is_neither_pinned_nor_exported(shop: EmbeddedShop, tmp_path: Path, edit: str) -> None:
    """The insider edits the store's signed_manifest row by SQL: its recorded digest, or its
    document swapped for one they signed themselves (the row's digest kept). Another machine
    pinning from the store, and the auditors' export, read the row as every other reader does:
    refused (exit 3), nothing pinned or written."""
    from tests.support import Custody

    db = sqlite3.connect(shop.c.home / "custody.db")
    saved = db.execute("SELECT digest, document FROM signed_manifest").fetchone()
    forged = _forged_manifest()
    if edit == "digest":
        db.execute("UPDATE signed_manifest SET digest = ?", ("ab" * 32,))
        shown = load_signed_manifest(saved[1].encode()).fingerprint
    else:
        db.execute("UPDATE signed_manifest SET document = ?", (json.dumps(forged.to_document()),))
        shown = forged.fingerprint  # what the insider reads out to the operator
    db.commit()
    try:
        other = Custody(tmp_path / "operator", db_url=shop.c.env["CUSTODY_DB_URL"])
        pinned = other("manifest", "pin", "--from-store", "--fingerprint", shown)
        assert pinned.exit_code == 3, pinned.output
        assert "does not match its recorded digest" in pinned.stderr
        assert not (other.home / "founders-manifest.json").exists()
        out = tmp_path / "for-auditors.json"
        exported = shop.c("policy", "manifest", "--out", str(out))
        assert exported.exit_code == 3 and "does not match its recorded digest" in exported.stderr
        assert not out.exists()
    finally:
        db.execute("UPDATE signed_manifest SET digest = ?, document = ?", saved)
        db.commit()
        db.close()
    assert shop.c("policy", "manifest", "--out", str(tmp_path / "after.json")).exit_code == 0


def test_an_unsigned_or_under_signed_manifest_cannot_be_pinned_or_initialised(tmp_path: Path) -> None:
    from tests.support import Custody, sign_manifest_with

    c = Custody(tmp_path / "home")
    fs = founders()
    draft = tmp_path / "m.json"
    assert (
        c(
            "manifest",
            "draft",
            "--network",
            "regtest",
            *[x for f in fs for x in ("--founder", f.spec)],
            "--out",
            str(draft),
        ).exit_code
        == 0
    )
    two = sign_manifest_with(load_signed_manifest(draft.read_bytes()), fs[:2])
    draft.write_text(json.dumps(two.to_document()))
    refused = c("init", str(draft))
    assert refused.exit_code == 2 and "founder founder-c has not signed it" in refused.stderr
    assert not (c.home / "custody.db").exists() and not (c.home / "founders-manifest.json").exists()
    pin = c("manifest", "pin", str(draft), "--fingerprint", two.fingerprint)
    assert pin.exit_code == 2
    three = sign_manifest_with(two, fs[2:])
    draft.write_text(json.dumps(three.to_document()))
    wrong = c("manifest", "pin", str(draft), "--fingerprint", "0000-0000-0000-0000")
    assert wrong.exit_code == 2 and three.fingerprint in wrong.stderr
    assert c("init", str(draft)).exit_code == 0


def test_a_second_operator_pins_the_manifest_from_the_shared_store(shop: EmbeddedShop, tmp_path: Path) -> None:
    """Team setup: another machine points at the same store, checks the founders' signatures
    and the fingerprint read out to it, pins, and can then act."""
    from tests.support import Custody

    other = Custody(tmp_path / "operator-2", db_url=shop.c.env["CUSTODY_DB_URL"])
    other.env["CUSTODY_CHAIN"] = "embedded"
    other.env["CUSTODY_CHAIN_DATADIR"] = str(shop.c.home / "chain")
    before = other("address", "new", "--account", "acct-2")
    assert before.exit_code == 9 and "no founders' manifest is pinned" in before.stderr
    fingerprint = shop.ok("manifest", "show")["fingerprint"]
    assert other("manifest", "pin", "--from-store", "--fingerprint", "1111-2222-3333-4444").exit_code == 2
    assert not (other.home / "halt.json").exists()
    assert other("manifest", "pin", "--from-store", "--fingerprint", fingerprint).exit_code == 0
    assert json.loads((other.home / "halt.json").read_text())["halted"] is False  # its guard reads it
    assert other("address", "new", "--account", "acct-2").exit_code == 0


# ---------------------------------------------------------------- halts


def test_a_halt_lifted_by_unrostered_or_roleless_employees_stays(shop: EmbeddedShop, tmp_path: Path) -> None:
    raised = shop.ok("halt", "raise", "--reason", "drill", *shop.as_("alice"))
    hid = str(raised["halt_id"])
    mal = shop.tmp / "mal1.key"
    assert shop.c("halt", "lift", hid, "--as", "mal1", "--key", str(mal)).exit_code == 5
    assert shop.c("halt", "lift", hid, "--as", "mal2", "--key", str(shop.tmp / "mal2.key")).exit_code == 5
    # A roster employee without the lift role.
    keys = enrol(shop.c, shop.tmp, shop.founder_keys, ["frank"], roles="request")
    refused = shop.c("halt", "lift", hid, "--as", "frank", "--key", str(keys["frank"]))
    assert refused.exit_code == 4 and "no lift role" in refused.stderr
    # An inserted lift row by SQL, signed by a stranger's key, counts for nothing.
    stranger = coincurve.PrivateKey()
    _sql(
        shop,
        "INSERT INTO halt_lift (halt_id, employee, pubkey, signature, at) VALUES (?, 'bob', ?, ?, "
        "'2026-01-01 00:00:00')",
        int(hid),
        stranger.public_key.format().hex(),
        "30" * 35,
    )
    one = shop.ok("halt", "lift", hid, *shop.as_("alice"))
    assert one["lifted"] is False and one["signers"] == ["alice"]
    assert shop.c("halt", "status").exit_code == 3
    two = shop.ok("halt", "lift", hid, *shop.as_("bob"))
    assert two["lifted"] is True


def test_apply_refuses_a_skipped_or_repeated_serial(shop: EmbeddedShop) -> None:
    current = shop.ok("roster", "show")["serial"]
    assert (
        shop.c("employee", "add", "gina", "--pubkey", coincurve.PrivateKey().public_key.format().hex()).exit_code == 0
    )
    path = shop.tmp / "roster-skip.json"
    path.unlink(missing_ok=True)
    assert shop.c("roster", "export", "--out", str(path)).exit_code == 0
    doc = json.loads(path.read_text())
    doc["roster"]["serial"] = current + 2
    r = parse_roster(doc)
    for name in ("founder-a", "founder-b"):
        r = r.with_signature(name, sign_message(_founder_key(shop, name), r.message))
    path.write_text(json.dumps(r.to_document()))
    skipped = shop.c("roster", "apply", str(path))
    assert skipped.exit_code == 6 and "not the next roster" in skipped.stderr
    sign_and_apply(shop.c, shop.tmp, shop.founder_keys)
    assert shop.ok("roster", "show")["serial"] == current + 1


def test_roster_pin_on_the_signer_refuses_older_rosters_from_then_on(shop: EmbeddedShop) -> None:
    """A founder pins the newest roster on their signer by hand, before any PSBT carries it: a
    PSBT under the previous roster is refused; an older or under-signed roster is not pinned."""
    offline = Offline(shop, shop.tmp / "offline-pin")
    old_psbt = _export(shop, _approved(shop))
    old_roster = shop.tmp / "roster-old-current.json"
    old_roster.unlink(missing_ok=True)
    assert shop.c("roster", "export", "--current", "--out", str(old_roster)).exit_code == 0
    shop.employees.update(enrol(shop.c, shop.tmp, shop.founder_keys, ["hank"]))
    newest = shop.tmp / "roster-newest-current.json"
    newest.unlink(missing_ok=True)
    assert shop.c("roster", "export", "--current", "--out", str(newest)).exit_code == 0
    one = json.loads(newest.read_text())
    one["signatures"] = one["signatures"][:1]
    under = shop.tmp / "roster-under-signed.json"
    under.write_text(json.dumps(one))
    _refused(run_cli(offline.env, "roster", "pin", str(under)), 4, "a roster needs 2")
    pinned = run_cli(offline.env, "roster", "pin", str(newest), "--json")
    assert pinned.returncode == 0, pinned.stderr
    _refused(run_cli(offline.env, "roster", "pin", str(old_roster)), 4, "older than")
    _refused(offline.sign(old_psbt), 4, "older than roster")


def test_without_an_open_proposal_export_and_discard_are_refused_by_name(tmp_path: Path) -> None:
    """Nothing proposed: exporting or discarding the roster's or the rulebook's proposal is
    refused (exit 5, NotFound) with the document named and how to propose one, and the audit log
    gains no entry (no <kind>.discarded of something that was never there)."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    before = c.json("audit", "log")
    for args, message in (
        (("roster", "export", "--out", str(tmp_path / "r")), "no roster proposal is open (`custody roster propose`"),
        (("roster", "discard"), "no roster proposal is open"),
        (("rules", "export", "--out", str(tmp_path / "b")), "no rulebook proposal is open (`custody rules propose`)"),
        (("rules", "discard"), "no rulebook proposal is open"),
    ):
        refused = c(*args)
        assert refused.exit_code == 5 and message in refused.output, (args, refused.output)
    assert c.json("audit", "log") == before
