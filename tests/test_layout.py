"""The package's shape: stages in folders, no import cycles, functions that fit on a screen.

The rules are checked from the source with ``ast`` (imports inside functions count), so a change
that brings a cycle back or grows a function past the limit fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fitonnx"
MAX_TOP_LEVEL = 12
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8
# Lower stages may not import higher ones: each stage may import only the stages listed before it.
STAGES = (
    "errors",
    "values",
    "files",
    "model",
    "scale",
    "formats",
    "prepare",
    "fisher",
    "score",
    "allocate",
    "export",
    "analysis",
    "render",
    "api",
    "cli",
)
# Optional heavy dependencies that may be imported inside a function, with a comment saying so.
DEFERRED_OK = ("matplotlib", "onnxruntime.quantization", "onnxruntime.capi", "ray", "PIL")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported fitonnx module, inside a function, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool, int]] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child, is_package)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, in_function, child.lineno))
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue
            visit(child, nested)

    visit(tree, False)
    return [(m, f, line) for m, f, line in found if m == "fitonnx" or m.startswith("fitonnx.") or not f]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _graph() -> nx.DiGraph:
    modules = _modules()
    known = set(modules)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for module, path in modules.items():
        for target, _, _ in _imports(module, path, known):
            if target in known and target != module:
                g.add_edge(module, target)
    return g


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fitonnx"


def test_no_import_cycles() -> None:
    g = _graph()
    # A package's __init__ re-exporting its own modules is not a cycle of stages; drop those edges.
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(g))
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_lower_stages_never_import_higher_ones() -> None:
    order = {s: i for i, s in enumerate(STAGES)}
    bad = []
    for a, b in _graph().edges:
        sa, sb = _stage(a), _stage(b)
        if sa in order and sb in order and order[sb] > order[sa]:
            bad.append(f"{a} -> {b}")
    assert bad == []


def test_no_function_level_imports_of_fitonnx() -> None:
    modules = _modules()
    known = set(modules)
    bad = []
    for module, path in modules.items():
        for target, inside, line in _imports(module, path, known):
            if inside and target.startswith("fitonnx"):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert bad == []


def test_deferred_imports_are_optional_heavy_dependencies_with_a_comment() -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                ok = all(n.startswith(DEFERRED_OK) for n in names)
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                if not ok or "#" not in above + lines[node.lineno - 1]:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {names}")
    assert bad == []


def test_top_level_is_small() -> None:
    top = [p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())]
    modules = [n for n in top if n.endswith(".py")]
    assert len(modules) <= MAX_TOP_LEVEL, sorted(modules)


def test_module_sizes() -> None:
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}


def _is_click_command(fn: ast.FunctionDef) -> bool:
    return any("command" in ast.unparse(d) or "option" in ast.unparse(d) for d in fn.decorator_list)


@pytest.mark.parametrize("limit", ["lines", "parameters"])
def test_functions_fit_on_a_screen(limit: str) -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or _is_click_command(fn):
                continue
            a = fn.args
            params = [p for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
            lines = fn.end_lineno - fn.lineno + 1
            where = f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name}"
            if limit == "lines" and lines > MAX_FUNCTION_LINES:
                bad.append(f"{where} ({lines} lines)")
            if limit == "parameters" and len(params) > MAX_PARAMETERS:
                bad.append(f"{where} ({len(params)} parameters)")
    assert bad == []
