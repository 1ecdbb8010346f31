"""Generation metrics: corpus BLEU as sacreBLEU computes it, the KETCHUP paper's tasks and their main
metrics, and :class:`TaskMetrics`, which computes every task's metric in one pass.

torchmetrics' ``BLEUScore`` is unsmoothed: one missing 4-gram match in the whole corpus makes it 0,
which is what short generations of small models get. :class:`SacreBLEU` keeps sacreBLEU's
sufficient statistics and scores them with sacreBLEU's own formula and smoothing.

The paper's tasks (**[code/README]** ``jiabinfan/KETCHUP``; ``../shared/PAPERS.md`` §3), each with the
metric its headline table reports, in :data:`TASKS`:

========================  ===============================  ==========================================
task                      metric (key of ``compute()``)    as the released code computes it
========================  ===============================  ==========================================
``summarization`` (XSum)  ROUGE-1 F (``rouge1``)           HF ``rouge`` (``rouge_score``), no stemmer;
                                                           its ``evaluation.py`` prints the bootstrap
                                                           aggregate's ``high`` F; kdlab (torchmetrics
                                                           ``ROUGEScore``) the mean F over segments
``translation`` (EN→NL)   BLEU-4 (``bleu``)                ``sacrebleu.corpus_bleu`` defaults: 13a
                                                           tokens, exp smoothing, order 4 (0–100;
                                                           kdlab 0–1)
``math`` (GSM8K)          answer accuracy (``accuracy``)   final number after ``#+``; kdlab also reads
                                                           "answer is" / the last number
                                                           (:mod:`kdlab.metrics.answers`)
========================  ===============================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.text.rouge import ROUGEScore

from kdlab.metrics.answers import AnswerAccuracy

__all__ = [
    "GENERATION_METRIC_KEYS", "TASKS", "SacreBLEU", "TaskMetrics", "TaskName", "main_generation_metric",
    "resolve_val_metric",
]

SmoothMethod = Literal["exp", "floor", "add-k", "none"]


class SacreBLEU(Metric):
    """Corpus BLEU of sacreBLEU (``sacrebleu.corpus_bleu(preds, refs).score / 100``), on a **0–1**
    scale (not sacreBLEU's 0–100) so that it sits beside ROUGE F-measures.

    ``BLEU = BP · exp((1/N) Σ_{n=1..N} log p_n)``, ``p_n = matches_n / total_n`` (clipped n-gram
    matches over hypothesis n-grams, summed over the corpus), ``BP = min(1, exp(1 − ref_len /
    hyp_len))`` with ``ref_len`` the closest reference length per segment, ``N = max_ngram_order``.
    ``smooth_method``: sacreBLEU's ``"exp"`` (default; the k-th order with 0 matches gets
    ``p_n = 1 / (2^k · total_n)``), ``"floor"``, ``"add-k"`` or ``"none"``. Text is tokenised with
    sacreBLEU's tokeniser (``"13a"``, its default).

    States are the integer statistics (``matches``, ``totals`` per order, ``hyp_len``, ``ref_len``)
    in ``sum`` states, so the value under DDP equals the single-process value. With no input the
    score is 0.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    matches: Tensor
    totals: Tensor
    hyp_len: Tensor
    ref_len: Tensor

    def __init__(
        self,
        smooth_method: SmoothMethod = "exp",
        smooth_value: float | None = None,
        tokenize: str = "13a",
        lowercase: bool = False,
        max_ngram_order: int = 4,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        from sacrebleu.metrics import BLEU

        if smooth_method not in BLEU.SMOOTH_DEFAULTS:
            raise ValueError(f"smooth_method must be one of {sorted(BLEU.SMOOTH_DEFAULTS)}, got {smooth_method!r}")
        if not (isinstance(max_ngram_order, int) and max_ngram_order >= 1):
            raise ValueError(f"max_ngram_order must be a positive integer, got {max_ngram_order!r}")
        self.smooth_method = smooth_method
        self.smooth_value = smooth_value
        self.max_ngram_order = max_ngram_order
        # Statistics are extracted unsmoothed ("none" never alters the counts; "add-k" would add
        # to them) through the public corpus_score; force=True silences sacreBLEU's "tokenized
        # period" warning, which would repeat on every batch and does not change the statistics.
        self._extractor = BLEU(
            tokenize=tokenize, lowercase=lowercase, smooth_method="none",
            max_ngram_order=max_ngram_order, force=True,
        )
        self.add_state("matches", default=torch.zeros(max_ngram_order, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("totals", default=torch.zeros(max_ngram_order, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hyp_len", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ref_len", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        """Add hypotheses ``preds[i]`` with their references ``target[i]`` (one or more strings each,
        torchmetrics' layout)."""
        if isinstance(preds, str) or len(preds) != len(target):
            raise ValueError(
                f"preds must be a sequence of strings as long as target; got {len(preds)} and {len(target)}"
            )
        if len(preds) == 0:
            return
        if any(isinstance(refs, str) or len(refs) == 0 for refs in target):
            raise ValueError("each target entry must be a non-empty sequence of reference strings")
        # sacreBLEU takes reference *streams* (refs[j][i]: j-th reference of segment i); a segment
        # with fewer references is padded with None, which sacreBLEU skips
        n_refs = max(len(refs) for refs in target)
        streams = [[refs[j] if j < len(refs) else None for refs in target] for j in range(n_refs)]
        stats = self._extractor.corpus_score(list(preds), streams)
        self.matches += torch.tensor(stats.counts, dtype=torch.long, device=self.matches.device)
        self.totals += torch.tensor(stats.totals, dtype=torch.long, device=self.totals.device)
        self.hyp_len += int(stats.sys_len)
        self.ref_len += int(stats.ref_len)

    def compute(self) -> Tensor:
        """sacreBLEU's ``compute_bleu`` on the summed statistics, divided by 100."""
        from sacrebleu.metrics import BLEU

        score = BLEU.compute_bleu(
            correct=[int(c) for c in self.matches.tolist()],
            total=[int(t) for t in self.totals.tolist()],
            sys_len=int(self.hyp_len),
            ref_len=int(self.ref_len),
            smooth_method=self.smooth_method,
            smooth_value=self.smooth_value,
            max_ngram_order=self.max_ngram_order,
        ).score
        return torch.tensor(score / 100.0, dtype=torch.float32, device=self.matches.device)


# --------------------------------------------------------------------------------------------------
# The paper's tasks and the validation metric


TaskName = Literal["summarization", "translation", "math"]

#: task → the key of :meth:`TaskMetrics.compute` that the paper's headline table reports for it
#: (**[code/README]**: XSum ROUGE-1, EN→NL BLEU-4, GSM8K accuracy). kdlab's stage has always
#: selected checkpoints by ``rougeL``; that stays its default (:func:`resolve_val_metric`).
TASKS: dict[str, str] = {"summarization": "rouge1", "translation": "bleu", "math": "accuracy"}

#: every key :meth:`TaskMetrics.compute` can return, each higher-is-better except ``gen_length``
GENERATION_METRIC_KEYS: tuple[str, ...] = (
    "rouge1", "rouge2", "rougeL", "bleu", "accuracy", "gen_length", "teacher_logprob",
)
_SELECTABLE = tuple(k for k in GENERATION_METRIC_KEYS if k != "gen_length")  # no direction to optimise


def main_generation_metric(task: TaskName) -> tuple[str, str]:
    """``(key, "max")``: the metric the paper reports for ``task`` and its direction, e.g.
    ``main_generation_metric("math") == ("accuracy", "max")``. The key has no split prefix
    (the stage logs it as ``val/<key>``). Unknown task → ``ValueError`` naming the choices."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(get_args(TaskName))}, got {task!r}")
    return TASKS[task], "max"


def resolve_val_metric(val_metric: str | None = None, task: TaskName | None = None,
                       default: str = "rougeL") -> tuple[str, str]:
    """The validation metric a stage selects checkpoints by, as ``(key, "max")``.

    An explicit ``val_metric`` (a key of :data:`GENERATION_METRIC_KEYS` other than ``gen_length``,
    with or without a ``val/`` prefix) wins; else ``task``'s main metric
    (:func:`main_generation_metric`); else ``default`` (``rougeL``: what the stage has always used).
    Bad names raise ``ValueError`` with one line naming the choices.
    """
    if val_metric is not None:
        key = val_metric.removeprefix("val/")
        if key not in _SELECTABLE:
            raise ValueError(f"val_metric must be one of {list(_SELECTABLE)}, got {val_metric!r}")
        return key, "max"
    if task is not None:
        return main_generation_metric(task)
    return resolve_val_metric(default)


class TaskMetrics(nn.Module):
    """Every metric of the paper's three tasks for one evaluation split, in one object: ROUGE-1/2/L
    F-measures, sacreBLEU BLEU-4 (0–1), answer accuracy (0–1), mean generation length and the
    teacher's mean log-likelihood of the student's tokens.

    A superset of the stage's ``GenerationMetrics`` with the same attributes (``rouge``, ``bleu``,
    ``teacher_logprob``, ``gen_length``) plus ``accuracy`` (:class:`~kdlab.metrics.answers.AnswerAccuracy`);
    :meth:`update` feeds the three text metrics at once (accuracy costs a regex per string).
    ``gen_length`` and ``teacher_logprob`` are updated by the caller, as before.

    :meth:`compute` returns ``rouge1``, ``rouge2``, ``rougeL``, ``bleu``, ``gen_length``, plus
    ``accuracy`` when it was updated (always through :meth:`update`) and ``teacher_logprob`` when a
    teacher scored anything. All states are torchmetrics states with ``sum`` reductions, so values
    under DDP equal single-process values. ``strict_answers``: see ``AnswerAccuracy(strict=...)``.
    """

    def __init__(self, strict_answers: bool = False) -> None:
        super().__init__()
        self.rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        self.bleu = SacreBLEU()
        self.accuracy = AnswerAccuracy(strict=strict_answers)
        self.teacher_logprob = MeanMetric()
        self.gen_length = MeanMetric()

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Add generations ``preds[i]`` with one reference ``targets[i]`` each to ROUGE, BLEU and
        answer accuracy."""
        preds, targets = list(preds), list(targets)
        self.rouge.update(preds, targets)
        self.bleu.update(preds, [[t] for t in targets])
        self.accuracy.update(preds, targets)

    def compute(self) -> dict[str, Tensor]:
        rouge = self.rouge.compute()
        out = {key: rouge[f"{key}_fmeasure"] for key in ("rouge1", "rouge2", "rougeL")}
        out["bleu"] = self.bleu.compute()
        if self.accuracy.update_count > 0:
            out["accuracy"] = self.accuracy.compute()
        out["gen_length"] = self.gen_length.compute()
        if self.teacher_logprob.update_count > 0:
            out["teacher_logprob"] = self.teacher_logprob.compute()
        return out

    def reset(self) -> None:
        for metric in (self.rouge, self.bleu, self.accuracy, self.teacher_logprob, self.gen_length):
            metric.reset()
