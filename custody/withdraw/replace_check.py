"""The offline signer's checks of replacements and self-transfers (imported by the signer:
no store, no chain, nothing but the PSBT's transaction and what this machine remembers).

* A **bump** (kind ``bump``) must be a fee-only replacement of a transaction this signer has
  already signed: the PSBT names the transaction it replaces (its unsigned bytes); its txid
  must be in this machine's journal; the replacement spends exactly the same inputs, pays
  exactly the journaled destinations and amounts (every output but verified change), and
  pays more fee. The fee rule itself is :func:`custody.identity.replacement_rules.judge_bump`.
* A **self-transfer** (kinds ``cancel``, ``cpfp``, ``consol``: a consolidation) pays every
  output to an address that re-derives from the pinned policy's change chain: nothing leaves
  custody but the fee. (A sweep to a new policy can add its kind here, with a deriver of the
  policy it pays.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from bitcoin.core import CTransaction, b2lx
from bitcoin.core.serialize import SerializationError

from custody.errors import InputError, PolicyViolation

BUMP = "bump"
SELF_TRANSFERS = frozenset({"cancel", "cpfp", "consol"})  # consol: a consolidation
REPLACEMENT_KINDS = frozenset({BUMP, *SELF_TRANSFERS})


def _outpoints(tx: Any) -> set[str]:
    return {f"{b2lx(v.prevout.hash)}:{v.prevout.n}" for v in tx.vin}


def replaced_tx(meta: dict[str, Any]) -> CTransaction:
    """The transaction a bump's PSBT says it replaces. Raises InputError."""
    replaces = meta.get("replaces")
    raw = replaces.get("unsigned_tx") if isinstance(replaces, dict) else None
    if not isinstance(raw, str):
        raise InputError("the bump's PSBT does not say which transaction it replaces (replaces.unsigned_tx)")
    try:
        return CTransaction.deserialize(bytes.fromhex(raw))
    except (ValueError, SerializationError) as exc:
        raise InputError(f"the transaction the bump replaces does not decode: {exc}") from None


def check_bump(
    tx: Any,
    old: CTransaction,
    change: set[int],
    journaled: Sequence[tuple[str, int]] | None,
    journaled_fee: int | None,
    input_total: int,
) -> int:
    """Check that ``tx`` (whose outputs in ``change`` re-derive from the policy) is a fee-only
    replacement of ``old``; ``journaled``: the payments this machine signed ``old`` for (None:
    it never signed it). Returns the fee ``old`` paid. Raises PolicyViolation."""
    old_txid = b2lx(old.GetTxid())
    if journaled is None or journaled_fee is None:
        raise PolicyViolation(
            f"rule bump: this signer never signed transaction {old_txid}, so it will not sign a replacement of it"
        )
    if _outpoints(tx) != _outpoints(old) or len(tx.vin) != len(old.vin):
        raise PolicyViolation(f"rule bump: the replacement does not spend exactly the inputs of {old_txid}")
    paid = Counter((bytes(o.scriptPubKey).hex(), int(o.nValue)) for n, o in enumerate(tx.vout) if n not in change)
    if paid != Counter(journaled):
        raise PolicyViolation(
            f"rule bump: the replacement does not pay exactly the destinations and amounts of {old_txid} "
            "(a bump changes only the fee, taken from change)"
        )
    if len(change) > 1:
        raise PolicyViolation("rule bump: a replacement has at most one change output")
    old_fee = input_total - sum(int(o.nValue) for o in old.vout)
    if old_fee != journaled_fee:
        raise PolicyViolation(f"rule bump: {old_txid} paid {old_fee} sat in fees, not the {journaled_fee} journaled")
    return old_fee


def check_self_transfer(kind: str, tx: Any, change: set[int]) -> None:
    """Every output of a self-transfer re-derives from the policy. Raises PolicyViolation."""
    if not tx.vout or len(change) != len(tx.vout):
        foreign = [n for n in range(len(tx.vout)) if n not in change]
        raise PolicyViolation(
            f"rule self_transfer: a {kind} pays only addresses of the policy, and output(s) "
            f"{', '.join(map(str, foreign)) or '(none)'} are not (every output re-derives from the policy's "
            "change chain)"
        )
