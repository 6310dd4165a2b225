"""The package's import graph: no circles, and imports point one way through the layers.

Every module of ``vlretrieval`` is parsed (not imported), and every ``import`` statement counts,
including those inside functions and ``TYPE_CHECKING`` blocks: a deferred import still ties the
modules together. The layers, from the bottom:

    base (errors, io, cli, conda_envs, config, the package root, the family registry)
    <- data <- models <- training, retrieval <- tracking <- pipeline <- __main__ (the command line)

A module may import its own layer and the layers below; ``training`` and ``retrieval`` are
siblings and import neither each other. The family registry (``models.registry``) is a base module:
it imports nothing but errors, so that config validation and the Snakefile can ask a family's kind
without importing paddle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "vlretrieval"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

BASE = "base"
LAYER_RANKS = {BASE: 0, "data": 1, "models": 2, "training": 3, "retrieval": 3, "tracking": 4, "pipeline": 5, "__main__": 6}
BASE_MODULES = {
    PACKAGE,
    f"{PACKAGE}.errors",
    f"{PACKAGE}.io",
    f"{PACKAGE}.cli",
    f"{PACKAGE}.conda_envs",
    f"{PACKAGE}.config",
    f"{PACKAGE}.models.registry",
}


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) of every module under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement may refer to, the most specific first."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        target = ".".join(anchor + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # ``from pkg import name`` imports the submodule pkg.name when there is one, else pkg itself.
    return [f"{target}.{alias.name}" for alias in node.names] + [target]


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(module, is_package, node)
            if isinstance(node, ast.ImportFrom):
                submodules = [name for name in names[:-1] if name in modules]
                names = submodules or [names[-1]]
            for name in names:
                # ``import a.b.c`` of an attribute path: the deepest existing module is imported.
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in modules and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, str] = {}  # "active" while on the DFS path, "done" once fully explored
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        iterators = [iter(sorted(graph[start]))]
        state[start] = "active"
        while iterators:
            successor = next(iterators[-1], None)
            if successor is None:
                state[path.pop()] = "done"
                iterators.pop()
            elif state.get(successor) == "active":
                return path[path.index(successor):] + [successor]
            elif successor not in state:
                state[successor] = "active"
                path.append(successor)
                iterators.append(iter(sorted(graph.get(successor, ()))))
    return None


def layer_of(module: str) -> str:
    if module in BASE_MODULES:
        return BASE
    parts = module.split(".")
    layer = parts[1] if len(parts) > 1 else BASE
    if layer not in LAYER_RANKS:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYER_RANKS or BASE_MODULES")
    return layer


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up the layers, or sideways between different layers of one rank."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = layer_of(module)
        for target in sorted(targets):
            destination = layer_of(target)
            if destination == source:
                continue
            if LAYER_RANKS[destination] >= LAYER_RANKS[source]:
                problems.append(f"{module} ({source}) imports {target} ({destination})")
    return problems


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_modules())


def test_the_package_has_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_point_down_the_layers(graph):
    assert layer_violations(graph) == []


def test_every_module_is_seen(graph):
    assert {f"{PACKAGE}.models.base", f"{PACKAGE}.models.bridgetower.modeling", f"{PACKAGE}.training.trainer"} <= set(graph)
    # Deferred imports count: base.py reaches the datasets only inside ModelFamily's hooks.
    assert f"{PACKAGE}.models.datasets" in graph[f"{PACKAGE}.models.base"]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # A cycle away from the first start, behind an already explored branch.
    cycle = find_cycle({"a": {"b", "d"}, "b": set(), "d": {"e"}, "e": {"f"}, "f": {"d"}})
    assert cycle == ["d", "e", "f", "d"]


def test_a_deferred_upward_import_is_a_violation(tmp_path):
    package = tmp_path / PACKAGE
    for sub in ("models", "training"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "base.py").write_text("def hook():\n    from ..training import trainer\n")
    (package / "training" / "trainer.py").write_text("from ..models.base import hook\n")
    graph = import_graph(package_modules(package))
    assert graph[f"{PACKAGE}.models.base"] == {f"{PACKAGE}.training.trainer"}
    assert find_cycle(graph) == [f"{PACKAGE}.models.base", f"{PACKAGE}.training.trainer", f"{PACKAGE}.models.base"]
    assert layer_violations(graph) == [f"{PACKAGE}.models.base (models) imports {PACKAGE}.training.trainer (training)"]
