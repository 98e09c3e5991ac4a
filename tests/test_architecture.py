"""Architecture: the verifier stays independent, and import-linter's contracts hold."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "custody" / "verify"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    package = "custody.verify"
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            found.append((node.lineno, "__import__ (dynamic)"))
    return found


def _allowed(name: str) -> bool:
    top = name.split(".")[0]
    if name == "custody.verify" or name.startswith("custody.verify."):
        return True
    return top == "coincurve" or (top in sys.stdlib_module_names and top != "custody")


def test_verifier_files_exist() -> None:
    files = sorted(VERIFY.glob("*.py"))
    assert VERIFY / "__init__.py" in files and len(files) > 5


def test_verifier_imports_only_stdlib_coincurve_and_itself() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted(VERIFY.rglob("*.py"))
        for line, name in _imports(path)
        if not _allowed(name)
    ]
    assert not bad, "custody.verify must import only the standard library, coincurve and itself:\n" + "\n".join(bad)


def test_the_ast_check_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import json\nfrom coincurve import PublicKey\nfrom .bip32 import ckd_pub\n"
        "from custody.errors import InputError\nimport bitcoin.core\nfrom .. import network\n"
    )
    verdict = {name: _allowed(name) for _, name in _imports(sample)}
    assert verdict == {
        "json": True,
        "coincurve": True,
        "custody.verify.bip32": True,
        "custody.errors": False,
        "bitcoin.core": False,
        "custody": False,
    }


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower() or " 0 broken" in result.stdout.lower()


def test_every_library_package_is_installed() -> None:
    """pyproject.toml lists the packages setuptools installs; a folder missing there would be
    importable from the checkout but absent from an installed custody."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(d.relative_to(ROOT).parts)
        for d in [ROOT / "custody", *(ROOT / "custody").rglob("*")]
        if d.is_dir() and (d / "__init__.py").exists()
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_every_layer_folder_says_what_it_holds() -> None:
    for init in (ROOT / "custody").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(ROOT)} needs a docstring saying what the layer holds"


def _lint_copy(tmp_path: Path) -> Path:
    """What scripts/lint.sh reads, copied, with this interpreter's virtualenv as its .venv."""
    copy = tmp_path / "repo"
    for name in ("custody", "cli", "tests", "benchmarks", "scripts", "typecheck"):
        shutil.copytree(ROOT / name, copy / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return copy


def _lint(copy: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: import-linter reads the copy's custody, not the installed one.
    env = {"PATH": os.environ["PATH"], "HOME": str(copy), "PYTHONPATH": str(copy)}
    return subprocess.run(
        [str(copy / "scripts" / "lint.sh")], cwd=copy, env=env, capture_output=True, text=True, timeout=300
    )


def test_every_gate_can_fail_ci(tmp_path: Path) -> None:
    """scripts/lint.sh (which scripts/test.sh and so .ci/run call first) passes on this tree,
    and fails, naming each gate, on a tree that breaks each of them once."""
    copy = _lint_copy(tmp_path)
    clean = _lint(copy)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    (copy / "custody" / "bitcoin" / "probe.py").write_text(
        '"""A probe that breaks every gate."""\n\n'
        "from custody.demo import Story  # a lower layer importing the top one\n\n\n"
        "def branches(x: int) -> int:\n"
        + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(16))
        + '    return "not an int"  # a type error\n\n\n'
        "def quiet() -> object:  # noqa"
        ": C901\n"  # split: the gate reads this file too
        "    return   Story\n\n\n"
        "def long_one() -> int:\n" + "    x = 1\n" * 61 + "    return x\n"
    )
    broken = _lint(copy)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    verdict = broken.stderr.strip().splitlines()[-1]
    gates = (
        "ruff check",
        "ruff format",
        "complexity exceptions give a reason",
        "sizes",
        "mypy --strict",
        "import-linter",
    )
    for gate in gates:
        assert gate in verdict, (gate, verdict)
    assert "C901" in broken.stdout and "probe.py" in broken.stdout
    assert "probe.py: long_one has 63 lines" in broken.stdout


def test_the_test_command_runs_the_gates_before_the_tests() -> None:
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/lint.sh" in script.split(".venv/bin/pytest")[0]
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _sizes(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "mod.py").write_text(source)
    script = ROOT / "scripts" / "check_sizes.py"
    return subprocess.run([sys.executable, str(script), str(tmp_path / "pkg")], capture_output=True, text=True)


def test_the_size_gate_wants_a_reason_and_refuses_a_stale_one(tmp_path: Path) -> None:
    """A long function or module passes only with a reason at its module's top; a reason
    that names nothing over its limit, or says nothing, fails."""
    long_fn = "def long_one() -> int:\n" + '    """Its docstring is not counted."""\n' + "    x = 1\n" * 59
    assert _sizes(tmp_path, long_fn).returncode == 0  # 60 lines with its def: at the limit
    longer = long_fn + "    return x\n"
    refused = _sizes(tmp_path, longer)
    assert refused.returncode == 1 and "long_one has 61 lines" in refused.stdout
    reasoned = "# size(long_one): the steps of one story, in order\n" + longer
    assert _sizes(tmp_path, reasoned).returncode == 0, _sizes(tmp_path, reasoned).stdout
    stale = "# size(long_one): the steps of one story, in order\n" + long_fn
    assert "names nothing over its limit" in _sizes(tmp_path, stale).stdout
    empty = "# size(long_one): ok\n" + longer
    assert "gives no reason" in _sizes(tmp_path, empty).stdout
    module = "x = 1\n" * 601
    assert "601 lines (over 600)" in _sizes(tmp_path, module).stdout
    assert _sizes(tmp_path, "# size(module): a table of vectors, one a line\n" + module).returncode == 0
    below = "# size(module): a table of vectors, one a line\n" + "def f() -> None:\n    pass\n" + module
    assert _sizes(tmp_path, below).returncode == 0  # a reason above the first def counts
    late = "def f() -> None:\n    pass\n# size(module): a table of vectors, one a line\n" + module
    assert "lines (over 600) and no '# size(module)" in _sizes(tmp_path, late).stdout  # below a def: not its top
