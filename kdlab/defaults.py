"""Defaults shared by several parts of kdlab, named once (standard library only).

A stage's or data module's own knobs keep their defaults in its typed ``__init__`` (that is what
LightningCLI shows); the values here are the ones that more than one place must agree on.
"""

from __future__ import annotations

IGNORE_INDEX: int = -100
"""Label of a token that carries no loss (the prompt, padding): PyTorch's ``ignore_index`` default."""

PAIR_MAX_LENGTH: int = 192
"""Tokens per (query, document) text when a teacher labels candidates and when exported rankers
are evaluated (``kdlab label``, ``kdlab pipeline``, :mod:`kdlab.evaluation`)."""

LABEL_BATCH_TOKENS: int = 6144
"""Padded tokens per teacher forward pass when labeling (length-sorted pairs packed up to this
budget: 32 pairs of ``PAIR_MAX_LENGTH`` tokens, many more short ones)."""

LABEL_CHUNK_GROUPS: int = 64
"""Query groups labelled and durably appended to the partial output per chunk (listwise labels)."""

EVAL_K: int = 10
"""The cut-off of NDCG@k / MRR@k in logged metrics and reports."""

EVAL_WARMUP_QUERIES: int = 3
"""Queries scored before latency is timed when evaluating an exported ranker."""

RANDOM_ORDER_DRAWS: int = 20
"""Seeded shuffles averaged for the "random ordering" row of a ranking report."""

__all__ = [
    "EVAL_K", "EVAL_WARMUP_QUERIES", "IGNORE_INDEX", "LABEL_BATCH_TOKENS", "LABEL_CHUNK_GROUPS",
    "PAIR_MAX_LENGTH", "RANDOM_ORDER_DRAWS",
]
