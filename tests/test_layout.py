"""The package's layout: no import cycle between its modules (every import counted: at the top,
inside functions, under ``TYPE_CHECKING``), none between its suites and layers, and no new
function over the length limit in ``coordinator/`` and ``factory/``.

The import graph is read from the source with :mod:`ast` (nothing is imported), over every
module the wheel ships (``[tool.setuptools] package-dir`` in pyproject.toml). An edge goes to the
module an import names: ``from a.b import c`` is an edge to ``a.b.c`` when that is a module,
else to ``a.b``. Importing a module also initializes its parent packages first; those implicit
edges are not counted (Python initializes a parent before its children, whatever the parent's
``__init__`` imports), as import-linter and pydeps do not count them either.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FUNCTION_LINES_MAX = 80
"""The longest a function in ``coordinator/`` or ``factory/`` may be (issue 15)."""
TOO_LONG_TODAY: dict[str, int] = {}
"""Functions over the limit when the check was added, with their length then: each may shrink,
none may grow, and no other function may pass the limit. Remove an entry once it fits."""

LAYER_EDGES_TODAY: set[tuple[str, str]] = set()
"""Edges between packages that make a cycle between layers, left for now (none: the last one,
``config`` -> ``factory`` for the price-table reader, went when the reader moved to ``schemas/``).
An entry is allowed only while it still exists: the check below refuses a stale one."""


# -- reading the graph -----------------------------------------------------------------------------


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the distribution under ``root``: dotted name -> file.

    :param root: the folder holding pyproject.toml.
    """
    dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        base = root / folder
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            # A nested folder belongs to the package only where every level has an __init__.py.
            if not all((base / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
                continue
            # A folder mapped by an entry of its own (factory/engines) gives the same names twice.
            name = ".".join([pkg, *(p for p in rel.parts if p != "__init__")])
            out[name] = f
    return out


def _nearest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules it imports, anywhere in its source.

    :param modules: from :func:`package_modules`.
    """
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    src = f"{base}.{node.module}" if node.module else base
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            for t in targets:
                hit = _nearest(t, modules)
                if hit is not None and hit != mod:
                    graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path ``[a, b, ..., a]``) per strongly connected component of more
    than one node, shortest first found by breadth-first search; [] when the graph has none.

    :param graph: node -> the nodes it points to.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; recursion depth <= the module count
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in comps:
        start = min(comp)
        # Shortest path from start back to start inside the component.
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = prev.get(v)
        out.append([start, *reversed(path[1:]), start])
    return out


def collapse(graph: dict[str, set[str]], level: int) -> dict[str, set[str]]:
    """The graph between the first ``level`` dotted parts of the module names (``gigafactory.chaos``
    for ``level`` 2): one node per layer or suite.

    :param graph: module -> modules.
    :param level: how many leading name parts make a node.
    """
    key = lambda m: ".".join(m.split(".")[:level])  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(key(m), set()).update(key(t) for t in targets if key(t) != key(m))
    return out


def _show(found: Iterable[list[str]]) -> str:
    return "\n".join("  " + " -> ".join(c) for c in found)


# -- the checks ------------------------------------------------------------------------------------


def test_the_package_has_no_import_cycle():
    modules = package_modules(ROOT)
    assert "gigafactory.chaos.scenarios.herd" in modules and "gigafactory.testing.cluster" in modules, sorted(modules)
    found = cycles(import_graph(modules))
    assert not found, "import cycles (move the shared piece to a module both can import):\n" + _show(found)


def test_no_cycle_between_the_suites_and_layers():
    """chaos -> loadtest is allowed (a scenario runs fleet hosts), loadtest -> chaos is not; the
    coordinator and the factory never import each other."""
    graph = collapse(import_graph(package_modules(ROOT)), 2)
    for a, b in LAYER_EDGES_TODAY:
        assert b in graph[a], f"{a} no longer imports {b}: remove it from LAYER_EDGES_TODAY"
        graph[a].discard(b)
    found = cycles(graph)
    assert not found, "cycles between packages:\n" + _show(found)
    assert "gigafactory.factory" not in graph["gigafactory.coordinator"]
    assert "gigafactory.coordinator" not in graph["gigafactory.factory"]


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    """The check itself: a cycle hidden behind an import inside a function is still a cycle,
    and it is printed as a path."""
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "demo" = "src" }\n')
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("from .b import thing\n")
    (src / "b.py").write_text("thing = 1\n\ndef later():\n    from .sub import c\n")
    (src / "sub" / "__init__.py").write_text("")
    (src / "sub" / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from demo import a\n")
    (src / "d.py").write_text("from demo.a import thing\n")

    modules = package_modules(tmp_path)
    graph = import_graph(modules)

    assert sorted(modules) == ["demo", "demo.a", "demo.b", "demo.d", "demo.sub", "demo.sub.c"]
    assert graph["demo.b"] == {"demo.sub.c"} and graph["demo.sub.c"] == {"demo.a"}
    assert cycles(graph) == [["demo.a", "demo.b", "demo.sub.c", "demo.a"]]
    assert collapse(graph, 2)["demo.d"] == {"demo.a"}


def function_lengths(root: Path, folders: Iterable[str]) -> dict[str, int]:
    """``folder/file.py:name`` -> lines, for every function (methods and nested ones too) in
    ``folders`` under ``root`` (a name defined twice in a file keeps its longest).

    :param root: the repository root.
    :param folders: folders relative to ``root``, searched recursively.
    """
    out: dict[str, int] = {}
    for folder in folders:
        for f in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    key = f"{f.relative_to(root).as_posix()}:{node.name}"
                    out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)
    return out


def test_no_new_function_over_the_length_limit():
    lengths = function_lengths(ROOT, ["coordinator", "factory"])
    too_long = {k: n for k, n in lengths.items() if n > FUNCTION_LINES_MAX}
    new = {k: n for k, n in too_long.items() if k not in TOO_LONG_TODAY}
    grown = {k: (TOO_LONG_TODAY[k], n) for k, n in too_long.items() if k in TOO_LONG_TODAY and n > TOO_LONG_TODAY[k]}
    assert not new, f"functions over {FUNCTION_LINES_MAX} lines (split them): {new}"
    assert not grown, f"functions over the limit that grew (was, now): {grown}"
    fitted = sorted(k for k in TOO_LONG_TODAY if lengths.get(k, 0) <= FUNCTION_LINES_MAX)
    assert not fitted, f"these fit the limit now: remove them from TOO_LONG_TODAY: {fitted}"


def test_the_factorys_mixins_never_define_the_same_method_twice():
    """The factory is one class made of mixins (stations, pools, holder, execute, reporting,
    ship, checkpoints, ...): a name two of them define is silently taken from the first in the
    MRO, and the other's callers get a method with another contract (this once broke WIP
    checkpoints: two ``_fence_side_effect`` with different return types)."""
    from gigafactory.factory.agent import Factory

    seen: dict[str, str] = {}
    clashes = []
    for base in Factory.__mro__[1:]:
        if base is object:
            continue
        for name in vars(base):
            if name.startswith("__") and name.endswith("__"):
                continue
            if name in seen:
                clashes.append(f"{name}: {seen[name]} and {base.__name__}")
            else:
                seen[name] = base.__name__
    assert not clashes, "methods defined by two of the factory's mixins:\n" + "\n".join(clashes)


# -- names -----------------------------------------------------------------------------------------

PRIVATE_IMPORTS_ALLOWED: dict[tuple[str, str, str], str] = {}
"""``(importer, module, name)`` -> why that module may take that underscore-private name from
another module. Empty: a helper two modules share is public in the module that owns it."""


def _imported_modules(mod: str, path: Path, modules: dict[str, Path]) -> tuple[ast.Module, dict[str, str]]:
    """The module's syntax tree and the local names it binds to modules of the package
    (``import a.b as x``, ``from a import b`` where ``a.b`` is a module) -> that module."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _import_source(mod, is_pkg, node)
            for a in node.names:
                if f"{src}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{src}.{a.name}"
    return tree, bound


def _import_source(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod if is_pkg else mod.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def private_imports(modules: dict[str, Path]) -> list[tuple[str, str, str, int]]:
    """Every underscore-private name (``_x``, not ``__x__``) one module of the package takes from
    another: ``from m import _x``, or ``m._x`` on a module it imported. ``(importer, module,
    name, line)``.

    :param modules: from :func:`package_modules`.
    """
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    out = []
    for mod, path in modules.items():
        tree, bound = _imported_modules(mod, path, modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _import_source(mod, path.name == "__init__.py", node)
                out += [(mod, src, a.name, node.lineno) for a in node.names if private(a.name) and src != mod]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                  and private(node.attr) and bound[node.value.id] != mod):
                out.append((mod, bound[node.value.id], node.attr, node.lineno))
    return out


def test_no_module_imports_another_modules_private_helper():
    """A helper another module needs is part of its module's interface: it gets a public name
    (and a docstring), so whoever changes it knows it has callers elsewhere."""
    found = [f"{m}:{line} takes {src}.{name}" for m, src, name, line in private_imports(package_modules(ROOT))
             if (m, src, name) not in PRIVATE_IMPORTS_ALLOWED]
    assert not found, "underscore-private names used across modules (make them public):\n" + "\n".join(found)


def test_the_private_import_check_sees_both_forms(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "demo" = "src" }\n')
    src = tmp_path / "src"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("def _helper():\n    pass\n\n\ndef _own():\n    _helper()\n")
    (src / "b.py").write_text("from .a import _helper\n")
    (src / "c.py").write_text("from demo import a\n\n\ndef f():\n    return a._helper(), a.__name__\n")
    (src / "d.py").write_text("from demo.a import _own as mine  # noqa\nimport demo.a\n")
    found = sorted((m, s, n) for m, s, n, _ in private_imports(package_modules(tmp_path)))
    assert found == [("demo.b", "demo.a", "_helper"), ("demo.c", "demo.a", "_helper"), ("demo.d", "demo.a", "_own")]


def test_the_simulation_reuses_no_production_class_name():
    """The deterministic simulation models the factory and the coordinator: its models are
    named ``Sim...`` so a reader (or a traceback) never takes one for the real class."""
    modules = package_modules(ROOT)
    sim = "gigafactory.chaos.sim"

    def classes(path: Path) -> set[str]:
        return {n.name for n in ast.parse(path.read_text(), str(path)).body if isinstance(n, ast.ClassDef)}

    production = set().union(*(classes(p) for m, p in modules.items() if m != sim))
    assert "Factory" in production and "Coordinator" in production
    clashes = sorted(classes(modules[sim]) & production)
    assert not clashes, f"chaos/sim.py reuses production class names (prefix them with Sim): {clashes}"
