"""align_cli.data imports one way: no module of the package imports, at any depth and even inside a
function, one that imports it back (readers <-> formats and tokenize <-> preference did)."""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "align_cli" / "data"


def data_imports() -> dict[str, set[str]]:
    """{module: the align_cli.data modules it imports anywhere in its file}."""
    names = {p.stem for p in DATA.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        tree = ast.parse((DATA / f"{name}.py").read_text())
        graph[name] = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("align_cli.data.")
            and node.module.rsplit(".", 1)[1] in names
        }
    return graph


def test_the_data_package_has_no_import_cycle():
    graph = data_imports()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, name, target])
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert graph["tokenize"] >= {"ranked"} and "preference" not in graph["tokenize"]
