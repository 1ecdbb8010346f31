"""The import graph keeps to DESIGN.md's map: data flows cli → stages → (losses, models, data,
metrics); stages never reach labeling or callbacks; callbacks reach stages only through protocols."""

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


def _imports(path: Path) -> set[str]:
    """Every kdlab module a file imports, at module level or inside functions (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("kdlab")}


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        for target in graph.get(module, set()):
            if target in graph and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {module: {name for name in _imports(path) if name in files} for module, path in files.items()}


def test_stages_reach_neither_labeling_nor_callbacks() -> None:
    graph = _graph()
    for module in (m for m in graph if m.startswith("kdlab.stages")):
        reached = _reachable(module, graph)
        bad = sorted(m for m in reached if m == "kdlab.labeling" or m.startswith(("kdlab.callbacks", "kdlab.cli",
                                                                                  "kdlab.pipeline")))
        assert not bad, f"{module} reaches {bad}"


def test_callbacks_reach_stages_only_through_protocols() -> None:
    graph = _graph()
    for module in (m for m in graph if m.startswith("kdlab.callbacks")):
        reached = _reachable(module, graph)
        assert not any(m.startswith("kdlab.stages") for m in reached), f"{module} reaches a stage module"


def test_losses_metrics_and_data_never_reach_lightning_modules_or_stages() -> None:
    graph = _graph()
    for module in (m for m in graph if m.startswith(("kdlab.losses", "kdlab.metrics", "kdlab.data"))):
        reached = _reachable(module, graph)
        bad = sorted(m for m in reached if m.startswith(("kdlab.stages", "kdlab.callbacks", "kdlab.cli")))
        assert not bad, f"{module} reaches {bad}"


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
