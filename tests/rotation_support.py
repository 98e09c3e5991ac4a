"""Key rotations for the tests: made with the library (founders' keys in hand), or through the
CLI on an embedded-chain shop (the founders' key files)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.policy.manifest import SignedManifest, load_signed_manifest
from custody.policy.model import Policy, make_policy
from custody.policy.rotation import approve_rotation, draft_rotation
from tests.support import TestFounder, account_key, sign_manifest_with

if TYPE_CHECKING:  # the library's helpers need no chain
    from tests.test_withdraw_embedded import EmbeddedShop


def founders_policy(fs: Sequence[TestFounder], threshold: int) -> Policy:
    """A regtest p2wsh ``threshold``-of-len(fs) policy of the founders ``fs``."""
    return make_policy(REGTEST, threshold, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])


def rotated(
    current: SignedManifest,
    new: Sequence[TestFounder],
    threshold: int,
    approvers: Sequence[TestFounder],
    carries: Mapping[str, Any] | None = None,
) -> SignedManifest:
    """A rotation from ``current`` to :func:`founders_policy` of ``new``, carrying ``carries``:
    signed by every new founder, approved by ``approvers`` (current founders). Not checked."""
    m = sign_manifest_with(draft_rotation(current, founders_policy(new, threshold), carries), list(new))
    for f in approvers:
        m = approve_rotation(m, current, f.name, account_key(f))
    return m


def keygen(shop: EmbeddedShop, name: str) -> tuple[Path, str]:
    path = shop.tmp / "keys" / f"{name}.key"
    made = shop.c("keygen", name, "--out", str(path), "--script", "p2wsh", "--json")
    assert made.exit_code == 0, made.output
    return path, json.loads(made.stdout)["xpub"]


def founder_xpub(shop: EmbeddedShop, name: str) -> str:
    m = load_signed_manifest((shop.c.home / "founders-manifest.json").read_bytes())
    return next(str(f.key) for f in m.policy.founders if f.name == name)


def draft_3_of_4(shop: EmbeddedShop, out: Path) -> Path:
    """founder-a, -b and -c keep their keys; founder-d joins; every new founder signs."""
    if "founder-d" not in shop.founder_keys:
        shop.founder_keys["founder-d"], xpub_d = keygen(shop, "founder-d")
        (shop.tmp / "founder-d.xpub").write_text(xpub_d)
    xpub_d = (shop.tmp / "founder-d.xpub").read_text()
    specs = [f"{n}={founder_xpub(shop, n)}" for n in ("founder-a", "founder-b", "founder-c")] + [f"founder-d={xpub_d}"]
    args = ["rotate", "draft", "--threshold", "3", "--out", str(out)]
    for spec in specs:
        args += ["--founder", spec]
    shop.ok(*args)
    for name in ("founder-a", "founder-b", "founder-c", "founder-d"):
        signed = shop.c("manifest", "sign", str(out), "--key", str(shop.founder_keys[name]), "--yes")
        assert signed.exit_code == 0, signed.output
    return out


def approve_as(shop: EmbeddedShop, path: Path, founder: str) -> None:
    done = shop.c("rotate", "approve", str(path), "--key", str(shop.founder_keys[founder]), "--yes")
    assert done.exit_code == 0, done.output
