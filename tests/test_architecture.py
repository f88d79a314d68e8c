"""The import rules of the `kontext` package, read from the source (no module is imported):

- no import cycles among kontext modules;
- the engine imports none of the tools beside it (TOOLS), nor ComfyUI, nor the optional dependencies (OPTIONAL);
- no kontext module imports ComfyUI's `nodes` or this pack's node package.

The engine is every kontext module outside TOOLS: the command line (and `python -m kontext`), the bench harness, the
ComfyUI queue client, the TensorRT backend and the tiny-model writer. Tools may import the engine (and the bench imports ComfyUI, which it
times), never the reverse.

Every `import` statement counts, at module level or inside a function (a function-level import is still a
dependency, only a later one); imports under `if TYPE_CHECKING:` do not, as they never run. Importing a submodule
runs its package's __init__ too, but that implicit edge is not counted: a package may import its own submodules.
Names looked up at run time (importlib.import_module with a string, as the lazy exports do) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kontext"

TOOLS = ("kontext.__main__", "kontext.cli", "kontext.bench", "kontext.queue", "kontext.tensorrt", "kontext.tiny")
OPTIONAL = ("onnx", "onnxruntime", "tensorrt", "ray")  # extras: the engine runs without them
COMFYUI = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "execution", "nodes")
NODE_PACKS = ("nodes", "kontext_pack")  # ComfyUI's nodes module, or this pack's nodes/ package

# Edges that break the rules today and are being removed; each names why it is here. Empty this, never grow it.
ALLOWED_EDGES: dict[tuple[str, str], str] = {
    # A cycle inside the TensorRT backend: the package's __init__ loads .runtime on use, and runtime reads the
    # backend's CAPABILITIES from the __init__. Moving CAPABILITIES to a leaf module of the package removes it.
    ("kontext.tensorrt.runtime", "kontext.tensorrt"): "tensorrt <-> tensorrt.runtime cycle",
}


# ---------------------------------------------------------------------------------------------- reading imports

def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level and in functions, not under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_names(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> set[str]:
    """The full dotted names `module` imports: kontext modules resolved to the most specific known module (a
    `from pkg import sub` names pkg.sub when that is a module), other packages by their dotted name."""
    names: set[str] = set()
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: from the package that holds `module`
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return names


def most_specific(name: str, known: set[str]) -> str | None:
    """The kontext module `name` lands in (kontext.weights.checkpoint.read_header -> kontext.weights.checkpoint)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def sources(root: Path = ROOT) -> dict[str, tuple[bool, ast.AST]]:
    return {module_name(p, root): (p.name == "__init__.py", ast.parse(p.read_text(), str(p)))
            for p in sorted(root.rglob("*.py"))}


def imports(srcs: dict[str, tuple[bool, ast.AST]]) -> dict[str, set[str]]:
    """module -> every dotted name it imports (kontext modules resolved to the module)."""
    known = set(srcs)
    out: dict[str, set[str]] = {}
    for module, (is_package, tree) in srcs.items():
        names = imported_names(module, is_package, tree, known)
        out[module] = {most_specific(n, known) or n for n in names}
    return out


def kontext_graph(imps: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> the kontext modules it imports, less itself, less the allowlisted edges."""
    return {m: {t for t in targets if t in imps and t != m and (m, t) not in ALLOWED_EDGES}
            for m, targets in imps.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
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
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(imps: dict[str, set[str]]) -> list[str]:
    """Each forbidden import, as 'importer -> imported (rule)'."""
    bad = []
    for module, targets in sorted(imps.items()):
        for target in sorted(targets):
            if (module, target) in ALLOWED_EDGES:
                continue
            if within(target, NODE_PACKS):
                bad.append(f"{module} -> {target} (no kontext module imports the node packages)")
            elif not within(module, TOOLS):
                if within(target, TOOLS):
                    bad.append(f"{module} -> {target} (the engine never imports a tool)")
                elif within(target, OPTIONAL) or within(target, COMFYUI):
                    bad.append(f"{module} -> {target} (the engine imports neither ComfyUI nor optional packages)")
    return bad


# ---------------------------------------------------------------------------------------------- the rules

@pytest.fixture(scope="module")
def imps() -> dict[str, set[str]]:
    return imports(sources())


def test_no_import_cycles(imps):
    assert cycles(kontext_graph(imps)) == []


def test_the_engine_imports_no_tool_comfyui_or_optional_package(imps):
    assert violations(imps) == []


def test_every_allowlisted_edge_still_exists(imps):
    """An allowlisted edge that is gone must leave the list, so that it cannot come back unnoticed."""
    assert [edge for edge in ALLOWED_EDGES if edge[1] not in imps.get(edge[0], ())] == []


def test_the_tools_are_packages_that_exist(imps):
    assert all(tool in imps for tool in TOOLS)


# ---------------------------------------------------------------------------------------------- the checker itself

def fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    root = tmp_path / "kontext"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return imports(sources(root))


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    imps = fake_package(tmp_path, {
        "__init__.py": "",
        "dit.py": "def f():\n    from .cli import main\n",
        "cli/__init__.py": "from ..dit import f\nfrom . import edit\n",
        "cli/edit.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..pipeline import P\n",
        "pipeline.py": "import onnx\n",
    })
    assert imps["kontext.dit"] == {"kontext.cli"}
    assert imps["kontext.cli"] == {"kontext.dit", "kontext.cli.edit"}
    assert imps["kontext.cli.edit"] == {"typing"}  # the TYPE_CHECKING import does not count
    assert cycles(kontext_graph(imps)) == [["kontext.cli", "kontext.dit"]]
    assert violations(imps) == ["kontext.dit -> kontext.cli (the engine never imports a tool)",
                                "kontext.pipeline -> onnx (the engine imports neither ComfyUI nor optional packages)"]
