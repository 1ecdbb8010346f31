"""Small files in every format kdlab reads, made from the embedded sample (no kdlab-specific field).

``experiments/data/fixtures/`` holds their committed copy (``python -m kdlab data fixtures
--output experiments/data/fixtures`` rewrites it; a test checks that it equals a fresh build), so
the ``experiments/data/*.yaml`` configs run from a fresh clone:

* ``beir/``: a BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,dev,test}.tsv``)
  and TREC runs ``beir/run.{train,dev,test}.trec`` (the sample's BM25 scores, tag ``bm25``);
* ``msmarco/``: ``collection.tsv`` (integer pids, title and text joined), ``queries.{split}.tsv``,
  TREC qrels ``qrels.{split}.tsv``, MS MARCO runs ``run.{train,dev}.tsv`` (``qid pid rank``) and a
  TREC run ``run.test.trec`` with scores;
* ``flagembedding/{train,dev}.jsonl``: ``{"query", "pos", "neg"}`` (pos = label > 0).

Qrels list the judged-relevant documents (label > 0), as BEIR and MS MARCO do; every other
candidate counts as 0, which is what the sample's labels say.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kdlab.data.embedded import sample_path
from kdlab.data.readers import RankingGroup, read_ranking_jsonl
from kdlab.runs import write_text_atomic

#: queries per split taken from the start of the sample's files (train, dev, test).
FIXTURE_QUERIES = {"train": 48, "dev": 16, "test": 16}
_SAMPLE_SPLIT = {"train": "train", "dev": "val", "test": "test"}


def _label(value: float | None) -> int:
    return int(round(value or 0.0))


def _trec_run(groups: Sequence[RankingGroup], qid: dict[str, str], pid: dict[str, str]) -> str:
    lines = []
    for g in groups:
        ranked = sorted(g.docs, key=lambda d: (-(d.first_stage_score or 0.0), d.id))
        lines += [f"{qid[g.query_id]} Q0 {pid[d.id]} {rank} {d.first_stage_score} bm25"
                  for rank, d in enumerate(ranked, start=1)]
    return "".join(line + "\n" for line in lines)


def write_fixtures(out_dir: str | Path) -> list[Path]:
    """Write the fixtures (see the module docstring) under ``out_dir``; returns the files written."""
    out = Path(out_dir)
    splits = {split: read_ranking_jsonl(sample_path(f"ranking_{_SAMPLE_SPLIT[split]}.jsonl"))[:n]
              for split, n in FIXTURE_QUERIES.items()}
    docs = {d.id: d for groups in splits.values() for g in groups for d in g.docs}
    written: list[Path] = []

    def put(path: Path, text: str) -> None:
        write_text_atomic(path, text)
        written.append(path)

    # BEIR: the sample's own ids (no whitespace in them).
    same = {key: key for key in docs} | {g.query_id: g.query_id for gs in splits.values() for g in gs}
    put(out / "beir" / "corpus.jsonl", "".join(
        json.dumps({"_id": d.id, "title": d.title, "text": d.body}, ensure_ascii=False) + "\n" for d in docs.values()))
    put(out / "beir" / "queries.jsonl", "".join(
        json.dumps({"_id": g.query_id, "text": g.query}, ensure_ascii=False) + "\n"
        for groups in splits.values() for g in groups))
    for split, groups in splits.items():
        rows = [f"{g.query_id}\t{d.id}\t{_label(d.label)}" for g in groups for d in g.docs if _label(d.label) > 0]
        put(out / "beir" / "qrels" / f"{split}.tsv", "query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in rows))
        put(out / "beir" / f"run.{split}.trec", _trec_run(groups, same, same))

    # MS MARCO: integer ids, as the real collection has.
    pid = {key: str(i) for i, key in enumerate(docs)}
    qid = {g.query_id: str(1000 + i) for i, g in enumerate(g for gs in splits.values() for g in gs)}
    put(out / "msmarco" / "collection.tsv", "".join(
        f"{pid[d.id]}\t{' '.join(f'{d.title} {d.body}'.split())}\n" for d in docs.values()))
    for split, groups in splits.items():
        put(out / "msmarco" / f"queries.{split}.tsv", "".join(f"{qid[g.query_id]}\t{' '.join(g.query.split())}\n"
                                                              for g in groups))
        put(out / "msmarco" / f"qrels.{split}.tsv", "".join(
            f"{qid[g.query_id]} 0 {pid[d.id]} {_label(d.label)}\n" for g in groups for d in g.docs if _label(d.label) > 0))
        if split == "test":
            put(out / "msmarco" / "run.test.trec", _trec_run(groups, qid, pid))
        else:
            lines = []
            for g in groups:
                ranked = sorted(g.docs, key=lambda d: (-(d.first_stage_score or 0.0), d.id))
                lines += [f"{qid[g.query_id]}\t{pid[d.id]}\t{rank}\n" for rank, d in enumerate(ranked, start=1)]
            put(out / "msmarco" / f"run.{split}.tsv", "".join(lines))

    # FlagEmbedding: texts only.
    for split in ("train", "dev"):
        put(out / "flagembedding" / f"{split}.jsonl", "".join(json.dumps({
            "query": g.query,
            "pos": [d.text for d in g.docs if _label(d.label) > 0],
            "neg": [d.text for d in g.docs if _label(d.label) == 0],
        }, ensure_ascii=False) + "\n" for g in splits[split]))
    return written


__all__ = ["FIXTURE_QUERIES", "write_fixtures"]
