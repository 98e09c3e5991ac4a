"""The custody story end to end, for ``custody demo``: the top layer, it uses every other.

It plays every role in one process, with a demo passphrase, in a fresh directory on the
embedded regtest chain (SQLite, no server): the founders' key ceremony, the 2-of-3 manifest
every founder signs, employees enrolled by a founders-signed roster, deposit addresses for a
few accounts, the auditors' independent verification, a tampered export caught and trading
halted, the halt lifted by two employees, deposits, a founders-signed rulebook that refuses a
withdrawal above its maximum, a withdrawal from request through offline review and signing to
confirmation, and the continuous audit.

:class:`Story` holds the steps in order; each step does its work and returns what it did as
data. The CLI announces a step, runs it and renders the data: nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import coincurve

from custody import verify
from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.bech32 import encode_segwit
from custody.bitcoin.destinations import parse_destination
from custody.bitcoin.encoding import hash160
from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.books import audit, deposits, ledger
from custody.chain.backend import backend_for
from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.control import halt as halt_lib
from custody.control import halt_lift, incidents
from custody.control import roster as roster_lib
from custody.control import rulebook as rulebook_lib
from custody.control.wallet import init_store
from custody.errors import CustodyError, InputError
from custody.identity.employee_keys import FileSigner
from custody.identity.keyfile import create_employee_key, create_founder_key, open_employee_key, open_founder_key
from custody.identity.roster import sign_roster
from custody.identity.rulebook import sign_rulebook
from custody.issuance.issuer import export_addresses, issue_addresses, list_addresses
from custody.policy.manifest import SignedManifest, load_signed_manifest, sign_manifest, unsigned, write_manifest
from custody.policy.model import make_policy
from custody.policy.origins import standard_path
from custody.store.db import Database
from custody.withdraw import broadcast as wd_broadcast
from custody.withdraw import limits as wd_limits
from custody.withdraw import psbt_io as wd_psbt
from custody.withdraw import queue as wd
from custody.withdraw.signer import SignerState, review, sign_reviewed

PASSPHRASE = "demo passphrase, never for real keys"
"""The passphrase of every key file the demo makes (demo only)."""

FOUNDERS = ("founder-a", "founder-b", "founder-c")
EMPLOYEES = ("alice", "bob", "carol")
ACCOUNTS = ("acct-1001", "acct-1002", "acct-1003")
WITHDRAWAL_BTC = "1.5"
RULES: dict[str, Any] = {
    "max_withdrawal_sat": 200_000_000,
    "velocity": [{"name": "daily", "scope": "global", "window_blocks": 144, "max_sat": 500_000_000}],
    "fees": {"max_fee_sat": 100_000, "max_fee_rate": "50", "max_fee_share_bp": 100, "max_batch_fee_sat": 200_000},
}
"""The demo's rulebook: at most 2 BTC a withdrawal and 5 BTC in 144 blocks, modest fees."""


def fresh_directory(base: Path = Path("custody-demo")) -> Path:
    """A new ``base/run-…`` directory name, one per run (not created here)."""
    return base / datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")


@dataclass(frozen=True)
class Step:
    """One step of the story: its number, a stable name for renderers, a title, and its work."""

    number: int
    name: str
    title: str
    run: Callable[[], dict[str, Any]]


class Story:
    """The demo in ``directory`` (created; refused unless new or empty).

    Raises InputError for a directory that holds anything. Each step raises CustodyError
    when the story does not go as it must (a clean store failing verification; issuance, a
    self-approval or an employee the founders did not sign for not refused).
    """

    def __init__(self, directory: Path, script_type: ScriptType = ScriptType.P2WSH, per_account: int = 3) -> None:
        if directory.exists() and any(directory.iterdir()):
            raise InputError(f"{directory} is not empty; give a new --dir (each demo starts fresh)")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory.resolve()  # paths shown at the end work from anywhere
        self.keys = self.directory / "keys"
        self.auditors = self.directory / "auditors"
        self.auditor_manifest = self.auditors / "founders-manifest.json"
        self.home = self.directory / "store"
        self.settings = Settings.load(home=str(self.home), env={"CUSTODY_CHAIN": "embedded"})
        self.db = Database(self.settings.db_url, halt_file=self.settings.halt_file, manifest=self.settings.manifest)
        self.script_type = script_type
        self.per_account = per_account
        self._founder_keys: dict[str, Any] = {}  # name -> account private key (the ceremony's)
        self._manifest: SignedManifest | None = None
        self._backend: ChainBackend | None = None
        self._halt_id = 0
        self._wid = 0
        self._destination = ""
        self._signed: list[Path] = []

    def steps(self) -> list[Step]:
        """The story's steps, in the order they must run."""
        parts = [
            ("ceremony", "Founders' key ceremony: three founders create keys offline and publish xpubs", self.ceremony),
            (
                "policy",
                "Every founder signs the 2-of-3 manifest; the store is created from it and it is pinned",
                self.policy,
            ),
            (
                "employees",
                "Employees: keys made, proposed as roster #1, which two founders sign offline; only then enrolled",
                self.employees,
            ),
            ("addresses", "Deposit addresses, each verified independently before it is shown", self.addresses),
            (
                "verify",
                "Auditors re-derive every address from their own copy of the founders' manifest",
                self.verify_addresses,
            ),
            (
                "tamper",
                "Someone swaps an address in the export: the verifier catches it and trading halts",
                self.tamper,
            ),
            ("lift", "Two employees sign the lift of that exact halt", self.lift),
            (
                "deposits",
                "Customers deposit: blocks mined on the embedded chain (Bitcoin Core's validation) pay them",
                self.deposit,
            ),
            (
                "rulebook",
                "The founders sign rulebook #1 (limits the store and every offline signer enforce); it refuses 5 BTC",
                self.rulebook,
            ),
            (
                "request",
                f"carol requests a withdrawal of {WITHDRAWAL_BTC} BTC for acct-1001 to the customer's own address",
                self.request,
            ),
            (
                "approvals",
                "Approvals: carol may not approve her own request; alice and bob sign the exact transaction",
                self.approvals,
            ),
            ("offline", "Offline signing: the PSBT goes to two founders' machines (no store, no node)", self.offline),
            (
                "broadcast",
                "Signatures merged, final transaction checked by the kernel, broadcast, mined, confirmed",
                self.broadcast,
            ),
            (
                "audit",
                "The continuous audit: every account sums to zero, reserves cover liabilities, the log is intact",
                self.continuous_audit,
            ),
        ]
        return [Step(n, name, title, run) for n, (name, title, run) in enumerate(parts, start=1)]

    def where(self) -> dict[str, Path | str]:
        """Where the story left its data."""
        return {
            "store": self.settings.db_url,
            "home": self.home,
            "manifest": self.settings.manifest,
            "halt_file": self.settings.halt_file,
            "chain": self.settings.chain_datadir,
            "keys": self.keys,
            "auditors": self.auditors,
            "auditor_manifest": self.auditor_manifest,
        }

    # ------------------------------------------------------------ helpers

    @property
    def backend(self) -> ChainBackend:
        if self._backend is None:
            self._backend = backend_for(self.settings, "regtest")
        return self._backend

    def _employee(self, name: str) -> FileSigner:
        return FileSigner(open_employee_key(self.keys / f"{name}.key", PASSPHRASE))

    def _components(self) -> list[tuple[str, str]]:
        return list(incidents.status_view(self.db)["components"].items())

    # ------------------------------------------------------------ the steps

    def ceremony(self) -> dict[str, Any]:
        """Three founder keys; their account xpubs with key origin."""
        founders = []
        for name in FOUNDERS:
            path = self.keys / f"{name}.key"
            key = create_founder_key(
                path, name, REGTEST, PASSPHRASE, account_path=standard_path(REGTEST, self.script_type)
            )
            founders.append((name, str(key.account)))
            self._founder_keys[name] = key.master.derive(key.account_path).private_key()
        self._manifest = unsigned(make_policy(REGTEST, 2, self.script_type, founders))
        return {"founders": founders}

    def policy(self) -> dict[str, Any]:
        """Every founder signs the manifest; the store is made from it, it is pinned and handed
        to the auditors."""
        assert self._manifest is not None, "the ceremony comes first"
        signed = self._manifest
        signers = []
        for name, account_key in self._founder_keys.items():
            signed = sign_manifest(signed, name, account_key)
            signers.append({"founder": name, "fingerprint": signed.fingerprint})
        self._manifest = signed
        init_store(self.db, signed)
        roster_lib.pin_manifest(self.settings.manifest, signed)
        write_manifest(self.auditor_manifest, signed.to_document())
        halt_lib.publish(self.db, self.settings)
        return {"signed": signers, "fingerprint": signed.fingerprint}

    def employees(self) -> dict[str, Any]:
        """Three employee keys proposed as roster #1, signed by two founders and applied; an
        employee only proposed cannot act."""
        made = []
        for name in EMPLOYEES:
            key = create_employee_key(self.keys / f"{name}.key", name, PASSPHRASE)
            roster_lib.propose(self.db, self.settings, [roster_lib.Change("add", name, key.public_key.hex())])
            made.append((name, key.public_key.hex()))
        proposal = roster_lib.proposal(self.db)
        founders_view = roster_lib.load_trust(self.settings).founders
        for name in FOUNDERS[:2]:
            proposal = sign_roster(proposal, name, self._founder_keys[name], founders_view)
        applied = roster_lib.apply_roster(self.db, self.settings, json.dumps(proposal.to_document()).encode())
        mallory = create_employee_key(self.keys / "mallory.key", "mallory", PASSPHRASE)
        roster_lib.propose(self.db, self.settings, [roster_lib.Change("add", "mallory", mallory.public_key.hex())])
        try:
            halt_lib.raise_by_employee(self.db, self.settings, "mallory", FileSigner(mallory), "only proposed")
        except CustodyError as exc:
            refused = {"exit_code": exc.exit_code, "message": str(exc)}
        else:
            raise CustodyError("an employee the founders did not sign for raised a halt")
        return {
            "employees": made,
            "roster": applied.serial,
            "roster_signers": sorted(applied.signatures),
            "unsigned_refused": refused,
        }

    def addresses(self) -> dict[str, Any]:
        """``per_account`` deposit addresses for each account, each verified before it is issued."""
        issued = []
        for account in ACCOUNTS:
            for a in issue_addresses(self.db, self.settings, account, self.per_account):
                issued.append({"account": account, "chain": a.chain, "index": a.index, "address": a.address})
        return {"addresses": issued}

    def verify_addresses(self) -> dict[str, Any]:
        """The auditors' export checked by the independent verifier against their manifest."""
        export = self.auditors / "addresses.jsonl"
        count = export_addresses(self.db, export)
        report = verify.verify_export(verify.load_manifest(self.auditor_manifest), export)
        if not report.ok:
            raise CustodyError(
                f"the clean store failed verification: {report.failure_count} failure(s) in {report.checked} checked"
            )
        return {"checked": report.checked, "exported": count, "ok": report.ok}

    def tamper(self) -> dict[str, Any]:
        """One exported address swapped for another: caught, the halt raised, issuance refused."""
        export = self.auditors / "addresses.jsonl"
        tampered = self.auditors / "addresses-tampered.jsonl"
        lines = export.read_text(encoding="utf-8").splitlines()
        i = min(2, len(lines) - 2)  # the third record, or the last but one of a short export
        record = json.loads(lines[i])
        record["address"] = json.loads(lines[i + 1])["address"]  # another issued address in its place
        lines[i] = json.dumps(record)
        tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")
        report = verify.verify_export(verify.load_manifest(self.auditor_manifest), tampered)
        if report.ok:
            raise CustodyError("the verifier did not catch the swapped address")
        failures = [
            {"address": f.address, "chain": f.chain, "index": f.index, "reason": f.reason} for f in report.failures
        ]
        raised = halt_lib.raise_halt(
            self.db,
            self.settings,
            reason=f"address verification failed: {report.failures[0].reason}",
            source="verification",
            actor="verifier",
        )
        self._halt_id = raised.id or 0
        halted = json.loads(self.settings.halt_file.read_text())["halted"]
        try:
            issue_addresses(self.db, self.settings, ACCOUNTS[0], 1)
        except CustodyError as exc:
            refused = {"exit_code": exc.exit_code, "message": str(exc)}
        else:
            raise CustodyError("an address was issued while trading was halted")
        return {
            "failures": failures,
            "halt_id": self._halt_id,
            "halt_file": self.settings.halt_file,
            "halted": halted,
            "issuance_refused": refused,
            "components": self._components(),
        }

    def lift(self) -> dict[str, Any]:
        """alice and bob sign the lift of the halt the tampering raised."""
        signed = []
        for name in ("alice", "bob"):
            result = halt_lift.lift(self.db, self.settings, self._halt_id, name, self._employee(name))
            signed.append(
                {"employee": name, "signers": len(result.signers), "needed": result.needed, "lifted": result.lifted}
            )
        return {"signed": signed, "components": self._components()}

    def deposit(self) -> dict[str, Any]:
        """A block paying the first address of each account, matured, and the deposits credited."""
        for a in list_addresses(self.db):
            if a.index % self.per_account == 0:  # the first address of each account
                self.backend.mine(1, bytes.fromhex(a.script_pubkey))
        self.backend.mine(100, b"\x51")  # coinbase maturity
        return {"credited": deposits.sync_deposits(self.db, self.settings, self.backend, 1)}

    def _request(self, amount: str) -> dict[str, Any]:
        customer = coincurve.PrivateKey(hashlib.sha256(b"demo customer wallet").digest())
        self._destination = encode_segwit("bcrt", 0, hash160(customer.public_key.format()))
        return wd.request_withdrawal(
            self.db,
            self.settings,
            self.backend,
            account=ACCOUNTS[0],
            destination=self._destination,
            amount=amount,
            fee_rate="2",
            requester="carol",
            key=self._employee("carol"),
        )

    def rulebook(self) -> dict[str, Any]:
        """Rulebook #1 proposed, signed by two founders offline and applied; carol's request of
        5 BTC, above its maximum, refused with the rule's name."""
        book, _ = rulebook_lib.propose(self.db, self.settings, self.backend, RULES)
        founders_view = roster_lib.load_trust(self.settings).founders
        for name in FOUNDERS[:2]:
            book = sign_rulebook(book, name, self._founder_keys[name], founders_view)
        applied, _ = rulebook_lib.apply(self.db, self.settings, json.dumps(book.to_document()).encode())
        try:
            self._request("5")
        except CustodyError as exc:
            refused = {"exit_code": exc.exit_code, "message": str(exc)}
        else:
            raise CustodyError("a withdrawal above the rulebook's maximum was accepted")
        return {
            "serial": applied.serial,
            "fingerprint": rulebook_lib.fingerprint(applied.digest),
            "signed_by": sorted(applied.signatures),
            "rules": RULES,
            "refused": refused,
        }

    def request(self) -> dict[str, Any]:
        """carol's request: coins selected, change to a fresh verified address, inputs reserved."""
        w = self._request(WITHDRAWAL_BTC)
        self._wid = int(w["id"])
        return {"withdrawal": w, "destination": self._destination}

    def approvals(self) -> dict[str, Any]:
        """carol's own approval refused; alice's and bob's counted."""
        wid = self._wid
        try:
            wd.approve(self.db, wid, "carol", self._employee("carol"), settings=self.settings)
        except CustodyError as exc:
            refused = {"exit_code": exc.exit_code, "message": str(exc)}
        else:
            raise CustodyError("the requester's own approval was accepted")
        approved = []
        for name in ("alice", "bob"):
            w = wd.approve(self.db, wid, name, self._employee(name), settings=self.settings)
            approved.append({"employee": name, "status": w["status"]})
        return {"requester_refused": refused, "approved": approved}

    def offline(self) -> dict[str, Any]:
        """The PSBT exported; two founders, with only their key file, their own signer state and
        the auditors' copy of the signed manifest, review what it pays and sign."""
        wid = self._wid
        unsigned_psbt = self.directory / "offline" / f"withdrawal-{wid}.psbt"
        unsigned_psbt.parent.mkdir(parents=True, exist_ok=True)
        unsigned_psbt.write_bytes(wd_psbt.export_psbt(self.db, wid).serialize())  # binary, as BIP-174 names .psbt files
        pinned = load_signed_manifest(self.auditor_manifest.read_bytes()).check()
        signed = []
        for name in FOUNDERS[:2]:
            p = psbt_lib.Psbt.parse(unsigned_psbt.read_bytes())
            state = SignerState.load(self.directory / "offline" / name / "signer-state.json", pinned)
            r = review(p, open_founder_key(self.keys / f"{name}.key", PASSPHRASE), pinned, state)
            result = sign_reviewed(p, r, state)
            out = unsigned_psbt.with_name(f"withdrawal-{wid}-{name}.psbt")
            out.write_bytes(p.serialize())
            self._signed.append(out)
            signed.append(
                {
                    "founder": name,
                    "digest": r.short_digest,
                    "outputs": list(r.outputs),
                    "fee": r.fee,
                    "approvals": list(result.approvals),
                    "signatures_added": result.signatures_added,
                    "rulebook": r.rulebook_serial,
                    "height": r.height,
                    "tier": r.needs[wid].tier,
                    "tier_approvals": r.needs[wid].approvals,
                }
            )
        return {"psbt": unsigned_psbt, "signed": signed}

    def broadcast(self) -> dict[str, Any]:
        """Signatures imported, finalized, broadcast, mined and followed to confirmation."""
        wid = self._wid
        for path in self._signed:
            wd_psbt.import_psbt(self.db, wid, path.read_bytes())
        wd_psbt.finalize(self.db, wid)
        sent = wd_broadcast.broadcast(self.db, self.backend, wid, settings=self.settings)
        self.backend.mine(1, b"\x51")
        wd_broadcast.sync(self.db, self.backend, wd_limits.Limits(), settings=self.settings)
        deposits.sync_deposits(self.db, self.settings, self.backend, 1)
        script = parse_destination(self._destination, REGTEST).script_pubkey
        paid = self.backend.unspent([bytes(script)])
        return {
            "txid": sent["txid"],
            "withdrawal": wd.show_withdrawal(self.db, wid),
            "customer_sat": sum(u.amount for u in paid),
        }

    def continuous_audit(self) -> dict[str, Any]:
        """The ledger's balances and the three audits: ledger, reserves, audit log."""
        return {
            "balances": ledger.balances(self.db),
            "ledger": audit.audit_ledger(self.db, self.settings),
            "reserves": audit.audit_reserves(self.db, self.settings, self.backend),
            "log": audit.audit_log_check(self.db, self.settings),
        }
