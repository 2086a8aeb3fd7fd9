"""No import cycle inside flatlm: the graph of its modules, read from their source with ``ast``, is
acyclic. Every import counts, a function's deferred one too (a cycle hidden in a function still
ties the two modules together); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
``from package import name`` depends on ``package.name`` where that is a submodule, else on the
package itself."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "flatlm").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in modules else module)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_imports():
    # Guards the check below: known edges, a deferred one among them, are found.
    graph = import_graph()
    assert "flatlm.lm.config" in graph["flatlm.lm.models"]
    assert "flatlm.optim.sharded" in graph["flatlm.optim.directions"]  # from flatlm.optim import
    assert "flatlm.optim.registry" in graph["flatlm.lm.config"]  # inside a function


def test_no_import_cycle_inside_flatlm():
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise AssertionError(f"import cycle inside flatlm: {cycle}") from None


def test_a_cycle_is_found():
    # The check itself on a made-up graph: a -> b -> c -> a.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError:
        return
    raise AssertionError("the cycle a -> b -> c -> a was not found")
