"""The pipeline's data: every split read, validated and cut before the first step, written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.pipeline.config import PipelineConfig
from kdlab.runs import write_json_atomic

LABELED_TRAIN = "train_labeled"  # the training queries the teacher labels (max_label_queries): their data/ file, report row


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
    the splits to ``max_*_queries`` and give every validation and test candidate a first-stage score (BM25 over the
    candidates when the data has none). Writes nothing."""
    from kdlab.data.readers import RankingGroup, with_scores
    from kdlab.data.sources import as_source, read_source
    from kdlab.errors import ConfigError

    prepared: dict[str, list[Any]] = {}
    user_files: dict[str, str | None] = {}
    first_stage: dict[str, dict[str, Any]] = {}
    for split, value in (("train", config.data.train), ("val", config.data.val), ("test", config.data.test)):
        source = as_source(value, split, sample=f"ranking_{split}.jsonl")
        data = read_source(source, split)
        groups, info = data.groups, dict(data.first_stage)
        limit = {"train": config.budget.max_train_queries, "test": config.budget.max_eval_queries,
                 "val": config.budget.max_eval_queries if config.budget.max_val_queries is None else config.budget.max_val_queries}[split]
        offset = config.budget.test_query_offset if split == "test" else 0
        if limit is not None or offset:
            groups = groups[offset:None if limit is None else offset + limit]
            if not groups:
                field_name = {"train": "max_train_queries", "test": "max_eval_queries",
                              "val": "max_eval_queries" if config.budget.max_val_queries is None else "max_val_queries"}[split]
                cut = f"test_query_offset={offset}, {field_name}={limit}" if offset else f"{field_name}={limit}"
                raise ConfigError(f"{source.label()}: no queries left after {cut}; expected at least one")
        if split in ("val", "test") and any(d.first_stage_score is None for g in groups for d in g.docs):
            from kdlab.data.first_stage import (
                BM25Options,
                bm25_candidate_scores,
                describe,
            )

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
    if config.budget.max_label_queries is not None:
        available = len(prepared["train"])
        if config.budget.max_label_queries > available:
            raise ConfigError(f"max_label_queries: expected at most {available} (the training queries the teacher "
                              f"is trained on) or null, got {config.budget.max_label_queries}")
        labeled_train = prepared["train"][:config.budget.max_label_queries]
    name = config.report.pre_ranker_name or _pre_ranker_name(first_stage["test"])
    return PreparedData(prepared, user_files, first_stage, name, labeled_train)


def _pre_ranker_name(info: dict[str, Any]) -> str:
    kind = info.get("kind")
    if kind == "run":
        return f"first-stage run ({Path(str(info['run'])).name})"
    if kind in ("bm25", "bm25-candidates"):
        where = "the collection" if kind == "bm25" else "the candidates"
        return f"BM25 over {where} (bm25s, k1={info.get('k1')}, b={info.get('b')})"
    return "first-stage scores (from the data)"
