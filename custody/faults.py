"""Crash and pause points for the crash-safety and race tests.

``crash_point("name")`` kills this process with SIGKILL when ``CUSTODY_CRASH_AT`` equals
``name``: the tests run a real command in a subprocess, kill it at each step, run it again
and check that nothing was lost or done twice. ``fail_point("name")`` raises the error a full
disk gives (``OSError`` ENOSPC) when ``CUSTODY_FAIL_AT`` equals ``name``. ``pause_point("name")`` stops this process
with SIGSTOP when ``CUSTODY_PAUSE_AT`` equals ``name``, as a slow or swapped-out process
would stand still there, until the test sends SIGCONT. Unset, each costs one dictionary
lookup.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = (
    "issuance.allocated",  # inside the issuing transaction, indexes taken, nothing stored
    "issuance.committed",  # addresses stored, not yet shown
    "halt.published",  # halt file says halted (the halt pending in it), hook run; store not yet told
    "halt.stored",  # halt committed, halt file not yet rewritten (it says halted since before the commit)
    "withdrawal.requested",  # inside the request transaction, inputs reserved
    "withdrawal.approved",  # approval committed, not yet shown
    "withdrawal.imported",  # signatures merged and committed
    "withdrawal.finalized",  # final transaction committed
    "withdrawal.sent",  # handed to the node, not yet recorded
    "withdrawal.broadcast",  # recorded as broadcast
    "signer.journaled",  # offline: the transaction in the signer's journal, not yet signed
    "rotate.pinned",  # a rotation pinned on this machine, not yet in the store
    "rotate.committed",  # the rotation's epoch and audit entry committed, not yet shown
    "sweep.requested",  # inside the sweep's transaction: inputs reserved, change address issued
    "bump.requested",  # inside the bump's request transaction, its row and link stored
    "cancel.requested",  # inside the cancel's request transaction, its row and link stored
    "group.refunded",  # inside sync: a replaced withdrawal's versions failed, its refund not yet posted
    "group.reorged",  # inside sync: a replaced withdrawal back to broadcast, its settlement reversed
    "sync.settled",  # inside sync: a withdrawal, sweep or consolidation confirmed, its inputs released, not yet booked
    "sync.reorged",  # inside sync: one back to broadcast, its inputs reserved and settlement reversed, not yet logged
    "sync.refunded",  # inside sync: one failed by a foreign spend, its inputs released, nothing posted nor logged
    "audit.rows_checked",  # audit log --verify's row worker: every row checked, its result not yet sent
)


FAIL_POINTS = ("audit.rows_checking",)  # audit log --verify's row worker: its snapshot open, no row read


PAUSE_POINTS = (
    "halt.state_read",  # halt state read from the store, halt file not yet written
    "issuance.allocated",  # inside the issuing transaction (SQLite's write lock held), nothing stored
    "issuance.derived",  # inside the issuing transaction, addresses derived, no lock taken yet
    "webauthn.counter_checked",  # a request's security-key counter checked, its signature not yet stored
    "withdrawal.request_counted",  # a console request's key checked, its unsigned backlog counted, nothing committed
)


# The environment reads outside custody/config.py, on purpose. Crash and pause points
# sit deep inside transactions (issuance, the withdrawal queue, the halt state) in functions
# that are handed no Settings, and they must fire in any process that runs the library, also
# before any Settings exist; threading Settings through all of them for test-only switches
# would widen signatures across every layer. Unset, each costs one lookup. They grant
# nothing: a crash, a stop or a full disk at these points is what the tests prove safe, and
# whoever can set the variables can as well send the same SIGKILL or SIGSTOP, or fill the disk.


def crash_point(name: str) -> None:
    """SIGKILL this process when CUSTODY_CRASH_AT names this point (tests only)."""
    if os.environ.get("CUSTODY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    """Raise OSError ENOSPC (a full disk) when CUSTODY_FAIL_AT names this point (tests only)."""
    if os.environ.get("CUSTODY_FAIL_AT") == name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def pause_point(name: str) -> None:
    """SIGSTOP this process when CUSTODY_PAUSE_AT names this point (tests only)."""
    if os.environ.get("CUSTODY_PAUSE_AT") == name:
        os.kill(os.getpid(), signal.SIGSTOP)
