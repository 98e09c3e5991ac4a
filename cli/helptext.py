"""Help that reads whole: command summaries never cut with "...", and the man page.

The man page (``man/custody.1``) is generated from the same click commands as ``--help``:
``python -m custody_cli.helptext > man/custody.1`` (``scripts/make-man.sh``); a test fails
when the committed page is not the one the commands make.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator

import click

SUMMARY_LIMIT = 10_000  # click cuts a summary at 45 characters or the terminal's width with "..."


class SummaryGroup(click.Group):
    """A group whose command list gives each command's first sentence whole (wrapped, not cut).

    Its subgroups (``@group.group()``) are SummaryGroups too (click's ``group_class = type``).
    """

    group_class = type

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(SUMMARY_LIMIT)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], (*path, name))


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes, hyphens and a leading dot or quote escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln[:1] in (".", "'") else ln) for ln in text.splitlines())


def _paragraphs(help_text: str) -> list[str]:
    """A command's help as paragraphs; click's ``\\b`` (keep as written) blocks kept verbatim."""
    out = []
    for block in inspect.cleandoc(help_text).split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].strip() == "\b":
            out.append(".nf\n" + _roff("\n".join(lines[1:])) + "\n.fi")
        else:
            out.append(_roff(" ".join(ln.strip() for ln in lines)))
    return out


def _options(ctx: click.Context, cmd: click.Command) -> list[str]:
    lines = []
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        lines += [".TP", f"\\fB{_roff(record[0])}\\fR", _roff(record[1])]
    return lines


def man_page(root: click.Group, version: str) -> str:
    """The roff text of ``custody(1)``: every command, its help and its options."""
    ctx = click.Context(root, info_name="custody", **root.context_settings)
    lines = [
        f'.TH CUSTODY 1 "" "custody {version}" "User Commands"',
        ".SH NAME",
        "custody \\- multisig custody and withdrawal approval for an exchange's cold storage",
        ".SH SYNOPSIS",
        "\\fBcustody\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *[ln for para in _paragraphs(root.help or "") for ln in (para, ".PP")],
        ".SH OPTIONS",
        *_options(ctx, root),
        ".SH COMMANDS",
    ]
    for path, cmd in _walk(root, ()):
        if not path or cmd.hidden or (isinstance(cmd, click.Group) and not cmd.invoke_without_command):
            continue  # a group that runs itself (`custody status`, `audit log`) is a command too
        sub = click.Context(cmd, info_name=" ".join(path), parent=ctx, **cmd.context_settings)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        lines += [".SS " + _roff("custody " + " ".join(path) + " " + usage).rstrip()]
        for para in _paragraphs(cmd.help or ""):
            lines += [para, ".PP"]
        lines += _options(sub, cmd)
    lines += [
        ".SH SHELL COMPLETION",
        'bash: \\fBeval "$(_CUSTODY_COMPLETE=bash_source custody)"\\fR in ~/.bashrc;',
        "zsh: \\fB_CUSTODY_COMPLETE=zsh_source\\fR; fish: \\fB_CUSTODY_COMPLETE=fish_source\\fR.",
        ".SH SEE ALSO",
        "README.md, docs/FORMATS.md, docs/THREAT_MODEL.md in the custody sources.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from custody import __version__
    from custody_cli.main import cli

    sys.stdout.write(man_page(cli, __version__))


if __name__ == "__main__":
    main()
