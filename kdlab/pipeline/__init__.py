"""``python -m kdlab pipeline``: the DisRanker recipe end to end, with an honest report.

Before anything trains, every split is read from the user's files in any format
(:mod:`kdlab.data.sources`; errors name their file and line) and every step's command line is
parsed and checked (options, click logs); a mistake leaves no pipeline directory. Then the steps
(each a ``python -m kdlab fit`` process with its own run directory inside the pipeline directory,
so every step leaves the same record as a hand-run one and DDP launchers re-run the right command):

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

Where it lives: :mod:`~kdlab.pipeline.config` (what a pipeline YAML says, in sections),
:mod:`~kdlab.pipeline.data` (the splits), :mod:`~kdlab.pipeline.run` (the steps),
:mod:`~kdlab.pipeline.report` (the report and its checks).
"""

from kdlab.pipeline.config import (
    BudgetConfig,
    DataConfig,
    HardwareConfig,
    PipelineConfig,
    RecipeConfig,
    ReportConfig,
)
from kdlab.pipeline.run import pipeline_command, run_pipeline

__all__ = ["BudgetConfig", "DataConfig", "HardwareConfig", "PipelineConfig", "RecipeConfig", "ReportConfig",
           "pipeline_command", "run_pipeline"]
