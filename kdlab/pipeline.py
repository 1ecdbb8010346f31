"""``python -m kdlab pipeline``: the DisRanker recipe end to end, with an honest report.

Before anything trains, every split is read from the user's files in any format
(:mod:`kdlab.data.sources`; errors name their file and line) and every step's command line is
parsed and checked (options, click logs); a mistake leaves no pipeline directory. Then the steps
(each a ``python -m kdlab fit`` process, forked from :func:`kdlab.runs.start_zygote`'s zygote so
that the imports are paid once, with its own run directory inside the pipeline directory, so every
step leaves the same record as a hand-run one and DDP launchers re-run the right command):

1. ``rank_sft_no_cpt``  rank fine-tuning of the teacher backbone as it is (the "without CPT" row);
2. ``cpt``              continued pre-training on click logs (query → clicked title + summary);
3. ``rank_sft_cpt``     rank fine-tuning starting from the CPT export;
4. ``labels/``          the CPT teacher scores the train/val candidates once (``kdlab label``; the
                        test split is scored by evaluation, never by labels the students could read);
5. ``student_<variant>`` distillation runs (hybrid, point-only, margin-only, TCL, ...);
6. evaluation of every model on the held-out test split in this process (same machine, same
   batching), with the first stage (run file or BM25) as the pre-ranker row, per-query paired
   significance tests and a trec_eval (ir_measures) recomputation from TREC runs under ``trec/``,
   written to ``report.md``, ``report.json`` and ``report.png``.

A step whose run directory already holds ``metrics.json`` (and its exported model) is skipped,
so ``--pipeline_dir`` of an interrupted pipeline resumes it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdlab.data.sources import RankingSource
from kdlab.defaults import LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH
from kdlab.machine import cpu_time_counters, describe_machine, inference_dtype, machine_record, steal_share
from kdlab.runs import (RunFailed, atomic_path, launch_run, new_run_dir, slug, start_zygote, write_json_atomic,
                        write_text_atomic)

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
        train / val / test: each split's ranking data: a kdlab JSONL path, or a source
            ``{format: jsonl|msmarco|beir|trec|flagembedding, ...}``
            (:class:`kdlab.data.sources.RankingSource`; None: the embedded sample). Every file is
            read and validated before the first step; splits that are not kdlab JSONL (or are cut
            to ``max_*_queries``) are written as kdlab JSONL into ``<pipeline dir>/data/``.
        max_train_queries / max_eval_queries: use only the first N queries of the training /
            validation and test files (the subsets are written into the pipeline directory and
            their sizes printed in the report) — to fit a large teacher into a time budget.
        label_val: the teacher also labels the validation split, and the students validate on
            that file (True, as before); False: the students validate on the validation split as
            it is — their validation metrics read only its relevance labels, so this saves the
            teacher's pass over it.
        max_label_queries: the teacher labels, and the students train on, only the first N of the
            training queries the teacher was trained on (None: all of them). Rank SFT costs the
            same per step whatever the number of queries, labeling and student training cost per
            query: a teacher that sees more distinct queries overfits less, at no cost in time.
        max_val_queries: the validation split's own cut when it should differ from the test split's
            (e.g. a small validation split that the teacher labels quickly and a large test split
            whose per-query significance test has power); None: ``max_eval_queries``.
        test_query_offset: skip this many queries of the test file before taking
            ``max_eval_queries`` (e.g. a fresh held-out slice for a confirmation run after an
            earlier run's test queries were looked at).
        label_max_tokens / label_max_length: teacher scoring (padded tokens per forward pass,
            tokens per pair).
        label_accelerator / label_devices / label_dtype / label_quantization: where and how the
            teacher labels the candidates (several devices run data parallel through
            ``python -m kdlab label``; the file is the same as one device's). ``label_dtype: auto``
            labels in bf16 where the hardware runs it natively (:func:`kdlab.machine.inference_dtype`),
            else fp32; the report says which.
        eval_device / eval_dtype: where the held-out evaluation scores every model.
        eval_interleaved: every model loaded at once and timed query by query in turn (fair speed
            ratios on a shared machine); False loads one model at a time (less memory: large
            teachers on one GPU).
        eval_max_length: tokens per (query, doc) when evaluating the students.
        teacher_eval_max_length: tokens per (query, doc) when evaluating the teachers; None:
            ``eval_max_length``. Each model is timed at the length it was trained for when these
            differ (e.g. a teacher trained on 96 tokens, students on 64); the report says so.
        min_student_ratio: the report checks student NDCG@10 ≥ this × teacher NDCG@10.
        min_student_speedup: ... and the student ≥ this many times faster per query than the teacher.
        significance_level: the p-value below which the report calls a difference significant.
        run_no_cpt_baseline: also train the teacher without CPT (the report's first row).
        pre_ranker_name: the report's name for the first-stage row (default: says where the scores
            come from: the run file, BM25 over the collection, or BM25 over the candidates).
        gain: NDCG's gain, ``linear`` (``rel``, as trec_eval) or ``exponential`` (``2^rel − 1``).
        significance: the per-query paired test of each model's NDCG@10 against the teacher and the
            pre-ranker: ``randomization`` (sign-flip, 10 000 draws) or ``t-test``.
    """

    name: str = "disranker"
    root: str = "runs/pipelines"
    pipeline_dir: str | None = None
    cpt_config: str = "experiments/quickstart/disranker/cpt.yaml"
    rank_sft_config: str = "experiments/quickstart/disranker/rank_sft.yaml"
    distill_config: str = "experiments/quickstart/disranker/distill.yaml"
    step_args: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_VARIANTS.items()})
    train: RankingSource | str | None = None
    val: RankingSource | str | None = None
    test: RankingSource | str | None = None
    max_train_queries: int | None = None
    max_eval_queries: int | None = None
    max_val_queries: int | None = None
    max_label_queries: int | None = None
    label_val: bool = True
    test_query_offset: int = 0
    label_max_tokens: int = LABEL_BATCH_TOKENS
    label_max_length: int = PAIR_MAX_LENGTH
    eval_max_length: int = PAIR_MAX_LENGTH
    teacher_eval_max_length: int | None = None
    label_accelerator: str = "auto"
    label_devices: int | str = 1
    label_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    label_quantization: Literal["8bit", "4bit"] | None = None
    eval_device: str = "cpu"
    eval_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_interleaved: bool = True
    min_student_ratio: float = 0.9
    min_student_speedup: float = 5.0
    significance_level: float = 0.05
    run_no_cpt_baseline: bool = True
    pre_ranker_name: str | None = None
    gain: Literal["linear", "exponential"] = "linear"
    significance: Literal["randomization", "t-test"] = "randomization"

    def __post_init__(self) -> None:
        from kdlab.errors import ConfigError

        for name in ("label_max_length", "eval_max_length", "teacher_eval_max_length", "max_label_queries"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                optional = " or null" if name in ("teacher_eval_max_length", "max_label_queries") else ""
                raise ConfigError(f"{name}: expected an integer >= 1{optional}, got {value!r}")

    @property
    def teacher_length(self) -> int:
        """Tokens per (query, document) pair the teachers are evaluated at."""
        return self.eval_max_length if self.teacher_eval_max_length is None else self.teacher_eval_max_length


@dataclass
class StepResult:
    name: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float
    steal: float | None = None  # the share of the machine's CPU time the hypervisor took meanwhile


def run_step(name: str, pipeline_dir: Path, args: Sequence[str]) -> StepResult:
    """Run one ``fit`` step in a subprocess (or reuse its finished record) and time it.

    The time is the subprocess's whole wall time, as the user waits for it: start-up, a backbone's
    first-use preparation and the run itself (its manifest's start and end bracket the run only),
    kept like every step's in ``step_times.json``."""
    run_dir, timed = pipeline_dir / name, {}
    with _timed_step(pipeline_dir, name, timed, run_dir):
        metrics = launch_run([*args, f"--run.name={name}"], run_dir, label=f"pipeline step {name}")
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


@dataclass
class PreparedData:
    """Each split's groups as the steps will see them, the user's own JSONL file where a step can
    read it as it is (else None: a kdlab JSONL copy is written), and where each split's candidates
    and first-stage scores came from."""

    groups: dict[str, list[Any]]
    user_files: dict[str, str | None]
    first_stage: dict[str, dict[str, Any]]
    pre_ranker_name: str
    labeled_train: list[Any] | None = None  # the first max_label_queries training groups (None: all)

    def label_sources(self, pipeline_dir: Path, splits: dict[str, str], label_val: bool) -> dict[str, str]:
        """The file the teacher labels for each split the students read its scores from: the
        training split (or its first ``max_label_queries`` queries, written once into ``data/``),
        and the validation split when ``label_val``."""
        from kdlab.data.readers import write_ranking_jsonl

        sources = {"train": splits["train"]}
        if self.labeled_train is not None:
            subset = pipeline_dir / "data" / f"ranking_{LABELED_TRAIN}.jsonl"
            if not subset.exists():
                write_ranking_jsonl(subset, self.labeled_train)
            sources["train"] = str(subset)
        if label_val:
            sources["val"] = splits["val"]
        return sources

    def write(self, pipeline_dir: Path) -> dict[str, str]:
        """The file of each split: the user's, or a copy written (once, atomically) into ``data/``."""
        from kdlab.data.readers import write_ranking_jsonl

        files = {}
        for split, groups in self.groups.items():
            copy = pipeline_dir / "data" / f"ranking_{split}.jsonl"
            if self.user_files[split] is not None:
                files[split] = str(self.user_files[split])
                continue
            if not copy.exists():
                write_ranking_jsonl(copy, groups)
            files[split] = str(copy)
        write_json_atomic(pipeline_dir / "data" / "first_stage.json", self.first_stage)
        return files


def read_ranking_data(config: PipelineConfig) -> PreparedData:
    """Read and validate every split from the user's files (errors name their file and line), cut
    the splits to ``max_*_queries`` and give every test candidate a first-stage score (BM25 over the
    candidates when the data has none). Writes nothing."""
    from kdlab.data.readers import RankingGroup, with_scores
    from kdlab.data.sources import as_source, read_source
    from kdlab.errors import ConfigError

    prepared: dict[str, list[Any]] = {}
    user_files: dict[str, str | None] = {}
    first_stage: dict[str, dict[str, Any]] = {}
    for split, value in (("train", config.train), ("val", config.val), ("test", config.test)):
        source = as_source(value, split, sample=f"ranking_{split}.jsonl")
        data = read_source(source, split)
        groups, info = data.groups, dict(data.first_stage)
        limit = {"train": config.max_train_queries, "test": config.max_eval_queries,
                 "val": config.max_eval_queries if config.max_val_queries is None else config.max_val_queries}[split]
        offset = config.test_query_offset if split == "test" else 0
        if limit is not None or offset:
            groups = groups[offset:None if limit is None else offset + limit]
            if not groups:
                field_name = {"train": "max_train_queries", "test": "max_eval_queries",
                              "val": "max_eval_queries" if config.max_val_queries is None else "max_val_queries"}[split]
                cut = f"test_query_offset={offset}, {field_name}={limit}" if offset else f"{field_name}={limit}"
                raise ConfigError(f"{source.label()}: no queries left after {cut}; expected at least one")
        if split == "test" and any(d.first_stage_score is None for g in groups for d in g.docs):
            from kdlab.data.first_stage import BM25Options, bm25_candidate_scores, describe

            options = BM25Options(k1=source.bm25_k1, b=source.bm25_b)
            scores = bm25_candidate_scores(groups, options)
            groups = [RankingGroup(g.query_id, g.query, tuple(with_scores(d, first_stage_score=s)
                                                              for d, s in zip(g.docs, row)))
                      for g, row in zip(groups, scores)]
            info = {"kind": "bm25-candidates", **describe(options)}
        first_stage[split] = info
        prepared[split] = groups
        user_files[split] = str(source.path) if source.format == "jsonl" and groups is data.groups else None
    labeled_train = None
    if config.max_label_queries is not None:
        available = len(prepared["train"])
        if config.max_label_queries > available:
            raise ConfigError(f"max_label_queries: expected at most {available} (the training queries the teacher "
                              f"is trained on) or null, got {config.max_label_queries}")
        labeled_train = prepared["train"][:config.max_label_queries]
    name = config.pre_ranker_name or _pre_ranker_name(first_stage["test"])
    return PreparedData(prepared, user_files, first_stage, name, labeled_train)


LABELED_TRAIN = "train_labeled"  # the training queries the teacher labels (max_label_queries): their data/ file, report row


def _pre_ranker_name(info: dict[str, Any]) -> str:
    kind = info.get("kind")
    if kind == "run":
        return f"first-stage run ({Path(str(info['run'])).name})"
    if kind in ("bm25", "bm25-candidates"):
        where = "the collection" if kind == "bm25" else "the candidates"
        return f"BM25 over {where} (bm25s, k1={info.get('k1')}, b={info.get('b')})"
    return "first-stage scores (from the data)"


def check_steps(config: PipelineConfig, step_args: dict[str, list[str]]) -> None:
    """Parse every step's command line and run its config-time checks now, before the first step
    trains: a typo in the distill config fails here, not after the teachers have trained. Each
    step's data files are read and validated too, except the students' (their teacher-score files
    are written by the pipeline itself)."""
    from kdlab.cli import check_inputs_before_loading, parse_lightning
    from kdlab.cli import _import_class, _init_args

    for name, args in step_args.items():
        cfg = parse_lightning(["fit", *args]).fit
        if name.startswith("student_"):
            stage = _import_class(str(cfg.model.class_path))
            if hasattr(stage, "check_options"):
                stage.check_options(_init_args(cfg.model))
        else:
            check_inputs_before_loading(cfg, "fit")


def label_split(teacher_dir: Path, source: str, output: Path, config: PipelineConfig, dtype: str) -> Path:
    """Teacher scores for one split, written once and reused (resumable, atomic). Several devices
    label through ``python -m kdlab label`` (Lightning relaunches that command once per rank).
    ``dtype``: the precision :func:`label_precision` chose (never ``auto``)."""
    from kdlab.labeling import score_file

    if output.exists():
        return output
    options = {"max_tokens": config.label_max_tokens, "max_length": config.label_max_length,
               "accelerator": config.label_accelerator, "devices": config.label_devices,
               "dtype": dtype, "quantization": config.label_quantization}
    if str(config.label_devices) in ("1", "auto") or config.label_devices == 1:
        score_file(str(teacher_dir), source, str(output), resume=True, **options)
        return output
    import subprocess
    import sys

    args = [sys.executable, "-m", "kdlab", "label", f"--teacher={teacher_dir}", f"--input={source}",
            f"--output={output}", *(f"--{key}={value}" for key, value in options.items() if value is not None)]
    if subprocess.run(args).returncode != 0:
        raise RunFailed(f"labeling {source} failed: {' '.join(args)}")
    return output


LABEL_PRECISION = "precision.json"


def label_precision(pipeline_dir: Path, config: PipelineConfig) -> dict[str, str]:
    """The precision the teacher labels in, ``{"dtype", "reason"}``: ``config.label_dtype`` resolved
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
    dtype, reason = inference_dtype(config.label_dtype, config.label_accelerator)
    chosen = {"dtype": dtype, "reason": reason}
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, chosen)
    return chosen


def _step_commands(config: PipelineConfig, pipeline_dir: Path, splits: dict[str, str]) -> dict[str, list[str]]:
    """Each step's ``fit`` command line, in the order the steps run."""
    common = list(config.step_args.get("all", []))
    last = list(config.step_args.get("all_after", []))
    data_args = [f"--data.init_args.{split}={path}" for split, path in splits.items()]
    label_args = [f"--data.init_args.{split}={path}" for split, path in {**splits, **_label_files(pipeline_dir, config)}.items()]
    cpt_model = pipeline_dir / "cpt" / "model"
    sft_args = [*common, "--config", config.rank_sft_config, *data_args, *config.step_args.get("rank_sft", []), *last]
    step_args: dict[str, list[str]] = {}
    if config.run_no_cpt_baseline:
        step_args["rank_sft_no_cpt"] = sft_args
    step_args["cpt"] = [*common, "--config", config.cpt_config, *config.step_args.get("cpt", []), *last]
    step_args["rank_sft_cpt"] = [*sft_args, f"--model.init_args.backbone={cpt_model}"]
    for variant, extra in config.variants.items():
        step_args[f"student_{slug(variant)}"] = [*common, "--config", config.distill_config, *label_args,
                                                 *config.step_args.get("distill", []), *extra, *last]
    return step_args


def _label_files(pipeline_dir: Path, config: PipelineConfig) -> dict[str, Path]:
    """The teacher-labeled files: the training split's, and the validation split's when ``label_val``."""
    return {split: pipeline_dir / "labels" / f"{split}.jsonl" for split in ("train", "val")
            if split == "train" or config.label_val}


def run_pipeline(config: PipelineConfig) -> Path:
    """Run every step and write the report; returns the path of ``report.md``."""
    start_zygote()  # its imports (the steps' start-up) run beside this process's reading and checking
    prepared = read_ranking_data(config)  # every split validated before anything is written
    fresh = not config.pipeline_dir
    pipeline_dir = new_run_dir(config.root, config.name) if fresh else Path(config.pipeline_dir)  # type: ignore[arg-type]
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    try:
        splits = prepared.write(pipeline_dir)
        label_sources = prepared.label_sources(pipeline_dir, splits, config.label_val)
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
            steps[name] = run_step(name, pipeline_dir, step_args[name])
    teacher_dir = pipeline_dir / "rank_sft_cpt" / "model"
    precision = label_precision(pipeline_dir, config)
    for split, output in labels.items():
        with _timed_step(pipeline_dir, f"labels_{split}", steps, output):
            label_split(teacher_dir, label_sources[split], output, config, precision["dtype"])
    for variant in config.variants:
        step = f"student_{slug(variant)}"
        steps[step] = run_step(step, pipeline_dir, step_args[step])

    from kdlab.evaluation import PRE_RANKER, RANDOM, evaluate_models

    models: dict[str, Path | str] = {"random ordering (mean of 20)": RANDOM, prepared.pre_ranker_name: PRE_RANKER}
    if config.run_no_cpt_baseline:
        models["teacher, no CPT"] = pipeline_dir / "rank_sft_no_cpt" / "model"
    models["teacher, CPT"] = teacher_dir
    # The teachers read the length they were trained on; everything added below reads eval_max_length.
    teacher_length = config.teacher_length
    lengths = {name: teacher_length for name, spec in models.items() if spec not in (RANDOM, PRE_RANKER)}
    for variant in config.variants:
        models[f"student, {variant}"] = pipeline_dir / f"student_{slug(variant)}" / "model"
    scores: dict[str, list[list[float]]] = {}
    with _timed_step(pipeline_dir, "evaluation", steps, pipeline_dir / "report.md", always=True):
        rows = evaluate_models(models, splits["test"], max_length=config.eval_max_length, max_lengths=lengths,
                               gain=config.gain,
                               scores_out=scores, device=config.eval_device, dtype=config.eval_dtype,
                               interleaved=config.eval_interleaved)
    evidence = review_figures(rows, scores, splits["test"], pipeline_dir, config, prepared.pre_ranker_name)
    evidence["label_dtype"] = precision
    total, steal = time.perf_counter() - started, steal_share(counters, cpu_time_counters())
    sizes = data_sizes(prepared.groups if prepared.labeled_train is None
                       else {**prepared.groups, LABELED_TRAIN: prepared.labeled_train})
    return write_report(pipeline_dir, config, rows, steps, total, sizes, evidence, steal)


def _length_sentence(config: PipelineConfig) -> str:
    """The report's statement of how many tokens of each (query, document) pair each model read."""
    teacher = config.teacher_length
    if teacher == config.eval_max_length:
        return f"Every model reads at most {teacher} tokens per (query, document) pair."
    return (f"The teachers read at most {teacher} tokens per (query, document) pair, the students "
            f"{config.eval_max_length} (each at the length it was trained on; ms / query is timed so).")


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
    per_query = {name: [m[key] if m else None for m in per_query_ranking_metrics(list(zip(s, labels)), EVAL_K, config.gain)]
                 for name, s in scores.items()}
    test = paired_randomization_test if config.significance == "randomization" else paired_t_test
    for row in rows:
        mine = per_query.get(row["model"])
        for column, other in (("p_vs_teacher", "teacher, CPT"), ("p_vs_pre_ranker", pre_ranker_name)):
            theirs = per_query.get(other)
            if mine is None or theirs is None or other == row["model"]:
                continue
            pairs = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
            row[column] = test([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 2 else None

    evidence: dict[str, Any] = {"gain": config.gain, "significance": config.significance,
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
            queries, kdlab_figures={k: row[k] for k in (key, f"mrr@{EVAL_K}")}, k=EVAL_K, gain=config.gain,
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
             f"Held-out test split. NDCG@10 with {config.gain} gain "
             f"({'rel, as trec_eval' if config.gain == 'linear' else '2^rel − 1'}), a model's score ties averaged "
             "(the pre-ranker's ranking is strict: its score, then its own order); "
             "PNR = concordant / discordant pairs of one query with different labels (score ties count neither way). "
             f"p = per-query paired {'randomisation test (10 000 sign flips)' if config.significance == 'randomization' else 't-test'} "
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
    if sizes:
        lines += ["", "## Data", "", "| split | queries | (query, doc) pairs |", "|---|---|---|"]
        names = {"train": "train (teacher rank SFT)", LABELED_TRAIN: "train, labeled by the teacher (students)"}
        if LABELED_TRAIN not in sizes:
            names["train"] = "train"
        lines += [f"| {names.get(split, split)} | {q} | {d} |" for split, (q, d) in sizes.items()]
        if evidence.get("label_dtype"):
            chosen = evidence["label_dtype"]
            lines += ["", f"The teacher labeled the students' training queries in {chosen['dtype']} ({chosen['reason']})."]
        if config.test_query_offset:
            lines += ["", f"The test split is queries {config.test_query_offset + 1}–"
                          f"{config.test_query_offset + sizes['test'][0]} of its file (`test_query_offset`)."]
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


def review_checks(rows: list[dict[str, Any]], config: PipelineConfig, evidence: dict[str, Any]) -> list[str]:
    """The report's checks, one line each, and a verdict that says plainly when the recipe did not
    work here: a teacher at or below the pre-ranker (or not significantly above it) makes every
    student's ratio-to-teacher check a failure too, and a student below the pre-ranker fails
    whatever its ratio to the teacher."""
    by_name = {r["model"]: r for r in rows}
    teacher, no_cpt = by_name.get("teacher, CPT"), by_name.get("teacher, no CPT")
    pre_ranker = by_name.get(evidence.get("pre_ranker", ""))
    chance = next((r for r in rows if r["model"].startswith("random")), None)
    alpha, key = config.significance_level, "ndcg@10"
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
        if ratio < config.min_student_ratio:
            problems.append(f"below {config.min_student_ratio:.0%} of the teacher")
        if speedup is not None and speedup < config.min_student_speedup:
            problems.append(f"less than {config.min_student_speedup:g}× faster")
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
                     f"keeps ≥ {config.min_student_ratio:.0%} of it at ≥ {config.min_student_speedup:g}× the speed."
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
