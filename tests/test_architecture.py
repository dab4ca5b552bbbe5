"""The package's imports run one way (issue 20): no module imports, directly or through others, a module that
imports it back. A circle makes a module's names depend on which of the two was imported first, and is easily
hidden by an import inside a function; so imports are read from the source with ``ast``, wherever they are
(inside functions and under ``TYPE_CHECKING`` included)."""

from __future__ import annotations

import ast
from pathlib import Path

import tolaria_otel

PACKAGE = Path(tolaria_otel.__file__).parent


def import_graph(root: Path) -> dict[str, set[str]]:
    """Per module of the package at ``root`` (dotted, relative to it; ``""`` is ``__init__``), the package's
    modules it imports."""
    paths = {_module_name(root, path): path for path in root.rglob("*.py")}
    return {name: _imported(name, path, set(paths), root.name) for name, path in paths.items()}


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(name: str, path: Path, modules: set[str], package_name: str) -> set[str]:
    package = [p for p in name.split(".") if p]
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix(package_name).lstrip(".")
                for alias in node.names
                if alias.name.split(".")[0] == package_name
            )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == package_name:
                base = node.module.removeprefix(package_name).lstrip(".")
            else:
                continue
            found.add(base)
            # `from . import x` and `from .a import b` may name a submodule as well as an attribute.
            found.update(f"{base}.{alias.name}".lstrip(".") for alias in node.names)
    return {module for module in found if module in modules and module != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a path that closes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_closing_path(graph, component) for component in components]


def _closing_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path inside the component from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no path closes {sorted(component)}")


def test_a_circle_through_an_import_inside_a_function_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .top import run\n")
    (package / "top.py").write_text("from .sub import low\n\ndef run():\n    return low.value\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "low.py").write_text("def value():\n    from ..sub import middle\n")
    (package / "sub" / "middle.py").write_text("import os\nfrom pkg.sub.low import value\nfrom .. import top\n")
    graph = import_graph(package)
    assert graph == {
        "": {"top"},
        "top": {"sub", "sub.low"},
        "sub": set(),
        "sub.low": {"sub", "sub.middle"},
        "sub.middle": {"", "sub.low", "top"},
    }
    assert circles(graph) == [["", "top", "sub.low", "sub.middle", ""]]
    (package / "sub" / "low.py").write_text("value = 1\n")
    assert circles(import_graph(package)) == []


def test_no_import_circle_in_the_package():
    found = circles(import_graph(PACKAGE))
    named = [" -> ".join(".".join(filter(None, [PACKAGE.name, module])) for module in circle) for circle in found]
    assert not found, "import circles: " + "; ".join(named)


#: The package's layers, bottom first, in the order a step's value flows through them: a module imports only
#: modules of its own layer or of the layers below it (docs/architecture.md). Each entry is a folder or a
#: top-level module; ``""`` is the package's ``__init__``.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "failures"),
    ("config",),
    ("capture",),
    ("measure",),
    ("reduce",),
    ("summary",),
    ("export",),
    ("step_path", "telemetry"),
    ("integrations",),
    ("demo",),
    ("cli",),
    ("", "lightning", "transformers", "plot", "redaction", "distributed"),  # the import paths the docs name
)


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(layers):
        if top in names:
            return index
    raise AssertionError(f"{module!r} is in no layer of tests/test_architecture.py's LAYERS: place it there")


def upward_imports(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Every import of a module of a higher layer, as ``importer -> imported``."""
    return sorted(
        f"{module or '__init__'} -> {target or '__init__'}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target, layers) > layer_of(module, layers)
    )


def test_an_import_against_the_layers_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    for folder in ("low", "high"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "high" / "user.py").write_text("from ..low.base import value\n")
    (package / "low" / "base.py").write_text("value = 1\n\ndef later():\n    from ..high import user\n")
    layers = (("low",), ("high",), ("",))
    assert upward_imports(import_graph(package), layers) == ["low.base -> high", "low.base -> high.user"]
    (package / "low" / "base.py").write_text("value = 1\n")
    assert upward_imports(import_graph(package), layers) == []


def test_every_module_imports_only_its_own_layer_and_those_below():
    found = upward_imports(import_graph(PACKAGE))
    assert not found, "imports against the layers (LAYERS, bottom first): " + "; ".join(found)


def test_every_internal_folder_says_so():
    """A folder whose names are not public API says it is internal in its first docstring line."""
    public = {"summary", "integrations", "demo", "cli"}
    for folder in sorted(path.parent for path in PACKAGE.glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))) or ""
        first = docstring.split("\n")[0]
        assert first.startswith("Internal:") == (folder.name not in public), f"{folder.name}/__init__.py: {first!r}"
