"""Example-by-example comparison of the generation runs of one ablation (issue 32, items 1–2).

Reads what each RLDistillKStep run left in its directory — ``val_generations/step{N}.jsonl`` (one
line per held-out example, loader order) and the CSV log's ``grad_var/*`` rows — and writes, beside
the ablation's own report:

* ``PREFIX.md``: per variant the final ROUGE-L / length / teacher log-likelihood (mean ± std over
  seeds), its change against the reference run (the CE start), a paired test **across the held-out
  examples** (two-sided Wilcoxon signed-rank of per-example ROUGE-L, averaged over seeds) against the
  reference and against the first variant, and a paired t-test **across seeds** against the first
  variant; the mean gradient-variance ratio ``trace/|ḡ|²`` when measured; collapsed runs flagged
  (mean length below half the reference's, or teacher log-likelihood per token below it), not ranked.
* ``PREFIX.png``: ROUGE-L and generation length against the optimiser step (the reference at step
  0), and ``trace/|ḡ|²`` against the step where measured.

    python scripts/ketchup_paired.py --config experiments/real/ketchup_search_smollm2.yaml --root runs/real

Per-example ROUGE-L is torchmetrics' ``rouge_score`` of one pair, the same scorer ``val/rougeL`` averages,
so the mean of a step's examples equals the logged figure (checked; a mismatch stops the script).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdlab.ablations import load_ablation  # noqa: E402
from kdlab.runs import slug, write_text_atomic  # noqa: E402

MIN_LENGTH_RATIO = 0.5


def _rouge_l(prediction: str, target: str) -> float:
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score(prediction, target, rouge_keys="rougeL")["rougeL_fmeasure"])


def read_steps(run_dir: Path, split: str = "val") -> dict[int, list[dict]]:
    """``{step: rows}`` of a run's evaluations, each row with its per-example ``rougeL`` added."""
    if not (run_dir / "manifest.json").exists():
        raise SystemExit(f"{run_dir}: no such run (run the ablation first, with the same --root)")
    if not (run_dir / "metrics.json").exists():
        raise SystemExit(f"{run_dir}: the run has not finished (no metrics.json); rerun the ablation to complete it")
    out: dict[int, list[dict]] = {}
    for path in sorted((run_dir / f"{split}_generations").glob("step*.jsonl")):
        if ".rank" in path.name:
            raise SystemExit(f"{path}: per-rank files (a DDP evaluation) are not merged by this script")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            row["rougeL"] = _rouge_l(row["prediction"], row["target"])
        out[int(path.stem.removeprefix("step"))] = rows
    if not out:
        raise SystemExit(f"{run_dir}: no {split}_generations/step*.jsonl (a run from before they were written?)")
    return out


def check_against_log(run_dir: Path, steps: dict[int, list[dict]], split: str = "val") -> None:
    """The last step's mean per-example ROUGE-L must be the run's logged ``{split}/rougeL``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = metrics.get(f"{split}/rougeL")
    rows = steps[max(steps)]
    mean = statistics.fmean(r["rougeL"] for r in rows)
    if logged is not None and abs(mean - logged) > 1e-4:
        raise SystemExit(f"{run_dir}: mean per-example ROUGE-L {mean:.6f} != logged {split}/rougeL {logged:.6f}")


def grad_variance_trace(run_dir: Path) -> list[tuple[int, float]]:
    """``(logged step, trace/|ḡ|²)`` of each gradient-variance measurement in the run's CSV log.

    The CSV logger repeats a callback's last value at every logging step until the next measurement,
    so a value equal to the previous row's is the same measurement and is kept once (at the step it
    was first logged, up to ``log_every_n_steps`` after the step it was measured at).
    """
    points: list[tuple[int, float]] = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        previous = None
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                value = row.get("grad_var/ratio", "")
                if value in ("", None) or value == previous:
                    continue
                previous = value
                points.append((int(float(row.get("step") or 0)), float(value)))
    return points


def token_mean_loglik(rows: list[dict]) -> float:
    """The teacher's log-likelihood per generated token over all examples (= the logged
    ``val/teacher_logprob``, a token-weighted mean), NaN without a teacher."""
    scored = [(r["teacher_logprob"], r["gen_length"]) for r in rows if r["teacher_logprob"] is not None]
    tokens = sum(n for _, n in scored)
    return sum(ll * n for ll, n in scored) / tokens if tokens else math.nan


def wilcoxon_p(a: list[float], b: list[float]) -> float:
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2 or all(abs(d) < 1e-12 for d in diffs):
        return math.nan
    return float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue)


def ttest_p(a: list[float], b: list[float]) -> float:
    from scipy import stats

    if len(a) < 2 or len(a) != len(b) or len({x - y for x, y in zip(a, b)}) < 2:
        return math.nan
    return float(stats.ttest_rel(a, b).pvalue)


def _fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(config: str, root: str, reference: str, split: str) -> tuple[str, dict]:
    spec = load_ablation(config)
    out_dir = Path(root) / spec.name
    ref_dir = out_dir / f"setup-{reference}"
    ref_steps = read_steps(ref_dir, split)
    check_against_log(ref_dir, ref_steps, split)
    ref_rows = ref_steps[max(ref_steps)]
    n = len(ref_rows)
    ref_score = [r["rougeL"] for r in ref_rows]
    ref_len = statistics.fmean(r["gen_length"] for r in ref_rows)
    ref_loglik = token_mean_loglik(ref_rows)

    data: dict[str, dict] = {}
    for variant in spec.variants:
        runs = []
        for seed in spec.seeds:
            run_dir = out_dir / slug(variant) / f"seed{seed}"
            steps = read_steps(run_dir, split)
            check_against_log(run_dir, steps, split)
            if len(steps[max(steps)]) != n:
                raise SystemExit(f"{run_dir}: {len(steps[max(steps)])} examples, reference has {n}")
            runs.append({"steps": steps, "grad_var": grad_variance_trace(run_dir)})
        data[variant] = {"runs": runs}

    first = next(iter(spec.variants))
    lines = [
        f"# {spec.name}: example-by-example ({split} split, {n} examples, seeds {spec.seeds})",
        "",
        f"Reference: `setup-{reference}` (ROUGE-L {statistics.fmean(ref_score):.4f}, length {ref_len:.1f}, "
        f"teacher log-lik/token {_fmt(ref_loglik)}). p(examples) = two-sided Wilcoxon signed-rank over the "
        f"{n} examples of per-example ROUGE-L (mean over seeds); p(seeds) = paired t-test over seeds against "
        f"`{first}`. Collapsed (length < {MIN_LENGTH_RATIO} × the reference's, or teacher log-lik below "
        "it): flagged, not ranked. Written by `scripts/ketchup_paired.py`.",
        "",
        "| variant | ROUGE-L | Δ vs start | p(examples) vs start | p(examples) vs first | p(seeds) vs first "
        "| length | teacher log-lik | trace/‖ḡ‖² (mean) | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_example_mean: dict[str, list[float]] = {}
    summary: dict[str, dict] = {}
    for variant, entry in data.items():
        finals = [run["steps"][max(run["steps"])] for run in entry["runs"]]
        per_seed = [statistics.fmean(r["rougeL"] for r in rows) for rows in finals]
        per_example = [statistics.fmean(rows[i]["rougeL"] for rows in finals) for i in range(n)]
        per_example_mean[variant] = per_example
        lengths = [statistics.fmean(r["gen_length"] for r in rows) for rows in finals]
        logliks = [token_mean_loglik(rows) for rows in finals]
        # per run: the mean of its measurements (the callback's grad_var/ratio_mean); then over seeds
        ratios = [statistics.fmean(values) for run in entry["runs"]
                  if (values := [v for _, v in run["grad_var"] if math.isfinite(v)])]
        collapsed = [length < MIN_LENGTH_RATIO * ref_len or (math.isfinite(ref_loglik) and ll < ref_loglik)
                     for length, ll in zip(lengths, logliks)]
        summary[variant] = {"rougeL": per_seed, "gen_length": lengths, "teacher_logprob": logliks,
                            "grad_var_ratio_mean": statistics.fmean(ratios) if ratios else None,
                            "collapsed": collapsed}
        first_seeds = summary[first]["rougeL"]
        lines.append(
            f"| {variant} | {_mean_std(per_seed)} | {statistics.fmean(per_seed) - statistics.fmean(ref_score):+.4f} "
            f"| {_fmt(wilcoxon_p(per_example, ref_score))} "
            f"| {'–' if variant == first else _fmt(wilcoxon_p(per_example, per_example_mean[first]))} "
            f"| {'–' if variant == first else _fmt(ttest_p(per_seed, first_seeds))} "
            f"| {_mean_std(lengths)} | {_mean_std(logliks)} "
            f"| {'–' if not ratios else _mean_std(ratios)} "
            f"| {'**yes** (' + str(sum(collapsed)) + '/' + str(len(collapsed)) + ')' if any(collapsed) else 'no'} |"
        )
    return "\n".join(lines) + "\n", {"reference": {"rougeL": statistics.fmean(ref_score), "gen_length": ref_len,
                                                   "teacher_logprob": ref_loglik},
                                     "variants": summary, "data": data, "ref_len": ref_len,
                                     "ref_score": statistics.fmean(ref_score)}


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_var = any(run["grad_var"] for entry in result["data"].values() for run in entry["runs"])
    fig, axes = plt.subplots(1, 3 if has_var else 2, figsize=(17 if has_var else 12, 5))
    colours = plt.get_cmap("tab20").colors
    for index, (variant, entry) in enumerate(result["data"].items()):
        style = {"color": colours[index % len(colours)], "ls": "-" if index < len(colours) else "--"}
        steps = sorted(set.intersection(*[set(run["steps"]) for run in entry["runs"]]))
        xs = [0, *steps]
        rouge = [result["ref_score"]] + [statistics.fmean(statistics.fmean(r["rougeL"] for r in run["steps"][s])
                                                          for run in entry["runs"]) for s in steps]
        length = [result["ref_len"]] + [statistics.fmean(statistics.fmean(r["gen_length"] for r in run["steps"][s])
                                                         for run in entry["runs"]) for s in steps]
        axes[0].plot(xs, rouge, marker="o", label=variant, **style)
        axes[1].plot(xs, length, marker="o", **style)
        if has_var:
            by_step: dict[int, list[float]] = {}
            for run in entry["runs"]:
                for step, value in run["grad_var"]:
                    by_step.setdefault(step, []).append(value)
            if by_step:
                axes[2].plot(sorted(by_step), [statistics.fmean(by_step[s]) for s in sorted(by_step)], marker="o",
                             **style)
    axes[0].axhline(result["ref_score"], color="grey", ls="--", lw=1, label="CE start")
    axes[1].axhline(result["ref_len"], color="grey", ls="--", lw=1)
    axes[1].axhline(MIN_LENGTH_RATIO * result["ref_len"], color="red", ls=":", lw=1, label="collapse line")
    axes[0].set(xlabel="optimiser step", ylabel="held-out ROUGE-L (mean over seeds)")
    axes[1].set(xlabel="optimiser step", ylabel="mean generated tokens")
    axes[1].legend(fontsize=7)
    if has_var:
        axes[2].set(xlabel="optimiser step (as logged)", ylabel="trace(Σ̂) / ‖ḡ‖² (mean over seeds)", yscale="log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the ablation YAML the runs came from")
    parser.add_argument("--root", default="runs/ablations", help="the --root the ablation ran with")
    parser.add_argument("--reference", default="student", help="the setup run every variant is compared with")
    parser.add_argument("--split", default="val", help="the evaluation files to read ({split}_generations)")
    parser.add_argument("--out", default=None, help="output prefix (default: ROOT/NAME/<config stem>_paired)")
    args = parser.parse_args(argv)
    text, result = summarise(args.config, args.root, args.reference, args.split)
    spec = load_ablation(args.config)
    prefix = Path(args.out) if args.out else Path(args.root) / spec.name / f"{Path(args.config).stem}_paired"
    write_text_atomic(prefix.with_suffix(".md"), text)
    plot(result, prefix.with_suffix(".png"), f"{Path(args.config).stem}: ROUGE-L, length and gradient variance by step")
    serialisable = {k: v for k, v in result.items() if k != "data"}
    write_text_atomic(prefix.with_suffix(".json"), json.dumps(serialisable, indent=1))
    print(text)
    print(f"wrote {prefix.with_suffix('.md')}, .png, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
