"""Long lists on a terminal: ``--limit N`` everywhere, and a cap on what a table shows.

A table on a terminal shows at most a screenful of rows (the newest; :func:`screenful`) unless
``--limit`` says otherwise, and says on stderr how many there were and how to see them all; ``--json`` and
``--csv`` (what programs read) and pipes get every row unless ``--limit`` is given.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click

from custody_cli import output

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

MIN_ROWS = 10
FRAME = 6  # a table's title, header and borders, and the line under it


def screenful() -> int:
    """How many rows of a table fit on this terminal (at least MIN_ROWS)."""
    return max(MIN_ROWS, shutil.get_terminal_size().lines - FRAME)


def limit_option(what: str) -> Callable[[F], F]:
    """``--limit N``: at most N of the list, the newest."""
    return click.option(
        "--limit",
        type=click.IntRange(1),
        help=f"At most N {what} (the newest). A table on a terminal shows a screenful by default; "
        "--json, --csv and pipes get every one.",
    )


def limited(rows: Iterable[T], limit: int | None, *, newest_last: bool = True) -> list[T]:
    """At most ``limit`` rows of ``rows``, the newest (the end when ``newest_last``)."""
    items = list(rows)
    if limit is None or len(items) <= limit:
        return items
    return items[-limit:] if newest_last else items[:limit]


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    limit: int | None,
    newest_last: bool = True,
) -> None:
    """``output.table`` of ``rows``, capped on a terminal (module docstring)."""
    cap = limit if limit is not None else (screenful() if sys.stdout.isatty() else None)
    shown = limited(rows, cap, newest_last=newest_last)
    output.table(title, columns, shown)
    if len(shown) < len(rows):
        output.info(f"{len(shown)} of {len(rows)} shown (the newest); --limit N for more, --json for all")
