"""Signed notifications against real parts on loopback.

A real SMTP server (aiosmtpd) in this process receives the mail, and the `gpg` program
checks its signature against the key `custody notify key export` published, in a separate
GnuPG home (the recipient's side), and decrypts what was encrypted to the recipient. A real
HTTP server checks webhook signatures and timestamps with its own HMAC code. Events are
driven through the CLI in process: init, employees, halt raise and lift, verification of a
tampered store.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from custody.notify import webhook as webhook_lib
from tests.support import Custody, founders, staffed

SECRET = b"4f1c2b8e9d0a7f6e5d4c3b2a19081726"
LOOPBACK = ("--pinentry-mode", "loopback", "--passphrase", "")
FROM = "custody@exchange.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The gpg program itself (not python-gnupg): the recipient's independent check."""
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "1", *args],
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
    )


def kill_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


# ---------------------------------------------------------------- the mail server


@dataclass
class Mailbox:
    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"

    def up(self) -> None:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def down(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def to(self, address: str) -> list[bytes]:
        return [raw for _, rcpts, raw in self.messages if address in rcpts]


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    yield box
    box.down()


# ---------------------------------------------------------------- the webhook receiver


@dataclass
class Receiver:
    """Checks every request as a receiver must: recent timestamp, HMAC over ``timestamp.body``."""

    port: int
    secret: bytes
    received: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/custody"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ts = self.headers.get("X-Custody-Timestamp", "")
                sig = self.headers.get("X-Custody-Signature", "")
                expected = hmac.new(receiver.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
                    receiver.rejected.append(f"stale timestamp {ts!r}")
                    self.send_response(401)
                elif not hmac.compare_digest(expected, sig):
                    receiver.rejected.append("bad signature")
                    self.send_response(401)
                else:
                    doc = json.loads(body)
                    receiver.received.append({"headers": dict(self.headers), "doc": doc})
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[tuple[int, str]]:
        return [(r["doc"]["audit"]["seq"], r["doc"]["audit"]["event"]) for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port(), SECRET)
    yield r
    r.down()


# ---------------------------------------------------------------- the custody side


@pytest.fixture
def shop(tmp_path: Path, mailbox: Mailbox) -> Iterator[tuple[Custody, dict[str, Path]]]:
    env = {"CUSTODY_SMTP_URL": f"smtp://127.0.0.1:{mailbox.port}", "CUSTODY_NOTIFY_FROM": FROM}
    env["CUSTODY_NOTIFY_TIMEOUT"] = "10"
    c, keys = staffed(tmp_path / "home", env)
    yield c, keys
    kill_agent(c.home / "gnupg")


@pytest.fixture
def system_key(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The system key made with --no-passphrase; its export imported on the recipient's side."""
    c, _ = shop
    made = c("notify", "key", "init", "--uid", f"Exchange custody <{FROM}>", "--no-passphrase", "--json")
    assert made.exit_code == 0, made.output
    fingerprint = json.loads(made.stdout)["fingerprint"]
    exported = c("notify", "key", "export")
    assert exported.exit_code == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in exported.stdout
    assert "PRIVATE" not in exported.stdout
    side = tmp_path / "recipient-gnupg"
    side.mkdir(mode=0o700)
    assert gpg(side, "--import", input=exported.stdout.encode()).returncode == 0
    yield fingerprint, side
    kill_agent(side)


def _raise(c: Custody, keys: dict[str, Path], who: str = "alice", reason: str = "suspicious withdrawal") -> int:
    result = c("halt", "raise", "--reason", reason, "--as", who, "--key", str(keys[who]), "--json")
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["halt_id"])


def _lift(c: Custody, keys: dict[str, Path], halt_id: int, who: str) -> None:
    result = c("halt", "lift", str(halt_id), "--as", who, "--key", str(keys[who]))
    assert result.exit_code == 0, result.output


def _tamper_and_verify(c: Custody, tmp_path: Path) -> Any:
    """Issue addresses, swap one in the store for an outsider's, verify: exit 3 and a halt."""
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.policy.generator import AddressDeriver
    from custody.policy.model import make_policy

    ok = c("address", "new", "--account", "a", "--count", "2")
    assert ok.exit_code == 0, ok.output
    manifest = tmp_path / "auditors.json"
    assert c("policy", "manifest", "--out", str(manifest)).exit_code == 0
    other = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in founders(tag="outsider")])
    db = sqlite3.connect(c.home / "custody.db")
    db.execute("UPDATE address SET address = ? WHERE idx = 1", (AddressDeriver(other).derive(0, 1).address,))
    db.commit()
    db.close()
    return c("verify", "addresses", "--manifest", str(manifest))


# ---------------------------------------------------------------- reading a PGP/MIME mail


def _boundary(raw: bytes) -> tuple[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return msg.get_content_type(), str(msg.get_param("boundary"))


def _signed_parts(entity: bytes) -> tuple[bytes, bytes, str]:
    """(signed bytes, signature, micalg) of a multipart/signed entity, per RFC 3156 section 5."""
    ctype, boundary = _boundary(entity)
    assert ctype == "multipart/signed"
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert msg.get_param("protocol") == "application/pgp-signature"
    delimiter = b"\r\n--" + boundary.encode()
    start = entity.index(b"--" + boundary.encode() + b"\r\n") + len(boundary) + 4
    end = entity.index(delimiter, start)
    signed = entity[start:end]
    sig_start = entity.index(b"-----BEGIN PGP SIGNATURE-----", end)
    sig_end = entity.index(b"-----END PGP SIGNATURE-----", sig_start) + len(b"-----END PGP SIGNATURE-----")
    return signed, entity[sig_start:sig_end] + b"\n", str(msg.get_param("micalg"))


def _verify(side: Path, signed: bytes, signature: bytes, tmp_path: Path) -> str:
    """The signer's fingerprint from gpg's VALIDSIG; fails on a bad signature."""
    sig_file, data_file = tmp_path / "sig.asc", tmp_path / "data.bin"
    sig_file.write_bytes(signature)
    data_file.write_bytes(signed)
    result = gpg(side, "--verify", str(sig_file), str(data_file))
    status = result.stdout.decode()
    assert "[GNUPG:] GOODSIG" in status, status + result.stderr.decode()
    match = re.search(r"\[GNUPG:\] VALIDSIG (\w+)", status)
    assert match
    return match.group(1)


def _text(signed: bytes) -> str:
    part = email.message_from_bytes(signed, policy=email.policy.default)
    assert part.get_content_type() == "text/plain"
    return str(part.get_content())


# ---------------------------------------------------------------- tests


def test_halt_mail_is_pgp_mime_signed_with_the_published_key(
    shop: tuple[Custody, dict[str, Path]], system_key: tuple[str, Path], mailbox: Mailbox, tmp_path: Path
) -> None:
    c, keys = shop
    fingerprint, side = system_key
    mailbox.up()
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    halt_id = _raise(c, keys, reason="cold wallet änomaly")

    mails = mailbox.to("ops@exchange.example")
    assert len(mails) == 1
    raw = mails[0]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == FROM and "HALT" in str(msg["Subject"]) and "änomaly" in str(msg["Subject"])
    assert msg["Message-ID"]
    signed, signature, micalg = _signed_parts(raw)
    assert micalg == "pgp-sha256"
    assert _verify(side, signed, signature, tmp_path) == fingerprint
    text = _text(signed)
    assert f"halt #{halt_id}" in text and "cold wallet änomaly" in text and '"event": "halt.raised"' in text

    # One changed byte and the signature no longer holds.
    forged = signed.replace(b"cold wallet", b"warm wallet")
    assert forged != signed
    (tmp_path / "forged.bin").write_bytes(forged)
    (tmp_path / "sig2.asc").write_bytes(signature)
    bad = gpg(side, "--verify", str(tmp_path / "sig2.asc"), str(tmp_path / "forged.bin"))
    assert "[GNUPG:] BADSIG" in bad.stdout.decode()


def test_mail_to_a_recipient_with_a_key_is_encrypted_then_decrypts_to_a_signed_mail(
    shop: tuple[Custody, dict[str, Path]], system_key: tuple[str, Path], mailbox: Mailbox, tmp_path: Path
) -> None:
    c, keys = shop
    fingerprint, side = system_key
    made = gpg(side, *LOOPBACK, "--quick-gen-key", "Auditor <auditor@exchange.example>", "ed25519", "default")
    assert made.returncode == 0, made.stderr.decode()
    sub = gpg(side, *LOOPBACK, "--quick-add-key", _fpr(side, "auditor@exchange.example"), "cv25519", "encr")
    assert sub.returncode == 0, sub.stderr.decode()
    public = gpg(side, "--armor", "--export", "auditor@exchange.example").stdout
    (tmp_path / "auditor.asc").write_bytes(public)
    added = c(
        "notify", "recipient", "add", "auditor@exchange.example", "--pgp-key", str(tmp_path / "auditor.asc"), "--json"
    )
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["encrypted"] is True
    mailbox.up()
    _raise(c, keys, reason="secret reason")

    (raw,) = mailbox.to("auditor@exchange.example")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    assert b"secret reason" not in raw and "secret" not in str(msg["Subject"])
    armored = raw[raw.index(b"-----BEGIN PGP MESSAGE-----") : raw.index(b"-----END PGP MESSAGE-----") + 25]
    plain = tmp_path / "decrypted.eml"
    decrypted = gpg(side, *LOOPBACK, "--output", str(plain), "--decrypt", input=armored)
    assert decrypted.returncode == 0, decrypted.stderr.decode()
    assert "[GNUPG:] DECRYPTION_OKAY" in decrypted.stdout.decode()
    entity = plain.read_bytes()
    signed, signature, _ = _signed_parts(entity)
    assert _verify(side, signed, signature, tmp_path) == fingerprint
    assert "secret reason" in _text(signed)


def _fpr(home: Path, uid: str) -> str:
    out = gpg(home, "--with-colons", "--list-keys", uid).stdout.decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def test_webhook_posts_are_signed_and_fresh(
    shop: tuple[Custody, dict[str, Path]], receiver: Receiver, tmp_path: Path
) -> None:
    c, keys = shop
    receiver.up()
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
    added = c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret"), "--json")
    assert added.exit_code == 0, added.output
    assert SECRET.decode() not in json.dumps(json.loads(added.stdout))
    halt_id = _raise(c, keys)
    _lift(c, keys, halt_id, "alice")
    _lift(c, keys, halt_id, "bob")

    assert receiver.rejected == []
    assert [e for _, e in receiver.events()] == ["halt.raised", "halt.lifted"]
    raised = receiver.received[0]
    assert raised["headers"]["X-Custody-Event"] == "halt.raised"
    assert raised["doc"]["format"] == "custody-notification" and raised["doc"]["severity"] == "critical"
    assert raised["doc"]["audit"]["payload"]["halt_id"] == halt_id
    lifted = receiver.received[1]["doc"]
    assert lifted["audit"]["payload"]["signers"] == ["alice", "bob"]
    # The secret is in the custody home (0600), not in the store.
    store = (c.home / "custody.db").read_bytes()
    assert SECRET not in store
    secret_files = list((c.home / "notify" / "webhooks").iterdir())
    assert len(secret_files) == 1 and secret_files[0].stat().st_mode & 0o077 == 0


def test_receiver_check_rejects_old_timestamps_and_wrong_secrets() -> None:
    body = b'{"x":1}'
    now = 1_800_000_000
    good = hmac.new(SECRET, f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert webhook_lib.signature(SECRET, now, body) == good
    assert webhook_lib.check_signature(SECRET, str(now), body, good, now=now + 10)
    assert not webhook_lib.check_signature(SECRET, str(now), body, good, now=now + 301)
    assert not webhook_lib.check_signature(b"another secret of 32 bytes......", str(now), body, good, now=now)
    assert not webhook_lib.check_signature(SECRET, str(now), body + b" ", good, now=now)
    assert not webhook_lib.check_signature(SECRET, "yesterday", body, good, now=now)


def test_receiver_down_then_up_gets_every_event_once_in_order(
    shop: tuple[Custody, dict[str, Path]], receiver: Receiver, tmp_path: Path
) -> None:
    c, keys = shop
    (tmp_path / "hook.secret").write_bytes(SECRET)
    assert c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    # The receiver is down: every command still works, says the notification is kept.
    result = c("halt", "raise", "--reason", "one", "--as", "alice", "--key", str(keys["alice"]), "--json")
    assert result.exit_code == 0
    assert "kept" in result.stderr and "unreachable" in result.stderr
    halt_id = json.loads(result.stdout)["halt_id"]
    _lift(c, keys, halt_id, "alice")
    _lift(c, keys, halt_id, "bob")  # backing off: not tried again now
    verified = _tamper_and_verify(c, tmp_path)
    assert verified.exit_code == 3

    waiting = c.json("notify", "pending")
    (hook,) = waiting
    events = [p["event"] for p in hook["pending"]]
    assert events == ["halt.raised", "halt.lifted", "halt.raised", "verification.run"]  # the halt first
    assert hook["attempts"] == 1 and "unreachable" in hook["last_error"] and hook["deliverable_here"]

    receiver.up()
    retried = c("notify", "retry", "--json")
    assert retried.exit_code == 0, retried.output
    assert receiver.rejected == []
    got = receiver.events()
    assert [e for _, e in got] == events
    seqs = [s for s, _ in got]
    assert seqs == sorted(set(seqs))  # in order, each once
    assert [p["seq"] for p in hook["pending"]] == seqs
    assert receiver.received[3]["doc"]["notification"] == "verification.failed"

    # Nothing twice: another retry and more commands deliver only what is new.
    assert c("notify", "retry").exit_code == 0
    assert c("halt", "status").exit_code == 3
    assert len(receiver.received) == 4
    assert c.json("notify", "pending")[0]["pending"] == []
    assert c.json("notify", "recipient", "list")[0]["delivered"] == 4


def test_halt_while_every_channel_is_down_takes_effect_and_is_delivered_by_retry(
    shop: tuple[Custody, dict[str, Path]],
    system_key: tuple[str, Path],
    mailbox: Mailbox,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    c, keys = shop
    _, side = system_key
    (tmp_path / "hook.secret").write_bytes(SECRET)
    assert c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0

    verified = _tamper_and_verify(c, tmp_path)
    assert verified.exit_code == 3  # the halt's exit code, whatever delivery did
    assert "kept" in verified.stderr
    halt_file = json.loads((c.home / "halt.json").read_text())
    assert halt_file["halted"] is True and halt_file["halts"][0]["source"] == "verification"
    assert c("halt", "status").exit_code == 3
    refused = c("address", "new", "--account", "a")
    assert refused.exit_code == 3

    still_down = c("notify", "retry")
    assert still_down.exit_code == 1 and "kept" in still_down.stderr

    mailbox.up()
    receiver.up()
    retried = c("notify", "retry", "--json")
    assert retried.exit_code == 0, retried.output
    assert [e for _, e in receiver.events()] == ["notify.recipient_added", "halt.raised", "verification.run"]
    subjects = [
        str(email.message_from_bytes(m, policy=email.policy.default)["Subject"])
        for m in mailbox.to("ops@exchange.example")
    ]
    assert len(subjects) == 2 and "HALT" in subjects[0] and "verification FAILED" in subjects[1]
    for raw in mailbox.to("ops@exchange.example"):
        signed, signature, _ = _signed_parts(raw)
        _verify(side, signed, signature, tmp_path)


def test_backoff_spares_later_commands_and_retry_ignores_it(
    shop: tuple[Custody, dict[str, Path]], receiver: Receiver, tmp_path: Path
) -> None:
    c, keys = shop
    (tmp_path / "hook.secret").write_bytes(SECRET)
    assert c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    _raise(c, keys)
    first = c.json("notify", "pending")[0]
    assert first["attempts"] == 1 and first["next_attempt_at"]
    assert c("employee", "list").exit_code == 0  # the hook skips a recipient that backs off
    assert c.json("notify", "pending")[0]["attempts"] == 1
    assert c("notify", "retry").exit_code == 1  # forced: tried again, still down
    assert c.json("notify", "pending")[0]["attempts"] == 2


def test_recipients_hear_of_each_other_and_start_from_now(
    shop: tuple[Custody, dict[str, Path]], receiver: Receiver, mailbox: Mailbox, tmp_path: Path
) -> None:
    c, keys = shop
    receiver.up()
    _raise(c, keys, reason="before anyone listened")
    (tmp_path / "hook.secret").write_bytes(SECRET)
    assert c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    assert receiver.received == []  # history before it was added is not sent
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    assert c("notify", "recipient", "remove", "ops@exchange.example").exit_code == 0
    docs = [r["doc"] for r in receiver.received]
    assert [d["notification"] for d in docs] == ["notify.recipient_added", "notify.recipient_removed"]
    assert all(d["audit"]["payload"]["target"] == "ops@exchange.example" for d in docs)
    listed = c.json("notify", "recipient", "list")
    assert [r["kind"] for r in listed] == ["webhook"]
    assert c.json("notify", "webhook", "list")[0]["target"] == receiver.url


def test_mail_waits_when_this_machine_has_no_system_key(
    shop: tuple[Custody, dict[str, Path]], mailbox: Mailbox, tmp_path: Path
) -> None:
    c, keys = shop
    mailbox.up()
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    result = c("halt", "raise", "--reason", "x", "--as", "alice", "--key", str(keys["alice"]))
    assert result.exit_code == 0 and "no system PGP key" in result.stderr
    assert mailbox.messages == []  # never unsigned
    (row,) = c.json("notify", "pending")
    assert [p["event"] for p in row["pending"]] == ["halt.raised"] and row["deliverable_here"] is False
    assert c("notify", "key", "init", "--no-passphrase").exit_code == 0
    assert c("notify", "retry").exit_code == 0
    assert len(mailbox.to("ops@exchange.example")) == 1


def test_a_protected_system_key_signs_only_with_its_passphrase(
    shop: tuple[Custody, dict[str, Path]], mailbox: Mailbox, tmp_path: Path
) -> None:
    c, keys = shop
    (tmp_path / "pp.txt").write_text("notify key passphrase\n")
    made = c("notify", "key", "init", "--passphrase-file", str(tmp_path / "pp.txt"))
    assert made.exit_code == 0, made.output
    kill_agent(c.home / "gnupg")  # forget any cached passphrase
    mailbox.up()
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    _raise(c, keys)
    assert mailbox.messages == []
    assert "passphrase" in c.json("notify", "pending")[0]["last_error"].lower()
    c.env["CUSTODY_NOTIFY_PASSPHRASE_FILE"] = str(tmp_path / "pp.txt")
    assert c("notify", "retry").exit_code == 0
    assert len(mailbox.to("ops@exchange.example")) == 1


def test_refusals_have_stable_exit_codes(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> None:
    c, _ = shop
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    short = tmp_path / "short.secret"
    short.write_bytes(b"tooshort")
    assert c("notify", "key", "export").exit_code == 5  # no key yet
    assert c("notify", "webhook", "add", "ftp://127.0.0.1/x", "--secret-file", str(secret)).exit_code == 2
    assert c("notify", "webhook", "add", "https://u:p@hooks.example/x", "--secret-file", str(secret)).exit_code == 2
    assert c("notify", "webhook", "add", "https://hooks.example/x", "--secret-file", str(short)).exit_code == 2
    assert c("notify", "recipient", "add", "not-an-address").exit_code == 2
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 6
    assert c("notify", "recipient", "remove", "nobody@exchange.example").exit_code == 5
    assert c("notify", "key", "init", "--no-passphrase").exit_code == 0
    assert c("notify", "key", "init", "--no-passphrase").exit_code == 6  # never replaced
    # A private key is refused as a recipient key.
    side = tmp_path / "other-gnupg"
    side.mkdir(mode=0o700)
    assert gpg(side, *LOOPBACK, "--quick-gen-key", "X <x@exchange.example>", "ed25519", "default").returncode == 0
    private = gpg(side, *LOOPBACK, "--armor", "--export-secret-keys").stdout
    (tmp_path / "private.asc").write_bytes(private)
    refused = c("notify", "recipient", "add", "x@exchange.example", "--pgp-key", str(tmp_path / "private.asc"))
    assert refused.exit_code == 2 and "private key" in refused.stderr
    kill_agent(side)
    bad_smtp = dict(c.env, CUSTODY_SMTP_URL="smtp://user:pw@127.0.0.1:25")
    c.env = bad_smtp
    assert c("notify", "pending").exit_code == 2


def test_no_recipient_means_no_delivery_work(custody_home: Path) -> None:
    c = Custody(custody_home)
    assert c("keygen", "founder-a", "--out", str(custody_home.parent / "f.key")).exit_code == 0
    assert not custody_home.exists()  # the hook created nothing without a store


@pytest.fixture
def custody_home(tmp_path: Path) -> Path:
    return tmp_path / "nohome"


@pytest.mark.parametrize(
    ("event", "payload", "kind", "words"),
    [
        ("withdrawal.requested", {"withdrawal_id": 7, "amount": 150_000_000, "destination": "bcrt1qx"}, None, "1.5"),
        ("withdrawal.approved", {"withdrawal_id": 7, "digest": "ab"}, None, "approved by alice"),
        ("withdrawal.finalized", {"withdrawal_id": 7, "txid": "ff" * 32}, "withdrawal.signed", "signed"),
        ("withdrawal.broadcast", {"withdrawal_id": 7, "txid": "ff" * 32}, None, "broadcast"),
        ("withdrawal.confirmed", {"withdrawal_id": 7, "txid": "ff" * 32, "height": 120}, None, "height 120"),
        ("withdrawal.failed", {"withdrawal_id": 7, "reason": "cancelled"}, None, "cancelled"),
        ("withdrawal.refused", {"withdrawal_id": 7, "refusal": "missing-inputs", "reason": "x"}, None, "stays signed"),
        ("withdrawal.batched", {"batch_id": 9, "members": [7, 8]}, None, "#7, #8"),
        ("halt.raised", {"halt_id": 3, "source": "ledger", "reason": "sum is 5"}, "audit.ledger_failed", "ledger"),
        ("halt.raised", {"halt_id": 3, "source": "reserves", "reason": "short"}, "audit.reserves_failed", "short"),
        ("verification.run", {"checked": 4, "failures": 1, "source": "store"}, "verification.failed", "FAILED"),
        ("audit.ledger", {"ok": False}, None, "AUDIT FAILED"),
        ("verification.run", {"checked": 4, "failures": 0, "source": "store"}, "", ""),
        ("withdrawal.signatures_imported", {"withdrawal_id": 7, "founders": ["a"]}, "", ""),
        ("withdrawal.exported", {"withdrawal_id": 7}, "", ""),
        ("address.issued", {"count": 1}, "", ""),
        ("halt.lift_signed", {"halt_id": 3}, "", ""),
    ],
)
def test_which_events_are_told_and_how(event: str, payload: dict[str, Any], kind: str | None, words: str) -> None:
    from datetime import UTC, datetime

    from custody.notify.catalog import notification_for
    from custody.store.models import AuditEntry

    entry = AuditEntry(
        seq=5, at=datetime.now(UTC), event=event, actor="alice", payload=json.dumps(payload), prev_hash="0", hash="1"
    )
    n = notification_for(entry)
    if kind == "":
        assert n is None
        return
    assert n is not None
    assert n.kind == (kind or event) and words in n.title
    assert n.document()["audit"]["payload"] == payload


def test_webhook_urls_are_redacted_in_the_audit_log(
    shop: tuple[Custody, dict[str, Path]], receiver: Receiver, tmp_path: Path
) -> None:
    c, _ = shop
    receiver.up()
    (tmp_path / "hook.secret").write_bytes(SECRET)
    assert c("notify", "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    token_url = f"http://127.0.0.1:{free_port()}/services/T0/B0/sEcReTtOkEn?key=abc"
    assert c("notify", "webhook", "add", token_url, "--secret-file", str(tmp_path / "hook.secret")).exit_code == 0
    (told,) = [r["doc"] for r in receiver.received]
    assert told["notification"] == "notify.recipient_added"
    assert "sEcReTtOkEn" not in json.dumps(told) and told["audit"]["payload"]["target"].endswith("/…")
    db = sqlite3.connect(c.home / "custody.db")
    logged = [row[0] for row in db.execute("SELECT payload FROM audit_log WHERE event LIKE 'notify.%'")]
    db.close()
    assert logged and not any("sEcReTtOkEn" in p or "key=abc" in p for p in logged)
