"""What ``kdlab pipeline`` is told, grouped as a user thinks of it.

A pipeline YAML has five sections beside its name: ``recipe`` (the steps and their LightningCLI
configs), ``data`` (``train`` / ``val`` / ``test``), ``budget`` (query caps and token lengths: what
a time budget trades), ``hardware`` (where and in which precision the teacher labels and the models
are evaluated) and ``report`` (its thresholds and tests). A user who brings their own data writes
only ``data:``. The keys of the earlier flat file are refused with one line naming their new place
(:data:`MOVED_PIPELINE_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from kdlab.data.sources import RankingSource
from kdlab.defaults import LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH
from kdlab.errors import ConfigError

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "hybrid": [],
    "point-only": ["--model.init_args.beta=0"],
    "margin-only": ["--model.init_args.alpha=0"],
    "hybrid+TCL": ["--model.init_args.use_tcl=true"],
}


@dataclass
class RecipeConfig:
    """The steps and their configs; each ``*_config`` is a LightningCLI YAML for one step.

    Args:
        cpt_config: YAML for TeacherCPT on click logs.
        rank_sft_config: YAML for TeacherRankSFT (its ``backbone`` is the teacher without CPT).
        distill_config: YAML for RankDistillStudent (its data paths are replaced by the labels).
        step_args: extra CLI arguments per step: keys ``cpt``, ``rank_sft``, ``distill`` (after the
            step's own config: they win), ``all`` (before every step's config, e.g. a shared base
            YAML: the step's config wins over it) and ``all_after`` (after everything: wins).
        variants: student variant name → extra CLI arguments for the distill step.
        run_no_cpt_baseline: also train the teacher without CPT (the report's first row).
        fallbacks: never worse than the start (:mod:`kdlab.pipeline.fallbacks`): the untouched
            student backbone zero-shot as a bi-encoder, every model interpolated with the first
            stage (α chosen on validation), and the students taught the interpolated teacher when
            the teacher does not beat the first stage on validation. Each is in the report.
    """

    cpt_config: str = "experiments/quickstart/disranker/cpt.yaml"
    rank_sft_config: str = "experiments/quickstart/disranker/rank_sft.yaml"
    distill_config: str = "experiments/quickstart/disranker/distill.yaml"
    step_args: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_VARIANTS.items()})
    run_no_cpt_baseline: bool = True
    fallbacks: bool = True


@dataclass
class DataConfig:
    """Each split's ranking data: a kdlab JSONL path, or a source ``{format: jsonl|msmarco|beir|trec|
    flagembedding, ...}`` (:class:`kdlab.data.sources.RankingSource`; None: the embedded sample).
    Every file is read and validated before the first step; splits that are not kdlab JSONL (or are
    cut by the budget) are written as kdlab JSONL into ``<pipeline dir>/data/``.

    Args:
        train: the teacher's rank-SFT queries (and, labeled by it, the students').
        val: the validation split (best checkpoints).
        test: the held-out split of the report.
        clicks_train / clicks_val: the click logs of the teacher's CPT step (JSONL ``{"query",
            "title", "summary"}``, :class:`~kdlab.data.ClickLogDataModule`); None: what the CPT
            config reads (the embedded sample's).
    """

    train: RankingSource | str | None = None
    val: RankingSource | str | None = None
    test: RankingSource | str | None = None
    clicks_train: str | None = None
    clicks_val: str | None = None


@dataclass
class BudgetConfig:
    """How much of the data each step reads, and how many tokens: what a time budget trades.

    Args:
        max_train_queries / max_eval_queries: use only the first N queries of the training /
            validation and test files (the subsets are written into the pipeline directory and
            their sizes printed in the report) — to fit a large teacher into a time budget.
        max_val_queries: the validation split's own cut when it should differ from the test split's
            (e.g. a small validation split that the teacher labels quickly and a large test split
            whose per-query significance test has power); None: ``max_eval_queries``.
        max_label_queries: the teacher labels, and the students train on, only the first N of the
            training queries the teacher was trained on (None: all of them). Rank SFT costs the
            same per step whatever the number of queries, labeling and student training cost per
            query: a teacher that sees more distinct queries overfits less, at no cost in time.
        label_val: the teacher also labels the validation split, and the students validate on
            that file (True); False: the students validate on the validation split as it is —
            their validation metrics read only its relevance labels, so this saves the teacher's
            pass over it.
        test_query_offset: skip this many queries of the test file before taking
            ``max_eval_queries`` (e.g. a fresh held-out slice for a confirmation run after an
            earlier run's test queries were looked at).
        label_max_tokens / label_max_length: teacher scoring (padded tokens per forward pass,
            tokens per pair).
        eval_max_length: tokens per (query, doc) when evaluating the students.
        teacher_eval_max_length: tokens per (query, doc) when evaluating the teachers; None:
            ``eval_max_length``. Each model is timed at the length it was trained for when these
            differ (e.g. a teacher trained on 96 tokens, students on 64); the report says so.
    """

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

    def __post_init__(self) -> None:
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
class HardwareConfig:
    """Where, and in which precision, the teacher labels and the models are evaluated.

    Args:
        label_accelerator / label_devices / label_dtype / label_quantization: where and how the
            teacher labels the candidates (several devices run data parallel through
            ``python -m kdlab label``; the file is the same as one device's). ``label_dtype: auto``
            labels in bf16 where the hardware runs it natively (:func:`kdlab.machine.inference_dtype`),
            else fp32; the report says which.
        eval_device / eval_dtype: where the held-out evaluation scores every model.
        eval_interleaved: every model loaded at once and timed query by query in turn (fair speed
            ratios on a shared machine); False loads one model at a time (less memory: large
            teachers on one GPU).
        train_accelerator / train_devices / num_nodes: where every training step runs
            (``--trainer.accelerator/devices/num_nodes`` of each ``fit``; DDP when more than one
            process); None keeps each step config's own. ``num_nodes`` applies to labeling too.
        launcher: the command that starts each training and labeling step on every process, put
            before ``python -m kdlab ...`` — ``[srun]`` inside a SLURM allocation (Lightning's
            SLURM environment reads the ranks srun gives), ``[torchrun, --nproc-per-node=8,
            --no-python]`` on one machine. Empty: the step runs as one process (Lightning starts
            the other local ranks itself). The pipeline's own work (data, evaluation, report) runs
            in the process that runs ``kdlab pipeline``: docs/cluster.md.
    """

    label_accelerator: str = "auto"
    label_devices: int | str = 1
    label_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    label_quantization: Literal["8bit", "4bit"] | None = None
    eval_device: str = "cpu"
    eval_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_interleaved: bool = True
    train_accelerator: str | None = None
    train_devices: int | str | None = None
    num_nodes: int = 1
    launcher: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"hardware.num_nodes: expected an integer >= 1, got {self.num_nodes!r}")
        if self.num_nodes > 1 and not self.launcher:
            raise ConfigError("hardware.num_nodes > 1 needs hardware.launcher (e.g. [srun] inside a SLURM "
                              "allocation): something must start the steps on the other nodes (docs/cluster.md)")

    def train_args(self) -> list[str]:
        """The ``fit`` arguments that put a training step where this section says."""
        args = [f"--trainer.accelerator={self.train_accelerator}"] if self.train_accelerator else []
        if self.train_devices is not None:
            args.append(f"--trainer.devices={self.train_devices}")
        if self.num_nodes > 1:
            args.append(f"--trainer.num_nodes={self.num_nodes}")
        if self.num_nodes > 1 or str(self.train_devices) not in ("None", "1", "auto"):
            args.append("--trainer.strategy=ddp")
        return args


@dataclass
class ReportConfig:
    """What the report checks, and how it tests.

    Args:
        min_student_ratio: the report checks student NDCG@10 ≥ this × teacher NDCG@10.
        min_student_speedup: ... and the student ≥ this many times faster per query than the teacher.
        significance_level: the p-value below which the report calls a difference significant.
        pre_ranker_name: the report's name for the first-stage row (default: says where the scores
            come from: the run file, BM25 over the collection, or BM25 over the candidates).
        gain: NDCG's gain, ``linear`` (``rel``, as trec_eval) or ``exponential`` (``2^rel − 1``).
        significance: the per-query paired test of each model's NDCG@10 against the teacher and the
            pre-ranker: ``randomization`` (sign-flip, 10 000 draws) or ``t-test``.
    """

    min_student_ratio: float = 0.9
    min_student_speedup: float = 5.0
    significance_level: float = 0.05
    pre_ranker_name: str | None = None
    gain: Literal["linear", "exponential"] = "linear"
    significance: Literal["randomization", "t-test"] = "randomization"


@dataclass
class PipelineConfig:
    """Everything ``kdlab pipeline`` needs (module docstring: the sections).

    Args:
        name: pipeline name; its directory is ``root/name/<time>-<id>`` unless ``pipeline_dir``.
        root: where pipeline directories go.
        pipeline_dir: an existing pipeline directory to resume (finished steps are skipped).
        recipe: the steps and their configs.
        data: the train / val / test splits, in any format.
        budget: query caps and token lengths.
        hardware: labeling and evaluation devices and precisions.
        report: the report's thresholds and tests.
    """

    name: str = "disranker"
    root: str = "runs/pipelines"
    pipeline_dir: str | None = None
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


SECTIONS: dict[str, type] = {"recipe": RecipeConfig, "data": DataConfig, "budget": BudgetConfig,
                             "hardware": HardwareConfig, "report": ReportConfig}

MOVED_PIPELINE_KEYS: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
"""A key of the earlier flat pipeline file → the section it belongs to now."""


def moved_pipeline_key_message(key: str) -> str | None:
    """The one line that says where an earlier flat key goes now (None: not such a key)."""
    section = MOVED_PIPELINE_KEYS.get(key)
    if section is None:
        return None
    return (f"pipeline key '{key}' now belongs to the `{section}:` section: write `{section}: {{{key}: ...}}` in "
            f"the YAML (or --{section}.{key}=VALUE)")
