"""The import graph of our packages, read from the source with `ast` (no module is imported).

Every `import` counts, wherever it sits: module level, inside a function (deferred), under TYPE_CHECKING. A
cycle between modules, even through a deferred import, means two modules cannot be understood or moved apart,
so the test fails on any; and library code under `mim/` parses no command lines (the commands live in
mimsearch/commands/).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mim", "export", "client", "benchmarks", "mimsearch")


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__.py)."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports, relative imports resolved; `from a import b` gives a.b and a."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a name that is a module's attribute counts as that module)."""
    graph = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules():
    graph = import_graph(module_files())
    assert len(graph) > 50  # the walk found the tree
    found = cycles(graph)
    assert found == [], "import cycles (deferred imports included): " + "; ".join(
        " <-> ".join(c) + " via " + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) for c in found
    )


def test_the_cycle_finder_sees_deferred_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.a"] == {"pkg", "pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_library_module_parses_a_command_line():
    files = module_files(packages=("mim",))
    offenders = [
        m
        for m, path in files.items()
        # mim.commandline: the parser class and argument types the entry points share; it parses nothing itself
        if m != "mim.commandline"
        and "argparse" in imported_names(ast.parse(path.read_text()), m, path.name == "__init__.py")
    ]
    assert offenders == [], f"argparse under mim/ in {offenders}; put the command in mimsearch/commands/"


@pytest.mark.parametrize("package", ["mim.data", "mim.model", "mim.training", "mim.search", "mim.serving"])
def test_every_subpackage_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse(module_files()[package].read_text()))
    assert doc and "May import" in doc, f"{package}'s docstring does not say what it owns and may import"


# What each subpackage of mim may import besides itself and the top-level helpers (contract, layout, atomic,
# progress, tables): the rule each package's docstring states. Top-level helpers import only the model configs.
MAY_IMPORT = {
    "mim.data": set(),
    "mim.model": set(),
    "mim.search": {"mim.model"},
    "mim.training": {"mim.data", "mim.model", "mim.search"},
    "mim.serving": {"mim.model", "mim.search"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in MAY_IMPORT else module


def test_each_subpackage_imports_only_what_its_docstring_allows():
    graph = import_graph(module_files(packages=("mim",)))
    wrong = []
    for module, targets in graph.items():
        home = _package(module)
        for target in targets:
            there = _package(target)
            if there == home or there not in MAY_IMPORT:  # itself, or a top-level helper
                continue
            allowed = MAY_IMPORT.get(home, {"mim.model"} if home != "mim" else set())
            if there not in allowed:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], f"imports against the package rules: {wrong}"
