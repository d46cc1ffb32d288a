"""How launcher's modules import each other: no cycles, counting every import statement (inside functions
too), and no rendezvous backend imports another.

An import of ``a.b.c`` is an edge to ``a.b.c`` and to the packages above it
(``a``, ``a.b``), which Python imports first. An edge from a module to a
package above it is left out: Python has run that package's ``__init__``
before the module, so the import adds no dependency (a package's
``__init__`` may import its submodules, and they may take names from it).
"""
import ast
import os

from helpers import REPO


def module_names(root: str, package: str) -> dict[str, str]:
    """Every Python module under ``root`` (the directory of ``package``): name -> path."""
    modules = {}
    for directory, _, files in os.walk(root):
        parts = [package, *os.path.relpath(directory, root).split(os.sep)]
        parts = [part for part in parts if part != "."]
        for file in files:
            if file.endswith(".py"):
                stem = file[:-3]
                name = ".".join(parts if stem == "__init__" else [*parts, stem])
                modules[name] = os.path.join(directory, file)
    return modules


def _imported(module: str, path: str, node: ast.AST) -> list[str]:
    """The modules an import statement names, as written (``from x import y`` names x and x.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, or the package's package...
        is_package = os.path.basename(path) == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` its import statements make Python import first."""
    modules = module_names(root, package)
    graph = {}
    for module, path in modules.items():
        with open(path) as source:
            tree = ast.parse(source.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(module, path, node):
                    parts = name.split(".")
                    targets.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
        above = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 1)}
        graph[module] = {target for target in targets if target in modules and target not in above | {module}}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found (``[a, b, a]``), by depth-first search."""
    found, state = [], {}  # state: "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_launcher_modules_import_without_cycles():
    graph = import_graph(os.path.join(REPO, "launcher"), "launcher")
    assert {"launcher.config", "launcher.rendezvous"} <= graph["launcher.agent"]  # the walk sees the imports
    assert "launcher.rendezvous.static" in graph["launcher.rendezvous"]  # inside a function too
    assert cycles(graph) == []


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg import b\n")
    (package / "b.py").write_text("from pkg.c import thing\n")
    (package / "c.py").write_text("from . import a\nthing = 1\n")
    graph = import_graph(str(package), "pkg")
    assert graph["pkg.b"] == {"pkg.c"}  # not pkg: b's own package
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_no_rendezvous_backend_imports_another():
    graph = import_graph(os.path.join(REPO, "launcher"), "launcher")
    backends = {f"launcher.rendezvous.{backend}" for backend in ("static", "c10d", "etcd")}
    assert {backend: graph[backend] & backends for backend in backends} == {backend: set() for backend in backends}
