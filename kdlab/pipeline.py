"""``python -m kdlab pipeline``: the DisRanker recipe end to end, with an honest report.

Steps (each a ``python -m kdlab fit`` subprocess with its own run directory inside the pipeline
directory, so every step leaves the same record as a hand-run one and DDP launchers re-run the
right command):

1. ``rank_sft_no_cpt``  rank fine-tuning of the teacher backbone as it is (the "without CPT" row);
2. ``cpt``              continued pre-training on click logs (query → clicked title + summary);
3. ``rank_sft_cpt``     rank fine-tuning starting from the CPT export;
4. ``labels/``          the CPT teacher scores the train/val candidates once (``kdlab label``; the
                        test split is scored by evaluation, never by labels the students could read);
5. ``student_<variant>`` distillation runs (hybrid, point-only, margin-only, TCL, ...);
6. evaluation of every model on the held-out test split in this process (same machine, same
   batching), written to ``report.md``, ``report.json`` and ``report.png``.

A step whose run directory already holds ``metrics.json`` (and its exported model) is skipped,
so ``--pipeline_dir`` of an interrupted pipeline resumes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdlab.defaults import LABEL_BATCH_SIZE, PAIR_MAX_LENGTH
from kdlab.runs import atomic_path, launch_run, new_run_dir, slug, write_json_atomic, write_text_atomic

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "hybrid": [],
    "point-only": ["--model.init_args.beta=0"],
    "margin-only": ["--model.init_args.alpha=0"],
    "hybrid+TCL": ["--model.init_args.use_tcl=true"],
}


@dataclass
class PipelineConfig:
    """Everything ``kdlab pipeline`` needs; each ``*_config`` is a LightningCLI YAML for one step.

    Args:
        name: pipeline name; its directory is ``root/name/<time>-<id>`` unless ``pipeline_dir``.
        root: where pipeline directories go.
        pipeline_dir: an existing pipeline directory to resume (finished steps are skipped).
        cpt_config: YAML for TeacherCPT on click logs.
        rank_sft_config: YAML for TeacherRankSFT (its ``backbone`` is the teacher without CPT).
        distill_config: YAML for RankDistillStudent (its data paths are replaced by the labels).
        step_args: extra CLI arguments per step: keys ``cpt``, ``rank_sft``, ``distill`` (after the
            step's own config: they win), ``all`` (before every step's config, e.g. a shared base
            YAML: the step's config wins over it) and ``all_after`` (after everything: wins).
        variants: student variant name → extra CLI arguments for the distill step.
        train_path / val_path / test_path: ranking groups JSONL (None: the embedded sample).
        max_train_queries / max_eval_queries: use only the first N queries of the training /
            validation and test files (the subsets are written into the pipeline directory and
            their sizes printed in the report) — to fit a large teacher into a time budget.
        test_query_offset: skip this many queries of the test file before taking
            ``max_eval_queries`` (e.g. a fresh held-out slice for a confirmation run after an
            earlier run's test queries were looked at).
        label_batch_size / label_max_length: teacher scoring.
        eval_max_length: tokens per (query, doc) when evaluating.
        min_student_ratio: the report checks student NDCG@10 ≥ this × teacher NDCG@10.
        run_no_cpt_baseline: also train the teacher without CPT (the report's first row).
    """

    name: str = "disranker"
    root: str = "runs/pipelines"
    pipeline_dir: str | None = None
    cpt_config: str = "experiments/quickstart/disranker/cpt.yaml"
    rank_sft_config: str = "experiments/quickstart/disranker/rank_sft.yaml"
    distill_config: str = "experiments/quickstart/disranker/distill.yaml"
    step_args: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_VARIANTS.items()})
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    max_train_queries: int | None = None
    max_eval_queries: int | None = None
    test_query_offset: int = 0
    label_batch_size: int = LABEL_BATCH_SIZE
    label_max_length: int = PAIR_MAX_LENGTH
    eval_max_length: int = PAIR_MAX_LENGTH
    min_student_ratio: float = 0.9
    run_no_cpt_baseline: bool = True


@dataclass
class StepResult:
    name: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float


def _sample_or(path: str | None, name: str) -> str:
    if path:
        return path
    from kdlab.data import sample_path

    return str(sample_path(name))


def run_step(name: str, pipeline_dir: Path, args: Sequence[str]) -> StepResult:
    """Run one ``fit`` step in a subprocess (or reuse its finished record) and time it."""
    metrics = launch_run([*args, f"--run.name={name}"], pipeline_dir / name, label=f"pipeline step {name}")
    return StepResult(name, pipeline_dir / name, metrics, _recorded_seconds(pipeline_dir / name))


def _recorded_seconds(run_dir: Path) -> float:
    """The step's own wall time from its manifest (also right for a step reused on resume)."""
    import datetime as dt

    manifest = json.loads((run_dir / "manifest.json").read_text())
    start, end = (dt.datetime.fromisoformat(manifest[k]) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def _split_files(config: PipelineConfig, pipeline_dir: Path) -> dict[str, str]:
    """The ranking files of each split, cut to ``max_*_queries`` (written once, atomically)."""
    from kdlab.data.readers import iter_lines

    out = {}
    for split, path in (("train", config.train_path), ("val", config.val_path), ("test", config.test_path)):
        source = _sample_or(path, f"ranking_{split}.jsonl")
        limit = config.max_train_queries if split == "train" else config.max_eval_queries
        offset = config.test_query_offset if split == "test" else 0
        if limit is None and offset == 0:
            out[split] = source
            continue
        subset = pipeline_dir / "data" / f"ranking_{split}.jsonl"
        if not subset.exists():
            lines = [text for _, text in iter_lines(source)][offset:None if limit is None else offset + limit]
            if not lines:
                raise ValueError(f"{source}: no queries left after test_query_offset={offset}")
            write_text_atomic(subset, "".join(line + "\n" for line in lines))
        out[split] = str(subset)
    return out


def label_split(teacher_dir: Path, source: str, output: Path, config: PipelineConfig) -> Path:
    """Teacher scores for one split, written once and reused (resumable, atomic)."""
    from kdlab.labeling import score_file

    if output.exists():
        return output
    score_file(str(teacher_dir), source, str(output), batch_size=config.label_batch_size,
               max_length=config.label_max_length, resume=True)
    return output


def run_pipeline(config: PipelineConfig) -> Path:
    """Run every step and write the report; returns the path of ``report.md``."""
    pipeline_dir = Path(config.pipeline_dir) if config.pipeline_dir else new_run_dir(config.root, config.name)
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(pipeline_dir / "pipeline.json", asdict(config))
    common = list(config.step_args.get("all", []))
    last = list(config.step_args.get("all_after", []))
    splits = _split_files(config, pipeline_dir)
    data_args = [f"--data.init_args.{split}_path={path}" for split, path in splits.items()]
    started = time.perf_counter()
    steps: dict[str, StepResult] = {}

    sft_args = [*common, "--config", config.rank_sft_config, *data_args, *config.step_args.get("rank_sft", []), *last]
    if config.run_no_cpt_baseline:
        steps["rank_sft_no_cpt"] = run_step("rank_sft_no_cpt", pipeline_dir, sft_args)
    steps["cpt"] = run_step("cpt", pipeline_dir, [*common, "--config", config.cpt_config,
                                                  *config.step_args.get("cpt", []), *last])
    cpt_model = pipeline_dir / "cpt" / "model"
    steps["rank_sft_cpt"] = run_step("rank_sft_cpt", pipeline_dir,
                                     [*sft_args, f"--model.init_args.backbone={cpt_model}"])
    teacher_dir = pipeline_dir / "rank_sft_cpt" / "model"

    labels_dir = pipeline_dir / "labels"
    labels = {split: label_split(teacher_dir, splits[split], labels_dir / f"{split}.jsonl", config)
              for split in ("train", "val")}
    label_args = [f"--data.init_args.{split}_path={path}" for split, path in {**splits, **labels}.items()]
    for variant, extra in config.variants.items():
        step = f"student_{slug(variant)}"
        steps[step] = run_step(step, pipeline_dir, [*common, "--config", config.distill_config, *label_args,
                                                    *config.step_args.get("distill", []), *extra, *last])

    from kdlab.evaluation import evaluate_models

    models: dict[str, Path | str] = {"random ordering (mean of 20)": "random", "lexical pre-ranker (BM25)": "bm25"}
    if config.run_no_cpt_baseline:
        models["teacher, no CPT"] = pipeline_dir / "rank_sft_no_cpt" / "model"
    models["teacher, CPT"] = teacher_dir
    for variant in config.variants:
        models[f"student, {variant}"] = pipeline_dir / f"student_{slug(variant)}" / "model"
    rows = evaluate_models(models, splits["test"], max_length=config.eval_max_length)
    total = time.perf_counter() - started
    return write_report(pipeline_dir, config, rows, steps, total, data_sizes(splits))


def data_sizes(splits: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(queries, documents) of each split's ranking file."""
    from kdlab.data.readers import read_ranking_jsonl

    sizes = {}
    for split, path in splits.items():
        groups = read_ranking_jsonl(path)
        sizes[split] = (len(groups), sum(len(g.docs) for g in groups))
    return sizes


def write_report(pipeline_dir: Path, config: PipelineConfig, rows: list[dict[str, Any]],
                 steps: dict[str, StepResult], total_seconds: float,
                 sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """``report.md`` (table + checks), ``report.json`` (the same numbers) and ``report.png``."""
    teacher = next((r for r in rows if r["model"] == "teacher, CPT"), None)
    no_cpt = next((r for r in rows if r["model"] == "teacher, no CPT"), None)
    lexical = next((r for r in rows if "BM25" in r["model"]), None)
    chance = next((r for r in rows if r["model"].startswith("random")), None)
    lines = [f"# {config.name}: DisRanker pipeline report", "",
             f"Pipeline directory: `{pipeline_dir}`; steps {sum(s.seconds for s in steps.values()) / 60:.1f} min "
             f"(sum of the steps' recorded wall times), this invocation {total_seconds / 60:.1f} min, on "
             f"{os.cpu_count()} CPU cores.", "",
             "Held-out test split. NDCG@10 uses torchmetrics' gain (linear in the label); "
             "PNR = concordant / discordant pairs of one query with different labels (score ties count neither way).",
             "", "| model | NDCG@10 | MRR@10 | PNR | parameters | ms / query |", "|---|---|---|---|---|---|"]
    for row in rows:
        params = f"{row['parameters'] / 1e6:.2f} M" if row.get("parameters") else "–"
        ms = f"{row['ms_per_query']:.1f}" if row.get("ms_per_query") is not None else "–"
        lines.append(f"| {row['model']} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | {row['pnr']:.3f} | {params} | {ms} |")
    lines += ["", "## Checks", ""]
    if teacher and no_cpt:
        verdict = "better than" if teacher["ndcg@10"] > no_cpt["ndcg@10"] else "NOT better than"
        lines.append(f"- The CPT teacher ranks {verdict} the teacher without CPT "
                     f"(NDCG@10 {teacher['ndcg@10']:.4f} vs {no_cpt['ndcg@10']:.4f}).")
    if teacher:
        for baseline in (chance, lexical):
            if baseline:
                verdict = "beats" if teacher["ndcg@10"] > baseline["ndcg@10"] else "does NOT beat"
                lines.append(f"- The CPT teacher {verdict} {baseline['model']} "
                             f"(NDCG@10 {teacher['ndcg@10']:.4f} vs {baseline['ndcg@10']:.4f}).")
        for row in rows:
            if row["model"].startswith("student") and teacher["ndcg@10"] > 0:
                ratio = row["ndcg@10"] / teacher["ndcg@10"]
                ok = "meets" if ratio >= config.min_student_ratio else "does NOT meet"
                speed = (f", {teacher['ms_per_query'] / row['ms_per_query']:.1f}× faster per query"
                         if row.get("ms_per_query") and teacher.get("ms_per_query") else "")
                lines.append(f"- {row['model']}: {ratio:.1%} of the teacher's NDCG@10 ({ok} the "
                             f"{config.min_student_ratio:.0%} target){speed}.")
    if sizes:
        lines += ["", "## Data", "", "| split | queries | (query, doc) pairs |", "|---|---|---|"]
        lines += [f"| {split} | {q} | {d} |" for split, (q, d) in sizes.items()]
        if config.test_query_offset:
            lines += ["", f"The test split is queries {config.test_query_offset + 1}–"
                          f"{config.test_query_offset + sizes['test'][0]} of its file (`test_query_offset`)."]
    lines += ["", "## Steps", "", "| step | wall time | run directory |", "|---|---|---|"]
    for name, step in steps.items():
        lines.append(f"| {name} | {step.seconds:.0f} s | `{step.run_dir}` |")
    report = pipeline_dir / "report.md"
    write_json_atomic(pipeline_dir / "report.json", {"rows": rows, "total_seconds": total_seconds})
    _plot(rows, pipeline_dir / "report.png", title=config.name)
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(rows) + 2), sharey=True)
    for ax, key, label in zip(axes, ("ndcg@10", "pnr", "ms_per_query"), ("NDCG@10", "PNR", "ms / query")):
        values = [r.get(key) or 0.0 for r in rows]
        ax.barh(names, values, color=["#888" if "BM25" in n else "#4c72b0" if "teacher" in n else "#dd8452" for n in names])
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
