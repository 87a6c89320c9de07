"""The shape of the code base: no import circles, no module importing another's private names.

Imports inside functions count too: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("builder", "verifier", "dirtylog")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> modules it imports, [(module, imported module, private name)])."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                targets = []
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.append((sub, None) if sub in modules else (target, a.name))
            else:
                continue
            for target, name in targets:
                if target.split(".")[0] not in PACKAGES or target == mod:
                    continue
                edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append((mod, target, name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_the_graph_is_read():
    edges, _ = import_graph()
    assert "verifier.trial" in edges["verifier.run"]
    assert "dirtylog.console" in edges["dirtylog.cli"]


def test_no_import_circles():
    edges, _ = import_graph()
    assert _cycles(edges) == []


def test_a_planted_circle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == []
