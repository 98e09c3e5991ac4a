"""Time in one place: timezone-aware UTC, rendered as ``YYYY-MM-DDTHH:MM:SSZ``."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(value: datetime | None, timespec: str = "seconds") -> str | None:
    """``2026-11-22T10:00:00Z`` (naive values are taken as UTC); None stays None."""
    if value is None:
        return None
    if value.utcoffset() is not None:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"
