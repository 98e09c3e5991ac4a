"""Withdrawal requests signed with a security key (WebAuthn), without a browser.

Alice (request and approve roles, a security key in the founders' roster) requests through
:mod:`custody.withdraw.webauthn_request`; her assertion is made in software the way an
authenticator makes it (tests/test_webauthn.py's ``Key``; the browser-made path is in
tests/test_console.py). Then what an insider tries: an assertion over another statement, made
at another origin, from a key the founders never listed, by an employee without the request
role, replayed from another request, and the amount edited after signing, in the store and in
the PSBT's bytes: the service refuses each, and so does the offline signer where the bytes
reach it. And the requester never approves, whatever she signs with.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction, CTransaction, b2x, x
from sqlalchemy import text

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.amounts import parse_btc_amount
from custody.bitcoin.destinations import parse_destination
from custody.bitcoin.network import REGTEST
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.errors import ApprovalError, Conflict, InputError
from custody.identity.statements import statement_digest
from custody.store.db import Database
from custody.withdraw import webauthn_request as wr
from custody.withdraw.records import MAX_UNSIGNED_REQUESTS
from custody.withdraw.signer import PROP_META, PROPRIETARY_ID
from custody.withdraw.webauthn_approval import REQUEST_SIGNED, approve_with_security_key
from tests.support import read_psbt, wait_stopped
from tests.test_webauthn import Key
from tests.test_withdraw_embedded import EmbeddedShop, destination
from tests.withdraw_support import enrol, sign_and_apply

ORIGIN = "http://localhost:8443"


@dataclass
class World:
    shop: EmbeddedShop
    db: Database
    settings: Settings
    keys: dict[str, Key]
    count: int = 0

    def assertion(self, who: str, challenge: str | bytes, **over: Any) -> str:
        """``who``'s security key over ``challenge`` (hex or bytes), its counter one higher each time."""
        self.count += 1
        raw = bytes.fromhex(challenge) if isinstance(challenge, str) else challenge
        return self.keys[who].assert_(raw, self.count, **over)

    def draft(self, who: str = "alice", amount: str = "0.01", to: str | None = None) -> dict[str, Any]:
        """A request recorded on ``who``'s security key over its record challenge (step 1)."""
        content = {"account": "acct-1", "destination": to or destination()[0], "amount": amount}
        c = wr.record_challenge(who, content["account"], content["destination"], amount)
        return self.record(who, c, self.assertion(who, c.digest), **content)

    def record(
        self, who: str, c: wr.RecordChallenge, assertion: str, key: str | None = None, **content: str
    ) -> dict[str, Any]:
        return wr.record_with_security_key(
            self.db,
            self.settings,
            self.shop.chain,
            account=content["account"],
            destination=content["destination"],
            amount=content["amount"],
            requester=who,
            nonce=c.nonce,
            at=c.at,
            credential_id=self.keys[key or who].credential.id,
            assertion=assertion,
        )

    def sign(self, wid: int, who: str, assertion: str, key: str | None = None) -> dict[str, Any]:
        credential = self.keys[key or who].credential.id
        return wr.sign_request_with_security_key(self.db, self.settings, wid, who, credential, assertion)

    def cli_sign(self, psbt: Path) -> Any:
        founder = str(self.shop.founder_keys["founder-a"])
        return self.shop.c("sign", str(psbt), "--key", founder, "--out", f"{psbt}.signed", "--yes")


def _world(tmp: Path, db_url: str | None = None, coins: int = 14) -> World:
    shop = EmbeddedShop(tmp, "p2wsh", db_url)
    shop.employees.update(enrol(shop.c, tmp, shop.founder_keys, ["dave"], roles="approve"))
    shop.deposit("acct-1", coins)  # a coin per request
    keys = {name: Key("localhost", ORIGIN, name.encode()) for name in ("alice", "bob", "dave", "stranger")}
    specs = []
    for name in ("alice", "bob", "dave"):  # the stranger's key is never listed
        path = tmp / f"{name}-webauthn.json"
        path.write_text(json.dumps(keys[name].credential.to_dict()))
        specs += ["--webauthn", f"{name}={path}"]
    proposed = shop.c("roster", "propose", *specs)
    assert proposed.exit_code == 0, proposed.output
    sign_and_apply(shop.c, tmp, shop.founder_keys)
    settings = Settings.load(env=shop.c.env)
    return World(shop, Database(settings.db_url), settings, keys)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = _world(tmp_path_factory.mktemp("keyreq"))
    yield w
    w.shop.chain.close()


def _approve(world: World, wid: int, who: str) -> Any:
    return world.shop.c("withdraw", "approve", str(wid), *world.shop.as_(who), "--yes")


def test_a_request_signed_with_a_security_key_is_approved_by_others_and_the_offline_signer_accepts_it(
    world: World,
) -> None:
    w = world.draft()
    wid = w["id"]
    # Recorded, coins held, but unsigned: nobody approves it yet.
    early = _approve(world, wid, "bob")
    assert early.exit_code == 4 and "has not signed the request yet" in early.stderr, early.output
    good = world.assertion("alice", w["request_digest"])
    signed = world.sign(wid, "alice", good)
    assert signed["requester"] == "alice" and signed["status"] == "requested"
    (entry,) = world.shop.ok("audit", "log", "--last", "1")
    assert entry["event"] == "withdrawal.request_signed" and entry["signature"] == good
    assert entry["payload"]["webauthn"] == world.keys["alice"].credential.fingerprint
    # Signed once: another assertion, even hers over the same statement, does not replace it.
    with pytest.raises(Conflict):
        world.sign(wid, "alice", world.assertion("alice", w["request_digest"]))

    # The requester never approves: not with her security key, not with her key file.
    approval = world.assertion("alice", w["statement_digest"])
    with pytest.raises(ApprovalError, match="cannot approve"):
        approve_with_security_key(world.db, world.settings, wid, "alice", world.keys["alice"].credential.id, approval)
    mine = _approve(world, wid, "alice")
    assert mine.exit_code == 4 and "cannot approve" in mine.stderr, mine.output
    for who in ("bob", "carol"):
        assert _approve(world, wid, who).exit_code == 0
    psbt = world.shop.tmp / f"w{wid}.psbt"
    assert world.shop.c("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    accepted = world.cli_sign(psbt)
    assert accepted.exit_code == 0, accepted.output

    # The same PSBT rewritten byte by byte, as the online machine could: each refused offline.
    other = world.draft(amount="0.002")
    replayed = world.assertion("alice", other["request_digest"])
    world.sign(other["id"], "alice", replayed)
    request = bytes.fromhex(w["request_digest"])
    forgeries: dict[str, tuple[dict[str, str], str]] = {
        "replayed from another request": ({"request_signature": replayed}, "challenge is not this statement's"),
        "over the approval statement": ({"request_signature": approval}, "challenge is not this statement's"),
        "made at another origin": (
            {"request_signature": world.assertion("alice", request, client={"origin": "http://localhost:9"})},
            "not the roster's",
        ),
        "a key the founders never listed": (
            {"request_signature": world.assertion("stranger", request)},
            "signature does not verify",
        ),
        "another account debited": ({"account": "acct-2"}, "challenge is not this statement's"),
        "an employee without the request role": (
            {"requester": "dave", "request_signature": world.assertion("dave", request)},
            "has no request role",
        ),
    }
    for name, (edit, why) in forgeries.items():
        refused = world.cli_sign(_rewrite_meta(psbt, edit, name))
        assert refused.exit_code == 4 and why in refused.stderr, (name, refused.output)
    # The payment raised by 1000 sat taken from the change: the request (checked first) no longer covers it.
    refused = world.cli_sign(_rewrite_amount(psbt, w["destination"], 1000))
    assert refused.exit_code == 4 and "alice's request" in refused.stderr, refused.output


def _rewrite_meta(psbt: Path, edit: dict[str, str], name: str) -> Path:
    p = psbt_lib.Psbt.parse(read_psbt(psbt))
    key = psbt_lib.ProprietaryKey(PROPRIETARY_ID, PROP_META, b"")
    p.proprietary[key] = json.dumps({**json.loads(p.proprietary[key]), **edit}).encode()
    out = psbt.with_name(f"{psbt.stem}-{name.replace(' ', '-')}.psbt")
    out.write_text(p.to_base64() + "\n")
    return out


def _rewrite_amount(psbt: Path, to: str, sats: int) -> Path:
    spk = parse_destination(to, REGTEST).script_pubkey
    p = psbt_lib.Psbt.parse(read_psbt(psbt))
    (paid,) = [o for o in p.tx.vout if bytes(o.scriptPubKey) == spk]
    (change,) = [o for o in p.tx.vout if bytes(o.scriptPubKey) != spk]
    paid.nValue += sats
    change.nValue -= sats
    out = psbt.with_name(f"{psbt.stem}-amount.psbt")
    out.write_text(p.to_base64() + "\n")
    return out


def test_requests_an_insider_forges_are_refused_by_the_service(world: World) -> None:
    first, second = world.draft(amount="0.003"), world.draft(amount="0.004")
    world.sign(first["id"], "alice", world.assertion("alice", first["request_digest"]))
    wid, digest = second["id"], second["request_digest"]

    def refused(assertion: str, why: str, who: str = "alice", key: str | None = None) -> None:
        with pytest.raises(ApprovalError, match=why):
            world.sign(wid, who, assertion, key)

    # The first request's assertion, played again for the second; an assertion over its approval statement.
    log = world.shop.ok("audit", "log", "--last", "5")
    (replayed,) = [
        e["signature"]
        for e in log
        if e["event"] == "withdrawal.request_signed" and e["payload"]["withdrawal_id"] == first["id"]
    ]
    refused(replayed, "challenge is not this statement's digest")
    refused(world.assertion("alice", second["statement_digest"]), "challenge is not this statement's digest")
    refused(world.assertion("alice", digest, client={"origin": "http://localhost:9"}), "not the roster's")
    refused(world.assertion("alice", digest, rp_id="example.com"), "another relying party")
    # A key the founders never listed: in alice's name, or claiming her credential id.
    refused(world.assertion("stranger", digest), "not alice's in the founders' roster", key="stranger")
    refused(world.assertion("stranger", digest), "signature does not verify")
    # Dave may approve but not request: he records nothing, and signs nobody's request.
    with pytest.raises(ApprovalError, match="has no request role"):
        world.draft("dave")
    refused(world.assertion("dave", digest), "did not request", who="dave")
    # None of that signed it; alice's own assertion does, and a counter not above it is refused.
    assert _approve(world, wid, "bob").exit_code == 4
    world.sign(wid, "alice", world.assertion("alice", digest))
    third = world.draft(amount="0.001")
    highest = world.count
    world.count -= 2  # a clone of her key, a step behind: it neither signs nor records
    with pytest.raises(ApprovalError, match="signature counter"):
        world.sign(third["id"], "alice", world.assertion("alice", third["request_digest"]))
    with pytest.raises(ApprovalError, match="signature counter"):
        world.draft(amount="0.001")
    world.count = highest


def test_the_amount_edited_in_the_store_after_signing_is_refused(world: World) -> None:
    w = world.draft(amount="0.005")
    world.sign(w["id"], "alice", world.assertion("alice", w["request_digest"]))
    with world.db.transaction() as s:
        # The column alone: the row no longer agrees with its own transaction.
        s.execute(text("UPDATE withdrawal SET amount = amount + 1000 WHERE id = :id"), {"id": w["id"]})
    refused = _approve(world, w["id"], "bob")
    assert refused.exit_code != 0 and "disagree" in refused.stderr, refused.output
    # The transaction too, consistently (1000 sat more paid, 1000 less change): approvers would see a
    # well-formed withdrawal, but alice's request does not cover it.
    with world.db.transaction() as s:
        (raw, spk) = s.execute(
            text("SELECT unsigned_tx, destination_spk FROM withdrawal WHERE id = :id"), {"id": w["id"]}
        ).one()
        tx = CMutableTransaction.from_tx(CTransaction.deserialize(x(raw)))
        for out in tx.vout:
            out.nValue += 1000 if bytes(out.scriptPubKey).hex() == spk else -1000
        s.execute(
            text("UPDATE withdrawal SET unsigned_tx = :tx, change_amount = change_amount - 1000 WHERE id = :id"),
            {"tx": b2x(tx.serialize()), "id": w["id"]},
        )
    refused = _approve(world, w["id"], "bob")
    assert refused.exit_code == 4 and "alice's request" in refused.stderr, refused.output


def test_a_request_assertion_is_bound_to_its_withdrawal_not_to_its_destination_and_amount(world: World) -> None:
    # The same customer, destination and amount twice: the second is another withdrawal (its id,
    # its coins), so the first one's assertion does not sign it.
    to, _ = destination()
    first, second = world.draft(amount="0.0011", to=to), world.draft(amount="0.0011", to=to)
    assert first["request_digest"] != second["request_digest"]
    assertion = world.assertion("alice", first["request_digest"])
    with pytest.raises(ApprovalError, match="challenge is not this statement's digest"):
        world.sign(second["id"], "alice", assertion)
    world.sign(first["id"], "alice", assertion)
    refused = _approve(world, second["id"], "bob")
    assert refused.exit_code == 4 and "has not signed the request yet" in refused.stderr, refused.output
    _cancel(world, second["id"])


def _cancel(world: World, wid: int) -> None:
    cancelled = world.shop.c("withdraw", "cancel", str(wid), "--reason", "test", *world.shop.as_("bob"))
    assert cancelled.exit_code == 0, cancelled.output


def test_a_forged_request_signed_audit_entry_neither_signs_a_request_nor_locks_the_key_out(world: World) -> None:
    w = world.draft(amount="0.0012")
    other = world.draft(amount="0.0013")
    world.sign(other["id"], "alice", world.assertion("alice", other["request_digest"]))
    fingerprint = world.keys["alice"].credential.fingerprint
    with world.db.transaction() as s:
        # An insider appends, well chained, the entry a signed request leaves: another request's real
        # assertion, and one whose counter is as high as it goes (made by a key not hers).
        (replayed,) = s.execute(
            text("SELECT request_signature FROM withdrawal WHERE id = :id"), {"id": other["id"]}
        ).one()
        payload = {"withdrawal_id": w["id"], "digest": w["request_digest"], "webauthn": fingerprint}
        audit_log.append(s, REQUEST_SIGNED, "alice", payload, replayed)
        stuck = world.keys["stranger"].assert_(bytes.fromhex(w["request_digest"]), 2**32 - 1)
        audit_log.append(s, REQUEST_SIGNED, "alice", payload, stuck)
    # The store reads the request's standing from the withdrawal's own signature, not from the log.
    refused = _approve(world, w["id"], "bob")
    assert refused.exit_code == 4 and "has not signed the request yet" in refused.stderr, refused.output
    # The planted counter is not alice's key's: her next assertion still counts.
    signed = world.sign(w["id"], "alice", world.assertion("alice", w["request_digest"]))
    assert signed["status"] == "requested"
    assert _approve(world, w["id"], "bob").exit_code == 0


def test_the_account_or_requester_edited_in_the_store_after_signing_is_refused(world: World) -> None:
    w = world.draft(amount="0.0014")
    world.sign(w["id"], "alice", world.assertion("alice", w["request_digest"]))

    def edit(column: str, value: str) -> None:
        with world.db.transaction() as s:
            s.execute(text(f"UPDATE withdrawal SET {column} = :v WHERE id = :id"), {"v": value, "id": w["id"]})

    # Another customer debited: alice signed acct-1.
    edit("account", "acct-2")
    refused = _approve(world, w["id"], "bob")
    assert refused.exit_code == 4 and "alice's request" in refused.stderr, refused.output
    edit("account", "acct-1")
    # Carol named as the requester, so that alice may approve her own request: it stands for nobody.
    edit("requester", "carol")
    for who in ("alice", "bob"):
        refused = _approve(world, w["id"], who)
        assert refused.exit_code == 4 and "not carol's" in refused.stderr, (who, refused.output)
    edit("requester", "alice")
    assert _approve(world, w["id"], "bob").exit_code == 0


def _stored(world: World) -> tuple[int, ...]:
    """What a recording changes: withdrawals, reserved coins, audit entries, used record nonces."""
    with world.db.transaction() as s:
        return tuple(
            int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("withdrawal", "reserved_input", "audit_log", "service_nonce")
        )


def test_nothing_is_recorded_without_the_requester_s_own_fresh_assertion_over_exactly_this_request(
    world: World,
) -> None:
    to, _ = destination()
    content = {"account": "acct-1", "destination": to, "amount": "0.0015"}
    earlier = world.draft(amount="0.0016")  # a request recorded before, its assertion in the audit log
    (old,) = [e for e in world.shop.ok("audit", "log", "--last", "3") if e["event"] == "withdrawal.requested"]
    assert old["payload"]["withdrawal_id"] == earlier["id"] and old["signature"].startswith("{")
    assert old["payload"]["webauthn"] == world.keys["alice"].credential.fingerprint
    c = wr.record_challenge("alice", **content)
    before = _stored(world)

    def refused(error: type[Exception], why: str, assertion: str, who: str = "alice", **over: Any) -> None:
        key, ch = over.pop("key", None), over.pop("challenge", c)
        with pytest.raises(error, match=why):
            world.record(who, ch, assertion, key=key, **{**content, **over})
        assert _stored(world) == before, why

    # No assertion at all, or an empty one.
    refused(InputError, "is JSON", "")
    refused(InputError, "authenticator_data, client_data_json, signature", "{}")
    # Another employee's key: bob's (request role, in the roster) over alice's challenge, in her
    # name; posted with her credential id; and bob's own in his name over a challenge naming her.
    bobs = world.assertion("bob", c.digest)
    refused(ApprovalError, "not alice's in the founders' roster", bobs, key="bob")
    refused(ApprovalError, "signature does not verify", bobs)
    refused(ApprovalError, "challenge is not this statement's digest", bobs, who="bob")
    # A key the founders never listed: with its own credential id, or claiming hers.
    stranger = world.assertion("stranger", c.digest)
    refused(ApprovalError, "not alice's in the founders' roster", stranger, key="stranger")
    refused(ApprovalError, "signature does not verify", stranger)
    # An employee without the request role records nothing, even in his own name.
    refused(ApprovalError, "has no request role", world.assertion("dave", c.digest), who="dave")
    # Replayed from another request: the earlier one's record assertion, read from the audit log.
    refused(ApprovalError, "challenge is not this statement's digest", old["signature"])
    # The content changed after the challenge: each field, the nonce, the moment.
    good = world.assertion("alice", c.digest)
    for field, value in (("amount", "0.0151"), ("destination", destination()[0]), ("account", "acct-2")):
        refused(ApprovalError, "challenge is not this statement's digest", good, **{field: value})
    refused(
        ApprovalError, "challenge is not this statement's", good, challenge=wr.RecordChallenge(c.digest, "0" * 32, c.at)
    )
    refused(
        ApprovalError,
        "challenge is not this statement's",
        good,
        challenge=wr.RecordChallenge(c.digest, c.nonce, iso(now())),
    )
    # Made at another origin, or in a cross-origin frame, or for another relying party.
    refused(
        ApprovalError, "not the roster's", world.assertion("alice", c.digest, client={"origin": "http://localhost:9"})
    )
    refused(ApprovalError, "cross-origin frame", world.assertion("alice", c.digest, client={"crossOrigin": True}))
    refused(ApprovalError, "another relying party", world.assertion("alice", c.digest, rp_id="example.com"))
    # Her own key over a challenge whose moment is past the window (or ahead of the clock).
    for at, why in (
        (now() - timedelta(seconds=wr.RECORD_WINDOW + 60), "older than"),
        (now() + timedelta(hours=1), "future"),
    ):
        stale = _challenge("alice", content, at)
        refused(ApprovalError, why, world.assertion("alice", stale.digest), challenge=stale)

    # Her own assertion records, once: played again (from the same challenge) it records nothing.
    w = world.record("alice", c, good, **content)
    assert w["requester"] == "alice" and w["awaiting_request_signature"] and w["amount_sat"] == 150_000
    (entry,) = world.shop.ok("audit", "log", "--last", "1")
    assert entry["event"] == "withdrawal.requested" and entry["signature"] == good, entry
    assert entry["payload"]["record_digest"] == c.digest, entry
    after = _stored(world)
    with pytest.raises(ApprovalError, match="used already"):
        world.record("alice", c, good, **content)
    assert _stored(world) == after
    _cancel(world, w["id"])
    _cancel(world, earlier["id"])


def _challenge(who: str, content: dict[str, str], at: datetime) -> wr.RecordChallenge:
    """A record challenge naming the moment ``at`` (as the console would have made it then)."""
    nonce, moment = secrets.token_hex(16), iso(at, "microseconds") or ""
    fields = wr.record_fields(
        who, content["account"], content["destination"], parse_btc_amount(content["amount"]), nonce, moment
    )
    return wr.RecordChallenge(statement_digest(wr.RECORD_DOMAIN, fields).hex(), nonce, moment)


def test_a_key_that_keeps_no_counter_records_once_per_challenge(world: World) -> None:
    # Some keys never count (always 0): the counter cannot refuse their replay, the nonce does.
    to, _ = destination()
    content = {"account": "acct-1", "destination": to, "amount": "0.0017"}
    c = wr.record_challenge("bob", **content)
    zero = world.keys["bob"].assert_(bytes.fromhex(c.digest), 0)
    w = world.record("bob", c, zero, **content)
    before = _stored(world)
    with pytest.raises(ApprovalError, match="used already"):
        world.record("bob", c, zero, **content)
    assert _stored(world) == before
    _cancel(world, w["id"])


def test_a_requester_holds_at_most_a_few_requests_unsigned(world: World) -> None:
    # Recording a request takes her key over its content, not yet over its exact transaction: each
    # recorded and never signed holds its coins and the customer's balance until cancelled, so a
    # key left in a machine could hold them all. Beyond the bound, refused (Conflict, exit 6).
    with world.db.transaction() as s:
        waiting = s.execute(
            text(
                "SELECT count(*) FROM withdrawal"
                " WHERE requester = 'alice' AND status = 'requested' AND request_signature = ''"
            )
        ).scalar_one()
    drafted = [world.draft(amount="0.0001")["id"] for _ in range(MAX_UNSIGNED_REQUESTS - waiting)]
    content = {"account": "acct-1", "destination": destination()[0], "amount": "0.0001"}
    c = wr.record_challenge("alice", **content)
    refused = world.assertion("alice", c.digest)
    with pytest.raises(Conflict, match="awaiting their security key"):
        world.record("alice", c, refused, **content)
    # Cancelled (or signed), the next one is recorded; not by the assertion refused above, played
    # again now that it would fit: it was used.
    _cancel(world, drafted[-1])
    with pytest.raises(ApprovalError, match="used already"):
        world.record("alice", c, refused, **content)
    world.draft(amount="0.0001")


def test_deleting_a_request_signed_entry_to_roll_the_counter_back_breaks_the_audit_chain(world: World) -> None:
    # Last in this module: it halts trading. A counter read from the log could be rolled back by
    # deleting the entries that name the key; the log's chain shows the hole.
    assert world.shop.c("audit", "log", "--verify").exit_code == 0
    with world.db.transaction() as s:
        s.execute(text("DELETE FROM audit_log WHERE event = :e"), {"e": REQUEST_SIGNED})
    broken = world.shop.c("audit", "log", "--verify")
    assert broken.exit_code == 3, broken.output


def test_a_cloned_key_signing_two_requests_at_once_with_one_counter_counts_once(tmp_path: Path, pg_url: str) -> None:
    # PostgreSQL: writers read committed rows, and each request locks its own withdrawal only; what
    # serializes the counter checks is the halt guard's lock on the audit head, taken first. The
    # key and its clone sign two requests with the same counter; the first process stands still
    # between its counter check and its commit while the second is tried: it waits, then is refused.
    world = _world(tmp_path, pg_url, coins=2)
    try:
        first, second = world.draft(amount="0.001"), world.draft(amount="0.002")
        credential = world.keys["alice"].credential.id
        count = world.count + 1
        a = world.keys["alice"].assert_(bytes.fromhex(first["request_digest"]), count)
        b = world.keys["alice"].assert_(bytes.fromhex(second["request_digest"]), count)
        script = (
            "import sys; from custody.config import Settings; from custody.store.db import Database; "
            "from custody.withdraw.webauthn_request import sign_request_with_security_key as sign; "
            "s = Settings.load(); sign(Database(s.db_url), s, int(sys.argv[1]), 'alice', sys.argv[2], sys.argv[3])"
        )
        env = dict(os.environ, **world.shop.c.env, CUSTODY_PAUSE_AT="webauthn.counter_checked")
        paused = subprocess.Popen(
            [sys.executable, "-c", script, str(first["id"]), credential, a], env=env, stderr=subprocess.PIPE, text=True
        )
        wait_stopped(paused.pid, "the first request")
        outcome: list[BaseException | None] = []

        def sign_second() -> None:
            try:
                world.sign(second["id"], "alice", b)
                outcome.append(None)
            except ApprovalError as exc:
                outcome.append(exc)

        racer = threading.Thread(target=sign_second)
        racer.start()
        racer.join(5)  # without a lock it has finished by now; with one it waits for the first
        os.kill(paused.pid, signal.SIGCONT)
        _, err = paused.communicate(timeout=120)
        racer.join()
        assert paused.returncode == 0, err
        (refused,) = outcome
        assert isinstance(refused, ApprovalError) and "signature counter" in str(refused), outcome
    finally:
        world.shop.chain.close()
