"""Options are accepted where they are documented (#16 item 2): every option the README's
command reference, its shell examples and each command's own help example give a command is
one that command takes (or a global option before it)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from custody_cli.main import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
OPTION = re.compile(r"(?<![\w/.=-])(--?[a-zA-Z][\w-]*)")
GLOBAL_FLAGS = {"-V", "--version", "--help"}


def _documented() -> Iterator[tuple[str, str]]:
    """(where, one command line) from the README's reference table, its code and the help examples."""
    for cell in re.findall(r"^\| `(custody [^`]*)`", README, re.M):
        yield "README table", cell
    for line in re.findall(r"^\s*(?:\$ )?(custody [^\n|`]*)$", README, re.M):
        for part in re.split(r"&&|;|\|", line.split("  #")[0]):
            if part.strip().startswith("custody "):
                yield "README example", part.strip()
    for path, cmd in _walk(cli, ()):
        match = re.search(r"Example:\n\s+(custody [^\n]*)", cmd.help or "")
        if match:
            yield f"help of custody {' '.join(path)}", match.group(1).split("  (")[0]


def _walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


def _names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def _resolve(line: str) -> tuple[click.Command, list[str], list[str]]:
    """The command a documented line names, its words, and the words after it."""
    words = line.split()[1:]
    cmd: click.Command = cli
    path: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not path and word.startswith("-"):  # a global option (and its value) before the command
            assert word in _names(cli) | GLOBAL_FLAGS or word.split("=")[0] in _names(cli), (line, word)
            i += 1 if "=" in word or word in GLOBAL_FLAGS else 2
            continue
        if isinstance(cmd, click.Group) and word in cmd.commands:
            cmd, path, i = cmd.commands[word], [*path, word], i + 1
            continue
        break
    return cmd, path, words[i:]


DOCUMENTED = sorted(set(_documented()))


def test_the_documentation_names_commands_to_check() -> None:
    assert len([d for d in DOCUMENTED if d[0] == "README table"]) > 80
    assert len([d for d in DOCUMENTED if d[0].startswith("help of")]) > 60


@pytest.mark.parametrize(("where", "line"), DOCUMENTED, ids=[f"{w}: {ln}"[:90] for w, ln in DOCUMENTED])
def test_every_documented_option_is_accepted_by_its_command(where: str, line: str) -> None:
    if line.startswith("custody is "):  # prose that starts with the name
        return
    cmd, path, rest = _resolve(line)
    assert path or rest == [] or rest[0] in ("--help",), f"{where}: {line!r} names no command"
    accepted = _names(cmd) | {"--help"}
    unknown = [o.split("=")[0] for o in OPTION.findall(" ".join(rest)) if o.split("=")[0] not in accepted]
    assert unknown == [], f"{where}: custody {' '.join(path)} takes no {', '.join(unknown)} ({line!r})"
