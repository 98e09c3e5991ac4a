"""One error tree for the whole library; each class carries its stable exit code.

Exit codes (documented in the README, tested in tests/test_cli_*):

====  =========================================================================
0     success
1     CustodyError: an error not covered below
2     InputError: bad input (option values, keys, addresses, amounts, files)
3     HaltedError / VerificationFailed: trading is halted, or an address mismatched
4     ApprovalError: a rule of the approval process was broken (PolicyViolation: of the rulebook)
5     NotFound: the thing named does not exist (policy, address, employee, ...)
6     Conflict: it exists already, or the stored state forbids the change
7     KeyFileError: a key file or token key could not be used (wrong passphrase or PIN, ...)
8     NodeError: the chain backend failed or is unreachable
9     StorageError: the database failed, or its schema is newer than this tool
10    (halt status / status only) the halt state is unknown: StoreBusy, the store locked elsewhere
====  =========================================================================
"""

from __future__ import annotations


class CustodyError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class InputError(CustodyError):
    """Input that cannot be accepted: malformed, of another network, out of range."""

    exit_code = 2


class HaltedError(CustodyError):
    """Trading is halted (or the halt state cannot be read, which counts as halted)."""

    exit_code = 3


class VerificationFailed(CustodyError):
    """An address did not re-derive from the founders' keys."""

    exit_code = 3


class ApprovalError(CustodyError):
    """A rule of the approval process was broken."""

    exit_code = 4


class PolicyViolation(ApprovalError):
    """The founders' rulebook forbids it (a tier, a limit, a destination, a fee); names the rule."""

    exit_code = 4


class NotFound(CustodyError):
    """The named object does not exist."""

    exit_code = 5


class Conflict(CustodyError):
    """The object exists already, or the stored state forbids the change."""

    exit_code = 6


class IllegalTransition(Conflict):
    """A state machine (custody.transitions) was asked for a transition its table does not hold:
    the stored state forbids the change, or the stored state is not one of its states."""


class KeyFileError(CustodyError):
    """A key file is unreadable (wrong passphrase, corrupted, wrong type or newer format), or a
    key on a PKCS#11 token cannot be used (no module, token or key; wrong PIN; a key that is
    not secp256k1 or could leave the token)."""

    exit_code = 7


class NodeError(CustodyError):
    """The chain backend failed, is unreachable, or is on the wrong chain."""

    exit_code = 8


class StorageError(CustodyError):
    """The database failed, or its schema is newer than this tool understands."""

    exit_code = 9


class StoreBusy(StorageError):
    """A read could not complete because another connection holds a lock on the store (SQLite
    locked exclusively, a PostgreSQL table lock): the store is not damaged, its answer is
    unknown for now. ``halt status`` and ``status`` exit :data:`UNKNOWN_EXIT` for it."""


UNKNOWN_EXIT = 10
"""``custody halt status`` / ``custody status``: the halt state is unknown right now (the store
is locked elsewhere); the halt file, whose lease then runs out, decides for the engine."""


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        CustodyError,
        InputError,
        HaltedError,
        VerificationFailed,
        ApprovalError,
        PolicyViolation,
        NotFound,
        Conflict,
        KeyFileError,
        NodeError,
        StorageError,
    )
}
