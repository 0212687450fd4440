"""The import graph of pipeline/, serve/ and loadtest/, read from the source (every import statement: module
level, under TYPE_CHECKING and inside functions): no two modules name each other through a circle, the
model side never imports the serving side or Ray, the job store never imports the HTTP layer, and the app's
config reaches neither."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "serve", "loadtest")


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name `module` imports, anywhere in its file (`from a import b` gives `a` and `a.b`, or
    only `a.b` when that is a module)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            imported = {f"{base}.{alias.name}" for alias in node.names}
            if not imported <= modules().keys():  # `from package import submodule` is an arrow to it alone
                names.add(base)
            names.update(imported)
    return names


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the modules of PACKAGES it imports (a name that is not a module counts as its parent's)."""
    known = modules()
    edges = {}
    for module, path in known.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = frozenset(targets)
    return edges


def importers_of(prefix: str) -> dict[str, set[str]]:
    """Module -> the names it imports that are `prefix` or under it."""
    found = {}
    for module, path in modules().items():
        hits = {
            name for name in imported_names(path, module) if name == prefix or name.startswith(prefix + ".")
        }
        if hits:
            found[module] = hits
    return found


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def without_package_inits(edges: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """The graph between modules, not counting imports of a package's `__init__` re-exports: `from
    serve.jobs import JobStore` is an arrow to where JobStore lives, which `serve.jobs` names."""
    inits = {module for module, path in modules().items() if path.name == "__init__.py"}
    resolved = {}
    for module, targets in edges.items():
        if module in inits:
            continue
        expanded: set[str] = set()
        for target in targets:
            if target in inits:
                expanded.update(edge for edge in edges[target] if edge not in inits)
            else:
                expanded.add(target)
        resolved[module] = frozenset(expanded - {module})
    return resolved


def test_the_graph_reads_the_modules_it_is_about() -> None:
    edges = graph()
    assert "serve.jobs.store" in edges and "pipeline.spec" in edges and "loadtest.capacity" in edges
    assert "serve.jobs.models" in edges["serve.jobs.rows"]  # a plain module-level import is an arrow


def test_no_two_modules_import_each_other_through_a_circle() -> None:
    found = cycles(without_package_inits(graph()))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(group) for group in found)


def test_the_model_side_imports_neither_the_serving_side_nor_ray() -> None:
    wrong = {
        module: names
        for prefix in ("serve", "ray")
        for module, names in importers_of(prefix).items()
        if module.startswith("pipeline")
    }
    assert wrong == {}


def test_the_job_store_never_imports_the_http_layer() -> None:
    wrong = {
        module: names
        for module, names in importers_of("serve.http").items()
        if module.startswith("serve.jobs")
    }
    assert wrong == {}


def reachable(module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    edges, seen, todo = graph(), set(), [module]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_app_config_reaches_neither_the_job_store_nor_the_http_layer() -> None:
    wrong = {name for name in reachable("serve.config") if name.startswith(("serve.jobs", "serve.http"))}
    assert wrong == set()


def test_a_circle_is_found_when_there_is_one() -> None:
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert cycles(edges) == [["a", "b", "c"]]
