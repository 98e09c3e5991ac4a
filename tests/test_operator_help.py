"""Help texts read whole, the version is one flag away, the man page is the commands' own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

from custody import __version__
from custody_cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {"NO_COLOR": "1", "COLUMNS": "80"}


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


def test_dash_v_and_version_command() -> None:
    runner = CliRunner()
    for args in (["-V"], ["--version"]):
        result = runner.invoke(cli, args, env=ENV)
        assert result.exit_code == 0 and __version__ in result.stdout, args
    shown = runner.invoke(cli, ["version", "--json"], env=ENV)
    assert shown.exit_code == 0
    data = json.loads(shown.stdout)
    assert data["version"] == __version__ and isinstance(data["schema_version"], int)
    assert runner.invoke(cli, ["version"], env=ENV).stdout.startswith(f"custody {__version__} ")


def test_top_level_help_never_cuts_a_summary() -> None:
    result = CliRunner().invoke(cli, ["--help"], env=ENV)
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:", 1)[1]
    assert "..." not in commands
    assert "Employees: each signs requests, approvals and halt lifts with a" in commands


def _groups(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Group]]:
    """Every group, root included, through the groups' own lookup (the root loads lazily)."""
    yield path, group
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if isinstance(sub, click.Group):
            yield from _groups(sub, (*path, name))


def test_every_groups_help_gives_each_summary_whole() -> None:
    """`custody withdraw --help` cut summaries with "..." where `custody --help` did not."""
    runner = CliRunner()
    cut, groups = [], 0
    for path, group in _groups(cli):
        result = runner.invoke(cli, [*path, "--help"], env=ENV)
        assert result.exit_code == 0, path
        listed = " ".join(result.stdout.split("Commands:", 1)[1].split())  # wrapped at 80: join the lines
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            assert sub is not None
            whole = " ".join(sub.get_short_help_str(10_000).split())
            if sub.hidden or not whole:
                continue
            if f"{name} {whole}" not in listed:
                cut.append((*path, name))
        groups += 1
    assert groups > 20, groups  # the walk reached the subgroups (notify key, trust ..., audit log)
    assert not cut, cut[:5]


def test_no_help_text_carries_code_indentation() -> None:
    """`scrypt +     ChaCha20-Poly1305`: a docstring's indentation inside a sentence."""
    runner = CliRunner()
    leaks = []
    for path in _commands(cli):
        result = runner.invoke(cli, [*path, "--help"], env={**ENV, "COLUMNS": "200"})
        assert result.exit_code == 0, path
        description = re.split(r"\n  Example:|\nOptions:|\nCommands:", result.stdout)[0]
        leaks += [(path, line) for line in description.splitlines() if re.search(r"\S {3,}\S", line)]
    assert not leaks, leaks[:5]


def test_the_man_page_is_the_commands_own_and_reads() -> None:
    """Regenerate with scripts/make-man.sh when a command changes."""
    committed = (ROOT / "man" / "custody.1").read_text()
    made = subprocess.run(
        [sys.executable, "-m", "custody_cli.helptext"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert made == committed, "man/custody.1 is stale: run scripts/make-man.sh"
    for path in _commands(cli):
        cmd = _resolve(path)
        if path and (not isinstance(cmd, click.Group) or cmd.invoke_without_command):  # `status` runs itself
            assert ".SS custody " + " ".join(path).replace("-", "\\-") + " " in committed, path
    rendered = subprocess.run(
        ["man", "-l", str(ROOT / "man" / "custody.1")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat"},
    )
    if rendered.returncode == 0:  # man installed: the page renders and says what -V does
        assert "custody withdraw approve" in rendered.stdout and "--version" in rendered.stdout.replace("‐", "-")


def _resolve(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def test_shell_completion_as_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "_CUSTODY_COMPLETE=bash_source custody" in readme
    script = subprocess.run(
        [str(Path(sys.executable).parent / "custody")],
        capture_output=True,
        text=True,
        env={**os.environ, "_CUSTODY_COMPLETE": "bash_source"},
    )
    assert script.returncode == 0 and "complete -o nosort -F _custody_completion custody" in script.stdout
    words = subprocess.run(
        [str(Path(sys.executable).parent / "custody")],
        capture_output=True,
        text=True,
        env={**os.environ, "_CUSTODY_COMPLETE": "bash_complete", "COMP_WORDS": "custody with", "COMP_CWORD": "1"},
    )
    assert "plain,withdraw" in words.stdout


def test_a_global_option_after_the_command_says_where_it_goes(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {**ENV, "CUSTODY_HOME": str(tmp_path)}
    result = runner.invoke(cli, ["sign", str(tmp_path / "w.psbt"), "--manifest", "m.json"], env=env)
    assert result.exit_code == 2
    assert "--manifest is a global option: give it before the command" in result.stderr
    assert "CUSTODY_MANIFEST" in result.stderr
    as_json = runner.invoke(cli, ["status", "--json", "--db=sqlite:///x.db"], env=env)
    assert as_json.exit_code == 2 and as_json.stdout == ""
    assert json.loads(as_json.stderr) == {
        "error": "--db is a global option: give it before the command (custody --db VALUE COMMAND ...) "
        "or set CUSTODY_DB_URL",
        "code": 2,
    }
    # `verify addresses` has its own --manifest: it stays that command's.
    own = runner.invoke(cli, ["verify", "addresses", "--manifest", str(tmp_path / "none.json")], env=env)
    assert "global option" not in own.stderr
