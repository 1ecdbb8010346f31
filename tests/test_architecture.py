"""The import graph keeps to docs/architecture.md: every import points down the layers, no import
circle, no file over 600 lines (cli.py ≤ 300), no run-time patching of other packages; stages never
reach labeling or callbacks; callbacks reach stages only through protocols."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE_DIRS = {"kdlab": REPO / "kdlab", "kdlab.callbacks": REPO / "callbacks"}


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, root in PACKAGE_DIRS.items():
        for path in root.rglob("*.py"):
            if package == "kdlab" and path.is_relative_to(REPO / "kdlab" / "data" / "sample"):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every kdlab module a file imports, at module level or inside functions (lazy imports count).
    ``from kdlab.data import readers`` imports the module ``kdlab.data.readers``;
    ``from kdlab.data import sample_path`` imports the package ``kdlab.data``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name.startswith("kdlab")}


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {module: {name for name in _imports(path, set(files)) if name in files} - {module}
            for module, path in files.items()}


#: The layers, bottom first (docs/architecture.md draws them). A module imports its own layer or
#: lower ones; inside a layer, only its own group (the groups of one layer do not know each other).
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("kdlab", "kdlab.errors", "kdlab.defaults", "kdlab.runs", "kdlab.protocols", "kdlab.machine")},
    {"losses": ("kdlab.losses",)},
    {"metrics": ("kdlab.metrics",)},
    {"models": ("kdlab.models",)},
    {"data": ("kdlab.data",)},
    {"stages": ("kdlab.stages",), "callbacks": ("kdlab.callbacks",), "labeling": ("kdlab.labeling", "kdlab.listwise"),
     "evaluation": ("kdlab.evaluation",), "export": ("kdlab.export",)},
    {"lightning_cli": ("kdlab.lightning_cli",)},
    {"pipeline": ("kdlab.pipeline",), "sweeps": ("kdlab.sweeps",), "ablations": ("kdlab.ablations",)},
    {"cli": ("kdlab.cli", "kdlab.__main__")},
]


def _place(module: str) -> tuple[int, str]:
    """(layer index, group) of a module: the group whose longest prefix matches."""
    best: tuple[int, int, str] | None = None
    for index, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), index, group)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return best[1], best[2]


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer, group = _place(module)
        for target in targets:
            target_layer, target_group = _place(target)
            if target_layer > layer or (target_layer == layer and target_group != group):
                wrong.append(f"{module} ({group}) imports {target} ({target_group})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    """No set of modules imports each other round (a package importing its own submodule counts)."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_layer_rules_catch_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a made-up graph with both mistakes is caught by the same code."""
    files = {"kdlab.models.x": tmp_path / "x.py", "kdlab.data.y": tmp_path / "y.py"}
    files["kdlab.models.x"].write_text("def f():\n    from kdlab.data.y import g\n")
    files["kdlab.data.y"].write_text("from kdlab.models import x\n")
    graph = {module: _imports(path, set(files)) for module, path in files.items()}
    assert graph == {"kdlab.models.x": {"kdlab.data.y"}, "kdlab.data.y": {"kdlab.models.x"}}
    assert _place("kdlab.models.x")[0] < _place("kdlab.data.y")[0]  # models → data points up


MAX_LINES = 600


def test_no_source_file_is_over_600_lines() -> None:
    long = {str(path.relative_to(REPO)): n for path in _module_files().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split along a seam a reader expects: {long}"
    assert len((REPO / "kdlab" / "cli.py").read_text().splitlines()) <= 300, "cli.py is argument plumbing only"


def test_library_code_never_patches_another_package() -> None:
    """No assignment to an attribute of an imported third-party module (``gguf.GGUFReader = ...``)."""
    patched = []
    for module, path in _module_files().items():
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names if not alias.name.startswith("kdlab")}
        imported |= {alias.asname or alias.name for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("kdlab")
                     and node.level == 0 for alias in node.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in (t for tgt in targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])):
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id in imported and target.value.id not in ("os", "sys"):
                    patched.append(f"{module}:{node.lineno} {target.value.id}.{target.attr}")
    assert not patched, f"third-party modules patched at run time: {patched}"


def test_library_code_names_no_test_runner() -> None:
    for module, path in _module_files().items():
        text = path.read_text()
        assert "PYTEST_CURRENT_TEST" not in text and "import pytest" not in text, module


def test_stages_reach_neither_labeling_nor_callbacks() -> None:
    graph = _graph()
    for module in (m for m in graph if m.startswith("kdlab.stages")):
        reached = _reachable(module, graph)
        bad = sorted(m for m in reached if m in ("kdlab.labeling", "kdlab.listwise") or m.startswith((
            "kdlab.callbacks", "kdlab.cli", "kdlab.lightning_cli", "kdlab.pipeline")))
        assert not bad, f"{module} reaches {bad}"


def test_callbacks_reach_stages_only_through_protocols() -> None:
    graph = _graph()
    for module in (m for m in graph if m.startswith("kdlab.callbacks")):
        reached = _reachable(module, graph)
        assert not any(m.startswith("kdlab.stages") for m in reached), f"{module} reaches a stage module"


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        for target in graph.get(module, set()):
            if target in graph and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_top_level_callbacks_module_is_installed() -> None:
    import importlib.util
    import subprocess
    import sys

    # Outside the repository (the working directory would shadow site-packages), `callbacks` must
    # not be found while `kdlab.callbacks` resolves to the callbacks/ folder (found, not imported:
    # finding a submodule would import the package, and with it Lightning, for nothing).
    code = ("import importlib.util; print(importlib.util.find_spec('callbacks') is None, "
            "*importlib.util.find_spec('kdlab.callbacks').submodule_search_locations)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    missing, location = out.stdout.split()
    assert missing == "True" and location == str(REPO / "callbacks")
    assert (Path(location) / "teacher.py").is_file()
    assert importlib.util.find_spec("kdlab.callbacks") is not None
