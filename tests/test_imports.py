"""The import graph of alignpipe has no cycles, and `import alignpipe` stays light.

The graph is read from the source with `ast`, so it sees every import: module level, inside
functions (a lazy import is still a dependency) and the E402 kind at the bottom of a package's
`__init__`. Only imports under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "alignpipe"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_names(root: Path) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package is named by its `__init__`)."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """All import statements in the tree except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest existing module that `name` names or lies inside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere but under TYPE_CHECKING)."""
    package = root.name
    modules = _module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_base(name, is_package, node)
                targets = [base]
                targets += [f"{base}.{alias.name}" for alias in node.names
                            if f"{base}.{alias.name}" in modules]
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                owner = target if target in modules else _owning_module(target, modules)
                if owner is not None and owner != name:
                    graph[name].add(owner)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_strongly_connected_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .. import top\n"
        "if TYPE_CHECKING:\n    from pkg import hidden\n"
        "def later():\n    import pkg.lazy.thing\n")
    for name in ("top", "hidden", "lazy"):
        (pkg / f"{name}.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.leaf"}
    # relative `from .. import top`, a lazy import inside a function; not the TYPE_CHECKING one
    assert graph["pkg.sub.leaf"] == {"pkg", "pkg.top", "pkg.lazy"}
    assert strongly_connected(graph) == [["pkg", "pkg.sub.leaf"]]


def test_graph_of_alignpipe_sees_lazy_imports():
    graph = import_graph()
    assert "alignpipe.embed.cluster" in graph["alignpipe.embed.api"]  # imported in a function
    assert "alignpipe.methods.registry" in graph["alignpipe.methods.asif"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles among alignpipe modules:\n" + "\n".join(
        _describe(component, graph) for component in cycles
    )


def test_import_alignpipe_loads_no_app_libraries():
    code = (
        "import sys, alignpipe; "
        "print(','.join(m for m in ('typer', 'rich', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "", f"import alignpipe loaded: {out.stdout.strip()}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


#: The app: what sits on top of the core's public API. Everything else under alignpipe is core.
APP = ("alignpipe.app", "alignpipe.__main__")


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_core_never_imports_the_app():
    graph = import_graph()
    assert any(_inside(m, APP) for m in graph), "the app package is missing"
    offenders = {m: sorted(d for d in deps if _inside(d, APP))
                 for m, deps in graph.items() if not _inside(m, APP)}
    offenders = {m: deps for m, deps in offenders.items() if deps}
    assert not offenders, "core modules importing the app:\n" + "\n".join(
        f"{m} -> {', '.join(deps)}" for m, deps in sorted(offenders.items()))


def test_the_core_check_sees_a_planted_app_import(tmp_path):
    pkg = tmp_path / "alignpipe"
    (pkg / "app").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "app" / "__init__.py").write_text("")
    (pkg / "app" / "cli.py").write_text("from alignpipe import store\n")
    (pkg / "store.py").write_text("def f():\n    from alignpipe.app.cli import x\n")
    graph = import_graph(pkg)
    assert graph["alignpipe.store"] == {"alignpipe.app.cli"}
    assert [m for m in graph if not _inside(m, APP) and any(_inside(d, APP) for d in graph[m])] \
        == ["alignpipe.store"]


def test_the_data_layer_does_not_import_stage_two_or_the_app():
    """Plumbing, manifests, stores and the stage-two pairing view sit below encoders, methods,
    fit, evaluation and the app."""
    graph = import_graph()
    above = ("alignpipe.encoders", "alignpipe.embed", "alignpipe.methods", "alignpipe.fit",
             "alignpipe.evaluate", *APP)
    below = [m for m in graph if _inside(m, ("alignpipe.util", "alignpipe.data"))]
    assert "alignpipe.data.store" in below and "alignpipe.util.fsutil" in below
    for module in below:
        reached = sorted(m for m in _reachable(graph, module) if _inside(m, above))
        assert not reached, f"{module} imports {reached}"


def test_util_imports_nothing_above_it():
    graph = import_graph()
    for module in (m for m in graph if _inside(m, ("alignpipe.util",))):
        assert all(_inside(d, ("alignpipe.util",)) for d in _reachable(graph, module)), module


def test_every_public_name_of_alignpipe_resolves_without_the_app():
    code = (
        "import sys, alignpipe\n"
        "for name in alignpipe.__all__: getattr(alignpipe, name)\n"
        "print(','.join(m for m in ('typer', 'rich', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "", f"the public API loaded: {out.stdout.strip()}"
