"""The pipeline's report: the held-out table, per-query significance, the trec_eval cross-check,
the checks with a plain verdict, each step's wall time; ``report.md``, ``report.json``, ``report.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.machine import describe_machine, machine_record
from kdlab.pipeline.config import PipelineConfig
from kdlab.pipeline.data import LABELED_TRAIN
from kdlab.runs import atomic_path, slug, write_json_atomic, write_text_atomic


@dataclass
class StepResult:
    name: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float
    steal: float | None = None  # the share of the machine's CPU time the hypervisor took meanwhile


def _length_sentence(config: PipelineConfig) -> str:
    """The report's statement of how many tokens of each (query, document) pair each model read."""
    teacher = config.budget.teacher_length
    if teacher == config.budget.eval_max_length:
        return f"Every model reads at most {teacher} tokens per (query, document) pair."
    return (f"The teachers read at most {teacher} tokens per (query, document) pair, the students "
            f"{config.budget.eval_max_length} (each at the length it was trained on; ms / query is timed so).")


def review_figures(rows: list[dict[str, Any]], scores: dict[str, list[list[float]]], test_path: str,
                   pipeline_dir: Path, config: PipelineConfig, pre_ranker_name: str) -> dict[str, Any]:
    """What a reviewer asks of the report's figures: a per-query paired significance test of each
    model's NDCG@10 against the teacher and the pre-ranker (p-values added to the rows), and the
    same NDCG@10 / MRR@10 recomputed by trec_eval (ir_measures) from TREC run files kdlab writes
    under ``trec/`` — possible only for integer labels (trec_eval's qrels are integers)."""
    from kdlab.data.readers import read_ranking_jsonl
    from kdlab.defaults import EVAL_K
    from kdlab.metrics.ranking import per_query_ranking_metrics
    from kdlab.metrics.significance import paired_randomization_test, paired_t_test
    from kdlab.metrics.trec import cross_check

    groups = read_ranking_jsonl(test_path)
    labels = [[float(d.label or 0.0) for d in g.docs] for g in groups]
    key = f"ndcg@{EVAL_K}"
    per_query = {name: [m[key] if m else None for m in per_query_ranking_metrics(list(zip(s, labels)), EVAL_K, config.report.gain)]
                 for name, s in scores.items()}
    test = paired_randomization_test if config.report.significance == "randomization" else paired_t_test
    for row in rows:
        mine = per_query.get(row["model"])
        for column, other in (("p_vs_teacher", "teacher, CPT"), ("p_vs_pre_ranker", pre_ranker_name)):
            theirs = per_query.get(other)
            if mine is None or theirs is None or other == row["model"]:
                continue
            pairs = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
            row[column] = test([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 2 else None

    evidence: dict[str, Any] = {"gain": config.report.gain, "significance": config.report.significance,
                                "pre_ranker": pre_ranker_name, "trec_eval": {}}
    if any(y != int(y) for row in labels for y in row):
        evidence["trec_eval_skipped"] = "fractional labels: trec_eval's qrels hold integers"
        return evidence
    for row in rows:
        name = row["model"]
        if name not in scores:
            continue
        queries = {g.query_id: ([d.id for d in g.docs], s, y) for g, s, y in zip(groups, scores[name], labels)}
        evidence["trec_eval"][name] = cross_check(
            queries, kdlab_figures={k: row[k] for k in (key, f"mrr@{EVAL_K}")}, k=EVAL_K, gain=config.report.gain,
            out_dir=pipeline_dir / "trec" / slug(name))
    return evidence


def data_sizes(groups: dict[str, list[Any]]) -> dict[str, tuple[int, int]]:
    """(queries, documents) of each split's groups (as read and cut before the first step)."""
    return {split: (len(rows), sum(len(g.docs) for g in rows)) for split, rows in groups.items()}


def write_report(pipeline_dir: Path, config: PipelineConfig, rows: list[dict[str, Any]],
                 steps: dict[str, StepResult], total_seconds: float,
                 sizes: dict[str, tuple[int, int]] | None = None, evidence: dict[str, Any] | None = None,
                 steal: float | None = None) -> Path:
    """``report.md`` (table + checks), ``report.json`` (the same numbers) and ``report.png``.
    ``steal``: the share of the machine's CPU time the hypervisor took during this invocation."""
    evidence = evidence or {}
    machine = machine_record()
    lines = [f"# {config.name}: DisRanker pipeline report", "",
             f"Pipeline directory: `{pipeline_dir}`; steps {sum(s.seconds for s in steps.values()) / 60:.1f} min "
             f"(sum of the steps' wall times, each with its process start-up), this invocation {total_seconds / 60:.1f} min"
             f"{f' (the hypervisor took {100 * steal:.0f} % of the CPU time meanwhile: steal)' if steal is not None else ''}, on "
             f"{describe_machine(machine)}. Another CPU (or another number of threads) moves the last digits "
             "of every figure; the same machine reproduces them.", "",
             f"Held-out test split. NDCG@10 with {config.report.gain} gain "
             f"({'rel, as trec_eval' if config.report.gain == 'linear' else '2^rel − 1'}), a model's score ties averaged "
             "(the pre-ranker's ranking is strict: its score, then its own order); "
             "PNR = concordant / discordant pairs of one query with different labels (score ties count neither way). "
             f"p = per-query paired {'randomisation test (10 000 sign flips)' if config.report.significance == 'randomization' else 't-test'} "
             "on NDCG@10, two-sided. "
             f"{_length_sentence(config)}",
             "", "| model | NDCG@10 | MRR@10 | PNR | p vs teacher | p vs pre-ranker | parameters | ms / query |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params = f"{row['parameters'] / 1e6:.2f} M" if row.get("parameters") else "–"
        ms = f"{row['ms_per_query']:.1f}" if row.get("ms_per_query") is not None else "–"
        p_t, p_l = (f"{row[c]:.3g}" if row.get(c) is not None else "–" for c in ("p_vs_teacher", "p_vs_pre_ranker"))
        lines.append(f"| {row['model']} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | {row['pnr']:.3f} | {p_t} | {p_l} "
                     f"| {params} | {ms} |")
    lines += ["", "## Checks", "", *review_checks(rows, config, evidence)]
    if evidence.get("fallbacks"):
        lines += ["", "## Never worse than the start", "", *_fallback_lines(evidence["fallbacks"])]
    chosen = _validation_choices(steps)
    if chosen:
        lines += ["", "## What validation chose", "",
                  "Each training step keeps the weights of its best validation (its stage's main metric on the "
                  "validation split) and stops when the step config's early stopping says so; `model/` is exported "
                  "from that checkpoint.", "", "| step | exported weights | validation metric | steps trained |",
                  "|---|---|---|---|", *chosen]
    if sizes:
        lines += ["", "## Data", "", "| split | queries | (query, doc) pairs |", "|---|---|---|"]
        names = {"train": "train (teacher rank SFT)", LABELED_TRAIN: "train, labeled by the teacher (students)"}
        if LABELED_TRAIN not in sizes:
            names["train"] = "train"
        lines += [f"| {names.get(split, split)} | {q} | {d} |" for split, (q, d) in sizes.items()]
        if evidence.get("label_dtype"):
            chosen = evidence["label_dtype"]
            lines += ["", f"The teacher labeled the students' training queries in {chosen['dtype']} ({chosen['reason']})."]
        if config.budget.test_query_offset:
            lines += ["", f"The test split is queries {config.budget.test_query_offset + 1}–"
                          f"{config.budget.test_query_offset + sizes['test'][0]} of its file (`test_query_offset`)."]
    if evidence.get("trec_eval"):
        lines += ["", "## trec_eval cross-check", "",
                  "The same figures recomputed by trec_eval (ir_measures) from the TREC run and qrels files under "
                  "`trec/` (queries with a relevant document; trec_eval breaks score ties by document id where "
                  "kdlab averages them, so only tie-free queries must agree).", "",
                  "| model | NDCG@10 kdlab | NDCG@10 trec_eval | MRR@10 kdlab | MRR@10 trec_eval | max abs diff | "
                  "queries with tied scores |", "|---|---|---|---|---|---|---|"]
        for name, check in evidence["trec_eval"].items():
            n, m = check["ndcg@10"], check["mrr@10"]
            lines.append(f"| {name} | {n['kdlab']:.6f} | {n['trec_eval']:.6f} | {m['kdlab']:.6f} | {m['trec_eval']:.6f} "
                         f"| {max(n['abs_diff'], m['abs_diff']):.1e} | {check['queries_with_tied_scores']} |")
    elif evidence.get("trec_eval_skipped"):
        lines += ["", f"trec_eval cross-check skipped: {evidence['trec_eval_skipped']}."]
    lines += ["", "## Steps", "", "Steal: the share of this machine's CPU time that the hypervisor gave to other "
              "guests during the step (`/proc/stat`); on a shared host it stretches wall times by about "
              "1 / (1 − steal).", "", "| step | wall time | steal | run directory |", "|---|---|---|---|"]
    for name, step in steps.items():
        steal = f"{100 * step.steal:.0f} %" if step.steal is not None else "–"
        lines.append(f"| {name} | {step.seconds:.0f} s | {steal} | `{step.run_dir}` |")
    report = pipeline_dir / "report.md"
    write_json_atomic(pipeline_dir / "report.json", {"rows": rows, "total_seconds": total_seconds, "machine": machine,
                                                     "step_seconds": {n: st.seconds for n, st in steps.items()},
                                                     "step_steal": {n: st.steal for n, st in steps.items()},
                                                     "steal": steal, **evidence})
    _plot(rows, pipeline_dir / "report.png", title=config.name)
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def _validation_choices(steps: dict[str, StepResult]) -> list[str]:
    """One table line per training step whose export came from a best checkpoint (its manifest)."""
    import json
    import re

    lines = []
    for name, step in steps.items():
        manifest = step.run_dir / "manifest.json"
        if not manifest.is_file():
            continue
        record = json.loads(manifest.read_text())
        weights = record.get("exported_weights") or {}
        if weights.get("weights") != "best":
            continue
        found = re.search(r"best-epoch(\d+)-step(\d+)", str(weights.get("checkpoint", "")))
        where = f"epoch {int(found.group(1)) + 1}, step {found.group(2)}" if found else str(weights.get("checkpoint"))
        trained = record.get("global_step")
        lines.append(f"| {name} | {where} | {weights.get('monitor')} = {float(weights.get('score', float('nan'))):.4f} | "
                     f"{'–' if trained is None else int(trained)} |")
    return lines


def _fallback_lines(fallbacks: dict[str, Any]) -> list[str]:
    """What the fallbacks measured and chose (:mod:`kdlab.pipeline.fallbacks`), one line each."""
    lines = []
    check = fallbacks.get("teacher_on_validation")
    if check:
        head = (f"- On the validation split ({check['queries']} queries) the CPT teacher's NDCG@10 is "
                f"{check['teacher_val_ndcg']:.4f}, the pre-ranker's {check['pre_ranker_val_ndcg']:.4f}: ")
        lines.append(head + ("it beats it, so the students learn its own scores." if check["teacher_beats_pre_ranker"]
                             else "it does NOT beat it, so the students learn its scores interpolated with the "
                                  f"pre-ranker's, α = {check['label_alpha']:g} chosen on validation (its raw labels: "
                                  "`labels/train.teacher.jsonl`)."))
    for name, chosen in fallbacks.get("alpha", {}).items():
        alone = "" if chosen["alpha"] < 1 else ": the model alone is best there, so no interpolated row"
        lines.append(f"- {name}: α = {chosen['alpha']:g} on validation (NDCG@10 {chosen['val_ndcg_at_alpha']:.4f}; "
                     f"the model alone {chosen['val_ndcg_model']:.4f}, the pre-ranker {chosen['val_ndcg_pre_ranker']:.4f})"
                     f"{alone}.")
    choice = fallbacks.get("choice")
    if choice:
        lines.append(f"- **Best on validation: {choice['model']}** (NDCG@10 {choice['val_ndcg']:.4f} on the validation "
                     f"split, among {len(choice['candidates'])} candidates: the pre-ranker, each model alone and "
                     "interpolated, the zero-shot bi-encoder) — what to ship if the test split were not there.")
    if fallbacks.get("zero_shot"):
        lines.append(f"- {fallbacks['zero_shot']}: the students' backbone before any training (cosine of mean-pooled "
                     "embeddings). Untouched, it has no ranking head, so there is no zero-shot cross-encoder row "
                     "(a fresh head scores at random).")
    return lines


def review_checks(rows: list[dict[str, Any]], config: PipelineConfig, evidence: dict[str, Any]) -> list[str]:
    """The report's checks, one line each, and a verdict that says plainly when the recipe did not
    work here: a teacher at or below the pre-ranker (or not significantly above it) makes every
    student's ratio-to-teacher check a failure too, and a student below the pre-ranker fails
    whatever its ratio to the teacher."""
    by_name = {r["model"]: r for r in rows}
    teacher, no_cpt = by_name.get("teacher, CPT"), by_name.get("teacher, no CPT")
    pre_ranker = by_name.get(evidence.get("pre_ranker", ""))
    chance = next((r for r in rows if r["model"].startswith("random")), None)
    alpha, key = config.report.significance_level, "ndcg@10"
    lines, failures = [], []
    if teacher and no_cpt:
        verdict = "better than" if teacher[key] > no_cpt[key] else "NOT better than"
        lines.append(f"- The CPT teacher ranks {verdict} the teacher without CPT "
                     f"(NDCG@10 {teacher[key]:.4f} vs {no_cpt[key]:.4f}).")
    teacher_ok = teacher is not None
    if teacher and chance:
        verdict = "beats" if teacher[key] > chance[key] else "does NOT beat"
        lines.append(f"- The CPT teacher {verdict} {chance['model']} (NDCG@10 {teacher[key]:.4f} vs {chance[key]:.4f}).")
    if teacher and pre_ranker:
        p = teacher.get("p_vs_pre_ranker")
        above = teacher[key] > pre_ranker[key]
        significant = above and p is not None and p < alpha
        p_text = f"p = {p:.3g}" if p is not None else "no test"
        if significant:
            lines.append(f"- The CPT teacher beats {pre_ranker['model']}, significantly (NDCG@10 {teacher[key]:.4f} vs "
                         f"{pre_ranker[key]:.4f}, {p_text} < {alpha}).")
        else:
            name = pre_ranker["model"]
            why = f"is above {name}, but NOT significantly" if above else f"is BELOW (or equal to) {name}"
            lines.append(f"- **The CPT teacher {why}** (NDCG@10 {teacher[key]:.4f} vs "
                         f"{pre_ranker[key]:.4f}, {p_text}): the LLM teacher does not earn its cost here.")
            teacher_ok = False
            failures.append("teacher vs pre-ranker")
    for row in rows:
        if not (row["model"].startswith("student") and teacher and teacher[key] > 0):
            continue
        ratio = row[key] / teacher[key]
        speedup = (teacher["ms_per_query"] / row["ms_per_query"]
                   if row.get("ms_per_query") and teacher.get("ms_per_query") else None)
        problems = []
        if ratio < config.report.min_student_ratio:
            problems.append(f"below {config.report.min_student_ratio:.0%} of the teacher")
        if speedup is not None and speedup < config.report.min_student_speedup:
            problems.append(f"less than {config.report.min_student_speedup:g}× faster")
        if pre_ranker and row[key] <= pre_ranker[key]:
            problems.append(f"BELOW {pre_ranker['model']} ({row[key]:.4f} vs {pre_ranker[key]:.4f})")
        if not teacher_ok:
            problems.append("its teacher does not beat the pre-ranker, so matching it is no success")
        speed = f", {speedup:.1f}× faster per query" if speedup is not None else ""
        verdict = "meets every check" if not problems else "does NOT pass: " + "; ".join(problems)
        lines.append(f"- {row['model']}: {ratio:.1%} of the teacher's NDCG@10{speed} — {verdict}.")
        if problems:
            failures.append(row["model"])
    if teacher:
        lines.append("")
        lines.append("**Verdict: every check passes** — the teacher beats the pre-ranker significantly and every student "
                     f"keeps ≥ {config.report.min_student_ratio:.0%} of it at ≥ {config.report.min_student_speedup:g}× the speed."
                     if not failures else f"**Verdict: the recipe did NOT fully work in this run** (failed: "
                     f"{', '.join(failures)}).")
    return lines


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(rows) + 2), sharey=True)
    for ax, key, label in zip(axes, ("ndcg@10", "pnr", "ms_per_query"), ("NDCG@10", "PNR", "ms / query")):
        values = [r.get(key) or 0.0 for r in rows]
        ax.barh(names, values, color=["#4c72b0" if "teacher" in n else "#dd8452" if "student" in n else "#888"
                                      for n in names])
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
