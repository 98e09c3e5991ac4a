"""docs/ARCHITECTURE.md cannot drift: its layers are import-linter's layers contract, its state
diagrams are the state tables, and README and CONTRIBUTING link to it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_architecture", ROOT / "scripts" / "render_architecture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_parts_match_the_contract_and_the_tables() -> None:
    text = DOC.read_text()
    assert _renderer().render(text) == text, (
        "docs/ARCHITECTURE.md differs from the contract or the state tables: "
        "run .venv/bin/python scripts/render_architecture.py"
    )


def test_the_layers_in_the_doc_are_the_contracts_in_order() -> None:
    """Read back from the page, independently of the renderer: the layers table's first column."""
    contract = _renderer().layers()
    block = DOC.read_text().split("<!-- generated: layers")[1].split("<!-- end generated -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    in_doc = [re.findall(r"`(custody\.[a-z_.]+)`", row.split(" | ")[0]) for row in rows]
    assert in_doc == contract and len(contract) >= 8


def test_every_package_of_the_library_is_in_a_layer_or_has_its_own_contract() -> None:
    layered = {p for layer in _renderer().layers() for p in layer}
    packages = {f"custody.{p.parent.name}" for p in (ROOT / "custody").glob("*/__init__.py")}
    assert packages - layered == {"custody.verify"}  # the verifier has a contract of its own


def test_the_diagrams_show_every_transition_of_the_tables() -> None:
    from custody.books import deposit_states
    from custody.withdraw import states

    text = DOC.read_text()
    machines = (
        ("withdrawals", states.MACHINE),
        ("consolidations", states.SELF_TRANSFER),
        ("deposits", deposit_states.MACHINE),
    )
    for name, machine in machines:
        block = text.split(f"<!-- generated: {name}")[1].split("<!-- end generated -->")[0]
        arrows = re.findall(r"^ {4}(\w+) --> (\w+): ([\w-]+)$", block, re.M)
        assert {(s, str(e), t) for (s, e), t in machine.table.items()} == {(s, e, t) for s, t, e in arrows}
        assert len(arrows) == len(machine.table)


def test_a_tampered_page_is_rendered_back(tmp_path: Path) -> None:
    """The check can fail: swap two layers, or drop a transition, and the rendering differs."""
    text = DOC.read_text()
    swapped = text.replace("| `custody.books` |", "| `custody.tmp` |").replace(
        "| `custody.issuance` |", "| `custody.books` |"
    )
    dropped = re.sub(r"^ {4}signed --> broadcast: broadcast\n", "", text, flags=re.M)
    render = _renderer().render
    for tampered in (swapped, dropped):
        assert tampered != text and render(tampered) == text


def test_readme_and_contributing_link_to_the_architecture() -> None:
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()
    assert "docs/ARCHITECTURE.md" in (ROOT / "CONTRIBUTING.md").read_text()
