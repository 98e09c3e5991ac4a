#!/usr/bin/env python3
"""The size gate (CONTRIBUTING.md): no module over 600 lines and no function over 60 lines
(from its ``def`` to its last line, its docstring not counted) without a reason at the top of
its module, before the first ``def`` or ``class``:

    # size(module): why this module stays over 600 lines
    # size(Class.method): why this function stays over 60 lines,
    #   a reason continued on comment lines indented by three spaces

A reason that names nothing over its limit fails too, so the list stays true. Standard library
only; prints one line a problem and exits 1 when there is one.

Usage: check_sizes.py [FOLDER ...]   (default: custody cli)
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
REASON = re.compile(r"^# size\((?P<target>[A-Za-z_][\w.]*)\): *(?P<reason>.*)$")


def _reasons(source: str, tree: ast.Module) -> tuple[dict[str, str], list[str]]:
    """The ``# size(target): reason`` comments above the module's first def or class."""
    first = next(
        (n.lineno for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)), None
    )
    lines = source.splitlines()[: (first - 1) if first else None]
    reasons: dict[str, str] = {}
    problems = []
    for number, line in enumerate(lines, 1):
        m = REASON.match(line.rstrip())
        if m is None:
            if line.startswith("# size"):
                problems.append(f"{number}: a size reason reads '# size(module|function): reason'")
            continue
        if len(m["reason"].strip()) < 10:
            problems.append(f"{number}: the size exception for {m['target']} gives no reason")
        reasons[m["target"]] = m["reason"].strip()
    return reasons, problems


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines without the docstring) of every function below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (child.end_lineno or child.lineno) - child.lineno + 1
            body = child.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    length -= (body[0].end_lineno or body[0].lineno) - body[0].lineno + 1
            yield prefix + child.name, length
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")


def check_file(path: Path) -> list[str]:
    """The size problems of one file, each naming it."""
    source = path.read_text()
    tree = ast.parse(source)
    reasons, problems = _reasons(source, tree)
    over: set[str] = set()
    count = source.count("\n")
    if count > MAX_MODULE_LINES:
        over.add("module")
        if "module" not in reasons:
            problems.append(f"{count} lines (over {MAX_MODULE_LINES}) and no '# size(module): reason' at its top")
    for name, length in _functions(tree):
        if length > MAX_FUNCTION_LINES:
            over.add(name)
            if name not in reasons:
                problems.append(
                    f"{name} has {length} lines (over {MAX_FUNCTION_LINES}) and no '# size({name}): reason' at the top"
                )
    for target in sorted(set(reasons) - over):
        problems.append(f"'# size({target})' names nothing over its limit: remove it")
    return [f"{path}: {p}" for p in problems]


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv] or [Path("custody"), Path("cli")]
    problems = [p for folder in folders for path in sorted(folder.rglob("*.py")) for p in check_file(path)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
