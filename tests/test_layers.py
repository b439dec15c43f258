"""The package's layering (DEVELOPERS.md): nothing imports upward, no import cycles between featx's modules."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parents[1] / "featx"
# Lower first. A module may import from any module before it in this list (and from the package root).
LAYERS = [
    "failpoints",
    "errors",
    "runtime",
    "distributed",
    "cluster",
    "metrics",
    "records",
    "data",
    "backbones",
    "onnx_export",
    "cache",
    "inference",
    "extraction",
    "heads",
    "ranking",
    "prediction",
    "estimators",
    "finetuning",
    "reporting",
    "bench",
    "cli",
    "__main__",
]


def _imports() -> dict[str, set[str]]:
    """featx module -> the featx modules it imports (anywhere in it, function-level imports included)."""
    out: dict[str, set[str]] = defaultdict(set)
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = me if f.name == "__init__.py" else me.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out[me].update(n for n in names if n.startswith("featx"))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer() -> None:
    assert {_layer(m) for m in _imports()} - {""} <= set(LAYERS)


def test_nothing_imports_upward() -> None:
    upward = sorted(
        (m, t)
        for m, targets in _imports().items()
        for t in targets
        if _layer(m) and _layer(t) and LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))
    )
    assert upward == []


def test_no_import_cycle_between_modules() -> None:
    graph = _imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if v == u or u.startswith(v + "."):  # a submodule reading its own package's names is not a cycle
                continue
            if state.get(v) == 1:
                cycles.append([*path[path.index(v) :], v])
            elif v not in state:
                visit(v, path)
        path.pop()
        state[u] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []
