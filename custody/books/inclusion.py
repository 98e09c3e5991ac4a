"""A customer's check that their balance is counted in a published proof of liabilities.

The checking is the independent checker's (custody.verify.liabilities, written from BitMEX's
rules and sharing no code with the generator); this module reads the customer's input and
turns what the checker found into custody's errors. No store is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from custody.books.liability_accounts import read_nonce_file
from custody.errors import InputError, VerificationFailed
from custody.files import LIABILITIES_MAX, read_limited
from custody.verify import liabilities as checker
from custody.verify.errors import LiabilitiesFileError


class InclusionFailed(VerificationFailed):
    """A customer's balance is not (or not correctly) in the liabilities file (exit 3)."""


def _hex32(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"the {what} must be hex") from None
    if len(value) != 32:
        raise InputError(f"the {what} must be 32 bytes (64 hex digits)")
    return value


def check_inclusion(
    file: Path,
    *,
    account: int | None = None,
    account_nonce: str | None = None,
    nonce: str | None = None,
    nonce_file: Path | None = None,
    expected: int | None = None,
) -> dict[str, Any]:
    """Check the whole liabilities ``file`` and the leaves of one account in it.

    Give the account's nonce file (``nonce_file``: number and nonce), or its ``account``
    number with its ``account_nonce`` or the sub-nonce of this file's height (``nonce``).
    ``expected``: the balance the customer expects, in satoshis. Raises InclusionFailed with
    every reason found (a file that does not parse, a node that does not add up, no leaf or
    another balance for the account); InputError for unreadable files or malformed input.
    """
    if sum(x is not None for x in (account_nonce, nonce, nonce_file)) != 1:
        raise InputError("give the account's nonce file, or its account nonce, or the nonce of this height (one)")
    key = None
    if nonce_file is not None:
        _, number, key = read_nonce_file(nonce_file)
        if account is not None and account != number:
            raise InputError(f"nonce file {nonce_file} is for account {number}, not {account}")
        account = number
    if account is None:
        raise InputError("give the account number (--account)")
    try:
        text = read_limited(file, LIABILITIES_MAX, "liabilities file").decode("ascii")
    except FileNotFoundError:
        raise InputError(f"liabilities file {file} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"liabilities file {file} is unreadable: {exc}") from None
    try:
        tree = checker.parse(text)
    except LiabilitiesFileError as exc:
        raise InclusionFailed(f"inclusion check failed for account {account}: {file} is no valid tree: {exc}") from None
    try:
        if key is not None or account_nonce is not None:
            key = key if key is not None else _hex32(account_nonce or "", "account nonce")
            report = checker.check_account(tree, account, account_nonce=key, expected=expected)
        else:
            report = checker.check_account(tree, account, nonce=_hex32(nonce or "", "nonce"), expected=expected)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not report.ok:
        raise InclusionFailed(f"inclusion check failed for account {account}: " + "; ".join(report.problems))
    return {
        "ok": True,
        "account": account,
        "balance_sat": report.balance,
        "leaves": [{"index": i, "value_sat": v} for i, v in report.matched],
        "height": report.height,
        "root": {"digest": report.root_digest, "value_sat": report.root_value},
        "leaf_count": report.leaves,
    }
