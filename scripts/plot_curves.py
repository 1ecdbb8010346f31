"""Learning curves of an ablation's runs: a validation metric against optimiser steps and against
the seconds spent training (``time/train_s``, logged by the ranking stages beside each validation).

    python scripts/plot_curves.py runs/real/rank-sft-cpu --metric val/ndcg@10 --out docs/rank_sft_cpu.png

Reads every ``<variant>/seed<k>/logs/metrics.csv`` under the ablation directory, prints a Markdown
table (per run: each validation's step, seconds and value; the best value; seconds per step) and
writes a two-panel PNG. Runs without a CSV log are skipped with a note.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_curve(csv_path: Path, metric: str) -> list[tuple[int, float, float]]:
    """``(step, train_seconds, value)`` for each validation row of a Lightning CSV log."""
    points = []
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            value, seconds = row.get(metric, ""), row.get("time/train_s", "")
            if value not in ("", None) and seconds not in ("", None):
                points.append((int(float(row["step"])), float(seconds), float(value)))
    return points


def variant_label(run_dir: Path, root: Path) -> str:
    """The variant's name as the ablation wrote it (its manifest's label, else the directory path)."""
    return str(run_dir.relative_to(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="an ablation directory (runs/<root>/<name>)")
    parser.add_argument("--metric", default="val/ndcg@10")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: ROOT/curves.png)")
    args = parser.parse_args()
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for csv_path in sorted(args.root.glob("*/seed*/logs/metrics.csv")):
        run_dir = csv_path.parent.parent
        points = read_curve(csv_path, args.metric)
        if points:
            curves[variant_label(run_dir, args.root)] = points
    if not curves:
        raise SystemExit(f"no run under {args.root} logged {args.metric} with time/train_s")
    names = {}
    spec = args.root / "ablation.json"
    if spec.exists():  # map slugged directory names back to the variants' names when recorded
        names = json.loads(spec.read_text()).get("dirs", {})
    print(f"| run | {args.metric} at each validation (step: value @ training seconds) | best | s / step |")
    print("|---|---|---|---|")
    for name, points in curves.items():
        cells = ", ".join(f"{s}: {v:.4f} @ {t:.0f} s" for s, t, v in points)
        per_step = points[-1][1] / max(points[-1][0], 1)
        print(f"| {names.get(name, name)} | {cells} | {max(v for _, _, v in points):.4f} | {per_step:.2f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, points in curves.items():
        steps, seconds, values = zip(*points)
        by_step.plot(steps, values, marker="o", label=names.get(name, name))
        by_time.plot(seconds, values, marker="o", label=names.get(name, name))
    by_step.set_xlabel("optimiser steps")
    by_time.set_xlabel("seconds spent training (validation excluded)")
    by_step.set_ylabel(args.metric)
    by_time.legend(fontsize=8, loc="lower right")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.root.name}: {args.metric}")
    fig.tight_layout()
    out = args.out or args.root / "curves.png"
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
