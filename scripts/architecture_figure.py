"""Draw docs/architecture.png from the layer rules that tests/test_architecture.py enforces.

    python scripts/architecture_figure.py            # writes docs/architecture.png

One row per layer, bottom first as in the test's ``LAYERS``; a box per group with its modules.
A module imports its own group or the rows below it, never a row above nor a neighbour in its row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_architecture import LAYERS, _module_files, _place  # noqa: E402

ROW_NAMES = ["base", "losses", "metrics", "models", "data", "jobs", "Lightning entry", "workflows", "cli"]
COLOURS = ["#e8e8e8", "#dbe9f6", "#dbe9f6", "#fde2c8", "#d9f0d3", "#f6d5e5", "#e5dcf2", "#fff2b3", "#cfe8ef"]


def _members(row: int, group: str, modules: list[str]) -> list[str]:
    """The modules the test places in this group, named without ``kdlab.``; a package is written
    ``package/: its modules``."""
    packages: dict[str, set[str]] = {}
    for module in modules:
        if _place(module) != (row, group):
            continue
        short = "__init__" if module == "kdlab" else module.removeprefix("kdlab.")
        package, _, rest = short.partition(".")
        packages.setdefault(package, set())
        if rest and not rest.startswith("_"):  # private helpers are not part of the map
            packages[package].add(rest.split(".")[0])
    return [f"{name}/: {' '.join(sorted(inner))};" if inner else f"{name};" for name, inner in sorted(packages.items())]


def main() -> Path:
    modules = sorted(_module_files())
    fig, ax = plt.subplots(figsize=(13, 9.5))
    ax.set_xlim(0, 13.4)
    ax.set_ylim(-0.4, len(LAYERS) + 0.1)
    ax.axis("off")
    for row, groups in enumerate(LAYERS):
        y = row + 0.05
        ax.text(0.05, y + 0.42, ROW_NAMES[row], fontsize=10, fontweight="bold", va="center")
        width = 11.0 / len(groups)
        for column, group in enumerate(groups):
            x = 1.9 + column * width
            ax.add_patch(FancyBboxPatch((x, y), width - 0.15, 0.78, boxstyle="round,pad=0.02",
                                        facecolor=COLOURS[row], edgecolor="#555"))
            members = _members(row, group, modules)
            text = " ".join(members).rstrip(";")
            per_line = max(12, int(width * 12))
            lines, line = [], ""
            for word in text.split(" "):
                if len(line) + len(word) + 1 > per_line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            ax.text(x + 0.08, y + 0.62, group, fontsize=9, fontweight="bold", va="center")
            ax.text(x + 0.08, y + 0.28, "\n".join(lines[:5]), fontsize=6.5, va="center", family="monospace")
    ax.add_patch(FancyArrowPatch((13.25, len(LAYERS) - 0.2), (13.25, 0.3), arrowstyle="-|>", mutation_scale=18,
                                 color="#333"))
    ax.text(13.15, len(LAYERS) / 2, "imports point down", rotation=90, va="center", ha="right", fontsize=9)
    ax.text(0.05, -0.25, "A module imports its own group or the rows below; groups of one row never import "
            "each other. Checked by tests/test_architecture.py (lazy imports inside functions included).",
            fontsize=8.5)
    out = REPO / "docs" / "architecture.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
