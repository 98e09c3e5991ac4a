#!/usr/bin/env python3
"""Regenerate the generated parts of docs/ARCHITECTURE.md in place: the layers (from the layers
contract of import-linter in pyproject.toml, described by each package's docstring) and the
state diagrams (from custody.withdraw.states, a consolidation's part of it included, and
custody.books.deposit_states).

tests/test_architecture_doc.py fails when the document differs from what this renders, so the
document cannot drift from the contract or the tables. Run it from the repository's root with
the project's interpreter: .venv/bin/python scripts/render_architecture.py
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) .*?-->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def layers() -> list[list[str]]:
    """The layers contract's layers, top to bottom, each a list of the packages it joins."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["type"] == "layers" and not contract.get("containers"):
            return [[p.strip() for p in layer.split("|")] for layer in contract["layers"]]
    raise SystemExit("pyproject.toml has no layers contract over custody")


def _summary(module: str) -> str:
    """The first sentence of a package's (or module's) docstring."""
    base = ROOT / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split()).replace("``", "`")
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0]


def render_layers() -> str:
    rows = ["| layer, top to bottom | what it holds |", "| --- | --- |"]
    for layer in layers():
        names = " \\| ".join(f"`{p}`" for p in layer)
        if len(layer) == 1:
            held = _summary(layer[0])
        else:
            held = "<br>".join(f"`{p.rsplit('.', 1)[-1]}`: {_summary(p)}" for p in layer)
        rows.append(f"| {names} | {held} |")
    return "\n".join(rows) + "\n"


def render_machine(name: str) -> str:
    sys.path.insert(0, str(ROOT))
    from custody.books import deposit_states
    from custody.withdraw import states

    machine = {
        "withdrawals": states.MACHINE,
        "consolidations": states.SELF_TRANSFER,
        "deposits": deposit_states.MACHINE,
    }[name]
    return f"```mermaid\n{machine.mermaid()}\n```\n"


def render(text: str) -> str:
    """``text`` with every generated block rendered afresh."""

    def block(m: re.Match[str]) -> str:
        name = m["name"]
        body = render_layers() if name == "layers" else render_machine(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(block, text)


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
