"""Helpers shared by the ranking benchmarks (student training, labeling throughput).

* :func:`machine` — a one-line description of the CPU this ran on (model, cores, load average).
* :func:`synthetic_teacher_file` — a copy of a ranking JSONL file with a deterministic synthetic
  ``teacher_score`` on every document (``label + 0.5 · N(0, 1)``, seeded), keeping only groups that
  can give ``1 positive + n negatives`` (so both trainers see exactly the same groups).
* :func:`export_student_init` — the student's initial weights (a one-label ``*ForSequenceClassification``
  + tokenizer) saved to a directory, so two trainers start from the *same* weights.
* :func:`run_child` — run this script again in a subprocess and read its JSON result (last stdout line).
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "BENCH_RESULT "


def machine() -> str:
    """``CPU model, N logical cores, load average a/b/c`` (Linux; falls back to platform info)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return f"{model}, {os.cpu_count()} logical cores, load average {load} (1/5/15 min)"


def set_threads(threads: int) -> None:
    """Same intra-op threads everywhere (the children set it before any work)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def synthetic_teacher_file(src: str | Path, dst: str | Path, num_negatives: int, seed: int = 0) -> dict[str, int]:
    """Write ``src``'s groups to ``dst`` with ``teacher_score = label + 0.5 · N(0, 1)`` where a
    document has no ``teacher_score`` yet (existing scores are kept), dropping groups that do not
    have ``num_negatives`` documents with a label strictly below the group's best label.

    Returns ``{"groups_in", "groups_kept"}``.
    """
    rng = random.Random(f"synthetic-teacher:{seed}")
    kept = 0
    rows_in = [json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(dst, "w", encoding="utf-8") as f:
        for row in rows_in:
            labels = [float(d.get("label") or 0.0) for d in row["docs"]]
            top = max(labels)
            if sum(1 for y in labels if y < top) < num_negatives:
                continue
            for d, y in zip(row["docs"], labels):
                if d.get("teacher_score") is None:
                    d["teacher_score"] = round(y + 0.5 * rng.gauss(0.0, 1.0), 6)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
    return {"groups_in": len(rows_in), "groups_kept": kept}


def export_student_init(model: str, directory: str | Path, seed: int = 0, no_dropout: bool = False) -> str:
    """Save ``model``'s seq-cls initial weights (score head seeded) and tokenizer to ``directory``
    (``no_dropout``: with hidden and attention dropout set to 0 in the saved config)."""
    import lightning as L

    from kdlab.models.backbones import load_backbone
    from kdlab.models.export import save_served_model

    L.seed_everything(seed, verbose=False)
    net = load_backbone(model, task="seq-cls", num_labels=1)
    if no_dropout:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(net.config, key):
                setattr(net.config, key, 0.0)
    save_served_model(net, model, directory, stage="bench")
    return str(directory)


def run_child(script: str | Path, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script *args`` and return the JSON after the last ``BENCH_RESULT`` line."""
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-4000:] + "\n")
    raise SystemExit(f"child {args[:2]} failed (rc={proc.returncode})")


def emit(result: dict[str, Any]) -> None:
    """Print a child's result for :func:`run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
