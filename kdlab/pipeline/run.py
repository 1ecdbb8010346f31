"""Running the pipeline's steps: each ``fit`` in its own process with its own run directory (the
same record as a hand-run one; resumed when finished), the teacher's labels, the evaluation, the report."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdlab.machine import cpu_time_counters, inference_dtype, steal_share
from kdlab.pipeline.config import PipelineConfig
from kdlab.pipeline.data import LABELED_TRAIN, read_ranking_data
from kdlab.pipeline.report import StepResult, data_sizes, review_figures, write_report
from kdlab.runs import RunFailed, launch_run, new_run_dir, slug, write_json_atomic


def run_step(name: str, pipeline_dir: Path, args: Sequence[str], launcher: Sequence[str] = ()) -> StepResult:
    """Run one ``fit`` step in a subprocess (or reuse its finished record) and time it.

    The time is the subprocess's whole wall time, as the user waits for it: start-up, a backbone's
    first-use preparation and the run itself (its manifest's start and end bracket the run only),
    kept like every step's in ``step_times.json``."""
    run_dir, timed = pipeline_dir / name, {}
    with _timed_step(pipeline_dir, name, timed, run_dir):
        metrics = launch_run([*args, f"--run.name={name}"], run_dir, label=f"pipeline step {name}", launcher=launcher)
    return StepResult(name, run_dir, metrics, timed[name].seconds, timed[name].steal)


STEP_TIMES = "step_times.json"
STEP_STEAL = "step_steal.json"


@contextlib.contextmanager
def _timed_step(pipeline_dir: Path, name: str, steps: dict[str, StepResult], output: Path,
                always: bool = False) -> Iterator[None]:
    """Time a step (a training subprocess, labels, evaluation) and keep its wall time in
    ``step_times.json`` (and the CPU share the hypervisor took meanwhile in ``step_steal.json``), so
    a resumed pipeline still reports the time a reused output took."""
    record_path, steal_path = pipeline_dir / STEP_TIMES, pipeline_dir / STEP_STEAL
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    steal = json.loads(steal_path.read_text()) if steal_path.exists() else {}
    reused = output.exists() and not always and name in record
    counters, started = cpu_time_counters(), time.perf_counter()
    yield
    if not reused:
        record[name] = time.perf_counter() - started
        steal[name] = steal_share(counters, cpu_time_counters())
        write_json_atomic(steal_path, steal)
        write_json_atomic(record_path, record)
    steps[name] = StepResult(name, output, {}, float(record.get(name, 0.0)), steal.get(name))

def check_steps(config: PipelineConfig, step_args: dict[str, list[str]]) -> None:
    """Parse every step's command line and run its config-time checks now, before the first step
    trains: a typo in the distill config fails here, not after the teachers have trained. Each
    step's data files are read and validated too, except the students' (their teacher-score files
    are written by the pipeline itself)."""
    from kdlab.lightning_cli import (
        check_inputs_before_loading,
        import_class,
        init_args,
        parse_lightning,
    )

    for name, args in step_args.items():
        cfg = parse_lightning(["fit", *args]).fit
        if name.startswith("student_"):
            stage = import_class(str(cfg.model.class_path))
            if hasattr(stage, "check_options"):
                stage.check_options(init_args(cfg.model))
        else:
            check_inputs_before_loading(cfg, "fit")


def label_split(teacher_dir: Path, source: str, output: Path, config: PipelineConfig, dtype: str) -> Path:
    """Teacher scores for one split, written once and reused (resumable, atomic). Several devices
    label through ``python -m kdlab label`` (Lightning relaunches that command once per rank), and
    so does a ``hardware.launcher`` (it starts that command on every process of every node).
    ``dtype``: the precision :func:`label_precision` chose (never ``auto``)."""
    from kdlab.labeling import score_file

    if output.exists():
        return output
    options = {"max_tokens": config.budget.label_max_tokens, "max_length": config.budget.label_max_length,
               "accelerator": config.hardware.label_accelerator, "devices": config.hardware.label_devices,
               "dtype": dtype, "quantization": config.hardware.label_quantization}
    if config.hardware.num_nodes > 1:
        options["num_nodes"] = config.hardware.num_nodes
    one_process = str(config.hardware.label_devices) in ("1", "auto") or config.hardware.label_devices == 1
    if one_process and not config.hardware.launcher:
        score_file(str(teacher_dir), source, str(output), resume=True, **options)
        return output
    import subprocess
    import sys

    args = [*config.hardware.launcher, sys.executable, "-m", "kdlab", "label", f"--teacher={teacher_dir}", f"--input={source}",
            f"--output={output}", *(f"--{key}={value}" for key, value in options.items() if value is not None)]
    if subprocess.run(args).returncode != 0:
        raise RunFailed(f"labeling {source} failed: {' '.join(args)}")
    return output


LABEL_PRECISION = "precision.json"


def label_precision(pipeline_dir: Path, config: PipelineConfig) -> dict[str, str]:
    """The precision the teacher labels in, ``{"dtype", "reason"}``: ``config.hardware.label_dtype`` resolved
    once per pipeline directory (``auto``: :func:`kdlab.machine.inference_dtype`) and kept in
    ``labels/precision.json``, so that a pipeline resumed elsewhere labels its remaining splits, and
    reports, in the precision its first labels were made in."""
    record = pipeline_dir / "labels" / LABEL_PRECISION
    if record.exists():
        from kdlab.errors import ConfigError

        try:
            kept = json.loads(record.read_text())
        except ValueError:
            kept = None
        if not (isinstance(kept, dict) and isinstance(kept.get("dtype"), str) and isinstance(kept.get("reason"), str)):
            raise ConfigError(f"{record}: expected the JSON object {{\"dtype\": ..., \"reason\": ...}} this pipeline "
                              "wrote when it first labeled; delete the file to choose the precision again")
        return kept
    dtype, reason = inference_dtype(config.hardware.label_dtype, config.hardware.label_accelerator)
    chosen = {"dtype": dtype, "reason": reason}
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, chosen)
    return chosen


def _step_commands(config: PipelineConfig, pipeline_dir: Path, splits: dict[str, str]) -> dict[str, list[str]]:
    """Each step's ``fit`` command line, in the order the steps run."""
    common = [*config.hardware.train_args(), *config.recipe.step_args.get("all", [])]
    last = list(config.recipe.step_args.get("all_after", []))
    data_args = [f"--data.init_args.{split}={path}" for split, path in splits.items()]
    label_args = [f"--data.init_args.{split}={path}" for split, path in {**splits, **_label_files(pipeline_dir, config)}.items()]
    cpt_model = pipeline_dir / "cpt" / "model"
    sft_args = [*common, "--config", config.recipe.rank_sft_config, *data_args, *config.recipe.step_args.get("rank_sft", []), *last]
    step_args: dict[str, list[str]] = {}
    if config.recipe.run_no_cpt_baseline:
        step_args["rank_sft_no_cpt"] = sft_args
    clicks = [f"--data.init_args.{name}_path={path}" for name, path in
              (("train", config.data.clicks_train), ("val", config.data.clicks_val)) if path]
    step_args["cpt"] = [*common, "--config", config.recipe.cpt_config, *clicks, *config.recipe.step_args.get("cpt", []),
                        *last]
    step_args["rank_sft_cpt"] = [*sft_args, f"--model.init_args.backbone={cpt_model}"]
    for variant, extra in config.recipe.variants.items():
        step_args[f"student_{slug(variant)}"] = [*common, "--config", config.recipe.distill_config, *label_args,
                                                 *config.recipe.step_args.get("distill", []), *extra, *last]
    return step_args


def _label_files(pipeline_dir: Path, config: PipelineConfig) -> dict[str, Path]:
    """The teacher-labeled files: the training split's, and the validation split's when ``label_val``."""
    return {split: pipeline_dir / "labels" / f"{split}.jsonl" for split in ("train", "val")
            if split == "train" or config.budget.label_val}


def run_pipeline(config: PipelineConfig) -> Path:
    """Run every step and write the report; returns the path of ``report.md``."""
    prepared = read_ranking_data(config)  # every split validated before anything is written
    fresh = not config.pipeline_dir
    pipeline_dir = new_run_dir(config.root, config.name) if fresh else Path(config.pipeline_dir)  # type: ignore[arg-type]
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    try:
        splits = prepared.write(pipeline_dir)
        label_sources = prepared.label_sources(pipeline_dir, splits, config.budget.label_val)
        step_args = _step_commands(config, pipeline_dir, splits)
        check_steps(config, step_args)
    except BaseException:
        if fresh:  # a pipeline that never started leaves no directory behind
            shutil.rmtree(pipeline_dir, ignore_errors=True)
            for parent in (pipeline_dir.parent, pipeline_dir.parent.parent):
                try:
                    parent.rmdir()  # only when empty: other pipelines' directories stay
                except OSError:
                    break
        raise
    write_json_atomic(pipeline_dir / "pipeline.json", asdict(config))
    started, counters = time.perf_counter(), cpu_time_counters()
    steps: dict[str, StepResult] = {}
    labels = _label_files(pipeline_dir, config)
    for name in ("rank_sft_no_cpt", "cpt", "rank_sft_cpt"):
        if name in step_args:
            steps[name] = run_step(name, pipeline_dir, step_args[name], config.hardware.launcher)
    teacher_dir = pipeline_dir / "rank_sft_cpt" / "model"
    precision = label_precision(pipeline_dir, config)
    teacher_check = _teacher_check(pipeline_dir, config, prepared, teacher_dir, steps)
    for split, output in labels.items():
        with _timed_step(pipeline_dir, f"labels_{split}", steps, output):
            _label_with_fallback(teacher_dir, label_sources[split], output, config, precision["dtype"], teacher_check)
    for variant in config.recipe.variants:
        step = f"student_{slug(variant)}"
        steps[step] = run_step(step, pipeline_dir, step_args[step], config.hardware.launcher)

    from kdlab.evaluation import PRE_RANKER, RANDOM, evaluate_models

    models: dict[str, Path | str] = {"random ordering (mean of 20)": RANDOM, prepared.pre_ranker_name: PRE_RANKER}
    if config.recipe.run_no_cpt_baseline:
        models["teacher, no CPT"] = pipeline_dir / "rank_sft_no_cpt" / "model"
    models["teacher, CPT"] = teacher_dir
    # The teachers read the length they were trained on; everything added below reads eval_max_length.
    teacher_length = config.budget.teacher_length
    lengths = {name: teacher_length for name, spec in models.items() if spec not in (RANDOM, PRE_RANKER)}
    for variant in config.recipe.variants:
        models[f"student, {variant}"] = pipeline_dir / f"student_{slug(variant)}" / "model"
    scores: dict[str, list[list[float]]] = {}
    with _timed_step(pipeline_dir, "evaluation", steps, pipeline_dir / "report.md", always=True):
        rows = evaluate_models(models, splits["test"], max_length=config.budget.eval_max_length, max_lengths=lengths,
                               gain=config.report.gain,
                               scores_out=scores, device=config.hardware.eval_device, dtype=config.hardware.eval_dtype,
                               interleaved=config.hardware.eval_interleaved)
    if config.recipe.fallbacks:
        with _timed_step(pipeline_dir, "fallbacks", steps, pipeline_dir / "report.md", always=True):
            fallback = _fallback_rows(config, prepared, splits, models, lengths, rows, scores, step_args, teacher_check)
    evidence = review_figures(rows, scores, splits["test"], pipeline_dir, config, prepared.pre_ranker_name)
    if config.recipe.fallbacks:
        evidence["fallbacks"] = {**fallback, "teacher_on_validation": teacher_check and
                                 {k: v for k, v in teacher_check.items() if k != "val_scores"}}
    evidence["label_dtype"] = precision
    total, steal = time.perf_counter() - started, steal_share(counters, cpu_time_counters())
    sizes = data_sizes(prepared.groups if prepared.labeled_train is None
                       else {**prepared.groups, LABELED_TRAIN: prepared.labeled_train})
    return write_report(pipeline_dir, config, rows, steps, total, sizes, evidence, steal)

FALLBACKS = "fallbacks.json"


def _teacher_check(pipeline_dir: Path, config: PipelineConfig, prepared: Any, teacher_dir: Path,
                   steps: dict[str, StepResult]) -> dict[str, Any] | None:
    """Whether the teacher beats the first stage on validation (once per pipeline directory), or
    None when fallbacks are off or the data has no first-stage scores."""
    from kdlab.pipeline.fallbacks import has_first_stage, teacher_on_validation

    val = prepared.groups["val"]
    if not config.recipe.fallbacks or not has_first_stage(val) or not has_first_stage(prepared.groups["train"]):
        return None
    record_path = pipeline_dir / FALLBACKS
    if record_path.exists():
        return json.loads(record_path.read_text())
    with _timed_step(pipeline_dir, "teacher_on_validation", steps, record_path):
        record = teacher_on_validation(str(teacher_dir), val, config.budget.teacher_length, gain=config.report.gain,
                                       device=config.hardware.eval_device, dtype=config.hardware.eval_dtype)
    write_json_atomic(record_path, record)
    return record


def _label_with_fallback(teacher_dir: Path, source: str, output: Path, config: PipelineConfig, dtype: str,
                         check: dict[str, Any] | None) -> None:
    """The teacher's labels; interpolated with the first stage (α of ``check``) when the teacher did
    not beat it on validation. The raw labels stay beside them (``<split>.teacher.jsonl``)."""
    if output.exists():
        return
    if check is None or check["teacher_beats_pre_ranker"]:
        label_split(teacher_dir, source, output, config, dtype)
        return
    from kdlab.data.readers import read_ranking_jsonl, write_ranking_jsonl
    from kdlab.pipeline.fallbacks import interpolate_labels

    raw = output.with_name(output.stem + ".teacher.jsonl")
    label_split(teacher_dir, source, raw, config, dtype)
    write_ranking_jsonl(output, interpolate_labels(read_ranking_jsonl(raw), float(check["label_alpha"])))


def _fallback_rows(config: PipelineConfig, prepared: Any, splits: dict[str, str], models: dict[str, Any],
                   lengths: dict[str, int], rows: list[dict[str, Any]], scores: dict[str, list[list[float]]],
                   step_args: dict[str, list[str]], teacher_check: dict[str, Any] | None) -> dict[str, Any]:
    """The report's never-worse-than-the-start rows (:mod:`kdlab.pipeline.fallbacks`), added to
    ``rows`` and ``scores``: every trained model interpolated with the first stage (α on the
    validation split), and the untouched student backbone zero-shot as a bi-encoder."""
    from kdlab.data.readers import read_ranking_jsonl
    from kdlab.evaluation import PRE_RANKER, RANDOM, score_models_per_query
    from kdlab.lightning_cli import parse_lightning
    from kdlab.pipeline.fallbacks import best_on_validation, has_first_stage, interpolated_rows, zero_shot_row

    val_groups, test_groups = read_ranking_jsonl(splits["val"]), read_ranking_jsonl(splits["test"])
    out: dict[str, Any] = {}
    if has_first_stage(val_groups) and has_first_stage(test_groups):
        known = {"teacher, CPT": teacher_check["val_scores"]} if teacher_check and "val_scores" in teacher_check else {}
        trained = {name: (spec, lengths.get(name, config.budget.eval_max_length)) for name, spec in models.items()
                   if spec not in (RANDOM, PRE_RANKER) and name not in known}
        val = score_models_per_query(trained, val_groups, device=config.hardware.eval_device,
                                     dtype=config.hardware.eval_dtype, interleaved=config.hardware.eval_interleaved)
        val_scores = {name: known[name] if name in known else val[name][0] for name in models if name in known or name in val}
        new_rows, new_scores, out["alpha"] = interpolated_rows(val_scores, scores, val_groups, test_groups, rows,
                                                               gain=config.report.gain)
        rows.extend(new_rows)
        scores.update(new_scores)
    students = [name for name in step_args if name.startswith("student_")]
    if students:
        cfg = parse_lightning(["fit", *step_args[students[0]]]).fit
        init = cfg.model.init_args
        if getattr(init, "architecture", "cross-encoder") == "cross-encoder":
            row, zero_scores, out["zero_shot_val_ndcg"] = zero_shot_row(
                str(init.backbone), test_groups, val_groups, config.budget.eval_max_length, gain=config.report.gain)
            rows.append(row)
            scores[row["model"]] = zero_scores
            out["zero_shot"] = row["model"]
    out["choice"] = best_on_validation(out, prepared.pre_ranker_name)
    return out


def pipeline_command(config: PipelineConfig) -> list[Path]:
    """Run a whole distillation pipeline (CPT → rank SFT → label → distill → report)."""
    report = run_pipeline(config)
    print(f"report: {report}")
    return [report]
