"""scripts/ketchup_paired.py: example-by-example comparison of generation runs, on hand-built run dirs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ketchup_paired", REPO / "scripts" / "ketchup_paired.py")
assert _spec is not None and _spec.loader is not None
paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired)

TARGETS = [f"returns the {w} of the list" for w in ("sum", "mean", "max", "min", "length", "first")]


def _run(run_dir: Path, steps: dict[int, list[str]], lengths: list[int], ll: float, ratio: float | None = None) -> None:
    for step, preds in steps.items():
        rows = [{"prediction": p, "target": t, "gen_length": n, "teacher_logprob": ll}
                for p, t, n in zip(preds, TARGETS, lengths)]
        (run_dir / "val_generations").mkdir(parents=True, exist_ok=True)
        (run_dir / "val_generations" / f"step{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = steps[max(steps)]
    score = sum(paired._rouge_l(p, t) for p, t in zip(last, TARGETS)) / len(TARGETS)
    (run_dir / "metrics.json").write_text(json.dumps({"val/rougeL": score}))
    (run_dir / "manifest.json").write_text(json.dumps({"status": "finished"}))
    if ratio is not None:
        (run_dir / "logs").mkdir(exist_ok=True)
        (run_dir / "logs" / "metrics.csv").write_text(f"step,grad_var/ratio,train/loss\n0,{ratio},\n5,,1.0\n9,{ratio},\n10,{ratio / 2},\n")


def test_paired_report_tests_over_examples_and_flags_collapse(tmp_path: Path) -> None:
    config = tmp_path / "abl.yaml"
    config.write_text("name: demo\nbase: [--x]\nvariants:\n  good: []\n  short: []\nseeds: [0]\n"
                      "setup:\n  student: [--y]\nmetrics: [val/rougeL]\n")
    out = tmp_path / "root" / "demo"
    start = ["returns the sum", "the mean", "returns max", "min of it", "length", "first"]
    _run(out / "setup-student", {150: start}, [4] * 6, -2.0)
    _run(out / "good" / "seed0", {10: start, 20: TARGETS}, [5] * 6, -1.5, ratio=8.0)
    _run(out / "short" / "seed0", {20: ["the"] * 6}, [1] * 6, -1.0)
    text, result = paired.summarise(str(config), str(tmp_path / "root"), "student", "val")
    good, short = result["variants"]["good"], result["variants"]["short"]
    assert good["rougeL"] == [pytest.approx(1.0)] and good["collapsed"] == [False]
    assert short["collapsed"] == [True]  # length 1 < half of 4, though its log-lik is higher
    assert good["grad_var_ratio_mean"] == pytest.approx(6.0)  # (8 + 4) / 2: empty cells and the logger's repeat skipped
    start_scores = [paired._rouge_l(p, t) for p, t in zip(start, TARGETS)]
    expected_p = stats.wilcoxon([1.0] * 6, start_scores).pvalue
    row = next(line for line in text.splitlines() if line.startswith("| good "))
    assert f"{expected_p:.4f}" in row and "| no |" in row
    assert "**yes** (1/1)" in next(line for line in text.splitlines() if line.startswith("| short "))
    paired.plot(result, tmp_path / "p.png", "demo")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_logged_figure_that_disagrees_with_the_examples_stops_the_script(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run(run_dir, {5: TARGETS}, [3] * 6, -1.0)
    (run_dir / "metrics.json").write_text(json.dumps({"val/rougeL": 0.5}))
    with pytest.raises(SystemExit, match="!= logged val/rougeL"):
        paired.check_against_log(run_dir, paired.read_steps(run_dir))
    assert math.isnan(paired.wilcoxon_p([1.0, 2.0], [1.0, 2.0]))


def test_a_missing_or_unfinished_run_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such run"):
        paired.read_steps(tmp_path / "absent")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="has not finished"):
        paired.read_steps(tmp_path / "half")
