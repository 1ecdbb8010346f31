"""Corpus BLEU as sacreBLEU computes it, accumulated as a torchmetrics ``Metric``.

torchmetrics' ``BLEUScore`` is unsmoothed: one missing 4-gram match in the whole corpus makes it 0,
which is what short generations of small models get. :class:`SacreBLEU` keeps sacreBLEU's
sufficient statistics and scores them with sacreBLEU's own formula and smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SacreBLEU"]

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
