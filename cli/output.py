"""The one module that talks to the terminal (rich): data on stdout, messages on stderr.

Every string shown passes through :func:`one_line` here, in messages, table cells, table
titles and CSV cells alike: halt reasons, incident messages, names, addresses, node errors
come from the store, files or other machines, and must not drive the terminal (ANSI and OSC
escape sequences, carriage returns, bidi overrides) or the rendering (rich markup: every
string is a Text, never markup). JSON output escapes them by itself.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when something is printed: `halt status --json` loads no rich
    from rich.console import Console
    from rich.text import Text


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def out() -> Console:
    from rich.console import Console

    return Console(file=sys.stdout, no_color=_no_color(), highlight=False, soft_wrap=True)


def err() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, no_color=_no_color(), highlight=False, soft_wrap=True)


def _text(text: str = "", style: str = "") -> Text:
    from rich.text import Text

    return Text(text, style=style)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit_csv(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: one_line(v) if isinstance(v, str) else v for k, v in row.items()})


def cell(value: Any) -> Text:
    """One value as plain text for a table: never markup, never a control character."""
    return _text(one_line("" if value is None else str(value)))


IDENTIFIER_COLUMNS = frozenset(
    ("address", "destination", "txid", "outpoint", "xpub", "account xpub", "key", "keys", "public keys", "ref")
)
"""Columns of identifiers: never wrapped over two lines in a table (a piece cannot be copied),
shortened with an ellipsis when the terminal is narrow; `show` and --json give them whole."""


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    from rich.table import Table  # here: a command that prints no table does not load it

    t = Table(title=None if title is None else cell(title), show_lines=False)
    for c in columns:
        if c in IDENTIFIER_COLUMNS:
            t.add_column(cell(c), no_wrap=True, overflow="ellipsis", min_width=14)
        else:
            t.add_column(cell(c), overflow="fold")
    for row in rows:
        t.add_row(*[cell(v) for v in row])
    out().print(t)


# Unicode categories shown as escapes: control (C0, DEL, C1: ESC, CSI, OSC, ST, ...), format
# (bidi overrides and isolates, zero-width characters), surrogates, private use, unassigned,
# line and paragraph separators.
_ESCAPED = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def one_line(text: str) -> str:
    """``text`` safe for one terminal line: control characters (newlines, carriage returns,
    escape sequences, ...), format characters (bidi overrides, zero-width), line separators
    and the like shown as Python escapes (``\\x1b``, ``\\u202e``).

    Untrusted strings (file contents, names, reasons, addresses, a node's errors) reach the
    terminal through messages and tables; rich prints control characters as they are, so a
    string could otherwise span lines, rewrite what is on the screen or drive the terminal.
    """
    if text.isprintable() and text.isascii():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _ESCAPED else ch for ch in text
    )


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 confirmation``, ``2 confirmations``: a count with its noun agreeing."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def line(message: str, style: str | None = None) -> None:
    """A plain line of data on stdout."""
    out().print(_text(one_line(message), style=style or ""))


def info(message: str) -> None:
    err().print(_text(one_line(message)))


def success(message: str) -> None:
    err().print(_text(one_line(message), style="green"))


def warning(message: str) -> None:
    err().print(_text("warning: ", style="yellow") + _text(one_line(message)))


def error_json(message: str, code: int) -> None:
    """An error under --json: one JSON object on one line of stderr (stdout, the data's, stays
    empty, so a script never takes an error for data). The message as :func:`one_line` makes
    it: no control character, bidi override or line separator of an untrusted string reaches
    a terminal."""
    sys.stderr.write(json.dumps({"error": one_line(message), "code": code}, ensure_ascii=False) + "\n")


def error(message: str) -> None:
    err().print(_text("error: ", style="bold red") + _text(one_line(message)))


def key_values(title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    """A record (what `show` prints): a title, then one line per field, each value whole on its
    line (a terminal may soft-wrap it; no newline is ever put inside an identifier)."""
    console = out()
    console.print(_text(one_line(title), style="bold"))
    width = max((len(one_line(k)) for k, _ in pairs), default=0)
    for k, v in pairs:
        value = one_line("" if v is None else str(v))
        console.print(_text("  ") + _text(one_line(k).ljust(width), style="bold") + _text("  " + value))


class Progress:
    """A progress bar on stderr for long work; silent when stderr is not a terminal, and when
    not ``shown`` (a command asked for --json keeps its terminal for the JSON alone)."""

    def __init__(self, description: str, total: int | None, *, shown: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err(),
            transient=True,
            disable=not (shown and sys.stderr.isatty()),
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Progress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` so far; ``total`` when the work learns how much there is as it goes."""
        if total is None:
            self._progress.update(self._task, completed=done)
        else:
            self._progress.update(self._task, completed=done, total=total)
