"""A withdrawal's states and kinds."""

from __future__ import annotations

REQUESTED = "requested"
APPROVED = "approved"
SIGNED = "signed"
BROADCAST = "broadcast"
CONFIRMED = "confirmed"
FAILED = "failed"
PENDING = (REQUESTED, APPROVED, SIGNED)
SINGLE = "single"
BATCH = "batch"
SWEEP = "sweep"  # custody.withdraw.sweep: an older policy's coins to the newest policy
