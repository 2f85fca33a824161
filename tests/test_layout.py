"""The source tree keeps the shape its README's Design section describes.

- No import circle among kine_server's modules (imports inside functions count: a circle that
  only works because one side imports late is still a circle).
- The packages depend in one direction: the api speaks gRPC and uses the store; the store
  composes mvcc, lease, auth and maintenance; drivers know nothing above them; only the
  process package knows there are several processes.
- No hand-written source file over 500 lines (generated protobuf code aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "kine_server"
MOST_LINES = 500

#: What each package may not import: the layers below never reach up.
FORBIDDEN = {
    "drivers": ("api", "store", "mvcc", "lease", "auth", "maintenance", "process", "gateway"),
    "mvcc": ("api", "store", "lease", "auth", "maintenance", "process", "gateway"),
    "lease": ("api", "store", "auth", "maintenance", "process", "gateway"),
    "auth": ("api", "store", "lease", "maintenance", "process", "gateway"),
    "maintenance": ("api", "store", "process", "gateway"),
    "store": ("api", "process", "gateway"),
    "api": ("process",),
    "gateway": ("process", "store", "mvcc"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "pb" not in path.relative_to(PACKAGE).parts[:1]
    }


def imports(path: Path, modules: set[str]) -> set[str]:
    """The kine_server modules `path` imports, wherever in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` uses the submodule; any other name is the
            # module's own.
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name for name in submodules if name in modules]
            if len(names) < len(submodules):
                names.append(node.module)
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def graph() -> dict[str, set[str]]:
    paths = sources()
    modules = set(paths)
    return {name: imports(path, modules) - {name} for name, path in paths.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for after in sorted(edges.get(node, ())):
            if after not in index:
                visit(after)
                low[node] = min(low[node], low[after])
            elif after in on_stack:
                low[node] = min(low[node], index[after])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_packages_depend_downwards_only() -> None:
    wrong = []
    for module, imported in graph().items():
        package = module.split(".")[1] if module.count(".") else ""
        for target in imported:
            top = target.split(".")[1] if target.count(".") else ""
            if top in FORBIDDEN.get(package, ()):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_source_file_is_too_long() -> None:
    roots = [PACKAGE, ROOT / "bench", ROOT / "e2e"]
    long = []
    for root in roots:
        for path in root.rglob("*.py"):
            if "pb" in path.relative_to(root).parts[:1] and root == PACKAGE:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MOST_LINES:
                long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert long == []
