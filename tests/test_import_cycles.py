"""No import cycles in the package, function-level imports included (a deferred import only hides
a cycle until someone moves it), and no module imports the package root."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lazymerge

PACKAGE = Path(lazymerge.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports at run time (anywhere in the file; not under TYPE_CHECKING)."""
    found: set[str] = set()
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != here}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def test_no_module_imports_the_package_root() -> None:
    importers = sorted(m for m, deps in _graph().items() if "lazymerge" in deps and m != "lazymerge")
    assert importers == [], "import from lazymerge._version (or the module itself), not the package root"


# Cycles inside the packages that issue 15's "each method declared once" rework rewrites (a
# registry module that `methods/*` import instead of the package; the kernels' interface apart
# from the CUDA backend). Listed so that no NEW cycle gets in meanwhile; the test fails once one
# of them is gone, so that its entry is deleted with the fix.
def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_package_imports_without_torch() -> None:
    # Planning is torch-free, and the start-up prefetch needs torch not imported yet.
    code = "import sys, lazymerge, lazymerge.cli; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
