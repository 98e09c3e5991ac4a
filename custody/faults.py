"""Crash points for the crash-safety tests.

``crash_point("name")`` kills this process with SIGKILL when ``CUSTODY_CRASH_AT`` equals
``name``: the tests run a real command in a subprocess, kill it at each step, run it again
and check that nothing was lost or done twice. Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "issuance.allocated",  # inside the issuing transaction, indexes taken, nothing stored
    "issuance.committed",  # addresses stored, not yet shown
    "halt.stored",  # halt committed, halt file not yet written
    "withdrawal.requested",  # inside the request transaction, inputs reserved
    "withdrawal.approved",  # approval committed, not yet shown
    "withdrawal.imported",  # signatures merged and committed
    "withdrawal.finalized",  # final transaction committed
    "withdrawal.sent",  # handed to the node, not yet recorded
    "withdrawal.broadcast",  # recorded as broadcast
)


def crash_point(name: str) -> None:
    """SIGKILL this process when CUSTODY_CRASH_AT names this point (tests only)."""
    if os.environ.get("CUSTODY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
