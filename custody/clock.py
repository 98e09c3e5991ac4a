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


def aware(value: datetime) -> datetime:
    """``value`` with UTC attached when it is naive (as SQLite gives stored times back)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_iso(value: object) -> datetime | None:
    """A stored ISO 8601 time (``Z`` or an offset; naive taken as UTC) as aware UTC; None for
    anything else (not a string, not a time)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return aware(parsed)
